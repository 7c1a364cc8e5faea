"""The GPU-only paths: cuDNN fused attention against the xla path, and the MoE grouped
matmul's Hopper kernels against the reference (skipped without a GPU).

Run on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py`
(tests/conftest.py defaults JAX_PLATFORMS to cpu); tools/gpu_check.sh does.

The pitfall these guard against: a fused kernel that silently attends across the
documents packed into one row. Every comparison uses packed rows with several documents
and a padding tail, and the packed-vs-separate-documents equivalence runs on cuDNN.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmjax.models import attention, transformer
from lmjax.models import grouped_matmul as gmm
from util import (model_loss_and_grads, packed_and_alone, packed_segment_ids, random_qkv,
                  tiny_config)

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rows(rng, b, t, max_docs):
  """Packed rows, every one with a padding tail."""
  return jnp.asarray(packed_segment_ids(rng, b, t, max_docs, pad=1.0, margin=8))


def _qkv(seed, b=4, t=256, n=8, k=2, h=64):
  return random_qkv(seed, b, t, n, k, h, jnp.bfloat16)


def _out_and_grads(impl, q, k, v, g, seg, max_segments=8):
  def f(q, k, v):
    return attention.attention(q, k, v, seg, impl, max_segments)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(g))


@pytest.mark.parametrize('max_docs', [1, 3, 7])
def test_cudnn_packed_matches_xla_values_and_grads(max_docs):
  q, k, v, g = _qkv(0)
  seg = _rows(np.random.default_rng(max_docs), 4, 256, max_docs)
  want = jax.jit(lambda *a: _out_and_grads('xla', *a))(q, k, v, g, seg)
  got = jax.jit(lambda *a: _out_and_grads('cudnn', *a))(q, k, v, g, seg)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert _rel(a, b) < 2e-2, (name, _rel(a, b))


@pytest.mark.parametrize('mask', ['CAUSAL', 'PADDING_CAUSAL'])
def test_cudnn_packed_mask_types(mask, monkeypatch):
  """Which of cuDNN's mask types computes causal attention inside each packed segment (a
  diagnostic for attention.PACKED_MASK, PADDING_CAUSAL, which the test above pins)."""
  monkeypatch.setattr(attention, 'PACKED_MASK', mask)
  q, k, v, g = _qkv(4)
  seg = _rows(np.random.default_rng(4), 4, 256, 4)
  want = _out_and_grads('xla', q, k, v, g, seg)
  got = jax.jit(lambda *a: _out_and_grads('cudnn', *a))(q, k, v, g, seg)
  errors = [_rel(a, b) for a, b in zip(got, want)]
  assert max(errors) < 2e-2, errors


def test_cudnn_single_run_rows_use_the_plain_kernel():
  q, k, v, g = _qkv(1)
  seg = jnp.ones((4, 256), jnp.int32)
  want = _out_and_grads('xla', q, k, v, g, seg)
  for m in (1, 8):
    got = jax.jit(lambda *a, m=m: _out_and_grads('cudnn', *a, max_segments=m))(q, k, v, g, seg)
    for a, b in zip(got, want):
      assert _rel(a, b) < 2e-2
  got = attention.attention(q, k, v, None, 'cudnn')  # no segment ids at all
  assert _rel(got, want[0]) < 2e-2


def test_cudnn_rows_over_the_bound_are_nan_not_silently_wrong():
  q, k, v, _ = _qkv(2)
  seg = _rows(np.random.default_rng(0), 4, 256, 1)  # 1 document + padding: 2 runs a row
  out = np.asarray(attention.attention(q, k, v, seg, 'cudnn', 1), np.float32)
  assert np.isnan(out).all()


def test_cudnn_packed_path_is_a_fused_kernel_without_a_bias():
  q, k, v, _ = _qkv(3)
  seg = _rows(np.random.default_rng(3), 4, 256, 3)
  hlo = jax.jit(lambda q, k, v, s: attention.attention(q, k, v, s, 'cudnn', 8)).lower(
      q, k, v, seg).compile().as_text()
  assert 'cudnn$fmha' in hlo
  assert '[4,1,256,256]' not in hlo  # no materialised mask or bias


def _model(attn, **kw):
  cfg = tiny_config(attention=attn, dtype='bfloat16', d_model=128, n_heads=2, n_kv_heads=1,
                    max_segments=4, **kw)
  return transformer.build(ml_collections.FrozenConfigDict(cfg.model)), cfg


def test_cudnn_packed_rows_equal_separate_documents():
  model, _ = _model('cudnn')
  packed, alone, leaky = packed_and_alone(model, [40, 24])
  assert all(_rel(p, a) < 2e-2 for p, a in zip(packed, alone))
  # The second document's logits differ when it can see the first (the test can fail).
  assert _rel(leaky[1], alone[1]) > 5 * _rel(packed[1], alone[1])


def test_cudnn_model_loss_and_grads_match_xla():
  """The whole model on packed rows (3 documents a row): the train loss and every
  parameter's gradient, cuDNN against xla."""
  results = {}
  for attn in ('xla', 'cudnn'):
    model, cfg = _model(attn)
    results[attn] = model_loss_and_grads(model, cfg)
  (lx, gx), (lc, gc) = results['xla'], results['cudnn']
  assert abs(float(lx) - float(lc)) < 1e-2 * abs(float(lx))
  for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gx)):
    assert _rel(a, b) < 5e-2


# ---- MoE grouped matmul: jax's Hopper kernels against the reference ----------------------

def _groups(seed, m=1000, k=256, n=384, g=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w = (0.1 * jax.random.normal(keys[1], (g, k, n), jnp.float32)).astype(jnp.bfloat16)
  cuts = np.sort(np.random.default_rng(seed).integers(0, m, g - 1))
  sizes = jnp.asarray(np.diff(np.concatenate([[0], cuts, [m]])), jnp.int32)
  sizes = sizes.at[2].set(0).at[3].add(sizes[2])  # an empty group too
  return x, w, sizes


def _reference(x, w, sizes):
  """Per-group float32 matmuls of the sorted rows."""
  groups = np.repeat(np.arange(len(sizes)), np.asarray(sizes))
  return jnp.einsum('mk,mkn->mn', x.astype(jnp.float32),
                    w.astype(jnp.float32)[groups])


@pytest.mark.skipif(not gmm.hopper(), reason='needs a Hopper GPU')
def test_pallas_grouped_matmul_matches_the_reference():
  x, w, sizes = _groups(0)
  assert gmm.resolve('auto', x, w) == 'pallas'
  got = gmm.grouped_matmul(x, w, sizes, 'pallas')
  assert got.shape == (x.shape[0], w.shape[2]) and _rel(got, _reference(x, w, sizes)) < 1e-2
  ct = jax.random.normal(jax.random.key(9), got.shape, jnp.bfloat16)
  loss = lambda impl: lambda x, w: jnp.sum(
      gmm.grouped_matmul(x, w, sizes, impl).astype(jnp.float32) * ct)
  dx, dw = jax.grad(loss('pallas'), argnums=(0, 1))(x, w)
  rx, rw = jax.grad(lambda x, w: jnp.sum(_reference(x, w, sizes) * ct), argnums=(0, 1))(x, w)
  assert _rel(dx, rx) < 1e-2 and _rel(dw, rw) < 1e-2
  assert float(jnp.abs(dw[2].astype(jnp.float32)).max()) == 0.0  # the empty group


@pytest.mark.skipif(not gmm.hopper(), reason='needs a Hopper GPU')
def test_moe_block_on_the_hopper_kernels_matches_dense_dispatch():
  """bf16 MoE block: dropless on the Pallas kernels == dense dispatch, outputs and grads."""
  from flax import nnx
  from lmjax.models import moe
  cfg = tiny_config(d_model=256, dtype='bfloat16')
  cfg.model.moe.update(experts=4, top_k=2, d_ff=384, grouped_matmul='auto')
  m = ml_collections.FrozenConfigDict(cfg.model)
  assert moe.grouped_impl(m) == 'pallas'
  block = moe.MoE(m, nnx.Rngs(0), jnp.float32)
  graphdef, params = nnx.split(block)
  x = jax.random.normal(jax.random.key(1), (4, 128, 256), jnp.bfloat16)

  def loss(params, dispatch):
    y = nnx.merge(graphdef, params)(x, dispatch=dispatch)[0]
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  a, ga = jax.value_and_grad(loss)(params, 'dropless')
  b, gb = jax.value_and_grad(loss)(params, 'dense')
  assert abs(float(a) - float(b)) < 0.02 * abs(float(b)) + 1
  for la, lb in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert _rel(la, lb) < 3e-2
