"""Pretrain a tiny Llama-style model on the Python standard library, on CPU.

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny

Expect (2-core CPU; docs/benchmarks.md has the measured run): the corpus (every .py
file of this Python's standard library, as a local TFDS dataset) and a 4k sentencepiece
tokenizer are built on first use (seconds); a 1.3M-parameter model then trains 200 steps
of 16 x 256 tokens at ~4k tokens/s, validation loss falling from 8.34 to ~6.2, about 4
minutes in all; a short (noisy, code-shaped) sample is printed at the end.
"""

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  cfg.tokenizer.update(vocab_size=4096)  # and model.vocab_size, which follows it
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                   tie_embeddings=True, rope_theta=10000.0)
  cfg.data.update(source='local_text', text_glob='stdlib', seq_len=256,
                  worker_threads=1)  # ~5k tokens/s to feed: one thread, more CPU for XLA
  cfg.train.update(global_batch=16, steps=200, log_every=20, eval_every=50,
                   eval_batches=8)
  cfg.optim.update(lr=1.5e-3, warmup_steps=30)
  cfg.checkpoint.update(every=100)
  if arg:  # e.g. --config=configs/pretrain_tiny.py:smoke for a 20-step smoke run.
    if arg != 'smoke':
      raise ValueError(f'pretrain_tiny: unknown config arg {arg!r} (known: smoke)')
    cfg.train.update(steps=20, eval_every=10, log_every=5)
  return cfg
