"""Pretrain a tiny mixture-of-experts model on the Python standard library, on CPU.

Run:
  python -m lmjax.train --config=configs/pretrain_moe_tiny.py --workdir=/tmp/lmjax_moe_tiny

The dense tiny model (configs/pretrain_tiny.py) with each feed-forward replaced by 8
SwiGLU experts of hidden size 192, top-2 routed (dropless, grouped matmuls): the same
active parameters per token as the dense model's d_ff=384, 4x its feed-forward weights.
Logs the router losses and, per layer, the expert load, dropped fraction and router
entropy ('moe/...' in metrics.jsonl and TensorBoard). docs/benchmarks.md compares it with
the dense model at equal steps and shows the per-expert load over training.
"""

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  cfg.tokenizer.update(vocab_size=4096)  # and model.vocab_size, which follows it
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                   tie_embeddings=True, rope_theta=10000.0)
  cfg.model.moe.update(experts=8, top_k=2, d_ff=192, dispatch='dropless', aux_loss=0.01,
                       z_loss=0.001)
  cfg.data.update(source='local_text', text_glob='stdlib', seq_len=256, worker_threads=1)
  cfg.train.update(global_batch=16, steps=200, log_every=20, eval_every=50,
                   eval_batches=8)
  cfg.optim.update(lr=1.5e-3, warmup_steps=30)
  cfg.checkpoint.update(every=100)
  if arg:  # e.g. --config=configs/pretrain_moe_tiny.py:smoke for a 20-step smoke run.
    if arg != 'smoke':
      raise ValueError(f'pretrain_moe_tiny: unknown config arg {arg!r} (known: smoke)')
    cfg.train.update(steps=20, eval_every=10, log_every=5)
  return cfg
