import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax.models import attention, transformer
from util import packed_and_alone, packed_segment_ids, random_batch, tiny_config


def _model(**kw):
  cfg = tiny_config(**kw)
  return transformer.build(ml_collections.FrozenConfigDict(cfg.model)), cfg


def test_packed_rows_equal_separate_documents():
  model, _ = _model()
  packed, alone, leaky = packed_and_alone(model, [13, 19])
  for p, a in zip(packed, alone):
    np.testing.assert_allclose(p, a, atol=1e-5)
  # Without segment ids the second document would see the first: the test can fail.
  assert np.max(np.abs(leaky[1] - alone[1])) > 1e-3


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


@pytest.mark.slow
def test_bf16_compute_close_to_float32():
  cfg = tiny_config()
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
  l32, g32 = _loss_and_grads({}, batch)
  l16, _ = _loss_and_grads(dict(dtype='bfloat16', param_dtype='bfloat16'), batch)
  assert abs(float(l16) - float(l32)) < 0.05
  # Mixed precision (float32 params, bf16 compute; the LM head's gradient in bf16 x bf16
  # products): every gradient within 3% of float32's by norm (measured 0.5-0.9%).
  _, g16 = _loss_and_grads(dict(dtype='bfloat16'), batch)
  def rel(a, b):
    assert a.dtype == jnp.float32
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  errs = jax.tree.leaves(jax.tree.map(rel, g16, g32))
  assert len(errs) == 12 and max(errs) < 0.03, errs


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


def test_segment_runs_describe_the_segment_mask():
  """cuDNN's packed description (offsets, lengths) covers every token once and puts two
  tokens in one segment exactly when their segment ids agree (contiguous documents)."""
  rng = np.random.default_rng(0)
  seg = packed_segment_ids(rng, 16, 48, 5)
  offsets, lengths, n_runs = jax.device_get(attention.segment_runs(jnp.asarray(seg), 8))
  assert offsets.shape == (16, 9) and lengths.shape == (16, 8)
  np.testing.assert_array_equal(n_runs, attention.count_runs(seg, np))
  np.testing.assert_array_equal(n_runs, jax.device_get(attention.count_runs(jnp.asarray(seg))))
  for r in range(16):
    which = np.full(48, -1)
    for m in range(n_runs[r]):
      assert which[offsets[r, m]:offsets[r, m] + lengths[r, m]].max() == -1
      which[offsets[r, m]:offsets[r, m] + lengths[r, m]] = m
    assert (which >= 0).all()
    assert (offsets[r, n_runs[r]:] == -1).all() and (lengths[r, n_runs[r]:] == -1).all()
    np.testing.assert_array_equal(which[:, None] == which[None, :],
                                  seg[r][:, None] == seg[r][None, :])


def _packed_reference(q, k, v, offsets, lengths):
  """Attention as cuDNN's packed layout defines it: each described segment on its own,
  causal (the xla kernel per segment, no mask)."""
  out = np.full(q.shape, np.nan, np.float32)
  for r in range(q.shape[0]):
    for lo, n in zip(offsets[r], lengths[r]):
      if n <= 0:
        continue
      sl = slice(lo, lo + n)
      out[r, sl] = jax.nn.dot_product_attention(q[r:r + 1, sl], k[r:r + 1, sl],
                                                v[r:r + 1, sl], is_causal=True)[0]
  return out


@pytest.mark.slow
def test_packed_description_computes_the_masked_attention():
  """The xla path with a segment mask == attention segment by segment over the runs that
  `segment_runs` describes (the function the cuDNN packed path is asked to compute)."""
  rng = np.random.default_rng(1)
  seg = packed_segment_ids(rng, 4, 32, 4)
  q = jnp.asarray(rng.normal(size=(4, 32, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, 32, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, 32, 2, 8)), jnp.float32)
  offsets, lengths, _ = jax.device_get(attention.segment_runs(jnp.asarray(seg), 6))
  want = attention.attention(q, k, v, jnp.asarray(seg))
  np.testing.assert_allclose(_packed_reference(q, k, v, offsets, lengths), want, atol=1e-5)


def test_too_many_segments_for_cudnn_is_a_clear_error():
  seg = np.array([[1, 1, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)  # 4 runs, 1 run
  attention.check_segments(seg, 4)
  with pytest.raises(ValueError, match='holds 4 segments .* model.max_segments is 3'):
    attention.check_segments(seg, 3)
  _, lengths, n_runs = attention.segment_runs(jnp.asarray(seg), 3)
  assert n_runs.tolist() == [4, 1] and lengths.tolist() == [[2, 1, 1], [6, -1, -1]]
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.attention, cfg.model.max_segments = 'cudnn', 3
  from lmjax.train import step as step_lib
  with pytest.raises(ValueError, match='model.max_segments is 3'):
    step_lib.check_host_batch(cfg, {'segment_ids': seg})
  cfg.model.attention = 'xla'
  step_lib.check_host_batch(cfg, {'segment_ids': seg})  # no bound on the xla path


def test_cudnn_call_type_checks_against_this_jax(monkeypatch):
  """The cuDNN path calls jax's fused_attention_stablehlo API (private): trace it here
  (its hardware checks stubbed) so a jax upgrade that changes it fails on CPU, not on a
  GPU. The packed call carries no [B, 1, T, T] mask; the values are tests/test_gpu.py's."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  monkeypatch.setattr(cudnn, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(cudnn, 'check_compute_capability', lambda c: True)
  monkeypatch.setattr(cudnn, 'is_cuda_compute_capability_equal', lambda c: False)
  q = jax.ShapeDtypeStruct((4, 256, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((4, 256), jnp.int32)
  for m in (1, 8):
    f = lambda q, k, v, s, m=m: attention._cudnn_attention(q, k, v, s, m)  # pylint: disable=protected-access
    grads = jax.eval_shape(lambda q, k, v, s: jax.vjp(lambda *a: f(*a, s), q, k, v)[1](q),
                           q, kv, kv, seg)
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]
    jaxpr = str(jax.make_jaxpr(f)(q, kv, kv, seg))
    assert 'dot_product_attention' in jaxpr or 'fmha' in jaxpr
    assert '4,1,256,256' not in jaxpr
  out = jax.eval_shape(lambda q, k, v: attention._cudnn_attention(q, k, v, None, 1), q, kv, kv)  # pylint: disable=protected-access
  assert out.shape == q.shape
  # A jax whose private API lost the offsets: the packed rows fall back to the public
  # API's mask (a bias), with a warning, rather than failing.
  assert attention._has_segment_offsets(cudnn.dot_product_attention)  # pylint: disable=protected-access
  monkeypatch.setattr(cudnn, 'dot_product_attention', lambda q, k, v, bias=None, mask=None: q)
  with pytest.warns(UserWarning, match='no segment offsets'):
    jaxpr = str(jax.make_jaxpr(lambda q, k, v, s: attention._cudnn_attention(q, k, v, s, 8))(  # pylint: disable=protected-access
        q, kv, kv, seg))
  assert 'dot_product_attention' in jaxpr or 'fmha' in jaxpr


@pytest.mark.parametrize('d,layers,t,vocab,tie', [(64, 2, 64, 256, False),
                                                  (128, 4, 128, 512, True)])
def test_flops_formula_against_xla_count(d, layers, t, vocab, tie):
  """MFU's numerator against XLA's own FLOP count of the compiled loss gradient (layers
  unrolled: XLA's cost analysis counts a scan body once). XLA computes the masked half of
  causal attention too, so its count is the formula with attention counted twice, plus a
  few percent of elementwise work."""
  from lmjax.train import step as step_lib
  cfg = tiny_config(d_model=d, n_layers=layers, d_ff=2 * d, vocab_size=vocab, n_heads=4,
                    n_kv_heads=2, scan_layers=False, tie_embeddings=tie)
  cfg.data.seq_len = t
  model = transformer.build(ml_collections.FrozenConfigDict(cfg.model))
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
  grad = jax.jit(jax.grad(lambda p: step_lib.loss_sums(graphdef, p, batch, 0.0)[0]))
  cost = grad.lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)['flops'] / batch['inputs'].size
  formula = transformer.flops_per_token(cfg.model, t)
  both_halves = formula + 6 * layers * t * 4 * (d // 4)
  assert 1.0 <= xla / both_halves < 1.06, (xla, both_halves)
