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


def _config_arg(argv) -> str | None:
  """The value of the last --config=PATH[:arg] (or --config PATH[:arg]) in argv."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _parse_flags(argv):
  """absl parsing, with bad input (a config file that is missing or fails to build, a typo
  in a --config.KEY override, a flag value absl refuses) reported as one line, exit code 2,
  rather than a traceback."""
  config_file = _config_arg(argv[1:])
  try:
    if config_file:  # built here first: config_flags would bury its error in a traceback
      path, _, arg = config_file.partition('.py:')
      if arg:
        config_lib.build(path + '.py', arg)
      else:
        config_lib.build(config_file)
    for arg in argv[1:]:
      if arg.startswith('--config.'):
        key = arg[len('--config.'):].split('=', 1)[0]
        if not config_lib.is_known_key(key, config_file):
          raise config_lib.ConfigError(f'unknown config key {key!r} in {arg}'
                                       f'{config_lib.suggest(key, config_file)}')
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
