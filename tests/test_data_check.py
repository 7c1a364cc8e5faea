"""The data check of SFT and DPO runs: no eval split without '{split}' (or eval_path), an
eval split that overlaps the train split, degenerate records (counted, dropped, warned,
refused), the exact stream of a resumed run, and the loop's use of it."""

import json
import os
import re
import sys

import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax.data import check, formats, preference, sft_task
from lmjax.data.sources import DataError
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from util import pretrain_cfg, sft_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
import eval_sft  # noqa: E402  pylint: disable=g-import-not-at-top

SEQ = 128


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return sft_tokenizer(tmp_path_factory.mktemp('tok'), 384)


def write_jsonl(path, objs):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objs), encoding='utf-8')
  return str(path)


def make_cfg(stage, path, **group):
  cfg = config_lib.base_config()
  cfg.stage = stage
  cfg.data.update(seq_len=SEQ, worker_threads=0, prefetch=0)
  cfg.sft.packing_bins = 4
  cfg[stage].update(path=str(path), **group)
  return cfg


def examples(n, seed=0, split='train'):
  return sft_task.make_examples(n, seed=seed, split=split)


def held_out(make, train, n):
  """n records of make(..., split='validation') that `train` does not hold (the built-in
  task's small questions repeat across splits)."""
  return [r for r in make(3 * n, seed=1, split='validation') if r not in train][:n]


def checked(cfg, tok):
  lines = []
  return check.check_stage(cfg, tok, cfg.stage, log=lines.append), lines


# ---- The eval split ----------------------------------------------------------------

@pytest.mark.parametrize('stage', ['sft', 'dpo'])
def test_a_path_without_split_has_no_eval_split(tok, tmp_path, stage):
  make = examples if stage == 'sft' else sft_task.make_pairs
  rows = make(40)
  train = write_jsonl(tmp_path / 'train.jsonl', rows)
  cfg = make_cfg(stage, train)
  assert formats.split_files(cfg, 'train', stage) == [train]
  assert not formats.has_split(cfg, 'validation', stage)
  with pytest.raises(DataError, match=re.escape(
      f"{stage}.path '{train}' has no '{{split}}', so it holds the 'train' split only: "
      f"there is no 'validation' split; set {stage}.eval_path")):
    formats.split_files(cfg, 'validation', stage)
  result, lines = checked(cfg, tok)
  assert not result.has_eval and list(result.splits) == ['train']
  assert lines[0].startswith(f"lmjax: {stage} data has no 'validation' split")
  assert 'eval_loss and exact match are skipped' in lines[0]
  if stage == 'sft':  # Model.exact_match / tools/eval_sft.py: a clear error
    with pytest.raises(DataError, match="there is no 'validation' split"):
      formats.answer_examples(cfg, 'validation', 4)
  else:
    with pytest.raises(DataError, match="there is no 'validation' split"):
      preference.get_pairs(cfg, 'validation')

  # eval_path names the held-out split; '{split}' paths are unchanged.
  held = write_jsonl(tmp_path / 'held.jsonl', held_out(make, rows, 10))
  cfg[stage].eval_path = held
  assert formats.split_files(cfg, 'validation', stage) == [held]
  result, lines = checked(cfg, tok)
  assert result.has_eval and list(result.splits) == ['train', 'validation']
  assert len(lines) == 2 and 'validation split: 10' in lines[1]
  cfg = make_cfg(stage, tmp_path / '{split}.jsonl')
  assert formats.split_files(cfg, 'held', stage) == [held]


@pytest.mark.parametrize('stage', ['sft', 'dpo'])
def test_an_empty_path_names_the_field_and_the_builtin_task(stage, tmp_path):
  cfg = make_cfg(stage, '')
  cfg.init_from.path = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f"{stage}.path is empty: set it to your JSONL files (e.g. 'data/{{split}}.jsonl') or to "
      "'builtin:synthetic' for the built-in synthetic task")):
    config_lib.validate(cfg)
  with pytest.raises(DataError, match=f'{stage}.path is empty'):
    formats.split_files(cfg, 'train', stage)
  cfg[stage].path = 'builtin:synthetic'
  config_lib.validate(cfg)


def test_eval_path_is_validated():
  cfg = make_cfg('sft', '', eval_path='x.jsonl', source='tfds', tfds_name='t')
  with pytest.raises(config_lib.ConfigError, match='sft.eval_path names JSONL files'):
    config_lib.validate(cfg)
  cfg = make_cfg('sft', 'builtin:synthetic', max_degenerate=1.5)
  with pytest.raises(config_lib.ConfigError, match=r'sft.max_degenerate must be a fraction'):
    config_lib.validate(cfg)
  cfg = make_cfg('sft', 'builtin:synthetic', on_degenerate='skip')
  with pytest.raises(config_lib.ConfigError, match="'sft.on_degenerate' must be one of"):
    config_lib.validate(cfg)


@pytest.mark.parametrize('stage', ['sft', 'dpo'])
def test_overlap_is_an_error_or_a_loud_warning(tok, tmp_path, stage):
  make = examples if stage == 'sft' else sft_task.make_pairs
  unit = 'examples' if stage == 'sft' else 'pairs'
  # Held-out records, and 3 copied from train.
  train = make(60)
  held = held_out(make, train, 17) + train[:3]
  write_jsonl(tmp_path / 'train.jsonl', train)
  eval_file = write_jsonl(tmp_path / 'validation.jsonl', held)
  cfg = make_cfg(stage, tmp_path / '{split}.jsonl')
  with pytest.raises(DataError, match=re.escape(
      f'{stage} data: 3 of 20 {unit} of the validation split ({eval_file}) are also in '
      'the train split') + f'.*set {stage}.allow_overlap=True'):
    checked(cfg, tok)
  cfg[stage].allow_overlap = True
  result, lines = checked(cfg, tok)
  assert result.splits['validation'].meta()['overlap'] == 3
  warning = [l for l in lines if l.startswith('WARNING')]
  assert len(warning) == 1 and f'3 of 20 {unit}' in warning[0]
  # The same file for both splits: every record, and the file named.
  cfg = make_cfg(stage, tmp_path / 'train.jsonl', eval_path=str(tmp_path / 'train.jsonl'))
  with pytest.raises(DataError, match=f'{len(train)} of {len(train)} {unit} .* '
                     + re.escape(f'(both splits read {tmp_path / "train.jsonl"})')):
    checked(cfg, tok)


def test_builtin_tasks_pass_the_check_by_default(tok, tmp_path):
  for stage in ('sft', 'dpo'):
    cfg = make_cfg(stage, 'builtin:synthetic')
    cfg.data.data_dir = str(tmp_path)
    cfg.sft.task_sizes = cfg.dpo.task_sizes = dict(train=600, validation=60, test=60)
    result, lines = checked(cfg, tok)
    assert result.has_eval and not result.keep
    assert all(c.degenerate == 0 for c in result.splits.values())
    assert result.splits['validation'].overlap == 0  # held out: no train question
    assert not any(l.startswith('WARNING') for l in lines)


def test_builtin_task_splits_hold_disjoint_questions():
  """Every task's held-out questions are unseen in training, also for the small tasks
  (25 to 100 distinct questions), and each split still holds every task."""
  question = lambda e: e['messages'][0]['content']
  splits = {s: sft_task.make_examples(600, seed=0, split=s) for s in sft_task.SPLITS}
  for task in sft_task.TASKS:
    qs = {s: {question(e) for e in ex if e['task'] == task} for s, ex in splits.items()}
    assert all(qs.values()), task
    assert not qs['train'] & (qs['validation'] | qs['test']) and not qs['validation'] & qs['test']
    assert all(sft_task.question_split(q) == s for s, q_set in qs.items() for q in q_set)
  pairs = sft_task.make_pairs(300, seed=0, split='test')
  assert all(sft_task.question_split(p['prompt'][0]['content']) == 'test' for p in pairs)


# ---- Degenerate records ------------------------------------------------------------

EMPTY_TURN = {'messages': [{'role': 'user', 'content': 'Say something'},
                           {'role': 'assistant', 'content': '  '}]}
NO_ROOM = {'prompt': 'p ' * 80, 'completion': 'z'}


def test_sft_degenerate_examples_dropped_warned_failed(tok, tmp_path):
  good = examples(40)
  path = write_jsonl(tmp_path / 'train.jsonl',
                     good[:5] + [EMPTY_TURN] + good[5:20] + [NO_ROOM] + good[20:])
  cfg = make_cfg('sft', path)
  cfg.data.shuffle = False
  cfg.train.eval_every = 0
  result, lines = checked(cfg, tok)
  c = result.splits['train']
  assert c.meta() == {'records': 42, 'degenerate': 2, 'empty_turn': 1, 'no_room': 1,
                      'overlong': 0, 'action': 'dropped'}
  assert len(lines) == 1 and lines[0].startswith('lmjax: sft data, train split: 42 examples')
  assert '2 degenerate dropped (1 with an empty assistant turn, 1 whose prompt' in lines[0]
  assert f'first: {path}:6' in lines[0]
  np.testing.assert_array_equal(result.keep['train'], [i for i in range(42) if i not in (5, 21)])
  # The pipeline reads the kept ones only: 40 whole conversations, none dropped.
  rows = list(formats.iter_rows(formats.make_sft_iterator(
      cfg, tok, 'train', batch_size=1, repeat=False, keep=result.keep['train'])))
  assert sum(len(np.unique(r['segment_ids'][r['segment_ids'] > 0])) for r in rows) == 40
  assert sum(int(r['dropped']) for r in rows) == 0
  full = list(formats.iter_rows(formats.make_sft_iterator(cfg, tok, 'train', batch_size=1,
                                                          repeat=False)))
  assert sum(int(r['dropped']) for r in full) == 1  # without the check: no room, dropped

  cfg.sft.on_degenerate = 'warn'
  result, lines = checked(cfg, tok)
  assert not result.keep and result.splits['train'].action == 'kept'
  assert lines[0].startswith('WARNING: sft data, train split') and '2 degenerate kept' in lines[0]
  cfg.sft.on_degenerate = 'fail'
  with pytest.raises(DataError, match=re.escape(
      f"sft data, train split ({path}): 2 of 42 examples (4.8%) are degenerate") +
      ".*sft.on_degenerate='fail'"):
    checked(cfg, tok)
  cfg.sft.update(on_degenerate='drop', max_degenerate=0.04)
  with pytest.raises(DataError, match=r'\(4.8%\) are degenerate .* more than '
                     r'sft.max_degenerate=0.04'):
    checked(cfg, tok)


def test_dpo_degenerate_pairs_counted(tok, tmp_path):
  same = {'prompt': 'What is 2 + 2?', 'chosen': '4', 'rejected': '4'}
  path = write_jsonl(tmp_path / 'identical.jsonl', [same] * 300)
  cfg = make_cfg('dpo', path)
  with pytest.raises(DataError, match=re.escape(
      f'dpo data, train split ({path}): 300 of 300 pairs (100.0%) are degenerate (300 with '
      f'chosen == rejected; first: {path}:1), more than dpo.max_degenerate=0.05')):
    checked(cfg, tok)

  tail = 'word ' * 100  # equal rows once cut to data.seq_len: no gradient either
  bad = [same, {'prompt': 'Q?', 'chosen': '', 'rejected': 'no'},
         {'prompt': 'Q?' * 80, 'chosen': 'a', 'rejected': 'b'},
         {'prompt': 'Q?', 'chosen': tail + 'yes', 'rejected': tail + 'no'}]
  pairs = sft_task.make_pairs(80)
  path = write_jsonl(tmp_path / 'train.jsonl', pairs[:50] + bad + pairs[50:])
  cfg = make_cfg('dpo', path)
  cfg.train.eval_every = 0
  result, lines = checked(cfg, tok)
  assert result.meta == {'train': {'records': 84, 'degenerate': 4, 'identical': 2,
                                   'empty_completion': 1, 'no_room': 1, 'overlong': 1,
                                   'action': 'dropped'}}
  assert '4 degenerate dropped (2 with chosen == rejected, 1 with an empty completion' in lines[0]
  keep = result.keep['train']
  assert len(keep) == 80 and not set(range(50, 54)) & set(keep)
  it = preference.make_pair_iterator(cfg, tok, 'train', batch_size=4, repeat=False,
                                     with_index=True, keep=keep)
  seen = np.concatenate([b['index'][0::2] for b in it])
  assert sorted(seen.tolist()) == keep.tolist()  # pairs keep their index in the split


def test_resumed_stream_with_dropped_records_is_exact(tok, tmp_path):
  good = examples(30)
  path = write_jsonl(tmp_path / 'train.jsonl', good[:10] + [EMPTY_TURN] + good[10:])
  cfg = make_cfg('sft', path)
  cfg.train.eval_every = 0
  make = lambda: formats.make_sft_iterator(
      cfg, tok, 'train', batch_size=2, seed=3,
      keep=check.check_stage(cfg, tok, cfg.stage, log=lambda _: None).keep['train'])
  it = make()
  stream = [next(it) for _ in range(10)]  # more than an epoch
  it = make()
  for _ in range(4):
    next(it)
  fresh = make()  # checks again, as a resumed run does
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  for want, got in zip(stream[4:], [next(fresh) for _ in range(6)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


# ---- The loop ----------------------------------------------------------------------

def _sft_cfg(base, path, **train):
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'sft'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=True, rank=4, alpha=8.0)
  cfg.sft.update(path=path, eval_examples=4, template='chatml')
  cfg.data.seq_len = SEQ
  cfg.train.update(global_batch=8, steps=4, eval_every=2, eval_batches=1, **train)
  cfg.checkpoint.update(every=2, keep=5)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  return cfg


@pytest.mark.slow
def test_loop_skips_eval_records_the_check_and_resumes_exactly(base, tmp_path, capsys):
  rows = examples(100)
  path = write_jsonl(tmp_path / 'train.jsonl', rows[:30] + [EMPTY_TURN] + rows[30:] +
                     [EMPTY_TURN])
  straight = str(tmp_path / 'straight')
  out = loop.train(_sft_cfg(base, path), straight)
  printed = capsys.readouterr().out
  assert "lmjax: sft data has no 'validation' split" in printed
  assert '2 degenerate dropped (2 with an empty assistant turn' in printed
  assert out.evals == []  # skipped: never measured on the training file
  rows_m = metrics_lib.read_jsonl(os.path.join(straight, 'metrics.jsonl'))
  assert not any('eval_loss' in r for r in rows_m)
  ckpt = ckpt_lib.Checkpointer(straight, None, read_only=True)
  meta = ckpt.read_meta()
  ckpt.close()
  got = meta['data_check']['train']
  assert {k: got[k] for k in ('records', 'degenerate', 'empty_turn', 'no_room', 'action')} == {
      'records': 102, 'degenerate': 2, 'empty_turn': 2, 'no_room': 0, 'action': 'dropped'}

  split = str(tmp_path / 'split')
  loop.train(_sft_cfg(base, path), split, stop_after=2)
  loop.train(_sft_cfg(base, path), split)
  losses = lambda w: {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
      os.path.join(w, 'metrics.jsonl')) if 'loss' in r}
  assert losses(straight) == losses(split) and len(losses(split)) == 4

  # Model.exact_match and tools/eval_sft.py: no validation split is a clear error.
  with pytest.raises(DataError, match="there is no 'validation' split"):
    lmjax.load(straight).exact_match('validation', limit=2)
  capsys.readouterr()
  assert eval_sft.main(['--workdir', straight, '--split=validation']) == 2
  assert "there is no 'validation' split" in capsys.readouterr().err


@pytest.mark.slow
def test_loop_refuses_identical_pairs_before_compiling(base, tmp_path):
  same = {'prompt': 'What is 2 + 2?', 'chosen': '4', 'rejected': '4'}
  cfg = _sft_cfg(base, '')
  cfg.stage = 'dpo'
  cfg.dpo.path = write_jsonl(tmp_path / 'pairs.jsonl', [same] * 300)
  with pytest.raises(DataError, match='300 of 300 pairs .* chosen == rejected'):
    loop.train(cfg, str(tmp_path / 'dpo'))
  assert not os.path.exists(tmp_path / 'dpo' / 'checkpoints' / '0')
