"""Command line: python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=DIR

Any config field can be overridden: --config.optim.lr=1e-3 --config.train.steps=50.
A config file may take an argument: --config=configs/pretrain_tiny.py:smoke.
Running again with the same --workdir resumes from its latest checkpoint.
Bad input (a missing config file, an unknown key, data or a checkpoint lmjax cannot use)
prints one line, `error: <reason>`, and exits with code 2; --verbose (or LMJAX_VERBOSE=1)
adds the traceback.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax import config as config_lib
from lmjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, logs.')
_VERBOSE = flags.DEFINE_bool('verbose', False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {argv[1:]} (flags are --NAME=VALUE; see --helpshort)')
  logging.getLogger('absl').setLevel(logging.WARNING)
  return cli.run(_train, _CONFIG.value, _WORKDIR.value, show_traceback=_VERBOSE.value)


def _train(cfg, workdir: str) -> int:
  config_lib.validate(cfg)
  from lmjax import distributed  # imported late: flag errors come before jax starts.
  distributed.initialize(cfg)  # before any device is touched
  from lmjax.train import loop
  loop.train(cfg, workdir)
  return 0


def _parse_flags(argv):
  """absl parsing, with bad input (a config file that is missing or fails to build, a typo
  in a --config.KEY override, a value of the wrong type) reported as one line, exit code
  2, rather than a traceback: the config and its overrides are tried once here first, by
  lmjax.config (the same ml_collections parsing, its errors as ConfigError)."""
  config_file, overrides, _ = config_lib.split_args(argv[1:])
  try:
    if config_file:
      config_lib.apply_flags(config_lib.build(config_file), overrides)
  except UserError as e:
    cli.report(e, cli.verbose(argv[1:]))
    raise SystemExit(cli.BAD_INPUT) from None
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(f'{e} (see --helpshort)')


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
