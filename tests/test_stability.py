"""Stability options of the model: logit soft-capping (attention scores and output
logits) and the depth-scaled initialisation. (QK-norm: tests/test_hf_moe.py, against
transformers' Qwen3.)"""

import os

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


# ---- Telemetry --------------------------------------------------------------------------

def _max_abs_logit_reference(q, k, seg):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, n, h = q.shape
  best = 0.0
  for bi in range(b):
    allowed = (np.tril(np.ones((t, t), bool)) & (seg[bi][:, None] == seg[bi][None, :])
               & (seg[bi][:, None] > 0))
    for hi in range(n):
      s = q[bi, :, hi] @ k[bi, :, hi // (n // k.shape[2])].T / np.sqrt(h)
      best = max(best, float(np.abs(s[allowed]).max(initial=0.0)))
  return best


def test_max_attention_logit_covers_attended_pairs_only_in_blocks():
  q, k, _ = _qkv(1, t=12)
  # A huge key where no query may attend it: the next document's first key, seen only from
  # later positions in its own document, and a padding key.
  seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], np.int32)
  k = k.at[0, 11].set(1e3)  # padding: never attended
  want = _max_abs_logit_reference(q, k, seg)
  for block in (2**24, 2 * 4 * 12 * 3):  # all queries at once; blocks of 3 queries
    got = float(attention.max_abs_logit(q, k, jnp.asarray(seg), block_elems=block))
    np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want < 100


def test_layer_stats_match_a_layer_by_layer_forward():
  cfg = ml_collections.FrozenConfigDict(tiny_config(n_layers=3, init_std=0.2).model)
  model = transformer.build(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, 256, (2, 16)))
  seg = jnp.asarray(np.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], np.int32))
  pos = jnp.asarray(np.array([list(range(9)) + list(range(7)),
                              list(range(12)) + [0] * 4], np.int32))
  h, router, layers = model.hidden_and_stats(tokens, pos, seg, telemetry=True)
  assert router is None and layers.attn_logit_max.shape == (3,)
  graphdef, state = nnx.split(model.layers)
  x = model._embed(tokens)  # pylint: disable=protected-access
  for i in range(3):
    block = nnx.merge(graphdef, jax.tree.map(lambda p: p[i], state))
    q, k, _ = block.attn._qkv(block.attn_norm(x), pos)  # pylint: disable=protected-access
    np.testing.assert_allclose(layers.attn_logit_max[i],
                               _max_abs_logit_reference(q, k, np.asarray(seg)), rtol=1e-4)
    x, _ = block(x, pos, seg)
    real = np.asarray(seg) > 0
    rms = np.sqrt(np.mean(np.square(np.asarray(x, np.float64)[real])))
    np.testing.assert_allclose(layers.resid_rms[i], rms, rtol=1e-4)
  np.testing.assert_allclose(h, model.hidden(tokens, pos, seg), atol=1e-6)  # unchanged


def test_telemetry_metrics_of_a_train_step_match_direct_computation():
  from lmjax.train import forward, losses, objectives  # pylint: disable=import-outside-toplevel
  from lmjax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from lmjax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from lmjax import sharding  # pylint: disable=import-outside-toplevel
  from util import random_batch  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(n_layers=3)
  cfg.train.update(telemetry=True, grad_accum=2)
  cfg.optim.update(clip_norm=0.0)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh, objectives.get(cfg))
  state = state_lib.init_state(cfg, setup)
  params = jax.tree.map(np.asarray, state['params'])
  batch = random_batch(cfg, seed=3, docs_per_row=2)
  _, m = step_lib.make_train_step(cfg, setup)(state, sharding.place_batch(batch, mesh, cfg.rules))
  m = jax.device_get(m)
  # log Z over the loss tokens, from the logits of the starting params
  model = nnx.merge(setup.graphdef, params)
  lse = np.asarray(jax.nn.logsumexp(model(batch['inputs'], batch['positions'],
                                          batch['segment_ids']), axis=-1))
  mask = batch['loss_mask'] > 0
  np.testing.assert_allclose(m['stability/logz_mean'], lse[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['stability/logz_max'], lse[mask].max(), rtol=1e-5)
  # The micro-batches' maxima combine as a max: the whole batch's max attention logit.
  _, _, layers = model.hidden_and_stats(batch['inputs'], batch['positions'],
                                        batch['segment_ids'], telemetry=True)
  for i in range(3):
    np.testing.assert_allclose(m[f'stability/layer{i}/attn_logit_max'],
                               layers.attn_logit_max[i], rtol=1e-5)
  np.testing.assert_allclose(m['stability/attn_logit_max'], np.max(layers.attn_logit_max),
                             rtol=1e-5)
  # Per-layer gradient norms: of the batch's mean-loss gradient, layer by layer.
  def loss(p):
    nll, _ = forward.loss_sums(setup.graphdef, p, batch, 0.0)
    return nll / batch['loss_mask'].sum()
  grads = jax.grad(loss)(params)
  sq = 0.0
  for i in range(3):
    g = np.sqrt(sum(float(np.sum(np.square(x[i]))) for x in jax.tree.leaves(grads['layers'])))
    np.testing.assert_allclose(m[f'stability/layer{i}/grad_norm'], g, rtol=1e-4)
    sq += m[f'stability/layer{i}/grad_norm'] ** 2
    # Adam's first update moves every weight by about lr: lr * sqrt(the layer's weights)
    n = sum(x[i].size for x in jax.tree.leaves(params['layers']))
    np.testing.assert_allclose(m[f'stability/layer{i}/update_norm'], 1e-2 * np.sqrt(n),
                               rtol=0.05)
  assert sq < m['grad_norm'] ** 2  # the embedding and final norm hold the rest
  del losses


@pytest.mark.slow
def test_telemetry_in_a_training_run(tmp_path):
  """A run with train.telemetry logs every statistic at each log step, to metrics.jsonl
  and TensorBoard; without it none is computed."""
  import json  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  from util import pretrain_cfg, write_corpus  # pylint: disable=import-outside-toplevel
  write_corpus(tmp_path / 'text')
  cfg = pretrain_cfg(tmp_path)  # on 8 devices
  cfg.train.update(telemetry=True, steps=4, log_every=2)
  res = loop.train(cfg, str(tmp_path / 'on'))
  rows = [json.loads(line) for line in open(tmp_path / 'on' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4]
  for r in rows:
    for i in range(2):
      for name in ('attn_logit_max', 'resid_rms', 'grad_norm', 'update_norm'):
        assert np.isfinite(r[f'stability/layer{i}/{name}']) and r[f'stability/layer{i}/{name}'] > 0
    assert r['stability/logz_max'] >= r['stability/logz_mean'] > 0
    assert r['stability/spike_score'] == 0.0
  assert os.listdir(tmp_path / 'on' / 'tb')
  cfg.train.update(telemetry=False)
  off = loop.train(cfg, str(tmp_path / 'off'))
  assert not any(k.startswith('stability/') for k in off.history[-1])
  # the same training either way: the statistics never touch the gradients
  np.testing.assert_allclose(off.history[-1]['loss'], res.history[-1]['loss'], rtol=1e-5)
