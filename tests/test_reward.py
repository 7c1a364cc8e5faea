"""Reward models (stage='reward') through the one loop: pair data with margin and soft-label
columns, a fresh score head on a language model's body, full fine-tuning and LoRA (resume),
1 vs 8 devices, min/max rewards under gradient accumulation, export to transformers and
lmjax.load(...).reward, config errors.

Covered elsewhere, not repeated here: the Bradley-Terry identities (equal rewards: ln 2;
a margin m: softplus(m); a soft label of 1 is the hard loss) in tests/test_losses.py
(test_bradley_terry_*), and rewards that do not depend on padding side or packing in
tests/test_reward_head.py.
"""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import config as config_lib
from lmjax import sharding, weights
from lmjax.data import preference
from lmjax.data.sources import DataError
from lmjax.models import transformer
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib
from lmjax.train.objectives import reward as reward_obj
from util import pretrain_cfg


def _rm_cfg(base, lora=False, **train):
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'reward'
  cfg.model.head = 'score'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=lora, rank=4, alpha=8.0, train_params='score' if lora else '')
  cfg.reward.update(path='builtin:synthetic',
                    task_sizes=dict(train=400, validation=32, test=32))
  cfg.sft.template = 'plain'  # the built-in pairs in at most 29 tokens of the test tokenizer
  cfg.data.seq_len = 32
  cfg.train.update(global_batch=8, steps=4, eval_every=0, eval_batches=2, sample_at_end=False)
  cfg.train.update(**train)
  cfg.optim.update(lr=3e-3, warmup_steps=0, weight_decay=0.0)
  cfg.checkpoint.update(every=2, keep=5)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  return cfg


def _write(path, objs):
  path.write_text(''.join((o if isinstance(o, str) else json.dumps(o)) + '\n' for o in objs))
  return path


def _tokenizer(base):
  return lmjax.load(base[1]).tokenizer


def _batch(cfg, tok, split='validation', batch_size=4):
  it = preference.make_pair_iterator(cfg, tok, split, batch_size=batch_size, group='reward')
  b = {k: v for k, v in next(it).items() if k not in preference.COUNTS}
  it.close()
  return b


# ---- Data ------------------------------------------------------------------------------

def test_margin_and_label_columns(base, tmp_path):
  pair = {'prompt': 'What is 2 + 2?', 'chosen': '4', 'rejected': '5'}
  _write(tmp_path / 'train.jsonl', [dict(pair, margin=1.5, label=0.75), pair,
                                    dict(pair, margin=None, label=1)])
  cfg = _rm_cfg(base)
  cfg.reward.update(path=str(tmp_path / '{split}.jsonl'), on_error='fail')
  cfg.data.update(worker_threads=0, prefetch=0, shuffle=False)
  tok = _tokenizer(base)
  b = _batch(cfg, tok, 'train', batch_size=3)
  # Both rows of a pair carry its values; absent (or null) -> margin 0, label 1 (hard).
  assert b['margin'].tolist() == [1.5, 1.5, 0, 0, 0, 0]
  assert b['label'].tolist() == [0.75, 0.75, 1, 1, 1, 1]
  assert b['margin'].dtype == b['label'].dtype == np.float32
  # DPO's pairs keep no columns.
  assert len(preference.normalize_pair(dict(pair, margin=2.0))) == 3
  for bad, msg in (({'label': 1.5}, r'"label" .* must be in \[0, 1\]'),
                   ({'label': 'yes'}, '"label" must be a number'),
                   ({'margin': float('nan')}, '"margin" must be finite'),
                   ({'margin': True}, '"margin" must be a number')):
    _write(tmp_path / 'bad.jsonl', [pair, dict(pair, **bad)])
    with pytest.raises(DataError, match=rf'bad.jsonl:2: malformed preference pair: {msg}'):
      preference.read_pairs([str(tmp_path / 'bad.jsonl')], 'fail', 'reward')
    pairs, stats = preference.read_pairs([str(tmp_path / 'bad.jsonl')], 'skip', 'reward')
    assert len(pairs) == 1 and stats['skipped'] == 1


# ---- Init and config -------------------------------------------------------------------

def test_init_from_a_language_model_gives_a_fresh_score_head(base):
  cfg = _rm_cfg(base)
  config_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  source = weights.open_init_source(cfg.init_from)
  params = jax.device_get(source.load_params(cfg, setup))
  lm, _, _, _ = weights.load_params(base[1])
  lm = jax.device_get(lm)
  assert 'score' not in lm and 'score' in params and 'lm_head' not in params
  body = {k: v for k, v in params.items() if k != 'score'}
  jax.tree.map(np.testing.assert_array_equal, body,
               {k: v for k, v in lm.items() if k != 'lm_head'})
  want = cfg.model.init_std * jax.random.normal(weights.score_key(cfg.seed), (64, 1))
  np.testing.assert_allclose(params['score'], np.asarray(want), rtol=1e-6)
  assert setup.objective.row_keys == {'margin': jnp.float32, 'label': jnp.float32}
  # FLOPs: a [D, 1] head instead of the [D, V] projection.
  lm = cfg.model.copy_and_resolve_references()
  lm.head = 'lm'
  assert (transformer.flops_per_token(lm, 32) - transformer.flops_per_token(cfg.model, 32)
          == 6 * 64 * (384 - 1))


def test_config_errors_name_the_field(base):
  cfg = _rm_cfg(base)
  cfg.model.head = 'lm'
  with pytest.raises(config_lib.ConfigError, match="set model.head='score'"):
    config_lib.validate(cfg)
  cfg = _rm_cfg(base, lora=True)
  cfg.lora.train_params = 'embed'
  with pytest.raises(config_lib.ConfigError,
                     match=r"lora.train_params='embed' does not match it.*'score'"):
    config_lib.validate(cfg)
  cfg = _rm_cfg(base)
  cfg.train.sample_at_end = True
  with pytest.raises(config_lib.ConfigError, match='train.sample_at_end=False'):
    config_lib.validate(cfg)
  cfg = _rm_cfg(base)
  cfg.reward.overlong = 'cut'
  with pytest.raises(config_lib.ConfigError, match="'reward.overlong' must be one of"):
    config_lib.validate(cfg)


# ---- The step --------------------------------------------------------------------------

def _step(cfg, tok, devices, params):
  """(metrics, params after one step) of a fresh state from `params` on `devices`."""
  c = cfg.copy_and_resolve_references()
  if len(devices) == 1:
    c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, devices)
  setup = state_lib.make_setup(c, mesh)
  p = jax.device_put(params, setup.state_shardings['params'])
  state = state_lib.init_state(c, setup, params=p)
  b = _batch(c, tok, 'train', c.train.global_batch)
  state, m = step_lib.make_train_step(c, setup)(state, sharding.place_batch(b, mesh, c.rules))
  return {k: float(v) for k, v in jax.device_get(m).items()}, jax.device_get(state['params'])


@pytest.mark.slow
def test_one_device_and_eight_give_the_same_step(base):
  cfg = _rm_cfg(base)
  tok = _tokenizer(base)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  params = jax.device_get(weights.open_init_source(cfg.init_from).load_params(cfg, setup))
  m1, p1 = _step(cfg, tok, jax.devices()[:1], params)
  m8, p8 = _step(cfg, tok, jax.devices(), params)
  for k in ('loss', 'accuracy', 'margin', 'mean_reward', 'min_reward', 'max_reward',
            'grad_norm', 'pairs'):
    assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
  assert m1['pairs'] == 8 and m1['min_reward'] < m1['max_reward']
  # Adam's first step moves each entry by lr·g/(|g| + eps): where g is ~0 its sign (and so
  # the step, up to ±lr) depends on the reduction order, so a few entries may differ by up
  # to 2·lr; the gradients themselves agree (grad_norm above).
  lr = cfg.optim.lr
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert diff.max() <= 2 * lr * (1 + 1e-3)
    assert np.mean(diff > 1e-5 * np.abs(np.asarray(b)) + 1e-6) < 1e-2


def test_min_and_max_reward_are_the_batch_extremes_under_grad_accum(base):
  cfg = _rm_cfg(base, grad_accum=2)
  tok = _tokenizer(base)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  params = weights.open_init_source(cfg.init_from).load_params(cfg, setup)
  b = _batch(cfg, tok, 'train', cfg.train.global_batch)
  placed = sharding.place_batch(b, mesh, cfg.rules)
  r = np.asarray(jax.device_get(reward_obj.pair_rewards(setup.graphdef, params, placed)))
  m, _ = _step(cfg, tok, jax.devices(), jax.device_get(params))
  assert m['min_reward'] == pytest.approx(r.min(), abs=1e-5)
  assert m['max_reward'] == pytest.approx(r.max(), abs=1e-5)
  assert m['mean_reward'] == pytest.approx(r.mean(), abs=1e-5)
  rc, rr = r[0::2], r[1::2]
  assert m['accuracy'] == pytest.approx(np.mean(rc > rr))
  assert m['loss'] == pytest.approx(np.mean(np.log1p(np.exp(-(rc - rr)))), rel=1e-5)


# ---- End to end ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def full_run(base, tmp_path_factory):
  """A short full fine-tuning run of a reward model from the base LM."""
  workdir = str(tmp_path_factory.mktemp('rm') / 'full')
  cfg = _rm_cfg(base, steps=24, log_every=4, eval_every=24, eval_batches=4)
  cfg.reward.task_sizes.train = 32  # 4 batches: 6 epochs in 24 steps
  return cfg, workdir, loop.train(cfg, workdir)


def _split_stats(cfg, setup, params, tok, split):
  """(mean loss, accuracy) of `params` over the 4 first batches of `split`."""
  it = preference.make_pair_iterator(cfg, tok, split, batch_size=cfg.train.global_batch,
                                     group='reward', repeat=False)
  r = []
  for host in itertools.islice(it, 4):
    b = {k: host[k] for k in setup.objective.batch_keys}
    r.append(np.asarray(jax.device_get(reward_obj.pair_rewards(
        setup.graphdef, params, sharding.place_batch(b, setup.mesh, cfg.rules)))))
  it.close()
  r = np.concatenate(r)
  d = r[0::2] - r[1::2]
  return float(np.mean(np.log1p(np.exp(-d)))), float(np.mean(d > 0))


@pytest.mark.slow
def test_full_fine_tuning_learns_the_preferences(full_run):
  cfg, workdir, out = full_run
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in r]
  for key in ('loss', 'accuracy', 'margin', 'mean_reward', 'min_reward', 'max_reward',
              'pairs', 'reward/dropped', 'reward/truncated', 'grad_norm'):
    assert key in rows[0], key
  assert rows[-1]['loss'] < rows[0]['loss']
  # Over the whole train split (32 pairs), before and after: loss down, accuracy up.
  start = weights.open_init_source(cfg.init_from).load_params(cfg, out.setup)
  loss0, acc0 = _split_stats(cfg, out.setup, start, out.tokenizer, 'train')
  loss1, acc1 = _split_stats(cfg, out.setup, out.state['params'], out.tokenizer, 'train')
  assert loss1 < loss0 - 0.05 and acc1 > acc0, (loss0, loss1, acc0, acc1)
  e0, e1 = out.evals[0], out.evals[-1]
  assert set(e0) >= {'eval_loss', 'eval_pairs', 'eval/accuracy', 'eval/margin',
                     'eval/mean_reward', 'eval/min_reward', 'eval/max_reward'}
  assert e0['eval_loss'] == pytest.approx(math.log(2), abs=0.01)  # a fresh head: r ~ 0
  assert e0['eval_pairs'] == 32 and e1['eval/min_reward'] <= e1['eval/max_reward']
  assert out.sample is None


@pytest.mark.slow
def test_export_to_transformers_and_load_reward_match_the_eval_path(full_run, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cfg, workdir, out = full_run
  tok = out.tokenizer
  b = _batch(cfg, tok)
  placed = sharding.place_batch(b, out.setup.mesh, cfg.rules)
  want = np.asarray(jax.device_get(reward_obj.pair_rewards(
      out.setup.graphdef, out.state['params'], placed)))
  seqs = [row[seg > 0].tolist() for row, seg in zip(b['inputs'], b['segment_ids'])]
  # lmjax.load(...).reward: token ids, and the pairs' conversations rendered as training does.
  model = lmjax.load(workdir)
  np.testing.assert_allclose(model.reward(seqs), want, atol=1e-5)
  pairs = preference.get_pairs(cfg, 'validation', 'reward')
  first = pairs[0]
  convs = [first[0] + first[1], first[0] + first[2]]
  enc = preference.encode_pair(first, tok, cfg.sft.template)
  np.testing.assert_allclose(model.reward(convs), model.reward([enc[1].tolist(),
                                                                enc[3].tolist()]), atol=1e-6)
  # Export: LlamaForSequenceClassification, score.weight, pad_token_id; transformers'
  # scores of right-padded rows match.
  hf_dir = str(tmp_path / 'hf')
  weights.export_workdir(workdir, hf_dir)
  c = json.load(open(os.path.join(hf_dir, 'config.json')))
  assert c['architectures'] == ['LlamaForSequenceClassification']
  assert c['pad_token_id'] == tok.pad_id
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      hf_dir, dtype=torch.float32).eval()
  n = max(map(len, seqs))
  ids = torch.full((len(seqs), n), tok.pad_id, dtype=torch.long)
  mask = torch.zeros((len(seqs), n), dtype=torch.long)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
  with torch.no_grad():
    got = hf_model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  # Import of the export scores the same.
  np.testing.assert_allclose(lmjax.load(hf_dir).reward(seqs), want, atol=1e-4)


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_score_and_resumes(base, tmp_path):
  cfg = _rm_cfg(base, lora=True)
  straight = loop.train(cfg, str(tmp_path / 'straight'))
  ad = jax.device_get(straight.state['adapters'])
  assert set(ad['full']) == {'score'} and 'opt_state' in straight.state
  fresh = weights.open_init_source(cfg.init_from)
  assert fresh.model['head'] == 'lm'
  base_score = jax.device_get(straight.state['params']['score'])  # the frozen fresh head
  assert not np.allclose(ad['full']['score'], base_score)  # the head trained
  assert np.abs(ad['layers']['attn']['q']['b']).max() > 0  # so did the adapters
  split = str(tmp_path / 'split')
  loop.train(_rm_cfg(base, lora=True), split, stop_after=2)
  second = loop.train(_rm_cfg(base, lora=True), split)
  a = {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
      str(tmp_path / 'straight' / 'metrics.jsonl')) if 'loss' in r}
  b = {r['step']: r['loss'] for r in metrics_lib.read_jsonl(split + '/metrics.jsonl')
       if 'loss' in r}
  assert a == b and len(a) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state['adapters']), ad)
  # lmjax.load merges the adapters and the trained head onto the base.
  model = lmjax.load(split)
  b = _batch(cfg, straight.tokenizer)
  seqs = [row[seg > 0].tolist() for row, seg in zip(b['inputs'], b['segment_ids'])]
  placed = sharding.place_batch(b, straight.setup.mesh, cfg.rules)
  w = straight.setup.weights(straight.state)
  want = reward_obj.pair_rewards(straight.setup.graphdef, w['params'], placed,
                                 adapters=w['adapters'], lora=straight.setup.lora)
  np.testing.assert_allclose(model.reward(seqs), np.asarray(jax.device_get(want)), atol=1e-5)
  assert math.isfinite(b['margin'].sum())


def test_a_hugging_face_causal_lm_becomes_a_reward_model(tmp_path):
  """init_from a *ForCausalLM: its body and a fresh score head; exported with the source's
  config.json, it is the *ForSequenceClassification of that model, and transformers
  scores it as lmjax does."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from lmjax import evaluate, hf  # pylint: disable=import-outside-toplevel
  from lmjax.train import compat  # pylint: disable=import-outside-toplevel
  config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, pad_token_id=0)
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(config).eval()
  lm.save_pretrained(str(tmp_path / 'lm'))
  cfg = hf.config_from_hf(str(tmp_path / 'lm')).copy_and_resolve_references()
  cfg.update_from_flattened_dict({'model.head': 'score', 'model.init_std': 0.5,
                                  'mesh.fsdp': 1, 'mesh.data': 1})
  source = weights.open_init_source({'path': str(tmp_path / 'lm'), 'format': 'auto',
                                     'step': -1})
  compat.check_init_source(source, cfg)  # head lm -> score: allowed
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  params = source.load_params(cfg, setup)
  assert 'lm_head' not in params and params['score'].shape == (32, 1)
  np.testing.assert_array_equal(np.asarray(params['embed']),
                                lm.model.embed_tokens.weight.detach().numpy())
  hf.save_hf(params, cfg, str(tmp_path / 'rm'), hf_config=source.hf_config)
  c = json.load(open(tmp_path / 'rm' / 'config.json'))
  assert c['architectures'] == ['LlamaForSequenceClassification'] and c['pad_token_id'] == 0
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / 'rm'), dtype=torch.float32).eval()
  seqs = [[5, 9, 17, 3], [7, 8, 9, 10, 11, 12]]
  want = evaluate.sequence_rewards(setup.graphdef, params, seqs, mesh=mesh, rules=cfg.rules)
  ids = torch.tensor([s + [0] * (6 - len(s)) for s in seqs])
  with torch.no_grad():
    got = rm(input_ids=ids, attention_mask=(ids > 0).long()).logits[:, 0].numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  # A reward model cannot become a language model again, nor resume as one.
  lm_cfg = cfg.copy_and_resolve_references()
  lm_cfg.model.head = 'lm'
  with pytest.raises(config_lib.ConfigError, match="model.head: source 'score' vs config 'lm'"):
    compat.check_init_source(weights.InitSource('x', 'lmjax', 1, cfg.model.to_dict(), ''),
                             lm_cfg)
  with pytest.raises(Exception, match="model.head: checkpoint 'lm' vs config 'score'"):
    compat.check_resumable(lm_cfg, cfg, 'x')
