"""DPO through the one loop: the three reference options agree, step-0 identities, TRL's
metrics, LoRA (reference = adapters off) and full fine-tuning (a frozen copy, or reference
log-probs precomputed into the data), resume."""

import math
import os

import jax
import numpy as np
import pytest

import lmjax
from lmjax import config as config_lib
from lmjax import sharding
from lmjax.data import preference
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from lmjax.train import ref_logps
from lmjax.train import state as state_lib
from util import pretrain_cfg


def _dpo_cfg(base, lora=True, reference='auto', **train):
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'dpo'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=lora, rank=4, alpha=8.0)
  cfg.dpo.update(path='builtin:synthetic', task_sizes=dict(train=400, validation=32, test=32),
                 beta=0.1,
                 reference=reference)
  cfg.sft.update(task_sizes=dict(train=100, validation=16, test=16), eval_examples=4,
                 eval_max_new_tokens=8)
  cfg.data.seq_len = 64
  # Rows this short leave half the task's prompts no room for a completion: the data check
  # warns and the pipeline drops those pairs, the stream these tests were written for.
  cfg.dpo.update(on_degenerate='warn', max_degenerate=1.0)
  cfg.train.update(global_batch=4, steps=4, eval_every=0, eval_batches=1)
  cfg.train.update(**train)
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.checkpoint.update(every=2, keep=5)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  return cfg


def _batch(cfg, out_tok, **kw):
  it = preference.make_pair_iterator(cfg, out_tok, 'validation', batch_size=4, **kw)
  b = {k: v for k, v in next(it).items() if k not in preference.COUNTS}
  it.close()
  return b


@pytest.mark.slow
def test_three_references_give_the_same_loss(base):
  """Policy = base + random LoRA adapters; reference = the base, three ways (precomputed:
  the table the loop computes, read back through the pair iterator)."""
  cfg = _dpo_cfg(base)
  cfg.dpo.overlong = 'drop'
  cfg.data.seq_len = 72  # about half the validation pairs are dropped: NaN rows, skipped
  out = loop.train(_dpo_cfg(base, steps=1), os.path.join(base[0], 'ref_probe'))
  adapters, params, tok = out.state['adapters'], out.state['params'], out.tokenizer
  host = _batch(cfg, tok)
  results = {}
  for mode in ('adapters_off', 'copy', 'precomputed'):
    c = cfg.copy_and_resolve_references()
    c.dpo.reference = mode
    mesh = sharding.make_mesh(c.mesh)
    setup = state_lib.make_setup(c, mesh)
    weights = {'params': params, 'adapters': adapters}
    b = dict(host)
    if mode == 'copy':
      weights['ref_params'] = params
    if mode == 'precomputed':
      table = ref_logps.compute(c, setup, params, tok, 'validation', 32)
      assert np.isnan(table).any() and np.isfinite(table).sum() >= 8
      b = _batch(c, tok, ref_logps=table)
      assert set(b) == set(host) | {'ref_logps'} and b['ref_logps'].shape == (8,)
      for k in host:
        np.testing.assert_array_equal(b[k], host[k])
    sums = setup.objective.eval_step(setup)(weights, sharding.place_batch(b, mesh, c.rules))
    results[mode] = {k: float(v) for k, v in jax.device_get(sums).items()}
  a, c_, p = results['adapters_off'], results['copy'], results['precomputed']
  assert a['loss'] / a['pairs'] != pytest.approx(math.log(2), abs=1e-4)  # not the identity
  for k in a:
    assert a[k] == pytest.approx(c_[k], rel=1e-5, abs=1e-5), k
    assert a[k] == pytest.approx(p[k], rel=1e-4, abs=1e-4), k


@pytest.mark.slow
def test_lora_dpo_run_metrics_and_step_zero(base, tmp_path):
  cfg = _dpo_cfg(base, eval_every=4)
  cfg.train.telemetry = True  # another objective: the adapters' per-layer norms
  out = loop.train(cfg, str(tmp_path / 'lora'))
  assert 'ref_params' not in out.state  # the reference is the base: adapters off
  e0 = out.evals[0]
  assert e0['eval_loss'] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
  assert e0['eval/rewards/margins'] == pytest.approx(0.0, abs=1e-6)
  # At step 0 the policy is the base: its exact match on the held-out built-in pairs'
  # questions (their chosen answers) is the base model's.
  questions = preference.answer_examples(cfg, 'validation', 4, out.tokenizer)
  em = lmjax.load(base[1]).exact_match(examples=questions, max_new_tokens=8)
  assert e0['eval/exact_match'] == em['accuracy'] and em['n'] == 4
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path / 'lora' / 'metrics.jsonl'))
          if 'loss' in r]
  for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
              'logps/chosen', 'logps/rejected', 'grad_norm', 'pairs', 'dpo/dropped',
              'dpo/truncated'):
    assert key in rows[0], key
  assert rows[0]['loss'] == pytest.approx(math.log(2), abs=1e-5)
  assert rows[-1]['stability/layer1/grad_norm'] > 0 and rows[-1]['stability/layer1/update_norm'] > 0
  assert 'stability/spike_score' in rows[-1] and 'stability/logz_mean' not in rows[-1]
  assert rows[-1]['rewards/margins'] > 0 and out.evals[-1]['eval_loss'] < e0['eval_loss']


@pytest.mark.slow
def test_full_dpo_keeps_a_frozen_copy_and_resumes_exactly(base, tmp_path):
  straight = loop.train(_dpo_cfg(base, lora=False), str(tmp_path / 'straight'))
  assert 'ref_params' in straight.state
  split = str(tmp_path / 'split')
  loop.train(_dpo_cfg(base, lora=False), split, stop_after=2)
  second = loop.train(_dpo_cfg(base, lora=False), split)
  a = {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
      str(tmp_path / 'straight' / 'metrics.jsonl')) if 'loss' in r}
  b = {r['step']: r['loss'] for r in metrics_lib.read_jsonl(split + '/metrics.jsonl')
       if 'loss' in r}
  assert a == b and len(a) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state['params']),
               jax.device_get(second.state['params']))
  # The reference stayed the start: equal to the base's params.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state['ref_params']),
               jax.device_get(straight.state['ref_params']))
  # Precomputed references: no copy in the state, the same run (to float tolerance),
  # and a resume reads the cached tables instead of recomputing them.
  pre = str(tmp_path / 'pre')
  first = loop.train(_dpo_cfg(base, lora=False, reference='precomputed', eval_every=4),
                     pre, stop_after=2)
  assert 'ref_params' not in first.state
  table = os.path.join(pre, 'ref_logps', 'train.npz')
  stamp = os.stat(table).st_mtime_ns
  loop.train(_dpo_cfg(base, lora=False, reference='precomputed', eval_every=4), pre)
  assert os.stat(table).st_mtime_ns == stamp
  assert os.path.exists(os.path.join(pre, 'ref_logps', 'validation.npz'))
  c = {r['step']: r['loss'] for r in metrics_lib.read_jsonl(pre + '/metrics.jsonl')
       if 'loss' in r}
  assert c == pytest.approx(a, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_dpo_config_errors(base):
  cfg = _dpo_cfg(base)
  cfg.init_from.path = ''
  cfg.lora.enabled = False
  with pytest.raises(config_lib.ConfigError, match="stage='dpo': set init_from.path"):
    config_lib.validate(cfg)
  cfg = _dpo_cfg(base, lora=False)
  cfg.dpo.reference = 'adapters_off'
  with pytest.raises(config_lib.ConfigError, match='needs lora.enabled'):
    config_lib.validate(cfg)
  cfg = _dpo_cfg(base)
  cfg.dpo.loss_type = 'kto'
  with pytest.raises(config_lib.ConfigError, match="'dpo.loss_type' must be one of"):
    config_lib.validate(cfg)
