"""Trains a sentencepiece tokenizer on a config's training split.

  python tools/train_tokenizer.py --config=configs/pretrain_tiny.py [--vocab_size=8192] \\
      [--output=PATH] [--config.data.text_glob='docs/**/*.md' ...]

Without --output the model goes where the config looks for it (tokenizer.path, or
<data_dir>/tokenizers/<dataset>_<model_type>_<vocab>.model), so the next training run
uses it. --config.KEY=VALUE overrides any config field, as for `python -m lmjax.train`.
Prints the time taken and the compression (UTF-8 bytes per token) on the eval split.
Bad input: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

import argparse
import sys

from lmjax import cli
from lmjax import config as config_lib
from lmjax.data import sources, tokenizer


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='experiment config (configs/*.py[:arg])')
  parser.add_argument('--output', default=None, help='where to write the .model file')
  parser.add_argument('--vocab_size', type=int, default=None,
                      help='pieces (default: the config\'s tokenizer.vocab_size)')
  cli.add_verbose_flag(parser)
  return parser.parse_known_args(argv)


@cli.main
def main(argv) -> int:
  args, rest = _parse(argv)
  cfg = config_lib.load(args.config, flags=rest)
  if args.vocab_size:
    # Not validated against model.vocab_size: the tokenizer may serve another config.
    cfg.tokenizer.vocab_size = args.vocab_size
  tok = tokenizer.train_on_config(cfg, path=args.output)
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
