"""Context parallelism: each sequence split over mesh.sequence devices (rules.length),
attention over all-gathered keys in load-balanced order, equal to the unsharded run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax import config as config_lib
from lmjax import sharding
from lmjax.models import attention, transformer
from lmjax.train import step as step_lib
from test_step import _run, assert_params_close
from util import packed_segment_ids, random_batch, tiny_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason='the meshes need 8 devices')


def test_load_balance_order_gives_every_device_the_same_causal_work():
  t, cp = 64, 4
  order = attention.load_balance_order(t, cp)
  assert sorted(order) == list(range(t))
  # Causal work of a query = how many keys it sees (its index + 1): equal per device.
  work = (order + 1).reshape(cp, -1).sum(axis=1)
  assert (work == work[0]).all()
  assert list(order[:4]) == [0, 1, 2, 3] and list(order[8:12]) == [56, 57, 58, 59]


def _cp_cfg(**kw):
  cfg = tiny_config(**kw)
  cfg.data.seq_len = 64
  cfg.train.global_batch = 4
  cfg.mesh.update(data=2, sequence=4)
  return cfg


def _loss_and_grads(cfg, mesh, batch, telemetry=False):
  model = transformer.build(cfg.model, seed=0)
  graphdef, params = nnx.split(model)

  def loss(p):
    with sharding.use_mesh(mesh, cfg.rules if mesh is not None else None):
      nll, _ = step_lib.loss_sums(graphdef, p, batch, 0.0)
      stats = nnx.merge(graphdef, p).hidden_and_stats(
          batch['inputs'], batch['positions'], batch['segment_ids'], telemetry=True)[2]
    return nll / jnp.sum(batch['loss_mask']), stats
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize('experts', [0, 4])
def test_sequence_by_data_mesh_equals_unsharded_loss_and_grads(experts):
  """Dense, and MoE with dropless dispatch (capacity dispatch fills its slots in the
  reordered token order, so it drops other tokens than an unsharded run)."""
  cfg = _cp_cfg()
  cfg.model.moe.experts = experts
  host = random_batch(cfg, seed=0, docs_per_row=3)
  mesh = sharding.make_mesh(cfg.mesh)
  placed = sharding.place_batch(host, mesh, cfg.rules)
  assert tuple(placed['inputs'].sharding.spec) == ('data', 'sequence')
  (l8, s8), g8 = _loss_and_grads(cfg, mesh, placed)
  (l1, s1), g1 = _loss_and_grads(cfg, None, {k: jnp.asarray(v) for k, v in host.items()})
  np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
  # The telemetry reads q and k back in token order: the same logit bound and RMS.
  for a, b in zip(s8, s1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.slow
def test_context_parallel_train_step_matches_single_device():
  cfg8, cfg1 = _cp_cfg(), _cp_cfg()
  cfg1.mesh.update(data=1, sequence=1)
  batches = [random_batch(cfg1, seed=0, docs_per_row=3)] * 3
  l1, p1, _ = _run(cfg1, jax.devices()[:1], batches)
  l8, p8, _ = _run(cfg8, jax.devices(), batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[-1] < l1[0] - 0.1
  assert_params_close(p8, p1)


def test_splash_under_context_parallelism_equals_xla():
  """The splash kernel with its mask info split over 2 sequence shards (each device's
  queries in load-balanced order) and heads over tensor, against one-device xla."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 256, 4, 64), jnp.float32)
  k = jax.random.normal(keys[1], (2, 256, 2, 64), jnp.float32)
  v = jax.random.normal(keys[2], (2, 256, 2, 64), jnp.float32)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(0), 2, 256, 3, pad=1.0, margin=8))
  want = attention.attention(q, k, v, seg, 'xla')
  mesh = sharding.make_mesh(dict(data=2, sequence=2, tensor=2))
  rules = tiny_config().rules

  @jax.jit
  def got(q, k, v, seg):
    with sharding.use_mesh(mesh, rules):
      order = attention.context_order(256)
      out = attention.attention(q[:, order], k[:, order], v[:, order], seg[:, order],
                                'splash', splash_blocks=dict(block_q=128, block_kv=128,
                                                             block_kv_compute=128))
    return out[:, np.argsort(order)]
  out = got(q, k, v, seg)
  tol = 2e-2 if jax.default_backend() == 'tpu' else 1e-5
  assert float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want)) < tol


def test_context_parallel_errors_name_the_fix():
  cfg = tiny_config()
  cfg.mesh.update(data=2, sequence=4)
  cfg.data.seq_len = 36
  with pytest.raises(config_lib.ConfigError, match=r'data.seq_len \(36\) must be a multiple of 8'):
    config_lib.validate(cfg)
  cfg.data.seq_len, cfg.model.attention = 256, 'splash'
  with pytest.raises(config_lib.ConfigError, match=r'multiple of 512 for model.attention=splash'):
    config_lib.validate(cfg)
  mesh = sharding.make_mesh(dict(data=2, sequence=4))
  rules = tiny_config().rules
  q = jnp.zeros((2, 36, 2, 8))
  with sharding.use_mesh(mesh, rules):
    with pytest.raises(config_lib.ConfigError, match=r'multiple of 8'):
      attention.attention(q, q, q, None, 'xla')
    q = jnp.zeros((2, 64, 2, 8))
    with pytest.raises(config_lib.ConfigError, match=r"'cudnn' does not split a sequence"):
      attention.attention(q, q, q, None, 'cudnn')


def test_context_memory_tool_rows_shrink_with_the_sequence_split(tmp_path):
  """tools/context_memory.py on a small model: splitting each sequence over 4 devices
  cuts the step's temporaries (the [heads, T, T] scores of the xla path among them)."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
  import context_memory  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  cfg.model.attention = 'xla'
  rows = [context_memory.measure(cfg, 256, cp) for cp in (1, 4)]
  assert [r['cp'] for r in rows] == [1, 4]
  # Params and optimizer state replicated over the sequence axis; the batch is split.
  assert 0.99 * rows[0]['argument_bytes'] < rows[1]['argument_bytes'] <= rows[0]['argument_bytes']
  assert rows[1]['temp_bytes'] < 0.5 * rows[0]['temp_bytes']
  assert '| 256 | 4 |' in context_memory.table(rows)


def test_loading_a_context_parallel_run_takes_the_loading_mesh():
  """lmjax.load's mesh replaces every axis of the run's (mesh.sequence=4 does not carry
  over onto one device)."""
  from lmjax import api  # pylint: disable=import-outside-toplevel
  cfg = _cp_cfg()
  cfg = api._with_mesh(cfg, api.DEFAULT_MESH)  # pylint: disable=protected-access
  assert dict(cfg.mesh) == dict(data=1, fsdp=-1, expert=1, sequence=1, tensor=1)
  config_lib.validate(cfg)
