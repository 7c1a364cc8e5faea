"""Shared settings of the benchmark configs (configs/bench/*.py): the target setting of
one H100 (bf16 compute, float32 params, cuDNN attention, AdamW, seq 2048, vocab 32768)."""

from lmjax import config as config_lib


def get_config(arg=None):
  """The shared part (each bench config sets the model size, batch and remat on it).
  arg 'cpu': xla attention instead of cuDNN (which needs a GPU), to compile and count
  on a machine without one. On a TPU pass --config.model.attention=splash (or auto), as
  tools/bench_suite.py --suite=tpu does."""
  if arg not in (None, '', 'cpu'):
    raise ValueError(f'bench config: unknown arg {arg!r} (known: cpu)')
  cfg = config_lib.base_config()
  cfg.tokenizer.update(vocab_size=32768)  # and model.vocab_size, which follows it
  cfg.model.update(tie_embeddings=False, rope_theta=500000.0,
                   param_dtype='float32', dtype='bfloat16', scan_layers=True,
                   attention='xla' if arg == 'cpu' else 'cudnn')
  cfg.data.update(seq_len=2048)
  cfg.train.update(steps=100, log_every=10, eval_every=0)
  cfg.optim.update(lr=3e-4, warmup_steps=10, weight_decay=0.1)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  return cfg
