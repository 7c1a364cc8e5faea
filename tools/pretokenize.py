"""Tokenizes a config's pretraining data once, into array_record files (data/tokenized.py).

  python tools/pretokenize.py --config=configs/pretrain_tiny.py [--splits=train,validation] \\
      [--threads=N] [--config.KEY=VALUE ...]

Every source of the config (data, or each data.mixture / data.eval_sources entry) and
split is written to <data_dir>/tokenized/<source>-<key>/ with the run's tokenizer (the
config's, or init_from's when the config starts from another run); existing copies are
reused. A run with --config.data.pretokenize=True then reads ids instead of text. On a
multi-host pod, run this once (on a shared data_dir) before launching. Prints documents,
tokens and tokens/s per split. Bad input: one line, `error: <reason>`, exit code 2
(--verbose: with the traceback).
"""

import argparse
import sys

from lmjax import cli


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', required=True, help='experiment config (configs/*.py[:arg])')
  parser.add_argument('--splits', default=None,
                      help='comma-separated (default: data.train_split,data.eval_split)')
  parser.add_argument('--threads', type=int, default=None,
                      help='tokenizer threads (default: data.worker_threads)')
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  from lmjax import config as config_lib
  cfg = config_lib.load(args.config, flags=rest)
  if cfg.stage != 'pretrain':
    raise config_lib.ConfigError(f"stage={cfg.stage!r}: pretokenize is for the pretraining "
                                 'pipeline (cfg.data)')
  from lmjax import weights  # imported once the config is checked
  from lmjax.data import pipeline, tokenized
  from lmjax.data import tokenizer as tokenizer_lib
  source = weights.open_init_source(cfg.init_from) if cfg.init_from.path else None
  tok = tokenizer_lib.run_tokenizer(cfg, None, source)
  d = cfg.data
  splits = args.splits.split(',') if args.splits else [d.train_split, d.eval_split]
  groups = config_lib.eval_sources(d)  # the mixture's sources and the extra eval sets
  if not config_lib.mixture_sources(d):
    groups = {'data': d, **groups}
  threads = args.threads or max(int(d.worker_threads), 1)
  for name, group in groups.items():
    for split in splits:
      split = pipeline.source_split(d, group, split)
      src = tokenized.get_source(group, split, tok, threads)
      print(f'{name}[{split}]: {src.meta["documents"]} documents, '
            f'{src.meta["tokens"]:,} tokens -> {src.name}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
