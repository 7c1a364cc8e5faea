"""Stability options of the model: logit soft-capping (attention scores and output
logits) and the depth-scaled initialisation. (QK-norm: tests/test_hf_moe.py, against
transformers' Qwen3.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax import config as config_lib
from lmjax import generate as gen
from lmjax import hf
from lmjax.models import attention, transformer
from util import tiny_config


def _qkv(seed, b=2, t=12, n=4, k=2, h=8, scale=3.0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = scale * jax.random.normal(keys[0], (b, t, n, h))
  kk = scale * jax.random.normal(keys[1], (b, t, k, h))
  v = jax.random.normal(keys[2], (b, t, k, h))
  return q, kk, v


def _reference(q, k, v, segment_ids, cap):
  """Soft-capped causal GQA attention in numpy, one head at a time."""
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, segment_ids))
  b, t, n, h = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(n):
      kh = hi // (n // k.shape[2])
      s = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(h)
      s = cap * np.tanh(s / cap)
      allowed = np.tril(np.ones((t, t), bool)) & (seg[bi][:, None] == seg[bi][None, :])
      s = np.where(allowed, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, kh]
  return out


def test_attention_soft_capping_is_the_formula_and_keeps_documents_apart():
  q, k, v = _qkv(0)
  seg = np.array([[1] * 5 + [2] * 7, [1] * 12], np.int32)
  got = attention.attention(q, k, v, jnp.asarray(seg), logit_cap=5.0)
  np.testing.assert_allclose(got, _reference(q, k, v, seg, 5.0), atol=1e-5)
  plain = attention.attention(q, k, v, jnp.asarray(seg))
  assert float(jnp.abs(got - plain).max()) > 1e-2      # the cap bites at these scores
  loose = attention.attention(q, k, v, jnp.asarray(seg), logit_cap=1e5)
  np.testing.assert_allclose(loose, plain, atol=1e-5)  # a far cap changes nothing
  # The cached path (generation) caps the same way.
  cached = attention.cached_attention(q, k, v, 0, jnp.ones((2, 12), bool), logit_cap=5.0)
  np.testing.assert_allclose(cached[1], got[1], atol=1e-5)


def test_final_logit_soft_capping_bounds_the_logits_and_generation_follows_it():
  cfg = ml_collections.FrozenConfigDict(tiny_config(
      init_std=0.5, final_logit_softcap=4.0, attn_logit_softcap=2.0).model)
  model = transformer.build(cfg)
  tokens = np.random.default_rng(0).integers(4, 256, (2, 16))
  logits = np.asarray(model(tokens))
  assert np.abs(logits).max() < 4.0 and np.abs(logits).max() > 3.0
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  prompt = tokens[0, :6].tolist()
  out = gen.generate(graphdef, params, [prompt], max_new_tokens=5).tokens[0]
  seq = list(prompt)
  for _ in range(5):  # greedy from the full forward pass, no cache
    seq.append(int(np.asarray(model(np.asarray([seq])))[0, -1].argmax()))
  assert out.tolist() == seq[len(prompt):]


def test_scaled_init_scales_the_residual_writes():
  cfg = tiny_config(n_layers=8, init='scaled', init_std=0.02, d_model=128, d_ff=512)
  _, state = nnx.split(transformer.build(cfg.model))
  p = nnx.to_pure_dict(state)['layers']
  want = 0.02 / np.sqrt(2 * 8)
  for name, x in (('o', p['attn']['o']), ('down', p['mlp']['down'])):
    assert abs(float(np.std(x)) / want - 1) < 0.05, name
  for name, x in (('q', p['attn']['q']), ('gate', p['mlp']['gate'])):
    assert abs(float(np.std(x)) / 0.02 - 1) < 0.05, name
  moe = tiny_config(n_layers=8, init='scaled', init_std=0.02, d_model=128)
  moe.model.moe.update(experts=4, top_k=2, d_ff=256, shared_d_ff=128)
  _, state = nnx.split(transformer.build(moe.model))
  p = nnx.to_pure_dict(state)['layers']['moe']
  for name in ('down', 'shared_down'):
    assert abs(float(np.std(p[name])) / want - 1) < 0.05, name
  assert abs(float(np.std(p['gate'])) / 0.02 - 1) < 0.05
  assert transformer.out_std(tiny_config().model) == 0.02  # the default: every weight alike


def test_soft_capping_config_errors():
  cfg = tiny_config(attn_logit_softcap=30.0, attention='cudnn')
  with pytest.raises(config_lib.ConfigError, match='attn_logit_softcap needs model.attention=xla'):
    config_lib.validate(cfg)
  cfg = tiny_config(final_logit_softcap=-1.0)
  with pytest.raises(config_lib.ConfigError, match='final_logit_softcap must be >= 0'):
    config_lib.validate(cfg)
  cfg = tiny_config(init='deep')
  with pytest.raises(config_lib.ConfigError, match="model.init' must be one of"):
    config_lib.validate(cfg)
  # No exported architecture soft-caps: export refuses rather than change the function.
  with pytest.raises(hf.HFError, match='final_logit_softcap=30.0: none of the exported'):
    hf.hf_config_from_model(tiny_config(final_logit_softcap=30.0).model, 'llama')
