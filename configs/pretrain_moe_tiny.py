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

import os

from lmjax import config as config_lib


def get_config(arg=None):
  # The dense tiny model's config (data, optimizer, steps), its feed-forward made experts.
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'pretrain_moe_tiny: unknown config arg {arg!r} (known: smoke)')
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'), arg or None)
  cfg.model.moe.update(experts=8, top_k=2, d_ff=192, dispatch='dropless', aux_loss=0.01,
                       z_loss=0.001)
  return cfg
