"""Trains a sentencepiece tokenizer on a config's training split.

  python tools/train_tokenizer.py --config=configs/pretrain_tiny.py [--vocab_size=8192] \\
      [--output=PATH] [--config.data.text_glob='docs/**/*.md' ...]

Without --output the model goes where the config looks for it (tokenizer.path, or
<data_dir>/tokenizers/<dataset>_<model_type>_<vocab>.model), so the next training run
uses it. --config.KEY=VALUE overrides any config field, as for `python -m lmjax.train`.
Prints the time taken and the compression (UTF-8 bytes per token) on the eval split.
"""

import argparse
import sys

from lmjax import config as config_lib
from lmjax.data import sources, tokenizer


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='experiment config (configs/*.py[:arg])')
  parser.add_argument('--output', default=None, help='where to write the .model file')
  parser.add_argument('--vocab_size', type=int, default=None,
                      help='pieces (default: the config\'s tokenizer.vocab_size)')
  args, rest = parser.parse_known_args(argv)
  try:
    return args, config_lib.cli_overrides(rest)
  except ValueError as e:
    parser.error(str(e))


def main(argv=None) -> int:
  args, overrides = _parse(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, overrides=overrides)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.vocab_size:
    # Not validated against model.vocab_size: the tokenizer may serve another config.
    cfg.tokenizer.vocab_size = args.vocab_size
  try:
    tok = tokenizer.train_on_config(cfg, path=args.output)
  except ValueError as e:  # sources.DataError included: bad glob, split, vocab size
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    docs = list(sources.iter_texts(cfg.data, cfg.data.eval_split, max_docs=200))
  except sources.DataError:
    docs = []
  if docs:
    n_bytes = sum(len(d.encode('utf-8')) for d in docs)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    print(f'{cfg.data.eval_split!r} ({len(docs)} documents): '
          f'{n_bytes / n_tokens:.2f} bytes/token')
  return 0


if __name__ == '__main__':
  sys.exit(main())
