"""Command line: python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=DIR

Any config field can be overridden: --config.optim.lr=1e-3 --config.train.steps=50.
A config file may take an argument: --config=configs/pretrain_tiny.py:smoke.
Running again with the same --workdir resumes from its latest checkpoint.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  cfg = _CONFIG.value
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  from lmjax import distributed  # imported late: flag errors come before jax starts.
  try:
    distributed.initialize(cfg)  # before any device is touched
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  from lmjax.train import loop
  loop.train(cfg, _WORKDIR.value)


def _parse_flags(argv):
  """absl parsing, with typos in --config.KEY overrides reported by key, not traceback."""
  config_file = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if not config_lib.is_known_key(key, config_file):
        sys.exit(f'FATAL: unknown config key {key!r} in {arg}'
                 f'{config_lib.suggest(key, config_file)}')
  return app.parse_flags_with_usage(argv)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
