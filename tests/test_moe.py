"""The mixture-of-experts block: dispatch paths against each other (outputs and
gradients), capacity drops, router losses against Hugging Face's formula and their
identities, telemetry in the train step, expert parallelism on 8 devices against one,
and continued pretraining from an imported MoE checkpoint."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax import config as config_lib
from lmjax import sharding
from lmjax.models import moe, transformer
from lmjax.train import state as state_lib
from util import random_batch, tiny_config

E, K, D, F = 4, 2, 16, 24


def _weights(seed=0, e=E):
  rng = np.random.default_rng(seed)
  f32 = lambda *s, scale=0.3: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
  return dict(x=f32(2, 12, D, scale=1.0), router=f32(D, e, scale=1.0), gate=f32(e, D, F),
              up=f32(e, D, F), down=f32(e, F, D))


def _run(dispatch, w, capacity_factor=100.0, valid=None):
  b, t, d = w['x'].shape
  flat = w['x'].reshape(b * t, d)
  _, weights, ids = moe.route(flat, w['router'], K, True)
  ffn = (w['gate'], w['up'], w['down'])
  if dispatch == 'dense':
    return moe.dense(flat, weights, ids, *ffn).reshape(b, t, d), None
  if dispatch == 'dropless':
    return moe.dropless(flat, weights, ids, *ffn).reshape(b, t, d), None
  valid = jnp.ones((b, t)) if valid is None else valid
  return moe.capacity_dispatch(w['x'], weights.reshape(b, t, K), ids.reshape(b, t, K), valid,
                               *ffn, capacity_factor)


def test_dropless_and_capacity_equal_dense_in_outputs_and_gradients():
  w = _weights()
  ref = _run('dense', w)[0]
  loss = lambda kind: lambda w: jnp.sum(jnp.sin(_run(kind, w)[0]))
  grads_ref = jax.grad(loss('dense'))(w)
  for kind in ('dropless', 'capacity'):
    np.testing.assert_allclose(_run(kind, w)[0], ref, atol=1e-5)
    grads = jax.grad(loss(kind))(w)
    for name in w:
      np.testing.assert_allclose(grads[name], grads_ref[name], atol=1e-5, err_msg=name)
  assert float(jnp.abs(ref).max()) > 0.1  # not trivially zero


def test_capacity_drops_overflow_and_converges_to_dropless():
  w = _weights(1)
  w['router'] = w['router'].at[:, 0].add(3.0)  # a skewed router: expert 0 is popular
  dropless = _run('dropless', w)[0]
  b, t, _ = w['x'].shape
  total = b * t * K
  prev_dropped = None
  for cf in (0.25, 0.5, 1.0, 2.0):  # E/K = 2: nothing can drop from there on
    y, processed = _run('capacity', w, cf)
    c = moe.capacity(cf, t, K, E)
    assert float(processed.max()) <= b * c
    dropped = total - float(processed.sum())
    assert prev_dropped is None or dropped <= prev_dropped
    prev_dropped = dropped
    if cf < 1.0:
      assert dropped > 0
      assert float(jnp.abs(y - dropless).max()) > 1e-3
  assert dropped == 0
  np.testing.assert_allclose(y, dropless, atol=1e-5)
  # Padding takes no slot and is counted nowhere.
  valid = jnp.ones((b, t)).at[:, t // 2:].set(0)
  _, processed = _run('capacity', w, 100.0, valid)
  assert float(processed.sum()) == b * (t // 2) * K


def test_capacity_priority_is_first_choice_then_position():
  """With one slot per expert, each expert keeps its first first-choice token."""
  ids = jnp.asarray([[[0, 1], [0, 2], [1, 0]]])                   # [1, 3, 2]
  weights = jnp.full((1, 3, 2), 0.5)
  x = jnp.eye(3, D)[None]                                           # token t = e_t
  eye = jnp.broadcast_to(jnp.eye(D, D), (3, D, D))
  # Experts as near-identities are not needed: count what each expert computed.
  _, processed = moe.capacity_dispatch(x, weights, ids, jnp.ones((1, 3)), eye, eye, eye,
                                       capacity_factor=0.5)         # c = ceil(.5*3*2/3) = 1
  # expert 0: token 0 (first choice) wins over token 1's first choice and token 2's second;
  # expert 1: token 2's first choice beats token 0's second; expert 2: token 1's second.
  np.testing.assert_array_equal(processed, [1, 1, 1])


def _hf_balance(logits, k, mask=None):
  torch = pytest.importorskip('torch')
  mixtral = pytest.importorskip('transformers.models.mixtral.modeling_mixtral')
  gate = tuple(torch.from_numpy(np.array(l)) for l in logits)
  m = None if mask is None else torch.from_numpy(np.array(mask))
  return float(mixtral.load_balancing_loss_func(gate, logits.shape[-1], k, m))


def _stats(logits, k, valid):
  """Layer-stacked RouterStats of logits [L, N, E]."""
  per = []
  for l in logits:
    _, ids = jax.lax.top_k(jax.nn.softmax(l), k)
    per.append(moe.router_stats(l, ids, valid))
  return jax.tree.map(lambda *a: jnp.stack(a), *per)


def test_pooled_balance_loss_equals_transformers():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 40, 8)) * 2, jnp.float32)
  mask = (rng.random((4, 10)) > 0.3).astype(np.int64)
  ours = moe.load_balancing_loss(_stats(logits, 2, jnp.ones(40)), 'pooled')
  assert abs(float(ours) - _hf_balance(logits, 2)) < 1e-6
  ours = moe.load_balancing_loss(_stats(logits, 2, jnp.asarray(mask.reshape(-1), jnp.float32)),
                                 'pooled')
  assert abs(float(ours) - _hf_balance(logits, 2, mask)) < 1e-6
  # One layer: per-layer == pooled.
  one = _stats(logits[:1], 2, jnp.ones(40))
  assert abs(float(moe.load_balancing_loss(one, 'layer'))
             - float(moe.load_balancing_loss(one, 'pooled'))) < 1e-6


@pytest.mark.parametrize('balance', ['layer', 'pooled'])
def test_balance_loss_identities(balance):
  n, e, k = 64, 8, 2
  uniform = _stats(jnp.zeros((2, n, e)), k, jnp.ones(n))
  assert abs(float(moe.load_balancing_loss(uniform, balance)) - k) < 1e-6   # k at uniform
  cfg = config_lib.base_config().model.moe
  cfg.update(experts=e, top_k=k, aux_loss=0.02, z_loss=0.0, balance=balance)
  loss, _ = moe.router_losses(uniform, cfg)
  assert abs(float(loss) - k * 0.02) < 1e-7                                # k * coef
  # Balanced routing (token i prefers experts i, i+1 mod E) scores lower than imbalanced
  # (every token prefers experts 0 and 1), at the same confidence.
  prefer = lambda ids: 4.0 * (jax.nn.one_hot(ids[:, 0], e) + 0.5 * jax.nn.one_hot(ids[:, 1], e))
  i = jnp.arange(n)
  balanced = prefer(jnp.stack([i % e, (i + 1) % e], 1))
  imbalanced = prefer(jnp.stack([jnp.zeros(n, int), jnp.ones(n, int)], 1))
  b = float(moe.load_balancing_loss(_stats(jnp.stack([balanced] * 2), k, jnp.ones(n)), balance))
  ib = float(moe.load_balancing_loss(_stats(jnp.stack([imbalanced] * 2), k, jnp.ones(n)),
                                     balance))
  assert ib > b + 1.0, (ib, b)


def test_pooled_balance_hides_per_layer_imbalance():
  """Layer 0 overloads experts 0-1, layer 1 experts 2-3: pooled, the loss is that of a
  balanced router; per layer, that of an imbalanced one."""
  n, e, k = 32, 4, 2
  hot = lambda a, b: jnp.broadcast_to(4.0 * (jax.nn.one_hot(a, e) + jax.nn.one_hot(b, e)), (n, e))
  logits = jnp.stack([hot(0, 1), hot(2, 3)])
  stats = _stats(logits, k, jnp.ones(n))
  pooled, layer = (float(moe.load_balancing_loss(stats, b)) for b in ('pooled', 'layer'))
  assert layer > pooled + 1.0, (layer, pooled)
  assert abs(pooled - _hf_balance(logits, k)) < 1e-6


def test_router_z_loss_and_stats():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
  valid = jnp.asarray([1.0] * 7 + [0.0] * 3)
  stats = _stats(logits, 2, valid)
  lse = jax.nn.logsumexp(logits[:, :7], axis=-1)
  np.testing.assert_allclose(moe.router_z_loss(stats), jnp.mean(lse ** 2), rtol=1e-6)
  np.testing.assert_allclose(stats.assigned.sum(-1), [14, 14])
  p = jax.nn.softmax(logits[:, :7])
  np.testing.assert_allclose(stats.entropy, -jnp.sum(p * jnp.log(p), axis=(1, 2)), rtol=1e-5)


def moe_config(**moe_kw):
  cfg = tiny_config()
  cfg.model.moe.update(**{'experts': 4, 'top_k': 2, 'd_ff': 32, **moe_kw})
  return cfg


def test_train_step_includes_router_losses_and_logs_telemetry():
  from lmjax.train import step as step_lib
  cfg = moe_config(aux_loss=0.1, z_loss=0.01)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  batch = random_batch(cfg, docs_per_row=2)
  params = jax.device_get(state['params'])  # the step donates the state
  graphdef = setup.graphdef

  def pieces(p):
    model = nnx.merge(graphdef, p)
    h, stats = model.hidden_and_router(batch['inputs'], batch['positions'], batch['segment_ids'])
    logits = model.unembed(h)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    nll = jnp.sum(nll * batch['loss_mask']) / jnp.sum(batch['loss_mask'])
    return nll, stats

  nll, stats = pieces(params)
  want = (float(nll) + 0.1 * float(moe.load_balancing_loss(stats, 'layer'))
          + 0.01 * float(moe.router_z_loss(stats)))
  step = step_lib.make_train_step(cfg, setup)
  _, m = step(state, sharding.place_batch(batch, mesh, cfg.rules))
  m = jax.device_get(m)
  assert abs(float(m['loss']) - float(nll)) < 1e-5
  got = float(m['loss']) + 0.1 * float(m['moe/balance_loss']) + 0.01 * float(m['moe/router_z_loss'])
  assert abs(got - want) < 1e-5
  for i in range(cfg.model.n_layers):
    assert 1.0 <= m[f'moe/layer{i}/load_max'] <= 4 / 2 + 1e-6
    assert abs(m[f'moe/layer{i}/load_mean'] - 1.0) < 1e-6 and m[f'moe/layer{i}/dropped'] == 0
    assert 0 < m[f'moe/layer{i}/entropy'] <= np.log(4) + 1e-6
  assert abs(np.mean([m[f'moe/expert{j}/load'] for j in range(4)]) - 1.0) < 1e-6
  # The data loss reaches the router through the top-k weights.
  grads = jax.grad(lambda p: pieces(p)[0])(params)
  assert float(jnp.abs(grads['layers']['moe']['router']).max()) > 0


@pytest.mark.slow
def test_experts_sharded_on_eight_devices_match_one_device():
  """Dropless and capacity dispatch, experts on a 4-way 'expert' axis x 2 data: the same
  losses and params as one device after three steps."""
  from test_step import _run as run_steps, assert_params_close
  for dispatch in ('dropless', 'capacity'):
    cfg1 = moe_config(dispatch=dispatch, capacity_factor=1.0)
    cfg8 = moe_config(dispatch=dispatch, capacity_factor=1.0)
    cfg8.mesh.update(data=2, expert=4)
    batches = [random_batch(cfg1, seed=0, docs_per_row=2)] * 3
    l1, p1, _ = run_steps(cfg1, jax.devices()[:1], batches)
    l8, p8, s8 = run_steps(cfg8, jax.devices(), batches)
    gate = s8['params']['layers']['moe']['gate']
    assert gate.sharding.spec[1] == 'expert' and gate.addressable_shards[0].data.shape[1] == 1
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l1[-1] < l1[0] - 0.1
    assert_params_close(p8, p1)


def _collectives(cfg):
  """{collective: [result shapes]} of cfg's compiled train step on 8 devices."""
  import re
  from lmjax.train import step as step_lib
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  state = jax.eval_shape(lambda: state_lib.init_state(cfg, setup))
  step = step_lib.make_train_step(cfg, setup)
  with sharding.use_mesh(mesh, cfg.rules):
    hlo = step.jitted.lower(state, step_lib.batch_spec(cfg, mesh, cfg.train.global_batch)) \
        .compile().as_text()
  out = {}
  for m in re.finditer(r'= (\(?[a-z0-9]+\[[^=]*?) (all-gather|all-reduce|all-to-all)\(', hlo):
    out.setdefault(m.group(2), []).append(m.group(1))
  return out


@pytest.mark.slow
def test_how_tokens_reach_their_experts():
  """Experts split 4 ways ('expert' axis) x 2 data, one layer. Capacity: the tokens'
  slots travel by all-to-all (two each way) and nothing is all-gathered. Dropless: the
  tokens stay put and the expert weights are all-gathered ([1, E, ...]: every expert)."""
  for dispatch in ('capacity', 'dropless'):
    cfg = moe_config(dispatch=dispatch)
    cfg.model.n_layers = 1
    cfg.mesh.update(data=2, expert=4)
    ops = _collectives(cfg)
    if dispatch == 'capacity':
      assert len(ops.get('all-to-all', [])) == 4, ops
      assert 'all-gather' not in ops, ops
    else:
      assert 'all-to-all' not in ops, ops
      gathered = ops.get('all-gather', [])
      assert gathered and all(s.startswith('f32[1,4,') for s in gathered), gathered


def test_flops_count_active_parameters():
  cfg = moe_config(shared_d_ff=16)
  m = cfg.model
  active = 2 * 3 * 64 * 32 + 64 * 4 + 3 * 64 * 16 + 64
  assert moe.active_ffn_params(m) == active
  total = 4 * 3 * 64 * 32 + 64 * 4 + 3 * 64 * 16 + 64
  assert moe.total_ffn_params(m) == total
  attn = 64 * 16 * (4 * 2 + 2 * 2)
  want = 6 * (2 * (attn + active) + 64 * 256) + 6 * 2 * 32 * 4 * 16
  assert transformer.flops_per_token(m, 32) == want
  # Every FFN param is in the model: the count matches the params.
  _, abstract = transformer.abstract(m)
  ffn = nnx.to_pure_dict(abstract)['layers']['moe']
  assert sum(x.size for x in jax.tree.leaves(ffn)) == 2 * total


def test_moe_config_errors():
  cfg = moe_config(top_k=5)
  with pytest.raises(config_lib.ConfigError, match='model.moe.top_k'):
    config_lib.validate(cfg)
  cfg = moe_config(dispatch='sparse')
  with pytest.raises(config_lib.ConfigError, match='model.moe.dispatch'):
    config_lib.validate(cfg)
  cfg = moe_config(capacity_factor=0.0)
  with pytest.raises(config_lib.ConfigError, match='capacity_factor'):
    config_lib.validate(cfg)


@pytest.mark.parametrize('remat,count', [('none', 9), ('dots_no_batch', 9), ('full', 12)])
def test_remat_saves_the_grouped_matmuls(remat, count):
  """The grouped matmuls (3 forward, 6 backward) are not recomputed under the policies
  that save the weight matmuls; 'full' recomputes the forward three."""
  from lmjax.train import step as step_lib
  cfg = moe_config()
  cfg.model.update(remat=remat, n_layers=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  step = step_lib.make_train_step(cfg, setup)
  state = jax.eval_shape(lambda: state_lib.init_state(cfg, setup))
  with sharding.use_mesh(mesh, cfg.rules):
    jaxpr = jax.make_jaxpr(step.jitted)(state, step_lib.batch_spec(cfg, mesh, 8))
  assert str(jaxpr).count('ragged_dot_general') == count


@pytest.mark.slow
def test_pretrain_moe_tiny_config_trains_and_plots(tmp_path, capsys):
  """configs/pretrain_moe_tiny.py, on a small local corpus: the loss falls, the router
  telemetry reaches metrics.jsonl, a sample is printed, and tools/plot_moe.py draws it."""
  import os
  import sys
  from lmjax.train import loop
  from util import write_corpus
  glob_ = write_corpus(tmp_path / 'corpus', n_files=30)
  cfg = config_lib.load('configs/pretrain_moe_tiny.py:smoke', overrides={
      'data.text_glob': glob_, 'data.data_dir': str(tmp_path / 'tfds'), 'data.seq_len': 64,
      'tokenizer.vocab_size': 384, 'tokenizer.max_sentences': 20_000, 'train.steps': 12,
      'train.global_batch': 8, 'train.log_every': 4, 'train.eval_every': 0,
      'train.progress_bar': False, 'sample.max_new_tokens': 8, 'optim.warmup_steps': 2})
  assert cfg.model.moe.experts == 8 and cfg.model.moe.top_k == 2
  out = loop.train(cfg, str(tmp_path / 'run'))
  assert out.history[-1]['loss'] < out.history[0]['loss'] - 0.3
  assert out.sample is not None and '--- sample' in capsys.readouterr().out
  rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text()
          .splitlines()]
  train_rows = [r for r in rows if 'loss' in r]
  assert {f'moe/layer{i}/load_max' for i in range(4)} <= set(train_rows[-1])
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
  import plot_moe  # pylint: disable=import-outside-toplevel
  png = tmp_path / 'load.png'
  assert plot_moe.main(['--workdir', str(tmp_path / 'run'), '--out', str(png)]) == 0
  assert png.stat().st_size > 10_000
  assert plot_moe.main(['--workdir', str(tmp_path), '--out', str(png)]) == 2


def test_dropless_warning_names_the_fix(monkeypatch):
  cfg = moe_config()
  assert moe.dropless_warning(cfg.model, backend='cpu') is None
  monkeypatch.setattr(moe, '_cudnn_version', lambda: (9, 19))
  msg = moe.dropless_warning(cfg.model, backend='gpu')
  assert 'cuDNN 9.19' in msg and 'model.moe.dispatch=capacity' in msg
  monkeypatch.setattr(moe, '_cudnn_version', lambda: (9, 22))
  assert moe.dropless_warning(cfg.model, backend='gpu') is None
  cfg.model.moe.dispatch = 'capacity'
  monkeypatch.setattr(moe, '_cudnn_version', lambda: (9, 19))
  assert moe.dropless_warning(cfg.model, backend='gpu') is None
  assert moe.describe(cfg.model).startswith(
      'MoE 4 experts x d_ff 32, top-2, capacity (capacity 1.25)')


def test_checkpoint_compatibility_names_the_expert_shapes():
  """A run cannot resume or init_from a checkpoint with other experts; routing settings
  (top_k, dispatch, loss weights) may change."""
  from lmjax.train import compat
  a = moe_config().model.to_dict()
  b = moe_config(top_k=1, dispatch='capacity', aux_loss=0.0).model.to_dict()
  assert compat.arch_diff(a, b) == []
  diff = compat.arch_diff(a, moe_config(experts=8).model.to_dict())
  assert [k for k, _, _ in diff] == ['moe']
  dense = tiny_config().model.to_dict()
  assert [k for k, _, _ in compat.arch_diff(dense, a)] == ['moe']
  assert [k for k, _, _ in compat.arch_diff(dense, tiny_config(qk_norm=True).model.to_dict())] \
      == ['qk_norm']


def test_grouped_matmul_choice():
  """On CPU, auto runs XLA's ragged_dot; pallas (Hopper only) is a clear error."""
  from lmjax.models import grouped_matmul as gmm
  w = _weights()
  flat = w['x'].reshape(-1, D)
  _, weights, ids = moe.route(flat, w['router'], K, True)
  ffn = (w['gate'], w['up'], w['down'])
  np.testing.assert_array_equal(moe.dropless(flat, weights, ids, *ffn, impl='auto'),
                                moe.dropless(flat, weights, ids, *ffn, impl='xla'))
  with pytest.raises(config_lib.ConfigError, match='grouped_matmul=pallas: not an NVIDIA Hopper'):
    moe.dropless(flat, weights, ids, *ffn, impl='pallas')
  cfg = moe_config(grouped_matmul='auto')
  assert moe.grouped_impl(cfg.model) == 'xla' and not gmm.hopper()


@pytest.mark.parametrize('stage', ['dpo', 'kto'])
def test_preference_objectives_add_the_router_losses(stage):
  """DPO and KTO on an MoE policy: the loss they optimise is theirs plus the router losses
  (per pair / example), and the telemetry is logged; the logged 'loss' stays theirs."""
  from lmjax.train import objectives
  cfg = moe_config(aux_loss=0.5, z_loss=0.1)
  cfg.stage = stage
  getattr(cfg, stage).reference = 'copy'
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  obj = objectives.get(cfg)
  batch = random_batch(cfg)
  rows = batch['inputs'].shape[0]
  if stage == 'kto':
    batch.update(label=np.tile([1, 0], rows // 2).astype(np.int32),
                 weight=np.ones(rows, np.float32))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  with sharding.use_mesh(mesh, cfg.rules):
    total, aux = obj.sums(setup)(setup.weights(state), batch, None)
    params = setup.weights(state)['params']
    _, stats = nnx.merge(setup.graphdef, params).hidden_and_router(
        batch['inputs'], batch['positions'], batch['segment_ids'])
  router, _ = moe.router_losses(stats, cfg.model.moe)
  examples = rows // 2
  np.testing.assert_allclose(float(total), float(aux['loss']) + examples * float(router),
                             rtol=1e-5)
  m = obj.metrics(aux, jnp.float32(examples))
  assert abs(float(m['moe/balance_loss']) - float(moe.load_balancing_loss(stats, 'layer'))) < 1e-5
  assert 'moe/layer1/load_max' in m and 'moe/expert0/load' in m
