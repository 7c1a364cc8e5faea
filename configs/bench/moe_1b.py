"""1B-class mixture of experts (d_model 1024, 16 layers, GQA 16/4 heads, 8 SwiGLU experts
of d_ff 2304 per layer, top-2 routed, dropless; vocab 32768 untied): 1.015B params, 336M
used per token (302M of them matmul weights: the N of the MFU formula's 6N, counting the
k=2 experts), seq 2048, batch 16, remat saving the weight matmuls.

  python tools/bench.py --config=configs/bench/moe_1b.py --steps=20
  python tools/bench.py --config=configs/bench/moe_1b.py --moe_rows  # the FFN block alone:
      # dropless vs dense dispatch vs a dense MLP of the same active FLOPs
  (on CPU: configs/bench/moe_1b.py:cpu, xla attention)
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      '_common.py'), arg)
  cfg.model.update(d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, remat='dots_no_batch')
  cfg.model.moe.update(experts=8, top_k=2, d_ff=2304, dispatch='dropless')
  cfg.train.update(global_batch=16)
  return cfg
