"""Whether a checkpoint or an init_from source fits a config: the checks a run makes
before it restores or loads anything, each a clear error naming the settings that differ.
"""

from __future__ import annotations

import jax

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax.models import lora as lora_lib

# Fields that define the parameter shapes; a checkpoint can only resume with equal ones.
# 'head' (lm | score): init_from may turn a language model into a reward model (a fresh
# score head, lmjax/weights.py), nothing else.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim',
             'd_ff', 'tie_embeddings', 'qkv_bias', 'qk_norm', 'moe', 'param_dtype', 'head')
# The model.moe fields that shape the params (the rest: routing and loss settings).
MOE_SHAPE_KEYS = ('experts', 'd_ff', 'shared_d_ff', 'shared_gate')
# Fields that change what the params compute but not their shapes: init_from warns when
# they differ (changing them can be the point, e.g. RoPE scaling for longer contexts).
FUNCTION_KEYS = ('rope_theta', 'rope_scaling', 'norm_eps', 'attn_logit_softcap',
                 'final_logit_softcap')


def arch_diff(source_model, model) -> list[tuple[str, object, object]]:
  """(key, source value, config value) for each ARCH_KEYS field that differs; only the
  keys `source_model` defines are compared, head_dim 0 as d_model // n_heads, and a
  missing head as 'lm' (configs written before the field existed)."""
  def value(m, k):
    if k == 'head_dim' and not m.get('head_dim'):
      return m['d_model'] // m['n_heads']
    if k == 'head':
      return m.get('head') or 'lm'
    if k == 'moe':
      moe = dict(m[k])
      return ({f: moe.get(f) for f in MOE_SHAPE_KEYS} if moe.get('experts')
              else {'experts': 0})
    return m[k]
  return [(k, value(source_model, k), value(model, k)) for k in ARCH_KEYS
          if (k in source_model or k == 'head') and value(source_model, k) != value(model, k)]


def lora_diff(saved_cfg, cfg) -> list[tuple[str, object, object]]:
  """(key, checkpoint value, config value) for each LoRA setting that shapes the saved
  state (adapters, their optimizer state) and differs: enabled, rank, the targets and
  train_params (as resolved, so 'q_proj' equals 'q')."""
  a, b = saved_cfg.lora, cfg.lora
  if a.enabled != b.enabled:
    return [('lora.enabled', a.enabled, b.enabled)]
  if not a.enabled:
    return []
  out = [('lora.rank', a.rank, b.rank)] if a.rank != b.rank else []
  if lora_lib.select_targets(a.targets) != lora_lib.select_targets(b.targets):
    out.append(('lora.targets', a.targets, b.targets))
  if lora_lib.full_params(saved_cfg) != lora_lib.full_params(cfg):
    out.append(('lora.train_params', a.train_params, b.train_params))
  return out


def check_resumable(saved_cfg, cfg, where: str) -> None:
  """CheckpointError when the checkpoint in `where` (its config: saved_cfg) was trained
  with parameter shapes or LoRA settings other than cfg's."""
  diff = [(f'model.{k}', a, b) for k, a, b in arch_diff(saved_cfg.model, cfg.model)]
  diff += lora_diff(saved_cfg, cfg)
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, a, b in diff)
    raise ckpt_lib.CheckpointError(
        f'the checkpoint in {where} was trained with different settings ({detail}); '
        'use a new --workdir or the checkpoint\'s settings')


def check_init_source(source, cfg) -> None:
  """ConfigError when init_from's model has another architecture than cfg.model (but a
  language model read for a reward model: head 'lm' -> 'score', which gets a fresh score
  head); a warning for each FUNCTION_KEYS field that differs."""
  diff = arch_diff(source.model, cfg.model)
  if source.format == 'hf':  # converted to the config's dtype on load
    diff = [d for d in diff if d[0] != 'param_dtype']
  diff = [d for d in diff if d != ('head', 'lm', 'score')]
  if diff:
    detail = ', '.join(f'model.{k}: source {a!r} vs config {b!r}' for k, a, b in diff)
    raise config_lib.ConfigError(
        f'init_from {source} has a different model architecture ({detail}); set these '
        'model fields to the source\'s')
  for k in FUNCTION_KEYS:
    theirs = source.model.get(k)
    ours = cfg.model[k].to_dict() if hasattr(cfg.model[k], 'to_dict') else cfg.model[k]
    if k == 'rope_scaling' and theirs is not None and theirs.get('type') == ours['type'] == 'none':
      continue
    if theirs is not None and theirs != ours and jax.process_index() == 0:
      print(f'WARNING: init_from {source} has model.{k}={theirs!r}, this config {ours!r}',
            flush=True)
