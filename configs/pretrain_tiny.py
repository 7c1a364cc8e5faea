"""Pretrain a tiny Llama-style model on the Python standard library, on CPU.

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny

Expect (2-core CPU, see docs/benchmarks.md for the measured run): the corpus
(every .py file of this Python's standard library, as a local TFDS dataset) and a
4k sentencepiece tokenizer are built on first use; validation loss falls from
~8.3 to under 5 in a few minutes, and a short code sample is printed at the end.
"""

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  cfg.model.update(
      vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
      d_ff=512, tie_embeddings=True, rope_theta=10000.0)
  cfg.data.update(source='local_text', text_glob='stdlib', seq_len=256)
  cfg.tokenizer.update(vocab_size=4096)
  cfg.train.update(global_batch=16, steps=300, log_every=20, eval_every=100,
                   eval_batches=8)
  cfg.optim.update(lr=3e-3, warmup_steps=30)
  cfg.checkpoint.update(every=100)
  if arg:  # e.g. --config=configs/pretrain_tiny.py:smoke for a 20-step smoke run.
    if arg != 'smoke':
      raise ValueError(f'pretrain_tiny: unknown config arg {arg!r} (known: smoke)')
    cfg.train.update(steps=20, eval_every=10, log_every=5)
  return cfg
