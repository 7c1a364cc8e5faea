"""AI feedback (lmjax/ai_feedback.py, tools/ai_feedback.py): constitutions, the judge's
scoring (both orderings, option tokens), clamping and near-tie drops, critique-and-revise
data, and the outputs as SFT / DPO / KTO / reward-model / GRPO inputs."""

import json
import os

import jax
import numpy as np
import pytest

import lmjax
from lmjax import ai_feedback, evaluate, rewards
from lmjax.data import feedback, formats, preference, sft_task
from lmjax.train import loop, losses
from util import pretrain_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, 'tools', 'ai_feedback.py')
SHIPPED = os.path.join(ROOT, 'configs', 'constitution_tiny.json')
# A planted rule: the judge is trained to prefer the built-in 'upper' task's right answer
# ('CAT' to 'Uppercase: cat') over its plausible wrong ones ('cat', 'Cat').
PLANTED = {
    'principles': [{'name': 'upper', 'critique': 'Is the answer all capitals?',
                    'revision': 'Write it in capitals.',
                    'preference': 'Which is in capitals?'}],
    'judge_template': '{prompt}\n(A) {response_a}\n(B) {response_b}'}


def _upper_pairs(split, n):
  return [(p['prompt'][0]['content'], p['chosen'][0]['content'], p['rejected'][0]['content'])
          for p in sft_task.make_pairs(n, seed=0, split=split, tasks=('upper',))]


@pytest.fixture(scope='module')
def judge_dir(base, tmp_path_factory):
  """A judge lmjax trains in 150 steps of SFT (on 8 devices) from the tiny base model on
  judge prompts of the upper task's train questions (ai_feedback.judge_sft_examples)."""
  root, workdir = base
  d = tmp_path_factory.mktemp('judge_data')
  c = ai_feedback.Constitution.from_dict(PLANTED)
  for split, n in (('train', 2000), ('validation', 32)):
    ai_feedback.write_jsonl(str(d / f'{split}.jsonl'),
                            ai_feedback.judge_sft_examples(c, _upper_pairs(split, n), seed=1))
  cfg = pretrain_cfg(root)
  cfg.stage = 'sft'
  cfg.init_from.path = workdir
  cfg.sft.path = str(d / '{split}.jsonl')
  cfg.data.seq_len = 128
  cfg.train.update(steps=150, eval_every=0, global_batch=16)
  cfg.optim.update(lr=3e-3, warmup_steps=10)
  out = str(tmp_path_factory.mktemp('judge') / 'judge')
  loop.train(cfg, out)
  return out


@pytest.fixture(scope='module')
def planted(judge_dir):
  return ai_feedback.Judge(lmjax.load(judge_dir), ai_feedback.Constitution.from_dict(PLANTED))


# ---- Constitution -------------------------------------------------------------------

def test_the_shipped_constitution_loads():
  c = ai_feedback.Constitution.load(SHIPPED)
  assert len(c.principles) >= 3 and all(p.preference for p in c.judge_principles())
  assert c.options == ('(A)', '(B)') and c.few_shot[-1]['role'] == 'assistant'


@pytest.mark.parametrize('change, message', [
    (dict(principles=[]), '"principles" must be a non-empty list'),
    (dict(principles=[{'name': 'x', 'critique': 'c'}]), r'principles\[0\] needs a non-empty '
                                                        '"revision"'),
    (dict(judge_template='{response_a} vs {answer}'), r"unknown field\(s\) \['answer'\]"),
    (dict(judge_template='{response_a} only'), 'must contain {response_b}'),
    (dict(options=['(A)', '(A)']), '"options" must be two different'),
    (dict(few_shot=[{'role': 'user', 'content': 'hi'}]), 'few_shot must end with an assistant'),
    (dict(colour='red'), r"unknown field\(s\) \['colour'\]"),
])
def test_constitution_errors_name_the_file_and_field(tmp_path, change, message):
  path = tmp_path / 'c.json'
  path.write_text(json.dumps({**PLANTED, **change}))
  with pytest.raises(ai_feedback.ConstitutionError, match=message) as e:
    ai_feedback.Constitution.load(str(path))
  assert str(path) in str(e.value)
  with pytest.raises(ai_feedback.ConstitutionError, match='not found'):
    ai_feedback.Constitution.load(str(tmp_path / 'missing.json'))
  (tmp_path / 'bad.json').write_text('{"principles": [')
  with pytest.raises(ai_feedback.ConstitutionError, match='not valid JSON'):
    ai_feedback.Constitution.load(str(tmp_path / 'bad.json'))


# ---- Labels -------------------------------------------------------------------------

def test_clamp_and_near_tie_drop():
  p = np.array([0.05, 0.45, 0.5, 0.58, 0.62, 0.97])
  keep, q = ai_feedback.clamp_and_filter(p, min_confidence=0.6)
  assert keep.tolist() == [True, False, False, False, True, True] and np.array_equal(q, p)
  keep, q = ai_feedback.clamp_and_filter(p, clamp=(0.4, 0.6))
  assert keep.all() and q.tolist() == [0.4, 0.45, 0.5, 0.58, 0.6, 0.6]
  # the drop judges the unclamped p; clamping comes after
  keep, q = ai_feedback.clamp_and_filter(p, clamp=(0.4, 0.6), min_confidence=0.6)
  assert keep.tolist() == [True, False, False, False, True, True]
  assert q[keep].tolist() == [0.4, 0.6, 0.6]
  with pytest.raises(ValueError, match='clamp'):
    ai_feedback.clamp_and_filter(p, clamp=(0.6, 0.9))
  # records: oriented so chosen is the judge's pick (p written >= 0.5), identical answers
  # and near-ties dropped, clamped
  recs, counts = ai_feedback.label_records(
      ['q1', 'q2', 'q3', 'q4'], ['x', 'same', 'a', 'm'], ['y', 'same', 'b', 'n'],
      np.array([0.2, 0.5, 0.9, 0.52]), clamp=(0.4, 0.6), min_confidence=0.55,
      columns=[{'answer': 'y', 'p': 7}] * 4)
  assert counts == {'pairs': 4, 'identical': 1, 'near_ties': 1, 'kept': 2}
  assert recs == [{'prompt': 'q1', 'chosen': 'y', 'rejected': 'x', 'p': 0.6, 'answer': 'y'},
                  {'prompt': 'q3', 'chosen': 'a', 'rejected': 'b', 'p': 0.6, 'answer': 'y'}]


def test_dpo_soft_labels_are_per_pair_label_smoothing():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 3, 6).astype(np.float32) for _ in range(4))
  p = np.array([1.0, 0.9, 0.75, 0.5, 0.3, 0.0], np.float32)
  soft, _ = losses.dpo(pc, pr, rc, rr, beta=0.3, labels=p)
  h = (pc - pr) - (rc - rr)
  logsig = lambda x: -np.logaddexp(0.0, -x)
  want = -(p * logsig(0.3 * h) + (1 - p) * logsig(-0.3 * h))
  np.testing.assert_allclose(soft, want, rtol=1e-5)
  hard, _ = losses.dpo(pc, pr, rc, rr, beta=0.3)
  np.testing.assert_allclose(soft[0], hard[0], rtol=1e-6)  # p = 1: DPO
  for eps in (0.1, 0.25):  # constant p = 1 - eps: conservative DPO (label_smoothing)
    a, _ = losses.dpo(pc, pr, rc, rr, beta=0.3, labels=np.full(6, 1 - eps, np.float32))
    b, _ = losses.dpo(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # the loss is least where the implicit reward margin beta*h is logit(p): a soft label
  # asks for that much preference, no more (p = 0.5: indifference, h = 0)
  q = p[1:-1]
  at = pr[1:-1] + rc[1:-1] - rr[1:-1] + np.log(q / (1 - q)) / 0.3  # beta*h = logit(p)
  g = jax.grad(lambda x: losses.dpo(x, pr[1:-1], rc[1:-1], rr[1:-1], beta=0.3,
                                    labels=q)[0].sum())(at)
  np.testing.assert_allclose(g, 0.0, atol=1e-5)
  with pytest.raises(ValueError, match='sigmoid'):
    losses.dpo(pc, pr, rc, rr, loss_type='hinge', labels=p)


def test_ai_labels_load_as_reward_dpo_and_kto_data(tmp_path, base):
  recs = [{'prompt': 'Q?', 'chosen': 'yes', 'rejected': 'no', 'p': 0.8},
          {'prompt': [{'role': 'user', 'content': 'R?'}],
           'chosen': [{'role': 'assistant', 'content': 'a'}],
           'rejected': [{'role': 'assistant', 'content': 'b'}], 'p': 0.3}]
  path = tmp_path / 'labels.jsonl'
  ai_feedback.write_jsonl(str(path), recs)
  pairs, _ = preference.read_pairs([str(path)], 'fail', 'reward')
  assert [x[3]['label'] for x in pairs] == [0.8, 0.3]  # p is the reward model's soft label
  pairs, _ = preference.read_pairs([str(path)], 'fail', 'dpo', ('label',))
  assert [x[3]['label'] for x in pairs] == [0.8, 0.3]
  examples, _ = feedback.read_feedback([str(path)], 'fail')
  assert [(e[1][-1]['content'], e[2], round(e[3], 6)) for e in examples] == [
      ('yes', True, 0.6), ('no', False, 0.6), ('a', False, 0.4), ('b', True, 0.4)]
  # DPO rows carry each pair's label with dpo.soft_labels; KTO rows their weights
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.data.seq_len = 96
  cfg.dpo.update(path=str(path), soft_labels=True)
  cfg.kto.update(path=str(path))
  tok = lmjax.load(workdir).tokenizer
  os.replace(path, tmp_path / 'train.jsonl')
  cfg.dpo.path = cfg.kto.path = str(tmp_path / '{split}.jsonl')
  batch = next(preference.make_pair_iterator(cfg, tok, 'train', batch_size=2, repeat=False))
  np.testing.assert_allclose(sorted(batch['label']), [0.3, 0.3, 0.8, 0.8], rtol=1e-6)
  batch = next(feedback.make_feedback_iterator(cfg, tok, 'train', batch_size=4, repeat=False))
  np.testing.assert_allclose(sorted(batch['weight']), [0.4] * 4 + [0.6] * 4, rtol=1e-6)


def test_cai_layout_pairs_drop_the_repeated_prompt():
  # chosen / rejected holding the whole conversation, as the public CAI datasets do
  obj = {'prompt': 'Hi?', 'chosen': [{'role': 'user', 'content': 'Hi?'},
                                     {'role': 'assistant', 'content': 'Hello.'}],
         'rejected': [{'role': 'user', 'content': 'Hi?'},
                      {'role': 'assistant', 'content': 'Go away.'}]}
  prompt, chosen, rejected = preference.normalize_pair(obj)
  assert [t['content'] for t in prompt] == ['Hi?']
  assert chosen == [{'role': 'assistant', 'content': 'Hello.'}]
  assert rejected == [{'role': 'assistant', 'content': 'Go away.'}]


# ---- The judge ----------------------------------------------------------------------

def test_the_scorer_reads_the_full_forward_at_the_last_position(base):
  m = lmjax.load(base[1])  # 8 devices, FSDP
  rng = np.random.default_rng(0)
  seqs = [rng.integers(4, 384, n).tolist() for n in (3, 17, 31, 5, 9)]
  choices = [[5, 9]] * len(seqs)
  got = evaluate.choice_logprobs(m.graphdef, m.params, seqs, choices, mesh=m.mesh,
                                 rules=m.config.rules, batch_size=2)
  for s, g in zip(seqs, got):
    logits = m.logits(s)[-1].astype(np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    np.testing.assert_allclose(g, logits[[5, 9]] - lse, atol=2e-5)
  one = lmjax.load(base[1], devices=jax.devices()[:1])
  np.testing.assert_allclose(
      evaluate.choice_logprobs(one.graphdef, one.params, seqs, choices), got, atol=2e-5)


def test_judge_orderings_average_to_complementary_probabilities(planted):
  prompts = ['Uppercase: abc', 'Uppercase: xyz', 'Uppercase: qqq']
  a, b = ['ABC', 'xyz', 'QQQ'], ['abc', 'XYZ', 'Qqq']
  fwd = planted.compare(prompts, a, b, seed=3)
  rev = planted.compare(prompts, b, a, principles=fwd.principles)
  np.testing.assert_allclose(fwd.p + rev.p, 1.0, rtol=0, atol=1e-12)
  # each ordering alone is not complementary: the average is what cancels position bias
  assert not np.allclose(fwd.p_first[..., 0] + rev.p_first[..., 0], 1.0, atol=1e-3)
  same = planted.compare(['Uppercase: abc'], ['ABC'], ['ABC'])
  assert same.p[0] == 0.5


def test_a_judge_trained_on_a_planted_rule_agrees_with_it(planted):
  test = _upper_pairs('test', 200)  # questions never in the judge's training split
  assert not {q for q, _, _ in test} & {q for q, _, _ in _upper_pairs('train', 2000)}
  res = planted.compare([t[0] for t in test], [t[1] for t in test], [t[2] for t in test])
  agreement = float(np.mean(res.p > 0.5))
  assert agreement >= 0.9, agreement


def test_the_judge_as_a_grpo_reward(judge_dir, tmp_path):
  path = tmp_path / 'c.json'
  path.write_text(json.dumps(PLANTED))
  fns = rewards.RewardFunctions(['judge'], judge={'path': judge_dir,
                                                  'constitution': str(path)})
  prompts = ['Uppercase: abc'] * 3 + ['Uppercase: mno'] * 2 + ['Uppercase: zzz']
  completions = ['abc', 'ABC', 'Abc', 'MNO', 'mno', 'ZZZ']
  scores = fns(prompts, completions, [[1]] * 6)
  r = scores.total
  # each completion: its mean probability of beating its group's others
  np.testing.assert_allclose(r[:3].mean(), 0.5, atol=1e-12)
  np.testing.assert_allclose(r[3:5].sum(), 1.0, atol=1e-12)
  assert r[5] == 0.5  # a group of one has nobody to beat
  assert np.argmax(r[:3]) == 1 and r[3] > r[4]
  np.testing.assert_array_equal(fns(prompts, completions, [[1]] * 6).total, r)
  with pytest.raises(rewards.RewardError, match='grpo.judge or grpo.constitution is unset'):
    rewards.RewardFunctions(['judge'])


# ---- The tool -----------------------------------------------------------------------

def _tool(*args):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('ai_feedback_tool', TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main(list(args))


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:.*longer than the')  # a tiny model, long prompts
def test_revise_and_judge_write_the_same_bytes_for_a_seed_and_feed_training(
    base, judge_dir, tmp_path):
  root, workdir = base
  common = ['--constitution', SHIPPED, '--prompts', 'builtin:synthetic', '--limit', '6',
            '--max_new_tokens', '6', '--seed', '4']
  outs = []
  for k in range(2):
    out = str(tmp_path / f'revised{k}.jsonl')
    assert _tool('revise', '--policy', workdir, '--out', out, '--rounds', '2', *common) == 0
    outs.append(open(out, 'rb').read())
  assert outs[0] == outs[1]
  recs = [json.loads(line) for line in outs[0].decode().splitlines()]
  assert len(recs) == 6 and all(len(r['revisions']) == 2 for r in recs)
  assert all(r['messages'] == r['chosen'] and r['rejected'][:-1] == r['chosen'][:-1]
             for r in recs)
  assert {x['principle'] for r in recs for x in r['revisions']} <= {
      p.name for p in ai_feedback.Constitution.load(SHIPPED).principles}
  # SFT reads the revisions as conversations; DPO and KTO read the pairs
  cfg = pretrain_cfg(root)
  cfg.sft.path = cfg.dpo.path = cfg.kto.path = str(tmp_path / 'revised0.jsonl')
  cfg.sft.eval_path = cfg.dpo.eval_path = cfg.kto.eval_path = str(tmp_path / 'revised1.jsonl')
  cfg.sft.allow_overlap = cfg.dpo.allow_overlap = cfg.kto.allow_overlap = True
  convs = formats.get_conversations(cfg, 'train')
  assert len(convs) == 6 and convs[0][-1]['content'] == recs[0]['chosen'][-1]['content']
  pairs = preference.get_pairs(cfg, 'train')
  assert [t['role'] for t in pairs[0][0]] == ['user'] and len(pairs[0][1]) == 1
  assert len(feedback.get_examples(cfg, 'train')) == 12

  outs = []
  for k in range(2):
    out = str(tmp_path / f'labels{k}.jsonl')
    assert _tool('judge', '--judge', judge_dir, '--policy', workdir, '--out', out,
                 '--principles', '1', '--temperature', '1.0', *common) == 0
    outs.append(open(out, 'rb').read())
  assert outs[0] == outs[1] and outs[0]
  labels = [json.loads(line) for line in outs[0].decode().splitlines()]
  assert all(r['p'] >= 0.5 and {'prompt', 'chosen', 'rejected', 'p', 'answer'} <= set(r)
             for r in labels)
  # existing pairs keep their orientation, with the judge's p
  pairs_path = tmp_path / 'pairs.jsonl'
  ai_feedback.write_jsonl(str(pairs_path), [
      {'prompt': q, 'chosen': good, 'rejected': bad, 'id': i}
      for i, (q, good, bad) in enumerate(_upper_pairs('test', 8))])
  out = str(tmp_path / 'judged.jsonl')
  assert _tool('judge', '--judge', judge_dir, '--pairs', str(pairs_path), '--out', out,
               '--constitution', SHIPPED, '--clamp', '0.4,0.6') == 0
  judged = [json.loads(line) for line in open(out)]
  assert [r['id'] for r in judged] == list(range(8))
  assert all(0.4 <= r['p'] <= 0.6 for r in judged)


def test_tool_errors_are_one_line(tmp_path, capsys, base):
  assert _tool('judge', '--judge', base[1], '--pairs', str(tmp_path / 'none.jsonl'),
               '--out', str(tmp_path / 'o.jsonl'), '--constitution',
               str(tmp_path / 'missing.json')) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'missing.json not found' in err[0]


def _labels_cfg(base, tmp_path, stage):
  """A short LoRA run of `stage` ('dpo' or 'kto') on judge labels of the upper task."""
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  root, workdir = base
  rng = np.random.default_rng(0)
  for split, n in (('train', 64), ('validation', 8)):
    ai_feedback.write_jsonl(str(tmp_path / f'{split}.jsonl'), [
        {'prompt': q, 'chosen': good, 'rejected': bad, 'p': float(p)}
        for (q, good, bad), p in zip(_upper_pairs(split, n), rng.uniform(0.5, 1.0, n))])
  cfg = pretrain_cfg(root)
  cfg.stage = stage
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=True, rank=4, alpha=8.0)
  cfg[stage].update(path=str(tmp_path / '{split}.jsonl'))
  cfg.sft.template = 'plain'
  cfg.data.seq_len = 32
  cfg.train.update(global_batch=8, steps=2, eval_every=0, eval_batches=1)
  cfg.mesh.update(data=-1)
  return cfg, config_lib


@pytest.mark.slow
def test_dpo_trains_on_soft_labels_and_checks_its_loss(base, tmp_path):
  cfg, config_lib = _labels_cfg(base, tmp_path, 'dpo')
  cfg.dpo.soft_labels = True
  for loss_type, smoothing in (('hinge', 0.0), ('sigmoid', 0.1)):
    bad = cfg.copy_and_resolve_references()
    bad.dpo.update(loss_type=loss_type, label_smoothing=smoothing)
    with pytest.raises(config_lib.ConfigError, match='dpo.soft_labels sets a label '
                                                     'smoothing per pair'):
      config_lib.validate(bad)
  loop.train(cfg, str(tmp_path / 'dpo'))
  rows = [json.loads(line) for line in open(tmp_path / 'dpo' / 'metrics.jsonl')]
  first = next(r for r in rows if 'loss' in r)
  # the first step: policy = reference (fresh adapters), h = 0, so every pair's loss is ln 2
  # whatever its p: -p·log σ(0) - (1 - p)·log σ(0)
  assert first['loss'] == pytest.approx(np.log(2), rel=1e-5)


@pytest.mark.slow
def test_kto_weights_examples_by_the_judges_confidence(base, tmp_path):
  cfg, _ = _labels_cfg(base, tmp_path, 'kto')
  loop.train(cfg, str(tmp_path / 'kto'))
  rows = [json.loads(line) for line in open(tmp_path / 'kto' / 'metrics.jsonl')]
  first = next(r for r in rows if 'loss' in r)
  # the first step: policy = reference, every example's KTO loss is λ/2 = 0.5, times its weight
  # |2p - 1|: the loss is half the batch's mean weight
  ex = feedback.get_examples(cfg, 'train')
  assert 0.0 < first['loss'] < 0.45  # unweighted, every example's loss would be 0.5
  weights = np.array([ex.example(i)[3] for i in range(len(ex))])
  assert weights.min() >= 0 and weights.max() <= 1 and weights.std() > 0.05


def test_a_hugging_face_judge_matches_transformers(tmp_path):
  """A Hugging Face chat model as judge: the scored prompt is its chat template's
  rendering with the generation prompt (as transformers' apply_chat_template writes it)
  plus the options' shared tokens, and p(first option) is transformers' next-token
  softmax over the two option tokens."""
  torch = pytest.importorskip('torch')
  from hf_tokenizers import make_bpe_dir  # pylint: disable=import-outside-toplevel
  from test_api import _hf_model  # pylint: disable=import-outside-toplevel
  src = tmp_path / 'hf'
  ref = make_bpe_dir(src, 'chatml')
  hf_model = _hf_model(src, 'Qwen2', vocab_size=len(ref))
  judge = ai_feedback.Judge(lmjax.load(str(src)), ai_feedback.Constitution.load(SHIPPED),
                            principles_per_comparison=2)
  assert judge.template == 'model'
  a_ids, b_ids = (ref(o, add_special_tokens=False)['input_ids'] for o in ('(A)', '(B)'))
  n = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
  assert judge.option_ids == (a_ids[n], b_ids[n])
  prompts, a, b = ['What is 2 + 2?', 'Reverse: abc'], ['4', 'cba'], ['5', 'abc']
  res = judge.compare(prompts, a, b, seed=0)
  for i in range(2):
    for k in range(2):
      pr = judge.principles[int(res.principles[i, k])]
      for order, (x, y) in enumerate(((a[i], b[i]), (b[i], a[i]))):
        text = judge.text(prompts[i], x, y, pr)
        ids = ref.apply_chat_template([{'role': 'user', 'content': text}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)['input_ids']
        ids = list(ids) + a_ids[:n]
        assert judge.sequence(prompts[i], x, y, pr) == ids
        with torch.no_grad():
          logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
        d = float(logits[a_ids[n]] - logits[b_ids[n]])
        np.testing.assert_allclose(res.p_first[i, k, order], 1 / (1 + np.exp(-d)), atol=2e-4)


@pytest.mark.slow
def test_grpo_trains_with_the_judge_as_its_reward(base, judge_dir, tmp_path):
  from test_grpo import _rows, _run_cfg  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'c.json'
  path.write_text(json.dumps(PLANTED))
  cfg = _run_cfg(base, reward_funcs='judge', reward_weights='', judge=judge_dir,
                 constitution=str(path), judge_principles=1, train={'steps': 2})
  cfg.mesh.update(data=-1)
  loop.train(cfg, str(tmp_path / 'grpo'))
  rows = _rows(str(tmp_path / 'grpo'))
  assert len(rows) == 2
  for r in rows:  # each group's judge rewards average 0.5 (every pair judged once)
    assert r['rewards/judge/mean'] == pytest.approx(0.5, abs=1e-6)
    assert r['reward_std'] >= 0 and r['time/score_s'] > 0


def test_the_scorer_benchmark_runs(capsys):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      'bench_judge', os.path.join(ROOT, 'tools', 'bench_judge.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main(['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                   '--prompts', '16', '--len', '32', '--batch', '8']) == 0
  out = capsys.readouterr().out
  assert '16 prompts of 16-32 tokens' in out and 'comparisons/s' in out
