import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax.models import attention, transformer
from util import random_batch, tiny_config


def _model(**kw):
  cfg = tiny_config(**kw)
  return transformer.build(ml_collections.FrozenConfigDict(cfg.model)), cfg


def test_packed_rows_equal_separate_documents():
  model, cfg = _model()
  rng = np.random.default_rng(0)
  a = rng.integers(4, 256, 13).astype(np.int32)
  b = rng.integers(4, 256, 19).astype(np.int32)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  seg = jnp.asarray(np.array([[1] * 13 + [2] * 19], np.int32))
  pos = jnp.asarray(np.array([list(range(13)) + list(range(19))], np.int32))
  out = model(packed, pos, seg)[0]
  alone_a = model(jnp.asarray(a[None]))[0]
  alone_b = model(jnp.asarray(b[None]))[0]
  np.testing.assert_allclose(out[:13], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[13:], alone_b, atol=1e-5)
  # Without segment ids the second document would see the first: the test can fail.
  leaky = model(packed, pos)[0]
  assert np.max(np.abs(leaky[13:] - alone_b)) > 1e-3


@pytest.mark.parametrize('variant', [
    dict(n_kv_heads=4),                     # multi-head
    dict(n_kv_heads=1),                     # multi-query
    dict(tie_embeddings=True),
    dict(qkv_bias=True),
    dict(head_dim=32),                      # head_dim * heads != d_model
    dict(rope_theta=500000.0, rope_scaling=dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_len=16)),
])
def test_variants_forward_and_param_count(variant):
  model, cfg = _model(**variant)
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  logits = model(tokens)
  assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  m = cfg.model
  h = m.head_dim or m.d_model // m.n_heads
  per_layer = (m.d_model * h * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
               + 2 * m.d_model + (h * (m.n_heads + 2 * m.n_kv_heads) if m.qkv_bias else 0))
  expected = (m.n_layers * per_layer + m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
              + m.d_model)
  assert transformer.count_params(params) == expected


def test_causality():
  model, _ = _model()
  t = jnp.asarray(np.random.default_rng(1).integers(4, 256, (1, 16)), jnp.int32)
  t2 = t.at[0, 10].set(7)
  a, b = model(t), model(t2)
  np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
  assert np.max(np.abs(a[0, 10:] - b[0, 10:])) > 1e-4


def _loss_and_grads(cfg_overrides, batch):
  model, cfg = _model(**cfg_overrides)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def loss(p):
    logits = nnx.merge(graphdef, p)(batch['inputs'], batch['positions'], batch['segment_ids'])
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(lp, batch['targets'][..., None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('variant', [dict(scan_layers=False), dict(remat='full'),
                                     dict(remat='dots'), dict(remat='dots_no_batch'),
                                     dict(remat='offload_dots')])
def test_scan_and_remat_do_not_change_results(variant):
  cfg = tiny_config()
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, docs_per_row=3).items()}
  ref_loss, ref_grads = _loss_and_grads({}, batch)
  loss, grads = _loss_and_grads(variant, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_bf16_compute_close_to_float32():
  cfg = tiny_config()
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
  l32, _ = _loss_and_grads({}, batch)
  l16, _ = _loss_and_grads(dict(dtype='bfloat16', param_dtype='bfloat16'), batch)
  assert abs(float(l16) - float(l32)) < 0.05


def test_llama3_rope_scaling_formula():
  # Reference: the Llama-3.1 release's apply_scaling, written out independently.
  import math
  theta, dim = 500000.0, 64
  base = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
  factor, low, high, old = 8.0, 1.0, 4.0, 8192
  ref = []
  for f in base:
    wavelen = 2 * math.pi / f
    if wavelen < old / high:
      ref.append(f)
    elif wavelen > old / low:
      ref.append(f / factor)
    else:
      s = (old / wavelen - low) / (high - low)
      ref.append((1 - s) * f / factor + s * f)
  got = attention.rope_frequencies(dim, theta, dict(type='llama3', factor=factor,
                                                    low_freq_factor=low, high_freq_factor=high,
                                                    original_max_len=old))
  np.testing.assert_allclose(got, np.array(ref), rtol=1e-6)
  assert not np.allclose(got, base)


def test_cudnn_attention_refused_off_gpu():
  q = jnp.zeros((1, 4, 2, 8))
  if jax.default_backend() == 'gpu':
    pytest.skip('GPU present')
  with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
    attention.attention(q, q, q, implementation='cudnn')


def test_flops_per_token_formula():
  cfg = tiny_config().model
  n = cfg.n_layers * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) + 64 * 256
  assert transformer.flops_per_token(cfg, 32) == 6 * n + 6 * 2 * 32 * 64
