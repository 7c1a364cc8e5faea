"""GRPO (train/objectives/grpo.py): the sampler's log-probs against the trainer's, the rows a
rollout trains on, and runs of the objective end to end.

The loss formulas themselves are checked against an independent NumPy reference of TRL's
GRPOTrainer in tests/test_grpo_loss.py.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax import generate as gen
from lmjax import rewards as rewards_lib
from lmjax.models import transformer
from lmjax.train import forward, objectives
from util import tiny_config

SAMPLINGS = [dict(temperature=1.0, top_k=0, top_p=1.0),
             dict(temperature=0.7, top_k=8, top_p=1.0),
             dict(temperature=1.3, top_k=0, top_p=0.8),
             dict(temperature=0.9, top_k=16, top_p=0.9)]


def _grpo_cfg(**grpo):
  cfg = tiny_config(dtype='float32')
  cfg.stage = 'grpo'
  cfg.grpo.update(path='builtin:synthetic', max_completion_length=12, **grpo)
  return cfg


@pytest.fixture(scope='module')
def model():
  return _build(tiny_config(dtype='float32'), 0)


def _build(cfg, seed):
  graphdef, state = nnx.split(transformer.build(ml_collections.FrozenConfigDict(cfg.model),
                                                seed=seed))
  return graphdef, nnx.to_pure_dict(state)


def _rollout_rows(model, sampling, *, seed=0, n=8):
  """Completions of n random prompts as the objective's training rows."""
  graphdef, params = model
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(4, 256, int(rng.integers(3, 9))).tolist() for _ in range(n)]
  obj = objectives.get(_grpo_cfg(**sampling))
  out = gen.generate(graphdef, params, prompts, max_new_tokens=12, seed=seed,
                     stop_tokens=(5,), **sampling)
  n_tok = out.lengths + out.stopped
  rows = obj.rows(prompts, out.tokens, n_tok, out.logprobs, np.ones(n))
  return obj, out, n_tok, rows


@pytest.mark.parametrize('sampling', SAMPLINGS, ids=lambda s: '-'.join(map(str, s.values())))
def test_sampler_logps_equal_the_trainers(model, sampling):
  """The trainer's log-prob of each sampled token, under the same truncated, renormalised
  distribution, equals the sampler's within 1e-5 in float32."""
  obj, out, n_tok, rows = _rollout_rows(model, sampling)
  graphdef, params = model
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  logps, entropy = jax.jit(lambda p, b: forward.sampling_logps(graphdef, p, b,
                                                               obj.sampling()))(params, batch)
  mask = rows['loss_mask'] > 0
  assert mask.sum() == n_tok.sum() and n_tok.min() >= 1
  got, want = np.asarray(logps)[mask], rows['old_logps'][mask]
  assert np.all(want <= 0) and np.all(want > -30)
  np.testing.assert_allclose(got, want, atol=1e-5)
  if sampling['top_k'] or sampling['top_p'] < 1:  # some tokens drawn from a truncated set
    plain = forward.sampling_logps(graphdef, params, batch, dict(temperature=sampling[
        'temperature'], top_k=0, top_p=1.0))[0]
    assert np.mean(np.asarray(plain)[mask] < got - 1e-3) > 0.5  # renormalised: higher
  assert np.all(np.asarray(entropy)[mask] >= 0)


def test_importance_ratio_is_one_at_the_first_update_with_top_p():
  """With top-p 0.8 in the default bf16 compute, the mean ratio of trainer to sampler
  probabilities over the completion tokens is 1.000 ± 0.005."""
  graphdef, params = _build(tiny_config(), 1)  # bfloat16 compute
  sampling = dict(temperature=1.0, top_k=0, top_p=0.8)
  obj, _, _, rows = _rollout_rows((graphdef, params), sampling, seed=3, n=16)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  logps = forward.sampling_logps(graphdef, params, batch, obj.sampling())[0]
  mask = rows['loss_mask'] > 0
  ratio = np.exp(np.asarray(logps)[mask] - rows['old_logps'][mask])
  assert mask.sum() > 100
  assert abs(ratio.mean() - 1.0) < 0.005, ratio.mean()


def test_rows_put_completions_after_their_prompts():
  obj = objectives.get(_grpo_cfg())
  prompts = [[1, 10, 11], [1, 12]]
  tokens = np.array([[20, 21, 5, 0], [22, 23, 24, 25]], np.int32)
  n_tok = np.array([3, 4])
  logprobs = -np.arange(1, 9, dtype=np.float32).reshape(2, 4) / 10
  rows = obj.rows(prompts, tokens, n_tok, logprobs, np.array([0.5, -0.5]))
  assert rows['inputs'][0, :5].tolist() == [1, 10, 11, 20, 21]
  assert rows['targets'][0, :5].tolist() == [10, 11, 20, 21, 5]
  assert rows['loss_mask'][0, :6].tolist() == [0, 0, 1, 1, 1, 0]
  np.testing.assert_allclose(rows['old_logps'][0, 2:5], [-0.1, -0.2, -0.3])
  assert rows['segment_ids'][0].sum() == 5 and rows['segment_ids'][1].sum() == 5
  assert rows['loss_mask'][1, :6].tolist() == [0, 1, 1, 1, 1, 0]
  np.testing.assert_allclose(rows['old_logps'][1, 1:5], [-0.5, -0.6, -0.7, -0.8])
  assert rows['advantages'].tolist() == [0.5, -0.5]


# ---- Runs ---------------------------------------------------------------------------------

def short_answers(prompts, completions, completion_ids, **columns):
  """A reward that varies within a group on an untrained model: shorter is better."""
  del prompts, completions, columns
  return [-len(ids) / 8.0 for ids in completion_ids]


def no_opinion(prompts, completions, completion_ids, **columns):
  """None on every other completion: skipped, never NaN."""
  return [None if i % 2 else 1.0 for i in range(len(completions))]


def flat_on_add(prompts, completions, completion_ids, task=None, **columns):
  """Equal rewards for every completion of an 'add' question (a group with no advantage);
  for the rest the parity of the first token, which varies between samples."""
  return [1.0 if t == 'add' else float(ids[0] % 2) if ids else 0.0
          for t, ids in zip(task, completion_ids)]


TRL_METRICS = ('loss', 'reward', 'reward_std', 'rewards/short_answers/mean',
               'rewards/exact_match/mean', 'frac_reward_zero_std', 'entropy',
               'clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean',
               'completions/mean_length', 'completions/clipped_ratio')


def _run_cfg(base, lora=True, train=(), **grpo):
  from util import pretrain_cfg  # pylint: disable=import-outside-toplevel
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'grpo'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=lora, rank=4, alpha=8.0)
  cfg.grpo.update(path='builtin:synthetic', num_generations=4, max_completion_length=8,
                  reward_funcs='exact_match,test_grpo:short_answers', reward_weights='1,0.5')
  cfg.grpo.update(**grpo)
  cfg.sft.update(task_sizes=dict(train=100, validation=16, test=16), eval_examples=4,
                 eval_max_new_tokens=8, template='chatml')
  cfg.data.seq_len = 128  # the test tokenizer's chatml prompts are up to ~100 tokens
  cfg.train.update(global_batch=4, steps=4, eval_every=0)
  cfg.train.update(**dict(train))
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.checkpoint.update(every=2, keep=5)
  return cfg


def _rows(workdir):
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  return [r for r in metrics_lib.read_jsonl(workdir + '/metrics.jsonl') if 'loss' in r]


@pytest.mark.slow
def test_lora_run_with_kl_logs_trl_metrics_and_resumes_exactly(base, tmp_path):
  """LoRA GRPO with a KL to the base (adapters off) on 8 devices: TRL's metrics, a KL that
  starts at 0, and a resume mid-run that samples and trains exactly as the straight run."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  straight = str(tmp_path / 'straight')
  out = loop.train(_run_cfg(base, beta=0.05, train={'eval_every': 4}), straight)
  rows = _rows(straight)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for key in TRL_METRICS + ('kl', 'grpo/dropped', 'completion_tokens', 'time/generate_s',
                            'time/score_s', 'time/update_s', 'rollout_tokens_per_s'):
    assert key in rows[0], key
  assert rows[0]['kl'] == pytest.approx(0.0, abs=1e-6)  # B = 0 adapters: policy = base
  assert all(r['kl'] >= 0 for r in rows) and rows[-1]['kl'] > 0
  assert all(-1.0 <= r['rewards/short_answers/mean'] < 0 for r in rows)
  assert out.evals and 'eval/reward' in out.evals[-1]
  split = str(tmp_path / 'split')
  loop.train(_run_cfg(base, beta=0.05), split, stop_after=2)
  loop.train(_run_cfg(base, beta=0.05), split)
  keys = ('loss', 'kl', 'reward', 'completions/mean_length', 'grad_norm')
  pick = lambda w: {r['step']: tuple(r[k] for k in keys) for r in _rows(w)}
  assert pick(straight) == pick(split)


@pytest.mark.slow
def test_full_fine_tuning_on_one_and_eight_devices_takes_the_same_steps(base, tmp_path):
  """Full fine-tuning, μ = 2 updates a rollout, KL to a frozen copy: the 1-device run
  samples the same completions and takes the same steps as the 8-device one."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  runs = {}
  for n in (1, 8):
    cfg = _run_cfg(base, lora=False, beta=0.05, num_iterations=2, train={'steps': 2})
    cfg.mesh.update(data=n)
    out = loop.train(cfg, str(tmp_path / f'd{n}'), devices=jax.devices()[:n])
    runs[n] = _rows(str(tmp_path / f'd{n}')), jax.device_get(out.state['params'])
  (r1, p1), (r8, p8) = runs[1], runs[8]
  for a, b in zip(r1, r8):
    assert a['completions/mean_length'] == b['completions/mean_length']  # same samples
    assert a['reward'] == b['reward']
    for key in ('loss', 'kl', 'grad_norm', 'entropy'):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
  assert r1[-1]['kl'] > 0
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), p1, p8)


def test_grpo_loss_is_zero_at_one_update_a_rollout_and_none_rewards_are_skipped(base, tmp_path):
  """loss_type 'grpo', μ = 1: every ratio is 1 (float32 compute), each group's advantages
  sum to 0, so the loss is 0 while the gradient is not. A reward function that abstains
  on half the completions gives finite rewards."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  cfg = _run_cfg(base, loss_type='grpo', reward_funcs='test_grpo:short_answers,'
                 'test_grpo:no_opinion', reward_weights='', train={'steps': 2})
  cfg.model.dtype = 'float32'
  loop.train(cfg, str(tmp_path / 'run'))
  rows = _rows(str(tmp_path / 'run'))
  assert len(rows) == 2
  for r in rows:
    assert abs(r['loss']) < 1e-6 and r['grad_norm'] > 1e-4
    assert r['rewards/no_opinion/mean'] == 1.0 and np.isfinite(r['reward'])
    assert r['clip_ratio/region_mean'] == 0.0


@pytest.mark.parametrize('override, message', [
    (dict(num_generations=1), 'grpo.num_generations must be >= 2'),
    (dict(max_completion_length=128), 'grpo.max_completion_length'),
    (dict(temperature=0.0), 'grpo.temperature must be positive'),
    (dict(top_p=0.0), 'grpo.top_p'),
    (dict(num_iterations=0), 'grpo.num_iterations'),
    (dict(reward_funcs='no_such_module:fn'), "grpo.reward_funcs: 'no_such_module:fn'"),
    (dict(reward_funcs='exactmatch'), 'neither a built-in'),
    (dict(reward_weights='1,2'), 'grpo.reward_weights has 2 weights for 2'),
    (dict(reward_weights='a'), 'grpo.reward_weights must be comma-separated numbers'),
    (dict(reference='adapters_off', beta=0.1, lora=False), 'needs lora.enabled'),
])
def test_config_errors_name_the_field(base, override, message):
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from lmjax.errors import UserError  # pylint: disable=import-outside-toplevel
  override = dict(override)
  lora = override.pop('lora', True)
  if 'reward_weights' in override and override['reward_weights'] == '1,2':
    override['reward_funcs'] = 'exact_match'
    message = 'grpo.reward_weights has 2 weights for 1'
  cfg = _run_cfg(base, lora=lora, **override)
  with pytest.raises(UserError, match=message.replace('(', r'\(')):  # one line, the field
    config_lib.validate(cfg)
  cfg = _run_cfg(base, beta=0.1)
  cfg.init_from.path = ''
  with pytest.raises(config_lib.ConfigError, match='grpo.beta > 0 needs init_from.path'):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_dynamic_sampling_refills_the_batch_and_resumes_exactly(base, tmp_path):
  """DAPO's dynamic sampling: groups of equal rewards ('add' questions here) are replaced by
  further prompts' groups; the rounds it took are logged, the rewards are the first
  round's, and a resume mid-run reads and samples what the straight run did."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  kw = dict(lora=False, reward_funcs='test_grpo:flat_on_add', reward_weights='',
            dynamic_sampling=True, max_resample=3)
  straight = str(tmp_path / 'straight')
  loop.train(_run_cfg(base, **kw), straight)
  rows = _rows(straight)
  assert any(r['frac_reward_zero_std'] > 0 for r in rows)
  assert sum(r['dynamic_sampling/filled_groups'] for r in rows) <= 1  # refilled, not padded
  for r in rows:  # a round more whenever the first had a flat group (4 prompts, 1-2 'add')
    assert (r['dynamic_sampling/rounds'] > 1) == (r['frac_reward_zero_std'] > 0)
  split = str(tmp_path / 'split')
  loop.train(_run_cfg(base, **kw), split, stop_after=2)
  loop.train(_run_cfg(base, **kw), split)
  keys = ('loss', 'reward', 'dynamic_sampling/rounds', 'grad_norm', 'grpo/dropped')
  pick = lambda w: {r['step']: tuple(r[k] for k in keys) for r in _rows(w)}
  assert pick(straight) == pick(split)


@pytest.mark.slow
def test_a_reward_model_scores_the_completions(base, tmp_path):
  """grpo.reward_funcs='reward_model': a reward model trained by lmjax (2 steps here)
  scores each completion (prompt + answer, in its own template) on the run's devices."""
  import lmjax  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  from util import pretrain_cfg  # pylint: disable=import-outside-toplevel
  root, workdir = base
  rm_cfg = pretrain_cfg(root)
  rm_cfg.stage, rm_cfg.model.head, rm_cfg.init_from.path = 'reward', 'score', workdir
  rm_cfg.reward.update(path='builtin:synthetic', task_sizes=dict(train=64, validation=8,
                                                                 test=8))
  rm_cfg.sft.template = 'chatml'  # the policy's: prompts as the reward model saw them
  rm_cfg.data.seq_len = 128
  rm_cfg.train.update(global_batch=8, steps=2, eval_every=0, sample_at_end=False)
  rm = str(tmp_path / 'rm')
  loop.train(rm_cfg, rm)
  cfg = _run_cfg(base, reward_funcs='reward_model', reward_weights='', reward_model=rm,
                 train={'steps': 1})
  loop.train(cfg, str(tmp_path / 'grpo'))
  row = _rows(str(tmp_path / 'grpo'))[0]
  assert np.isfinite(row['rewards/reward_model/mean']) and row['rewards/reward_model/std'] > 0
  assert row['reward'] == pytest.approx(row['rewards/reward_model/mean'])
  # The same scores as the reward model gives the conversations itself.
  obj = objectives.get(cfg)
  turns = [[{'role': 'user', 'content': 'What is 2 + 2?'}]] * 2
  scores = obj.rewards(turns, ['4', '5'], [[1], [2]])
  direct = lmjax.load(rm).reward([t + [{'role': 'assistant', 'content': a}]
                                  for t, a in zip(turns, ['4', '5'])])
  np.testing.assert_allclose(scores.total, direct, rtol=1e-6)
  with pytest.raises(Exception, match="grpo.reward_funcs names 'reward_model' but "
                                      'grpo.reward_model is unset'):
    objectives.validate(_run_cfg(base, reward_funcs='reward_model', reward_weights=''))


@pytest.mark.parametrize('train_params', ['', 'embed'])
def test_sampling_with_unmerged_adapters_equals_the_merged_model(model, train_params):
  """generate(adapters=...) samples base + adapters without merging them: the same tokens
  and log-probs as the merged params (lora.train_params' leaves included)."""
  from lmjax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  graphdef, params = model
  cfg = tiny_config(dtype='float32')
  cfg.lora.update(enabled=True, rank=4, alpha=8.0, train_params=train_params)
  adapters = lora_lib.init_adapters(jax.random.key(0), cfg, params=params)
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32),
                          adapters)  # nonzero B (and a trained copy of the embedding)
  merged = lora_lib.merge(params, adapters, cfg)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  kw = dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
  ref = gen.generate(graphdef, merged, prompts, **kw)
  got = gen.generate(graphdef, params, prompts, adapters=adapters, lora=dict(cfg.lora), **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
  plain = gen.generate(graphdef, params, prompts, **kw)
  assert not np.array_equal(plain.tokens, ref.tokens)  # the adapters matter
  with pytest.raises(ValueError, match='adapters need `lora`'):
    gen.generate(graphdef, params, prompts, adapters=adapters, **kw)


def test_prompt_records_and_what_reward_functions_receive(tmp_path):
  """Prompt records as TRL takes them: a string prompt (reward functions get strings), a
  message prompt or a conversation (they get messages; a conversation's last turn becomes
  the 'answer' column); every other field a column; malformed records skipped."""
  from lmjax.data import prompts  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'p.jsonl'
  lines = [{'prompt': 'What is 2 + 2?', 'answer': '4', 'task': 'add'},
           {'prompt': [{'role': 'system', 'content': 'Be short.'},
                       {'role': 'user', 'content': 'Reverse: abc'}], 'answer': 'cba'},
           {'messages': [{'role': 'user', 'content': 'Uppercase: dog'},
                         {'role': 'assistant', 'content': 'DOG'}], 'task': 'upper'},
           {'completion': 'no prompt'},
           {'prompt': [{'role': 'assistant', 'content': 'mine'}]}]
  path.write_text(''.join(json.dumps(x) + '\n' for x in lines))
  items, stats = prompts.read_prompts([str(path)])
  assert stats['skipped'] == 2 and len(items) == 3
  (t0, c0, conv0), (t1, c1, conv1), (t2, c2, conv2) = items
  assert t0 == [{'role': 'user', 'content': 'What is 2 + 2?'}] and not conv0
  assert c0 == {'answer': '4', 'task': 'add'} and len(t1) == 2 and conv1
  assert t2 == [{'role': 'user', 'content': 'Uppercase: dog'}] and conv2
  assert c2 == {'answer': 'DOG', 'task': 'upper'}
  records = prompts.Prompts(items, 'p')
  assert records.columns([0, 1]) == {'answer': ['4', 'cba'], 'task': ['add', None]}

  seen = {}

  def spy(prompts, completions, completion_ids, **columns):
    seen.update(prompts=prompts, completions=completions, columns=columns)
    return [0.0] * len(completions)

  cfg = _grpo_cfg()
  obj = objectives.get(cfg)
  obj._records['x'] = records  # pylint: disable=protected-access
  obj._rewards = rewards_lib.RewardFunctions([spy])  # pylint: disable=protected-access
  out = gen.GenerateOutput(tokens=np.zeros((2, 3), np.int32), lengths=np.array([1, 2]),
                           stopped=np.array([True, False]), steps=3)
  obj.score('x', [0, 2], ['4', 'DOG'], out, 1)
  assert seen['prompts'] == ['What is 2 + 2?', t2]
  assert seen['completions'] == ['4', [{'role': 'assistant', 'content': 'DOG'}]]
  assert seen['columns'] == {'answer': ['4', 'DOG'], 'task': ['add', 'upper']}
