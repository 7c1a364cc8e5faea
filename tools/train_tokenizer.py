"""Trains a sentencepiece tokenizer on a config's training split.

  python tools/train_tokenizer.py --config=configs/pretrain_tiny.py [--vocab_size=8192] \
      [--output=PATH]

Without --output the model goes where the config looks for it (tokenizer.path, or the
default path under data.data_dir), so the next training run uses it.
"""

import time

from absl import app, flags
from ml_collections import config_flags

from lmjax import config as config_lib
from lmjax.data import sources, tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the .model file.')
_VOCAB = flags.DEFINE_integer('vocab_size', None, 'Pieces (default: tokenizer.vocab_size).')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _VOCAB.value:
    cfg.tokenizer.vocab_size = _VOCAB.value
  config_lib.check_fields(cfg)
  out = _OUTPUT.value or (cfg.tokenizer.path or tokenizer.default_path(cfg))
  t0 = time.perf_counter()
  tok = tokenizer.train_sentencepiece(
      sources.iter_texts(cfg.data, cfg.data.train_split), out, cfg.tokenizer.vocab_size,
      cfg.tokenizer.model_type, cfg.tokenizer.max_sentences)
  sample = 'def main(argv):\n    return 0\n'
  print(f'trained {tok.vocab_size}-piece {cfg.tokenizer.model_type} tokenizer in '
        f'{time.perf_counter() - t0:.1f}s -> {out}')
  print(f'{sample!r} -> {len(tok.encode(sample))} tokens')


if __name__ == '__main__':
  app.run(main)
