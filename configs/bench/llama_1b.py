"""1B-class Llama (d_model 2048, 16 layers, GQA 32/8 heads, d_ff 8192, vocab 32768
untied: 1.11B params), seq 2048, batch 16, remat saving the weight matmuls: the
>= 55% MFU target on one H100.

  python tools/bench.py --config=configs/bench/llama_1b.py --steps=20
  python tools/bench.py --config=configs/bench/llama_1b.py --mode=both   # LoRA vs full
  (on CPU: configs/bench/llama_1b.py:cpu, xla attention)
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      '_common.py'), arg)
  cfg.model.update(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                   remat='dots_no_batch')
  cfg.train.update(global_batch=16)
  return cfg
