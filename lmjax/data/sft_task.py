"""A built-in synthetic instruction task with exact answers, for the default CPU SFT run.

Each example is one user question and a short assistant answer (messages format), drawn
deterministically from (seed, split). Tasks and expected difficulty for a tiny model
(~1M params, a 4k sentencepiece vocab trained on code) after minutes of CPU fine-tuning:
    next_letter  'What letter comes after c?' -> 'd'             easy (25 cases)
    larger       'Which is larger, 7 or 4?' -> '7'                easy (90 cases)
    add          'What is 3 + 5?' -> '8'                          easy-medium (100 cases)
    upper        'Uppercase: cat' -> 'CAT'                        medium (copy + map)
    reverse      'Reverse: cat' -> 'tac'                          medium-hard (reorder)
    length       'How many letters in kqzt?' -> '4'               medium (counting 2-7)
Words are random 3-letter strings (17,576 of them) so string tasks cannot be memorized.
The splits hold disjoint questions: a question belongs to one split by a hash of its text
(question_split: about 10% test, 10% validation, 80% train), so held-out exact match is on
questions the model never trained on, also for the small tasks (next_letter: 20 train, 2
validation and 3 test questions; larger 75 / 10 / 5; add 81 / 8 / 11), where a split's
examples repeat its few questions. Answers are one token or a few.

    root = write_task('/tmp/sft', seed=0, sizes={'train': 20000, 'validation': 500, 'test': 500})
    acc = evaluate.exact_match(gen, formats.file_answer_examples(root + '/test.jsonl', 'llama3'),
                               normalize=formats.answer_normalizer('llama3'))

The task is what sft.path / dpo.path = 'builtin:synthetic' (formats.BUILTIN) reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import tempfile

from lmjax.data import sources

TASKS = ('next_letter', 'larger', 'add', 'upper', 'reverse', 'length')
# The version of the generated data, in the cache directories' names: files written by a
# version whose splits shared questions are not reused.
VERSION = 2
SPLITS = ('train', 'validation', 'test')
LETTERS = string.ascii_lowercase


def _word(rng: random.Random, n: int = 3) -> str:
  return ''.join(rng.choice(LETTERS) for _ in range(n))


def make_question(task: str, rng: random.Random) -> tuple[str, str]:
  """(question, answer) of one `task` example."""
  if task == 'next_letter':
    c = rng.choice(LETTERS[:-1])
    return f'What letter comes after {c}?', chr(ord(c) + 1)
  if task == 'larger':
    a, b = rng.sample(range(10), 2)
    return f'Which is larger, {a} or {b}?', str(max(a, b))
  if task == 'add':
    a, b = rng.randrange(10), rng.randrange(10)
    return f'What is {a} + {b}?', str(a + b)
  if task == 'upper':
    w = _word(rng)
    return f'Uppercase: {w}', w.upper()
  if task == 'reverse':
    w = _word(rng)
    return f'Reverse: {w}', w[::-1]
  if task == 'length':
    w = _word(rng, rng.randint(2, 7))
    return f'How many letters in {w}?', str(len(w))
  raise ValueError(f'unknown task {task!r}; known: {TASKS}')


def question_split(question: str) -> str:
  """The split a question belongs to: 'test', 'validation' or 'train' (about 10 / 10 / 80%),
  by a hash of its text."""
  bucket = int(hashlib.sha256(f'lmjax-task-split/{question}'.encode()).hexdigest()[:8], 16)
  return {0: 'test', 1: 'validation'}.get(bucket % 10, 'train')


def draw_question(task: str, rng: random.Random, split: str) -> tuple[str, str]:
  """make_question drawn until the question belongs to `split` (question_split); a split
  named otherwise than SPLITS takes any question."""
  while True:
    q, a = make_question(task, rng)
    if split not in SPLITS or question_split(q) == split:
      return q, a


def make_examples(n: int, seed: int = 0, split: str = 'train',
                  tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """n examples {'messages': [user, assistant], 'task'}, tasks in turn, deterministic in
  (seed, split), the questions `split`'s (question_split)."""
  rng = random.Random(f'lmjax-sft-task/{seed}/{split}')
  out = []
  for i in range(n):
    task = tasks[i % len(tasks)]
    q, a = draw_question(task, rng, split)
    out.append({'messages': [{'role': 'user', 'content': q},
                             {'role': 'assistant', 'content': a}], 'task': task})
  return out


def _write_splits(root: str, sizes: dict, make) -> str:
  """Writes <root>/{split}.jsonl with make(n, split)'s examples, atomically (a crash leaves
  no partial files); returns root."""
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.task-')
  try:
    for split, n in sizes.items():
      with open(os.path.join(tmp, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
        for ex in make(int(n), split):
          f.write(json.dumps(ex) + '\n')
    if os.path.isdir(root):
      shutil.rmtree(root)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def write_task(root: str, seed: int = 0, sizes: dict | None = None,
               tasks: tuple[str, ...] = TASKS) -> str:
  """Writes <root>/{train,validation,test}.jsonl (atomically); returns root."""
  sizes = dict(sizes or {'train': 20000, 'validation': 500, 'test': 500})
  return _write_splits(root, sizes, lambda n, split: make_examples(n, seed, split, tasks))


def default_root(cfg) -> str:
  """<data_dir>/sft_task/v<VERSION>_seed<task_seed>_<hash of the sizes>."""
  s = cfg.sft
  sizes = json.dumps(dict(s.task_sizes), sort_keys=True)
  tag = hashlib.sha256(sizes.encode()).hexdigest()[:8]
  return os.path.join(sources.default_data_dir(cfg.data), 'sft_task',
                      f'v{VERSION}_seed{s.task_seed}_{tag}')


def ensure(cfg) -> str:
  """The built-in task's directory for cfg.sft, written if missing."""
  root = default_root(cfg)
  if not all(os.path.exists(os.path.join(root, f'{s}.jsonl')) for s in cfg.sft.task_sizes):
    write_task(root, cfg.sft.task_seed, dict(cfg.sft.task_sizes))
    print(f'lmjax: wrote the synthetic SFT task to {root}', flush=True)
  return root


# ---- Preference pairs (DPO) ---------------------------------------------------------------

def wrong_answer(task: str, question: str, answer: str, rng: random.Random) -> str:
  """A plausible wrong answer: the other number, an off-by-one, the unchanged word."""
  if task == 'next_letter':
    c = question.rstrip('?').split()[-1]
    return rng.choice([c, chr(ord(answer) + 1) if answer != 'z' else 'a'])
  if task == 'larger':
    a, b = (int(x) for x in question.rstrip('?').split(', ')[1].split(' or '))
    return str(min(a, b))
  if task in ('add', 'length'):
    n = int(answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
  if task == 'upper':
    w = question.split(': ')[1]
    return rng.choice([w, w[0].upper() + w[1:]])
  if task == 'reverse':
    w = question.split(': ')[1]
    if w != answer:
      return w
    return w[:-1] + LETTERS[(LETTERS.index(w[-1]) + 1) % 26]  # a palindrome: change one
  raise ValueError(f'unknown task {task!r}; known: {TASKS}')


def make_pairs(n: int, seed: int = 0, split: str = 'train',
               tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """n preference pairs {'prompt': [user], 'chosen': [assistant], 'rejected': [assistant],
  'task'} from the SFT task's questions: chosen = the correct answer, rejected = a
  plausible wrong one (never equal to it). Deterministic in (seed, split); the questions
  are `split`'s (question_split), drawn from their own stream, not the SFT examples'."""
  rng = random.Random(f'lmjax-pref-task/{seed}/{split}')
  out = []
  for i in range(n):
    task = tasks[i % len(tasks)]
    q, a = draw_question(task, rng, split)
    w = wrong_answer(task, q, a, rng)
    assert w != a, (task, q, a, w)
    out.append({'prompt': [{'role': 'user', 'content': q}],
                'chosen': [{'role': 'assistant', 'content': a}],
                'rejected': [{'role': 'assistant', 'content': w}], 'task': task})
  return out


def write_pairs(root: str, seed: int = 0, sizes: dict | None = None) -> str:
  """Writes <root>/{split}.jsonl preference pairs atomically; returns root."""
  sizes = dict(sizes or {'train': 20000, 'validation': 500, 'test': 500})
  return _write_splits(root, sizes, lambda n, split: make_pairs(n, seed, split))


def ensure_pairs(cfg, group: str = 'dpo') -> str:
  """The built-in preference task's directory for cfg.<group> ('dpo' or 'reward': its
  task_sizes and task_seed; 'kto', which splits each pair into a liked and a disliked
  answer), written if missing."""
  d = cfg[group]
  sizes = json.dumps(dict(d.task_sizes), sort_keys=True)
  tag = hashlib.sha256(sizes.encode()).hexdigest()[:8]
  root = os.path.join(sources.default_data_dir(cfg.data), 'pref_task',
                      f'v{VERSION}_seed{d.task_seed}_{tag}')
  if not all(os.path.exists(os.path.join(root, f'{s}.jsonl')) for s in d.task_sizes):
    write_pairs(root, d.task_seed, dict(d.task_sizes))
    print(f'lmjax: wrote the synthetic preference task to {root}', flush=True)
  return root
