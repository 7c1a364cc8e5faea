"""The objective interface (lmjax/train/objectives): the factory, what each objective
declares, and that a new objective with its own batch keys and a trainable head next to
the params runs through the unchanged state and step code."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax import sharding
from lmjax.models import reward
from lmjax.train import forward, losses, objectives
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib
from util import random_batch, tiny_config


def test_the_factory_and_what_each_objective_declares():
  cfg = tiny_config()
  got = {}
  for stage in ('pretrain', 'sft', 'dpo', 'reward'):
    cfg.stage = stage
    o = objectives.get(cfg)
    got[stage] = (type(o).__name__, o.rows_per_example, o.normaliser, o.counters)
  assert got == {
      'pretrain': ('LM', 1, 'loss_tokens', ()),
      'sft': ('SFT', 1, 'loss_tokens', ('sft/dropped', 'sft/truncated')),
      'dpo': ('DPO', 2, 'pairs', ('dpo/dropped', 'dpo/truncated')),
      'reward': ('Reward', 2, 'pairs', ('reward/dropped', 'reward/truncated'))}
  cfg.stage = 'reward'
  assert objectives.get(cfg).batch_keys == forward.TOKEN_KEYS + ('margin', 'label')
  cfg.stage = 'dpo'
  cfg.dpo.reference = 'precomputed'
  assert objectives.get(cfg).batch_keys == forward.TOKEN_KEYS + ('ref_logps',)
  cfg.dpo.soft_labels = True  # each pair's label (an AI judge's p) on its rows
  assert objectives.get(cfg).batch_keys == forward.TOKEN_KEYS + ('ref_logps', 'label')
  cfg.dpo.soft_labels = False
  cfg.dpo.reference = 'copy'
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  assert setup.unsaved() == ('ref_params',) and setup.needs_base
  state = state_lib.init_state(cfg, setup)
  assert 'ref_params' not in setup.saved(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['ref_params']),
               jax.device_get(state['params']))
  cfg.stage = 'kto'  # KTO: an example and its KL row, a label and a weight per row
  o = objectives.get(cfg)
  assert (type(o).__name__, o.rows_per_example, o.normaliser, o.counters, o.batch_keys) == (
      'KTO', 2, 'examples', ('kto/dropped', 'kto/truncated'),
      forward.TOKEN_KEYS + ('label', 'weight'))
  cfg.kto.reference = 'precomputed'
  assert objectives.get(cfg).batch_keys == forward.TOKEN_KEYS + ('label', 'weight', 'ref_logps')


class _PairedRewards(objectives.LM):
  """A toy reward model: a trainable score head [D, 1] next to the params, rows in pairs
  (chosen, rejected) with a per-row 'margin' key; the Bradley-Terry loss over pairs."""

  name = 'toy_reward'
  rows_per_example = 2
  normaliser = 'pairs'
  reducers = {'min_reward': 'min', 'max_reward': 'max'}

  def __init__(self, cfg):
    super().__init__(cfg)
    self.row_keys = {'margin': jnp.float32}

  def state_entries(self, abstract_params, param_shardings):
    d = self.cfg.model.d_model
    return {'score': objectives.StateEntry(
        jax.ShapeDtypeStruct((d, 1), jnp.float32), sharding.replicated(param_shardings[
            'embed'].mesh), init=lambda params, key: 0.02 * jax.random.normal(key, (d, 1)),
        trainable=True)}

  def sums(self, setup):
    def sums(weights, batch, rng):
      model = nnx.merge(setup.graphdef, weights['params'])
      h = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'])
      scores = jnp.einsum('btd,dk->bt', h.astype(jnp.float32), weights['score'])
      r = reward.last_token_rewards(scores, batch['segment_ids'] > 0)
      loss, _ = losses.bradley_terry(r[0::2], r[1::2], margin=batch['margin'][0::2])
      return jnp.sum(loss), {'loss': jnp.sum(loss), 'min_reward': jnp.min(r),
                             'max_reward': jnp.max(r)}
    return sums

  def denominator(self, batch):
    return jnp.float32(batch['inputs'].shape[0] // 2)


def test_a_new_objective_with_a_trainable_head_needs_no_loop_edit():
  cfg = tiny_config()
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.mesh.update(data=2)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  toy = _PairedRewards(cfg)
  setup = state_lib.make_setup(cfg, mesh, toy)
  assert setup.trainable_keys == ('params', 'score') and 'score' in setup.abstract_saved
  state = state_lib.init_state(cfg, setup)
  before = jax.device_get(state['score'])
  batch = random_batch(cfg)
  batch['margin'] = np.zeros(cfg.train.global_batch, np.float32)
  step = step_lib.make_train_step(cfg, setup)
  state, m = step(state, sharding.place_batch(batch, mesh, cfg.rules))
  assert m['pairs'] == cfg.train.global_batch // 2 and np.isfinite(m['loss'])
  assert not np.array_equal(jax.device_get(state['score']), before)  # the head trained
  assert set(state['opt_state'][1][0].mu) == {'params', 'score'}


def test_min_and_max_metrics_combine_over_micro_batches():
  """A 'min' / 'max' reducer gives the whole batch's extreme under gradient accumulation,
  where a sum would add the micro-batches' values."""
  out = {}
  for accum in (1, 2):
    cfg = tiny_config()
    cfg.train.grad_accum = accum
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    toy = _PairedRewards(cfg)
    setup = state_lib.make_setup(cfg, mesh, toy)
    state = state_lib.init_state(cfg, setup)
    batch = random_batch(cfg)
    batch['margin'] = np.zeros(cfg.train.global_batch, np.float32)
    _, m = step_lib.make_train_step(cfg, setup)(state, sharding.place_batch(batch, mesh,
                                                                             cfg.rules))
    out[accum] = {k: float(m[k]) for k in ('loss', 'min_reward', 'max_reward')}
  assert out[1]['min_reward'] < out[1]['max_reward']
  for k, v in out[1].items():
    np.testing.assert_allclose(out[2][k], v, rtol=1e-5, atol=1e-6)
