"""Cleaning the default corpus (this Python's standard library sources) before training.

  python tools/prepare_data.py --config=configs/data/prepare_stdlib.py --out=/tmp/stdlib_clean
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/tiny_clean \\
      --config.data.source=tfds \\
      --config.data.tfds_name=/tmp/stdlib_clean/tfds/prepared_text/stdlib_clean/1.0.0

Code is not prose: Gopher's prose rules (mean word length, symbols per word, lines ending
in punctuation) would remove most of it, so they are off or loosened here; duplicates,
near duplicates (vendored or generated copies), boilerplate-heavy files and encoding junk
go. Decontamination is off (no evaluation text overlaps the stdlib); set
--config.decontam.enabled=True --config.decontam.eval_jsonl=... to use it.
"""

from lmjax.data import quality


def get_config(arg=None):
  del arg
  cfg = quality.default_config()
  cfg.data.update(source='local_text', text_glob='stdlib')
  cfg.name = 'stdlib_clean'
  cfg.workers = 2
  cfg.quality.update(min_words=20, max_words=200_000, min_mean_word_len=2.0,
                     max_mean_word_len=20.0, max_symbol_word_ratio=-1.0, max_digit_frac=0.3,
                     max_dup_line_frac=0.5, max_top_2gram_frac=0.3, max_top_3gram_frac=0.3,
                     max_top_4gram_frac=0.3, max_dup_5gram_frac=0.5, min_punct_line_frac=-1.0)
  cfg.near_dedup.update(threshold=0.8)
  return cfg
