"""KTO: like/dislike data (unpaired and paired records, KL rows, resume), the step-0
identities through the objective, one-sided batches, 1 vs 8 devices, the three references,
a LoRA run with TRL's metric names that resumes exactly, config errors."""

import json
import os

import jax
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import sharding
from lmjax.data import check as data_check
from lmjax.data import feedback, formats, preference, sft_task
from lmjax.data.sources import DataError
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from lmjax.train import ref_logps
from lmjax.train import state as state_lib
from lmjax.train.objectives import kto as kto_lib
from util import pretrain_cfg, sft_tokenizer

SEQ = 128
TRL_METRICS = ('kl', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'logps/chosen',
               'logps/rejected', 'loss')


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return sft_tokenizer(tmp_path_factory.mktemp('tok'), 384)


def write_jsonl(path, objs):
  path.write_text(''.join((o if isinstance(o, str) else json.dumps(o)) + '\n' for o in objs),
                  encoding='utf-8')
  return path


def data_cfg(path, **kto):
  cfg = config_lib.base_config()
  cfg.data.update(seq_len=SEQ, worker_threads=0, prefetch=0)
  cfg.sft.template = 'chatml'
  cfg.kto.update(path=str(path), **kto)
  return cfg


UNPAIRED = [
    {'prompt': 'What is 2 + 2?', 'completion': '4', 'label': True},
    {'prompt': 'What is 2 + 3?', 'completion': '6', 'label': False},
    {'prompt': [{'role': 'user', 'content': 'Reverse: abc'}],
     'completion': [{'role': 'assistant', 'content': 'cba'}], 'label': True},
    {'prompt': [{'role': 'system', 'content': 'Be short.'},
                {'role': 'user', 'content': 'Upper: dog'}],
     'completion': [{'role': 'assistant', 'content': 'dog'}], 'label': False},
]


# ---- Data ---------------------------------------------------------------------------

def test_feedback_formats():
  (p, c, liked, w), = feedback.normalize_feedback(UNPAIRED[0])
  assert p == [{'role': 'user', 'content': 'What is 2 + 2?', 'sep': ''}] and liked is True
  assert c == [{'role': 'assistant', 'content': '4'}]
  (p, c, liked, w), = feedback.normalize_feedback(UNPAIRED[3])
  assert [t['role'] for t in p] == ['system', 'user'] and liked is False
  pair = {'prompt': 'Q?', 'chosen': 'yes', 'rejected': 'no'}
  (p1, c1, l1, w1), (p2, c2, l2, w2) = feedback.normalize_feedback(pair)
  assert p1 == p2 and (c1[0]['content'], l1, c2[0]['content'], l2) == ('yes', True, 'no', False)
  implicit = {'chosen': [{'role': 'user', 'content': 'Q?'}, {'role': 'assistant', 'content': 'y'}],
              'rejected': [{'role': 'user', 'content': 'Q?'},
                           {'role': 'assistant', 'content': 'n'}]}
  assert [x[2] for x in feedback.normalize_feedback(implicit)] == [True, False]
  for bad, msg in (({'prompt': 'Q', 'completion': 'a', 'label': 1}, '"label" must be true'),
                   ({'prompt': 'Q', 'completion': 'a', 'label': 'yes'}, '"label" must be'),
                   ({'prompt': 'Q', 'completion': 'a'}, 'needs "prompt", "completion" and '
                                                        '"label"')):
    with pytest.raises(ValueError, match=msg):
      feedback.normalize_feedback(bad)


def test_bad_label_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / 'train.jsonl',
                     [UNPAIRED[0], {'prompt': 'Q', 'completion': 'a', 'label': 'good'},
                      UNPAIRED[1]])
  with pytest.raises(DataError, match=rf'{path}:2: malformed feedback example: "label"'):
    feedback.get_examples(data_cfg(path, on_error='fail'), 'train')
  examples = feedback.get_examples(data_cfg(path), 'train')  # skip: counted
  assert len(examples) == 2 and examples.stats['skipped'] == 1
  assert examples.where(1) == f'{path}:3'


def test_rows_kl_rows_and_labels(tok, tmp_path):
  path = write_jsonl(tmp_path / 'train.jsonl',
                     UNPAIRED + [{'prompt': 'Q?', 'chosen': 'yes', 'rejected': 'no'}])
  cfg = data_cfg(path)
  cfg.data.shuffle = False
  examples = feedback.get_examples(cfg, 'train')
  assert len(examples) == 6 and examples.labels().tolist() == [1, 0, 1, 0, 1, 0]
  assert examples.where(4) == examples.where(5) == f'{path}:5'  # a pair's two examples
  partner = examples.partner
  assert sorted(partner.tolist()) == list(range(6)) and (partner != np.arange(6)).all()
  it = feedback.make_feedback_iterator(cfg, tok, 'train', batch_size=6, with_index=True,
                                       repeat=False)
  b = next(it)
  it.close()
  assert b['inputs'].shape == (12, SEQ) and b['label'].tolist() == [1, 1, 0, 0] * 3
  for r in range(6):
    i = int(b['index'][2 * r])
    prompt, completion, liked, _ = examples.example(i)
    assert b['label'][2 * r] == liked and b['index'][2 * r + 1] == i
    # The example row is exactly a DPO row of its prompt and completion; the KL row is the
    # same prompt's tokens with the partner's completion.
    other = examples.example(partner[i])[1]
    start, ct, cm, kt, km = preference.encode_pair((prompt, completion, other), tok, 'chatml')
    dpo_row = preference.encode_pair((prompt, completion, completion), tok, 'chatml')
    np.testing.assert_array_equal(ct, dpo_row[1])
    np.testing.assert_array_equal(b['inputs'][2 * r][:len(ct)], ct)
    np.testing.assert_array_equal(b['inputs'][2 * r + 1][:len(kt)], kt)
    np.testing.assert_array_equal(b['inputs'][2 * r][:start], b['inputs'][2 * r + 1][:start])
    assert b['loss_mask'][2 * r].sum() == len(ct) - start
    assert b['loss_mask'][2 * r + 1].sum() == len(kt) - start
    assert tok.decode(kt[start:].tolist()) == other[-1]['content'] + '<|im_end|>'
  # The partners are fixed by (seed, split): the same on every read.
  np.testing.assert_array_equal(feedback.get_examples(cfg, 'train').partner, partner)


def test_builtin_set_splits_pairs_and_the_stream_resumes(tok, tmp_path):
  cfg = data_cfg('builtin:synthetic', task_sizes=dict(train=40, validation=8, test=8))
  cfg.data.data_dir = str(tmp_path)
  examples = feedback.get_examples(cfg, 'train')
  pairs = sft_task.make_pairs(40, 0, 'train')
  assert len(examples) == 80
  for j in (0, 7):
    assert examples.example(2 * j)[1][0]['content'] == pairs[j]['chosen'][0]['content']
    assert examples.example(2 * j + 1)[1][0]['content'] == pairs[j]['rejected'][0]['content']
  assert examples.labels().sum() == 40
  questions = feedback.answer_examples(cfg, 'validation', 3, tok)
  assert [q['answer'] for q in questions] == [
      p['chosen'][0]['content'] for p in sft_task.make_pairs(8, 0, 'validation')[:3]]
  it = feedback.make_feedback_iterator(cfg, tok, 'train', batch_size=4)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  it.close()
  it2 = feedback.make_feedback_iterator(cfg, tok, 'train', batch_size=4)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  it2.close()


def test_data_check_and_weight_balance(tok, tmp_path):
  rows = UNPAIRED + [{'prompt': 'Q?', 'completion': ' ', 'label': True}]
  path = write_jsonl(tmp_path / '{split}.jsonl'.format(split='train'), rows)
  write_jsonl(tmp_path / 'validation.jsonl', [UNPAIRED[0], UNPAIRED[1]])
  cfg = data_cfg(str(tmp_path / '{split}.jsonl'), max_degenerate=0.5)
  cfg.train.eval_every = 1
  with pytest.raises(DataError, match='are also in the train split'):
    data_check.check_stage(cfg, tok, 'kto', log=lambda s: None)
  cfg.kto.allow_overlap = True
  lines = []
  checked = data_check.check_stage(cfg, tok, 'kto', log=lines.append)
  train = checked.splits['train']
  assert train.counts == {'empty_completion': 1, 'no_room': 0}
  assert train.first == f'{path}:5' and checked.keep['train'].tolist() == [0, 1, 2, 3]
  assert any('kto data, train split: 5 examples' in s and '1 degenerate dropped' in s
             for s in lines)
  # The objective's check counts the labels of the kept train examples (2 liked, 2
  # disliked) and warns when λD·nD / (λU·nU) is outside [1, 4/3], naming a fix.
  cfg.kto.desirable_weight = 2.0
  lines = []
  kto_lib.KTO(cfg).check_data(tok, lines.append)
  assert lines[-1] == ('WARNING: kto data has 2 liked and 2 disliked training examples: '
                       'kto.desirable_weight x liked / (kto.undesirable_weight x disliked) = '
                       "2.000, outside [1, 4/3] (the KTO paper's advice); set e.g. "
                       'kto.undesirable_weight=2')
  assert kto_lib.balance_warning(10, 10, 1.0, 1.0) is None
  assert kto_lib.balance_warning(12, 10, 1.0, 1.0) is None
  low = kto_lib.balance_warning(10, 30, 1.0, 1.0)
  assert low.startswith('WARNING:') and 'kto.desirable_weight=3' in low
  high = kto_lib.balance_warning(30, 10, 1.0, 1.0)
  assert 'kto.undesirable_weight=3' in high and '3.000' in high
  assert 'no disliked examples' in kto_lib.balance_warning(5, 0, 1.0, 1.0)
  assert 'no liked examples' in kto_lib.balance_warning(0, 5, 1.0, 1.0)


# ---- The objective ----------------------------------------------------------------------

def _kto_cfg(base, lora=True, reference='auto', **train):
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'kto'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=lora, rank=4, alpha=8.0)
  cfg.kto.update(path='builtin:synthetic', task_sizes=dict(train=400, validation=32, test=32),
                 beta=0.1, reference=reference, on_degenerate='warn', max_degenerate=1.0)
  cfg.sft.update(task_sizes=dict(train=100, validation=16, test=16), eval_examples=4,
                 eval_max_new_tokens=8)
  cfg.data.seq_len = 64
  cfg.train.update(global_batch=4, steps=4, eval_every=0, eval_batches=1)
  cfg.train.update(**train)
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.checkpoint.update(every=2, keep=5)
  cfg.mesh.update(data=8, fsdp=1, tensor=1)
  return cfg


def _batch(cfg, tok, **kw):
  it = feedback.make_feedback_iterator(cfg, tok, 'validation', batch_size=8, **kw)
  b = {k: v for k, v in next(it).items() if k not in formats.COUNTS}
  it.close()
  return b


@pytest.fixture(scope='module')
def probe(base, tmp_path_factory):
  """A 1-step LoRA KTO run (random adapters, base = the reference): its output."""
  return loop.train(_kto_cfg(base, steps=1), str(tmp_path_factory.mktemp('kto') / 'probe'))


def test_step_zero_identities_and_one_sided_batches(base, probe):
  """With B = 0 adapters the policy is the reference: the loss is exactly 1/2, z = 0;
  batches of one label give finite losses and gradients on the 8-device mesh."""
  cfg = _kto_cfg(base)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  params, tok = probe.state['params'], probe.tokenizer
  zero = jax.tree.map(np.zeros_like, jax.device_get(probe.state['adapters']))
  host = _batch(cfg, tok)
  step = setup.objective.eval_step(setup)
  out = jax.device_get(step({'params': params, 'adapters': zero},
                            sharding.place_batch(host, mesh, cfg.rules)))
  assert out['examples'] == 8 and out['loss'] / out['examples'] == 0.5
  m = setup.objective.metrics(out, out['examples'])
  assert float(m['kl']) == 0.0 and float(m['rewards/margins']) == 0.0
  assert float(m['count/chosen']) + float(m['count/rejected']) == 8
  sums = setup.objective.sums(setup)
  adapters = probe.state['adapters']

  def loss(a, b):
    total, aux = sums({'params': params, 'adapters': a}, b, None)
    return total / 8, aux

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  for label in (1, 0):
    b = sharding.place_batch(dict(host, label=np.full_like(host['label'], label)), mesh,
                             cfg.rules)
    with sharding.use_mesh(mesh, cfg.rules):
      (value, aux), grads = grad_fn(adapters, b)
    assert np.isfinite(float(value)) and float(value) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    m = setup.objective.metrics(jax.device_get(aux), 8.0)
    assert float(m['kl']) >= 0 and float(m['rewards/margins']) == 0.0
    assert float(m['count/chosen' if label else 'count/rejected']) == 8


@pytest.mark.slow
def test_one_and_eight_devices_take_the_same_step(base, tmp_path):
  runs = {}
  for n in (1, 8):
    cfg = _kto_cfg(base, steps=1)
    cfg.mesh.update(data=n)
    out = loop.train(cfg, str(tmp_path / f'd{n}'), devices=jax.devices()[:n])
    row = [r for r in metrics_lib.read_jsonl(str(tmp_path / f'd{n}' / 'metrics.jsonl'))
           if 'loss' in r][0]
    runs[n] = row, jax.device_get(out.state['adapters'])
  (r1, a1), (r8, a8) = runs[1], runs[8]
  for key in TRL_METRICS + ('grad_norm',):
    assert r1[key] == pytest.approx(r8[key], rel=1e-5, abs=1e-6), key
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a1, a8)


@pytest.mark.slow
def test_three_references_give_the_same_loss(base, probe):
  """Policy = base + the probe run's adapters; reference = the base, three ways."""
  cfg = _kto_cfg(base)
  adapters, params, tok = probe.state['adapters'], probe.state['params'], probe.tokenizer
  host = _batch(cfg, tok)
  results = {}
  for mode in ('adapters_off', 'copy', 'precomputed'):
    c = cfg.copy_and_resolve_references()
    c.kto.reference = mode
    mesh = sharding.make_mesh(c.mesh)
    setup = state_lib.make_setup(c, mesh)
    weights = {'params': params, 'adapters': adapters}
    b = dict(host)
    if mode == 'copy':
      weights['ref_params'] = params
    if mode == 'precomputed':
      n = len(feedback.get_examples(c, 'validation'))
      table = ref_logps.compute(c, setup, params, tok, 'validation', n,
                                feedback.make_feedback_iterator)
      b = _batch(c, tok, ref_logps=table)
      assert set(b) == set(host) | {'ref_logps'}
      for k in host:
        np.testing.assert_array_equal(b[k], host[k])
    out = setup.objective.eval_step(setup)(weights, sharding.place_batch(b, mesh, c.rules))
    out = jax.device_get(out)
    results[mode] = {k: float(v) for k, v in
                     setup.objective.metrics(out, out['examples']).items()}
  a, c_, p = results['adapters_off'], results['copy'], results['precomputed']
  assert a['loss'] != pytest.approx(0.5, abs=1e-4)  # not the identity
  for k in a:
    assert a[k] == pytest.approx(c_[k], rel=1e-5, abs=1e-5), k
    assert a[k] == pytest.approx(p[k], rel=1e-4, abs=1e-4), k


@pytest.mark.slow
def test_lora_kto_run_logs_trl_metrics_and_resumes_exactly(base, tmp_path):
  straight = str(tmp_path / 'straight')
  loop.train(_kto_cfg(base, eval_every=4), straight)
  rows = [r for r in metrics_lib.read_jsonl(straight + '/metrics.jsonl') if 'loss' in r]
  for key in TRL_METRICS + ('count/chosen', 'count/rejected', 'examples', 'kto/dropped',
                            'kto/truncated'):
    assert key in rows[0], key
  assert rows[0]['loss'] == pytest.approx(0.5, abs=1e-6)  # policy == reference
  assert rows[0]['rewards/margins'] == 0.0 and all(r['kl'] >= 0 for r in rows)
  evals = [r for r in metrics_lib.read_jsonl(straight + '/metrics.jsonl') if 'eval_loss' in r]
  assert evals[0]['eval_loss'] == pytest.approx(0.5, abs=1e-6)
  for key in ('eval_examples', 'eval/kl', 'eval/rewards/margins', 'eval/exact_match'):
    assert key in evals[-1], key
  split = str(tmp_path / 'split')  # evals do not change training: none here
  loop.train(_kto_cfg(base), split, stop_after=2)
  loop.train(_kto_cfg(base), split)
  loss = lambda w: {r['step']: (r['loss'], r['kl'], r['rewards/margins'])
                    for r in metrics_lib.read_jsonl(w + '/metrics.jsonl') if 'loss' in r}
  assert loss(straight) == loss(split) and len(loss(split)) == 4


def test_kto_config_errors(tmp_path):
  cfg = _kto_cfg((tmp_path, str(tmp_path / 'base')))
  config_lib.validate(cfg)
  for field, value, msg in (
      ('init_from.path', '', "stage='kto': set init_from.path"),
      ('kto.beta', 0.0, 'kto.beta must be positive'),
      ('kto.desirable_weight', -1.0, 'kto.desirable_weight must be positive'),
      ('kto.path', '', 'kto.path is empty'),
      ('kto.loss_type', 'bco', "'kto.loss_type' must be one of"),
      ('kto.reference', 'adapters_off', 'needs lora.enabled')):
    c = _kto_cfg((tmp_path, str(tmp_path / 'base')), lora=field != 'kto.reference')
    if field == 'init_from.path':
      c.lora.enabled = False
    config_lib.apply_overrides(c, {field: value})
    with pytest.raises(config_lib.ConfigError, match=msg):
      config_lib.validate(c)
  assert os.path.basename(formats.BUILTIN) == formats.BUILTIN  # the built-in data's name


@pytest.mark.slow
def test_grad_accumulation_z_per_micro_batch_and_kl_examples_weighted():
  """With train.grad_accum = 2 each micro-batch's KL rows give its own z (as TRL's per
  forward pass); the logged kl is the examples-weighted mean of the two, the loss the
  examples' mean and rewards the per-label means over the whole step."""
  from lmjax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from util import random_batch, tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  cfg.stage = 'kto'
  cfg.kto.reference = 'precomputed'  # a reference unlike the policy: z > 0
  cfg.train.update(global_batch=4, grad_accum=2)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(cfg, mesh)
  state = state_lib.init_state(cfg, setup)
  with cfg.unlocked():
    cfg.train.global_batch = 8  # random_batch's rows: 4 examples, each with its KL row
  batch = random_batch(cfg)
  batch['label'] = np.array([1, 1, 0, 0, 1, 1, 0, 0], np.int32)
  batch['weight'] = np.ones(8, np.float32)
  rng = np.random.default_rng(0)
  # Rows of 32 random tokens of 256: policy log-probs near -32·ln 256 = -177; the KL
  # rows' references 5 nats lower, so z > 0.
  batch['ref_logps'] = (-177.0 - np.where(np.arange(8) % 2, 5.0, 0.0)
                        + rng.normal(0, 1, 8)).astype(np.float32)
  eval_step = setup.objective.eval_step(setup)
  weights = setup.weights(state)
  halves = [jax.device_get(eval_step(weights, sharding.place_batch(
      {k: v[h * 4:(h + 1) * 4] for k, v in batch.items()}, mesh, cfg.rules))) for h in (0, 1)]
  _, m = step_lib.make_train_step(cfg, setup)(state, sharding.place_batch(batch, mesh,
                                                                           cfg.rules))
  z = [h['kl'] / 2 for h in halves]
  assert z[0] > 0 and z[1] > 0 and z[0] != pytest.approx(z[1])
  assert float(m['kl']) == pytest.approx((z[0] + z[1]) / 2, rel=1e-5)
  assert float(m['loss']) == pytest.approx((halves[0]['loss'] + halves[1]['loss']) / 4,
                                           rel=1e-5)
  chosen = (halves[0]['rewards/chosen'] + halves[1]['rewards/chosen']) / 2
  assert float(m['rewards/chosen']) == pytest.approx(chosen, rel=1e-5)
  assert float(m['count/chosen']) == 2 and float(m['examples']) == 4
