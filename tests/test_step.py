"""The jitted step: sharded == single device, accumulation == one big batch."""

import jax
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import sharding
from lmjax.train import loop
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib
from util import random_batch, tiny_config


def assert_params_close(a, b):
  """Params after a few Adam steps at lr 1e-2, computed with another reduction order.

  Adam divides near-zero gradients by their own scale, so float32 reduction-order
  noise is amplified in a handful of entries (8 devices vs 1, measured: max 1.1e-4 of
  106,816 entries, 99.9th percentile 4e-6, median 4e-8). Allowed: 5e-4 (5% of one
  step) for the worst entry, 1e-5 for the 99.9th percentile, 1e-7 for the median.
  """
  diffs = np.concatenate([d.ravel() for d in jax.tree.leaves(
      jax.tree.map(lambda x, y: np.abs(x - y), a, b))])
  assert diffs.max() < 5e-4
  assert np.percentile(diffs, 99.9) < 1e-5
  assert np.median(diffs) < 1e-7


def _run(cfg, devices, batches):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  step = step_lib.make_train_step(cfg, setup)
  losses = []
  for b in batches:
    state, m = step(state, sharding.place_batch(b, mesh, cfg.rules))
    losses.append(float(m['loss']))
  return losses, jax.device_get(state['params']), state


@pytest.mark.slow
def test_eight_devices_match_one_device():
  assert len(jax.devices()) == 8
  cfg1 = tiny_config()
  cfg8 = tiny_config()
  cfg8.mesh.update(data=2, fsdp=2, tensor=2)
  batches = [random_batch(cfg1, seed=0, docs_per_row=2)] * 3  # memorise one batch
  l1, p1, _ = _run(cfg1, jax.devices()[:1], batches)
  l8, p8, s8 = _run(cfg8, jax.devices(), batches)
  # Params really are sharded on all three axes.
  q = s8['params']['layers']['attn']['q']
  assert tuple(q.sharding.spec) == (None, 'fsdp', 'tensor', None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
  # Same math up to float32 reduction order: losses to 1e-5 relative, params as below.
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[-1] < l1[0] - 0.1
  assert_params_close(p8, p1)


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
  cfg = tiny_config()
  batches = [random_batch(cfg, seed=i, docs_per_row=3) for i in range(2)]
  # Uneven loss-token counts per micro-batch, so a per-micro-batch mean would differ.
  for b in batches:
    b['loss_mask'][:2, :20] = 0
  l1, p1, _ = _run(cfg, jax.devices()[:1], batches)
  cfg4 = tiny_config()
  cfg4.train.grad_accum = 4
  l4, p4, _ = _run(cfg4, jax.devices()[:1], batches)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  assert_params_close(p4, p1)


@pytest.mark.slow
def test_loss_is_mean_over_all_loss_tokens():
  cfg = tiny_config()
  cfg.optim.lr = 1e-9
  b = random_batch(cfg)
  b['loss_mask'][0, :] = 0          # row 0 contributes nothing
  b['loss_mask'][1, 5:] = 0         # row 1 contributes 5 tokens
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  from flax import nnx
  logits = np.asarray(nnx.merge(setup.graphdef, state['params'])(
      b['inputs'], b['positions'], b['segment_ids']), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, b['targets'][..., None], -1)[..., 0]
  expected = (nll * b['loss_mask']).sum() / b['loss_mask'].sum()
  _, m = step_lib.make_train_step(cfg, setup)(state, sharding.place_batch(b, mesh, cfg.rules))
  np.testing.assert_allclose(float(m['loss']), expected, rtol=1e-5)
  assert float(m['loss_tokens']) == b['loss_mask'].sum()


def test_mesh_and_batch_errors_name_the_fields():
  with pytest.raises(sharding.ShardingError, match='do not divide the 8 devices'):
    sharding.make_mesh({'data': -1, 'fsdp': 3, 'tensor': 1})
  with pytest.raises(sharding.ShardingError, match='has 4 devices but 8'):
    sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 1})
  cfg = tiny_config()
  cfg.train.global_batch = 6
  cfg.mesh.update(data=4, fsdp=1, tensor=2)
  with pytest.raises(config_lib.ConfigError, match=r'train.global_batch \(6\).*data-parallel size 4'):
    loop.check_batch(cfg, sharding.make_mesh(cfg.mesh))


@pytest.mark.slow
def test_chunked_cross_entropy_matches_and_never_holds_the_batch_logits():
  """model.loss_chunk: the same losses and updates (8 devices, z-loss on), and the
  compiled step's temporaries shrink (float32 logits [B, T, V] are never materialised)."""
  batches = [random_batch(tiny_config(), seed=i, docs_per_row=2) for i in range(3)]
  runs = {}
  for chunk in (0, 8):
    cfg = tiny_config(loss_chunk=chunk)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    cfg.train.z_loss = 1e-3
    runs[chunk] = _run(cfg, jax.devices(), batches)
  np.testing.assert_allclose(runs[8][0], runs[0][0], rtol=1e-5)
  assert_params_close(runs[8][1], runs[0][1])

  def temp_bytes(chunk):
    cfg = tiny_config(vocab_size=8192, loss_chunk=chunk)
    cfg.tokenizer.vocab_size = 8192
    cfg.data.seq_len = 128
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    setup = state_lib.make_setup(cfg, mesh)
    step = step_lib.make_train_step(cfg, setup)
    with sharding.use_mesh(mesh, cfg.rules):
      compiled = step.jitted.lower(setup.abstract_state,
                                   step_lib.batch_spec(cfg, mesh, 8)).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 8 * 128 * 8192 * 4  # one float32 copy of the batch's logits: 32 MiB
  full, chunked = temp_bytes(0), temp_bytes(16)
  assert full > logits_bytes and full - chunked > logits_bytes, (full, chunked)
  with pytest.raises(config_lib.ConfigError, match=r'model.loss_chunk \(24\) must be 0 or '
                     r'divide data.seq_len \(32\)'):
    config_lib.validate(tiny_config(loss_chunk=24))


def test_skip_bad_steps_guard():
  """state.skip_bad_steps: non-finite gradients and spikes (> threshold x the running mean
  norm) change nothing and are counted; other steps are the inner optimizer's."""
  import jax.numpy as jnp
  import optax
  tx = state_lib.skip_bad_steps(optax.sgd(1.0), spike_threshold=5.0, ema_decay=0.5)
  params = {'w': jnp.ones(3)}
  s = tx.init(params)
  norms = []
  for g in ([1.0, 0, 0], [np.nan, 0, 0], [2.0, 0, 0], [100.0, 0, 0], [np.inf, 0, 0],
            [1.0, 0, 0]):
    u, s = tx.update({'w': jnp.asarray(g)}, s, params)
    params = optax.apply_updates(params, u)
    norms.append((float(params['w'][0]), int(s.skipped), int(s.consecutive)))
  assert norms == [(0.0, 0, 0), (0.0, 1, 1), (-2.0, 1, 0), (-2.0, 2, 1), (-2.0, 3, 2),
                   (-3.0, 3, 0)]
  assert float(s.grad_norm_ema) == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 1)


@pytest.mark.slow
def test_skipped_step_leaves_the_state_and_reports_it():
  cfg = tiny_config()
  cfg.train.skip_bad_steps = True
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  step = step_lib.make_train_step(cfg, setup)
  good = random_batch(cfg)
  bad = dict(good, loss_mask=np.where(good['loss_mask'] > 0, np.nan, 0).astype(np.float32))
  state, m = step(state, sharding.place_batch(good, mesh, cfg.rules))
  assert not bool(m['skipped']) and int(m['skipped_steps']) == 0
  before = jax.device_get(state['params'])
  state, m = step(state, sharding.place_batch(bad, mesh, cfg.rules))
  assert bool(m['skipped']) and int(m['skipped_steps']) == 1 and not np.isfinite(m['loss'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']), before)
  assert int(state['step']) == 2  # the data moved on
  state, m = step(state, sharding.place_batch(good, mesh, cfg.rules))
  assert not bool(m['skipped']) and int(m['skipped_in_a_row']) == 0
  assert np.isfinite(jax.device_get(state['params'])['embed']).all()


@pytest.mark.parametrize('mode,stage,tie,chunk', [
    ('full', 'pretrain', False, 0), ('full', 'pretrain', True, 8), ('lora', 'sft', False, 0),
    ('full', 'dpo', False, 8), ('lora', 'dpo', True, 0)])
def test_bfloat16_step_has_no_float32_matmul(mode, stage, tie, chunk):
  """With model.dtype bfloat16 every matmul of the train step (forward and gradient,
  LM head, LoRA, DPO) multiplies bf16 operands, or runs the BF16_BF16_F32 algorithm:
  a float32 operand under the default precision is a float32 matmul on a GPU (the LM
  head's gradient was one, 12% of the 125M bench step's matmul FLOPs)."""
  from lmjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from lmjax.train import metrics  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(dtype='bfloat16', tie_embeddings=tie, loss_chunk=chunk)
  cfg.stage = stage
  cfg.lora.enabled = mode == 'lora'
  if mode == 'lora':
    lora_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  step = step_lib.make_train_step(cfg, setup)
  rows = cfg.train.global_batch * setup.objective.rows_per_example
  with sharding.use_mesh(mesh, cfg.rules):
    jaxpr = jax.make_jaxpr(step.jitted)(setup.abstract_state,
                                        step_lib.batch_spec(cfg, mesh, rows))
  dots = metrics.matmuls(jaxpr)
  bf16_algo = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  slow = [(a.str_short(), b.str_short()) for a, b, prec, _ in dots
          if not (a.dtype == b.dtype == jax.numpy.bfloat16 or prec == bf16_algo)]
  assert len(dots) > 20 and not slow, slow
