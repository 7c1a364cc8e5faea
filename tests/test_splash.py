"""model.attention='splash': the Pallas splash kernel against the xla path.

Off TPU the kernel runs in Pallas interpret mode (the same kernel code, evaluated by
XLA), so these run in CI on CPU; on a TPU VM (tools/tpu_check.sh) they run the compiled
kernel, with tolerances for the TPU's bfloat16 passes of float32 matmuls. Every
comparison uses packed rows (several documents and a padding tail) and grouped-query
heads; shapes stay small (T = 256, 2 layers) to keep the interpreter fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax import config as config_lib
from lmjax import sharding
from lmjax.models import attention, transformer
from lmjax.train import step as step_lib
from util import (model_loss_and_grads, packed_and_alone, packed_segment_ids, random_batch,
                  random_qkv, tiny_config)

ON_TPU = jax.default_backend() == 'tpu'
TOL = 2e-2 if ON_TPU else 1e-5   # relative; the TPU runs float32 matmuls in bf16 passes
RULES = dict(batch=('data', 'fsdp', 'expert'), length='sequence', heads='tensor',
             kv_heads='tensor', head_dim=None)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(seed, b=4, t=256, n=4, k=2, h=64):
  return random_qkv(seed, b, t, n, k, h, jnp.float32)


def _out_and_grads(impl, q, k, v, g, seg, cap=0.0, mesh=None):
  def f(q, k, v):
    with sharding.use_mesh(mesh, RULES if mesh is not None else None):
      return attention.attention(q, k, v, seg, impl, logit_cap=cap,
                                 splash_blocks=dict(block_q=128, block_kv=128,
                                                    block_kv_compute=128))
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(g))


def _close(got, want, tol=TOL):
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.isfinite(np.asarray(a)).all(), name
    assert _rel(a, b) < tol, (name, _rel(a, b))


@pytest.mark.parametrize('cap', [0.0, 5.0])
def test_splash_packed_matches_xla_values_and_grads(cap):
  """Causal GQA over packed rows (up to 4 documents and a padding tail), with and without
  the attention soft-cap: output and the q, k, v gradients."""
  q, k, v, g = _qkv(0)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(0), 4, 256, 4, pad=1.0, margin=8))
  want = jax.jit(lambda *a: _out_and_grads('xla', *a, cap=cap))(q, k, v, g, seg)
  got = jax.jit(lambda *a: _out_and_grads('splash', *a, cap=cap))(q, k, v, g, seg)
  _close(got, want)


@pytest.mark.parametrize('tensor', [2, 4])
def test_splash_sharded_batch_and_heads_equals_one_device(tensor):
  """On every device (8 on CPU), batch over data and heads over tensor, equal to one
  device. With tensor=4 the 2 kv heads do not split 4 ways: each q head gets its own copy."""
  n = len(jax.devices())
  if n < tensor or n // tensor > 4:
    pytest.skip(f'needs {tensor} to {4 * tensor} devices, {n} here')
  mesh_shape = dict(data=n // tensor, tensor=tensor)
  q, k, v, g = _qkv(1)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(1), 4, 256, 3, pad=1.0, margin=8))
  one = jax.jit(lambda *a: _out_and_grads('splash', *a))(q, k, v, g, seg)
  mesh = sharding.make_mesh(mesh_shape)
  got = jax.jit(lambda *a: _out_and_grads('splash', *a, mesh=mesh))(q, k, v, g, seg)
  _close(got, one, 1e-6 if not ON_TPU else TOL)
  _close(got, _out_and_grads('xla', q, k, v, g, seg))


def _model(attn, **kw):
  cfg = tiny_config(attention=attn, head_dim=128, **kw)
  return transformer.build(cfg.model, seed=0), cfg


def test_splash_packed_rows_equal_separate_documents():
  model, _ = _model('splash')
  packed, alone, leaky = packed_and_alone(model, [128, 256])
  assert all(_rel(p, a) < TOL for p, a in zip(packed, alone))
  # The second document's logits differ when it can see the first (the test can fail).
  assert _rel(leaky[1], alone[1]) > 100 * max(_rel(packed[1], alone[1]), 1e-7)


def test_splash_model_loss_and_grads_match_xla():
  """The whole model on packed rows (3 documents a row): loss and every gradient."""
  results = {}
  for attn in ('xla', 'splash'):
    model, cfg = _model(attn)
    cfg.data.seq_len, cfg.train.global_batch = 128, 2
    results[attn] = model_loss_and_grads(model, cfg)
  (lx, gx), (ls, gs) = results['xla'], results['splash']
  assert abs(float(lx) - float(ls)) < TOL * abs(float(lx))
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
    assert _rel(a, b) < 10 * TOL


def test_auto_picks_the_backends_kernel(monkeypatch):
  m = tiny_config().model
  assert m.attention == 'auto'
  for backend, dtype, cap, want in [('cpu', 'bfloat16', 0.0, 'xla'),
                                    ('tpu', 'float32', 0.0, 'splash'),
                                    ('tpu', 'bfloat16', 30.0, 'splash'),
                                    ('gpu', 'bfloat16', 0.0, 'cudnn'),
                                    ('gpu', 'float32', 0.0, 'xla'),
                                    ('gpu', 'bfloat16', 30.0, 'xla')]:
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    m.dtype, m.attn_logit_softcap = dtype, cap
    assert attention.implementation(m) == want, (backend, dtype, cap)
  m.attention = 'xla'
  assert attention.implementation(m) == 'xla'


def test_splash_block_errors_name_the_field():
  cfg = tiny_config()
  cfg.model.splash.block_q = 100
  with pytest.raises(config_lib.ConfigError, match=r'model\.splash\.block_q must be a positive multiple of 128'):
    config_lib.validate(cfg)
  q, k, v, _ = _qkv(2, b=1, t=384)
  with pytest.raises(config_lib.ConfigError, match=r'model\.splash\.block_q \(256\) must divide'):
    attention.attention(q, k, v, None, 'splash', splash_blocks=dict(block_q=256))
  q, k, v, _ = _qkv(2, b=1, t=200)
  with pytest.raises(config_lib.ConfigError, match='not a multiple of 128; change data.seq_len'):
    attention.attention(q, k, v, None, 'splash')


def test_remat_saves_the_kernels_residuals_instead_of_rerunning_it():
  """remat=dots_no_batch saves the splash output and log-sum-exp (by checkpoint name):
  the backward pass does not run the forward kernel again (compiled FLOPs within 1% of no
  remat; re-running it adds ~4% here)."""
  def flops(remat):
    model, cfg = _model('splash', remat=remat, d_model=256)
    cfg.data.seq_len, cfg.train.global_batch = 512, 2
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=0).items()}
    grad = jax.jit(jax.grad(lambda p: step_lib.loss_sums(graphdef, p, batch, 0.0)[0]))
    cost = grad.lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  assert flops('dots_no_batch') < 1.01 * flops('none')
