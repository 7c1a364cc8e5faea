"""SFT data: chat templates, loss masks, packing, overlong/malformed handling, the task."""

import json
import re

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.data import formats, sft_task
from lmjax.data.sources import DataError
from util import sft_tokenizer

SEQ = 64
VOCAB = 384


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return sft_tokenizer(tmp_path_factory.mktemp('tok'), VOCAB)


def make_cfg(path, **sft):
  cfg = config_lib.base_config()
  cfg.data.update(seq_len=SEQ, worker_threads=0, prefetch=0)
  cfg.sft.update(path=str(path), packing_bins=4, **sft)
  return cfg


def write_jsonl(path, objs):
  path.write_text(''.join((o if isinstance(o, str) else json.dumps(o)) + '\n' for o in objs),
                  encoding='utf-8')
  return path


MULTI = [{'role': 'system', 'content': 'Be brief.'},
         {'role': 'user', 'content': 'What is 2 + 3?'},
         {'role': 'assistant', 'content': '5'},
         {'role': 'user', 'content': 'Reverse: abc'},
         {'role': 'assistant', 'content': 'cba'}]


def masked_runs(tokens, mask):
  """Consecutive runs of masked tokens."""
  runs, cur = [], []
  for t, m in zip(tokens.tolist(), mask.tolist()):
    if m:
      cur.append(t)
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


@pytest.mark.parametrize('template', formats.BUILTIN_TEMPLATES)
def test_mask_is_exactly_the_assistant_turns(tok, template):
  tokens, mask = formats.encode(MULTI, tok, template)
  assert tokens[0] == tok.bos_id and (tokens == tok.bos_id).sum() == 1
  assert tokens[-1] == tok.eos_id and (tokens == tok.eos_id).sum() == 1
  end = formats.end_marker(template)
  runs = masked_runs(tokens, mask)
  assert len(runs) == 2
  first = '5' + end + ('\n' if template == 'plain' else '')
  assert tok.decode(runs[0]) == first
  assert runs[1][-1] == tok.eos_id and tok.decode(runs[1][:-1]) == 'cba' + end
  # Everything unmasked decodes to the rendered prompt parts: no user/system text leaks.
  unmasked = tok.decode([t for t, m in zip(tokens[1:-1], mask[1:-1]) if not m])
  for t in MULTI:
    assert (t['content'] in unmasked) == (t['role'] != 'assistant')
  # The whole conversation round-trips.
  assert tok.decode(tokens[1:-1]) == ''.join(text for text, _ in formats.chunks(MULTI, template))


def test_template_texts(tok):
  one = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]
  assert formats.render_prompt(one, 'llama3') == (
      '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
      '<|start_header_id|>assistant<|end_header_id|>\n\n')
  assert formats.render_prompt(one, 'chatml') == (
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  assert formats.render_prompt(one, 'plain') == 'Hi\n'  # messages: a line per turn
  norm = formats.answer_normalizer('llama3')
  assert norm(' 81<|eot_id|>junk') == '81' and norm('81\nmore') == '81'


@pytest.mark.parametrize('template', formats.BUILTIN_TEMPLATES)
def test_prompt_completion_format(tok, template):
  turns = formats.normalize_example({'prompt': 'Q: 2+2? A: ', 'completion': '4'})
  assert [(t['role'], t['content']) for t in turns] == [('user', 'Q: 2+2? A: '),
                                                         ('assistant', '4')]
  tokens, mask = formats.encode(turns, tok, template)
  runs = masked_runs(tokens, mask)
  assert len(runs) == 1 and runs[0][-1] == tok.eos_id
  assert tok.decode(runs[0][:-1]) == '4' + formats.end_marker(template)
  if template == 'plain':  # exactly prompt + completion
    assert tok.decode(tokens[1:-1]) == 'Q: 2+2? A: 4'
  # The eval prompt, encoded as lmjax.api does, is exactly the training prefix.
  prompt = [tok.bos_id] + tok.encode(formats.render_prompt(turns, template))
  assert tokens[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any()


def test_tfds_style_records():
  rec = {'messages': {'role': np.array([b'user', b'assistant']),
                      'content': np.array([b'hi', b'yo'])}}
  assert formats.normalize_example(rec) == [{'role': 'user', 'content': 'hi'},
                                            {'role': 'assistant', 'content': 'yo'}]


def _conversations(n, rng):
  out = []
  for i in range(n):
    k = int(rng.integers(1, 3))
    turns = []
    for j in range(k):
      turns.append({'role': 'user', 'content': f'q{i} ' + 'x' * int(rng.integers(1, 12))})
      turns.append({'role': 'assistant', 'content': f'a{i}.{j} ' + 'y' * int(rng.integers(0, 8))})
    out.append({'messages': turns, 'id': i})
  return out


@pytest.fixture(scope='module')
def chat_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('chat') / 'train.jsonl'
  convs = _conversations(60, np.random.default_rng(0))
  return write_jsonl(path, convs), convs


def test_packing_keeps_conversations_whole(tok, chat_file):
  path, convs = chat_file
  cfg = make_cfg(path, template='chatml')
  cfg.data.seq_len = 3 * SEQ  # every conversation fits
  encoded = {tuple(formats.encode(formats.normalize_example(c), tok, 'chatml')[0].tolist()): c
             for c in convs}
  it = formats.make_sft_iterator(cfg, tok, 'train', batch_size=4, repeat=False)
  seen, rows = [], 0
  for b in it:
    assert set(b) == set(formats.COUNTS) | {'inputs', 'targets', 'segment_ids', 'positions',
                                             'loss_mask'}
    assert b['inputs'].shape == (4, 3 * SEQ) and b['loss_mask'].dtype == np.float32
    for r in formats.iter_rows([b]):
      rows += 1
      seg, x = r['segment_ids'], r['inputs']
      assert (r['dropped'], r['truncated']) == (0, 0)
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all()  # contiguous
        assert (r['positions'][idx] == np.arange(len(idx))).all()
        toks = tuple(x[idx].tolist())
        assert toks in encoded  # a whole conversation, never split
        seen.append(encoded[toks]['id'])
        _, mask = formats.encode(formats.normalize_example(encoded[toks]), tok, 'chatml')
        # targets within the segment; loss exactly where the target is an assistant token
        assert (r['targets'][idx[:-1]] == x[idx[1:]]).all()
        assert r['targets'][idx[-1]] == 0 and r['loss_mask'][idx[-1]] == 0
        assert (r['loss_mask'][idx[:-1]] == mask[1:]).all()
      assert (r['loss_mask'][seg == 0] == 0).all() and (r['positions'][seg == 0] == 0).all()
  # One ordered-or-shuffled pass sees each conversation once (minus the dropped tail).
  assert len(seen) == len(set(seen)) and len(seen) >= 40 and rows >= 8


def test_train_split_is_shuffled_and_seeded(tok, chat_file):
  path, _ = chat_file
  cfg = make_cfg(path)
  cfg.data.seq_len = 3 * SEQ
  take = lambda seed: next(formats.make_sft_iterator(cfg, tok, 'train', batch_size=2,
                                                     seed=seed))['inputs']
  assert (take(1) == take(1)).all() and not np.array_equal(take(1), take(2))


def test_overlong_truncate_vs_drop(tok, tmp_path):
  short = {'prompt': 'hi ', 'completion': 'yo'}
  long_ = {'prompt': 'p ' * 10, 'completion': 'z ' * 80}
  long_prompt = {'prompt': 'p ' * 80, 'completion': 'z'}  # nothing left to learn once cut
  path = write_jsonl(tmp_path / 'train.jsonl', [short, long_, short, long_prompt, short])
  totals = {}
  for mode in ('truncate', 'drop'):
    cfg = make_cfg(path, overlong=mode, template='plain')
    cfg.data.shuffle = False
    batches = list(formats.make_sft_iterator(cfg, tok, 'train', batch_size=1, repeat=False))
    totals[mode] = (sum(int(b['dropped'].sum()) for b in batches),
                    sum(int(b['truncated'].sum()) for b in batches),
                    sum(int((b['segment_ids'] > 0).sum()) for b in batches))
    lengths = [len(np.unique(b['segment_ids'][b['segment_ids'] > 0])) for b in batches]
    if mode == 'truncate':  # the cut conversation fills a row by itself, no EOS
      full = [b for b in batches if (b['segment_ids'] > 0).all()]
      assert len(full) == 1 and tok.eos_id not in full[0]['inputs']
      assert full[0]['loss_mask'].sum() > 0
    assert sum(lengths) == (4 if mode == 'truncate' else 3)
  assert totals['truncate'][:2] == (1, 1)  # long_prompt dropped: no loss token left
  assert totals['drop'][:2] == (2, 0)


def test_malformed_lines_skip_or_fail(tok, tmp_path, capsys):
  good = {'prompt': 'a', 'completion': 'b'}
  lines = [good, '{not json', {'messages': []}, good,
           {'messages': [{'role': 'user', 'content': 'x'}]},
           {'messages': [{'role': 'bot', 'content': 'x'}]}, '', good]
  path = write_jsonl(tmp_path / 'train.jsonl', lines)
  convs, stats = formats.read_jsonl([str(path)], 'skip')
  assert len(convs) == 3 and stats['skipped'] == 4
  assert stats['first_error'].startswith(f'{path}:2: malformed example')
  cfg = make_cfg(path)
  assert len(formats.get_conversations(cfg, 'train')) == 3
  assert 'skipped 4 malformed' in capsys.readouterr().out
  with pytest.raises(DataError, match=re.escape(f'{path}:2: malformed example')):
    formats.read_jsonl([str(path)], 'fail')
  path2 = write_jsonl(tmp_path / 'b.jsonl', [good, {'messages': [{'role': 'user',
                                                                   'content': 'x'}]}])
  with pytest.raises(DataError, match=re.escape(f'{path2}:2:') + '.*assistant'):
    formats.read_jsonl([str(path2)], 'fail')
  with pytest.raises(DataError, match='matches no file'):
    formats.get_conversations(make_cfg(tmp_path / 'nope-{split}.jsonl'), 'train')
  with pytest.raises(DataError, match='sft.template'):
    next(formats.make_sft_iterator(make_cfg(path, template='zephyr'), tok, 'train',
                                   batch_size=1))


@pytest.mark.parametrize('threads,prefetch', [(0, 0), (2, 2)])
def test_resume_mid_stream_is_exact(tok, chat_file, threads, prefetch):
  path, _ = chat_file
  cfg = make_cfg(path)
  cfg.data.update(worker_threads=threads, prefetch=prefetch, seq_len=3 * SEQ)
  make = lambda: formats.make_sft_iterator(cfg, tok, 'train', batch_size=3, seed=5)
  it = make()
  stream = [next(it) for _ in range(14)]  # > one epoch of 60 conversations
  for k in (1, 5):
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = make()
    fresh.set_state(state)
    for want, got in zip(stream[k:k + 6], [next(fresh) for _ in range(6)]):
      assert set(want) == set(got)
      for key in want:
        assert want[key].dtype == got[key].dtype and (want[key] == got[key]).all(), key


def test_all_overlong_raises_not_hangs(tok, tmp_path):
  path = write_jsonl(tmp_path / 'train.jsonl', [{'prompt': 'p ' * 80, 'completion': 'z'}] * 3)
  with pytest.raises(DataError, match='longer than data.seq_len'):
    next(formats.make_sft_iterator(make_cfg(path), tok, 'train', batch_size=1))


def test_counts_survive_resume(tok, tmp_path):
  short = {'prompt': 'hi ', 'completion': 'yo'}
  long_ = {'prompt': 'p ', 'completion': 'z ' * 80}
  path = write_jsonl(tmp_path / 'train.jsonl', [short, long_] * 6)
  cfg = make_cfg(path, overlong='drop', template='plain')
  cfg.sft.packing_bins = 1
  make = lambda: formats.make_sft_iterator(cfg, tok, 'train', batch_size=1, seed=0)
  it = make()
  want = [int(next(it)['dropped'][0]) for _ in range(8)]
  it = make()
  next(it)
  fresh = make()
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  assert [int(next(fresh)['dropped'][0]) for _ in range(7)] == want[1:]
  assert sum(want) > 0


def test_processes_get_disjoint_shares(tok, chat_file):
  path, convs = chat_file
  cfg = make_cfg(path)
  cfg.data.seq_len = 3 * SEQ
  ids = []
  for p in range(2):
    it = formats.make_sft_iterator(cfg, tok, 'train', batch_size=1,
                                   process_index=p, process_count=2, repeat=False)
    ids.append({tuple(r['inputs'][r['segment_ids'] == s].tolist())
                for r in formats.iter_rows(it) for s in np.unique(r['segment_ids']) if s})
  assert ids[0] and ids[1] and not ids[0] & ids[1]


# ---- The synthetic task -------------------------------------------------------------

def solve(question):
  """An independent solver for the task's questions."""
  if m := re.fullmatch(r'What letter comes after ([a-y])\?', question):
    return chr(ord(m[1]) + 1)
  if m := re.fullmatch(r'Which is larger, (\d) or (\d)\?', question):
    return str(max(int(m[1]), int(m[2])))
  if m := re.fullmatch(r'What is (\d+) \+ (\d+)\?', question):
    return str(int(m[1]) + int(m[2]))
  if m := re.fullmatch(r'Uppercase: ([a-z]+)', question):
    return m[1].upper()
  if m := re.fullmatch(r'Reverse: ([a-z]+)', question):
    return m[1][::-1]
  if m := re.fullmatch(r'How many letters in ([a-z]+)\?', question):
    return str(len(m[1]))
  raise AssertionError(f'unparsed question {question!r}')


def test_task_is_deterministic_and_correct(tmp_path):
  a = sft_task.write_task(str(tmp_path / 'a'), seed=3, sizes={'train': 120, 'test': 30})
  b = sft_task.write_task(str(tmp_path / 'b'), seed=3, sizes={'train': 120, 'test': 30})
  c = sft_task.write_task(str(tmp_path / 'c'), seed=4, sizes={'train': 120, 'test': 30})
  read = lambda root, s: open(f'{root}/{s}.jsonl', encoding='utf-8').read()
  assert read(a, 'train') == read(b, 'train') and read(a, 'train') != read(c, 'train')
  assert read(a, 'train') != read(a, 'test')
  tasks = set()
  for line in read(a, 'train').splitlines():
    ex = json.loads(line)
    user, asst = ex['messages']
    assert solve(user['content']) == asst['content'] and len(asst['content']) <= 3
    tasks.add(ex['task'])
  assert tasks == set(sft_task.TASKS)
  evals = formats.file_answer_examples(f'{a}/test.jsonl', 'llama3')
  assert len(evals) == 30
  for ex in evals:
    q = ex['prompt'].split('<|end_header_id|>\n\n')[1].split('<|eot_id|>')[0]
    assert solve(q) == ex['answer']
    assert ex['prompt'].endswith('<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_builtin_task_is_named_and_trains(tok, tmp_path):
  cfg = make_cfg('builtin:synthetic', template='chatml')
  cfg.data.update(data_dir=str(tmp_path), seq_len=3 * SEQ)
  cfg.sft.task_sizes = dict(train=50, validation=10, test=10)
  b = next(formats.make_sft_iterator(cfg, tok, 'train', batch_size=2))
  assert b['loss_mask'].sum() > 0 and (b['segment_ids'].max(axis=1) >= 2).all()
  root = sft_task.default_root(cfg)
  assert sorted(p.name for p in (tmp_path / 'sft_task').iterdir()) == [root.split('/')[-1]]


def test_make_sft_task_tool(tmp_path):
  import subprocess
  import sys
  res = subprocess.run([sys.executable, 'tools/make_sft_task.py', '--out', str(tmp_path / 't'),
                        '--train', '12', '--validation', '3', '--test', '3',
                        '--tasks', 'add,reverse'], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  lines = (tmp_path / 't' / 'train.jsonl').read_text().splitlines()
  assert len(lines) == 12 and {json.loads(l)['task'] for l in lines} == {'add', 'reverse'}
