"""125M-class Llama (d_model 768, 12 layers, GQA 12/4 heads, vocab 32768 untied: 126M
params), seq 2048, batch 32, no remat, unrolled layers (on one H200 a scan over the
layers made the step 20% slower: docs/benchmarks.md): the >= 40% MFU target on one H100.

  python tools/bench.py --config=configs/bench/llama_125m.py --steps=20
  (on CPU: configs/bench/llama_125m.py:cpu, xla attention)
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      '_common.py'), arg)
  cfg.model.update(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048,
                   remat='none', scan_layers=False)
  cfg.train.update(global_batch=32)
  return cfg
