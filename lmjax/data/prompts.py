"""Prompts for online RL (cfg.grpo): what the policy samples completions of.

Records (a JSONL line or a TFDS record), as TRL's GRPOTrainer takes them:
    {"prompt": str, ...}                      a user turn
    {"prompt": [messages], ...}               the conversation so far
    {"messages": [..., assistant], ...}       a conversation: the prompt is every turn
                                              before the last, whose content becomes the
                                              "answer" column (SFT data works as is)
Every other field is a column: the reward functions receive it, one entry per completion
(e.g. "answer" for the built-in exact-match reward, "task"). As in TRL, a prompt given as
messages (or a conversation) makes the reward functions receive its prompt as messages and
its completions as [{"role": "assistant", "content": text}]; a string prompt, both as
strings. A record without a column
that others have gives None there. 'builtin:synthetic' reads the built-in task's
conversations (data/sft_task.py, cfg.sft.task_sizes / task_seed): its questions with
their exact answers.

A prompt is rendered with cfg.sft.template up to the assistant's header and encoded as
generation sees it (formats.prompt_ids). It must leave room for grpo.max_completion_length
tokens within data.seq_len; one that does not is dropped (by the data check, or counted as
'grpo/dropped' where the pipeline meets it).

The batches are indices: {'index': [B] int32} into the split's records (and 'dropped'
[B]), so the stream is a plain grain pipeline whose state resumes exactly; the objective
looks the prompts and columns up on the host.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lmjax.data import formats, pipeline, preference
from lmjax.data.sources import DataError


def _plain(value):
  """A JSON-safe column value (bytes decoded, numpy scalars and arrays as Python)."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return _plain(value.item()) if value.ndim == 0 else [_plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


def normalize_prompt(obj: Any) -> tuple[list[dict[str, str]], dict, bool]:
  """A record -> (prompt turns, columns, conversational: whether the prompt came as
  messages, not a string); ValueError if malformed (see the module doc)."""
  if not isinstance(obj, dict):
    raise ValueError(f'a prompt record must be a JSON object, got {type(obj).__name__}')
  columns = {k: _plain(v) for k, v in obj.items() if k not in ('prompt', 'messages')}
  if 'prompt' in obj:
    turns = preference.parse_turns(obj['prompt'], 'prompt')
    conversational = not isinstance(obj['prompt'], (str, bytes))
  elif 'messages' in obj:
    turns = formats.normalize_example({'messages': obj['messages']})
    if len(turns) < 2:
      raise ValueError('"messages" needs a prompt before its final assistant turn')
    columns.setdefault('answer', turns[-1]['content'])
    turns, conversational = turns[:-1], True
  else:
    raise ValueError(f'a prompt record needs "prompt" (or "messages"), has {sorted(obj)}')
  if turns[-1]['role'] == 'assistant':
    raise ValueError('the prompt must not end with an assistant turn (the completion is '
                     "the model's)")
  return turns, columns, conversational


def read_prompts(paths: list[str], on_error: str = 'skip') -> tuple[list, dict]:
  """Normalized prompt records of JSONL files and stats (formats.read_records)."""
  return formats.read_records(paths, normalize_prompt, on_error=on_error, what='prompt',
                              field='grpo.on_error')


class Prompts:
  """Random-access (turns, columns, conversational) of one split (len + __getitem__)."""

  def __init__(self, items, name: str, stats: dict | None = None, raw: bool = False):
    self._items, self.name, self.stats, self._raw = items, name, stats or {}, raw

  def __len__(self) -> int:
    return len(self._items)

  def where(self, index: int) -> str:
    """Where prompt `index` came from: 'file:line', or 'name[index]'."""
    return formats.where(self.stats, self.name, index)

  def __getitem__(self, index: int) -> tuple[list[dict[str, str]], dict, bool]:
    item = self._items[int(index)]
    if not self._raw:
      return item
    try:
      return normalize_prompt(dict(item))
    except ValueError as e:
      raise DataError(f'{self.name}[{index}]: malformed prompt: {e}') from None

  def columns(self, indices) -> dict[str, list]:
    """{column: [value per index]} of the records `indices` (None where one lacks it)."""
    rows = [self[i][1] for i in indices]
    names = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in names}


def get_prompts(cfg, split: str) -> Prompts:
  """The prompts of `split` from cfg.grpo (JSONL files, a TFDS dataset, or the built-in
  task)."""
  return formats.read_split(cfg, split, 'grpo', read_prompts,
                            lambda items, name, stats: Prompts(items, name, stats),
                            lambda records, name: Prompts(records, name, raw=True), 'prompts')


def encode_prompt(turns: list[dict[str, str]], tokenizer, template: str) -> list[int]:
  """The ids generation starts from: the turns rendered up to the assistant's header."""
  text = formats.render_prompt(turns + [{'role': 'assistant', 'content': ''}], template,
                               tokenizer)
  return formats.prompt_ids(text, tokenizer, template)


def max_prompt_length(cfg) -> int:
  """The longest prompt that leaves room for grpo.max_completion_length tokens."""
  return cfg.data.seq_len - cfg.grpo.max_completion_length


class _Encode(grain.transforms.Map):

  def __init__(self, tokenizer, template: str):
    self.tokenizer, self.template = tokenizer, formats.resolve_template(template, tokenizer)

  def map(self, item):
    index, (turns, *_) = item
    return index, len(encode_prompt(turns, self.tokenizer, self.template))


def make_prompt_iterator(cfg, tokenizer, split: str, *, batch_size: int,
                         process_index: int = 0, process_count: int = 1,
                         seed: int | None = None, repeat: bool = True,
                         keep=None) -> grain.DatasetIterator:
  """Batches {'index': [batch_size] int32 (the prompts' indices in the split),
  'dropped': [batch_size] int32 (prompts too long, dropped since the previous one)} of
  this process's share of the cfg.grpo `split`, shuffled (train split, when
  cfg.data.shuffle); repeat=False: one pass. keep: the indices of the split's prompts to
  read (the data check's), None = all. get_state()/set_state() resume the exact stream."""
  seed = cfg.seed if seed is None else seed
  records = get_prompts(cfg, split)
  if keep is not None and not len(keep):
    raise DataError(f'grpo split {split!r} ({records.name}) has no prompt left to train on')
  it, share = formats.encoded_stream(cfg, preference.Indexed(records, keep), split,
                                     _Encode(tokenizer, cfg.sft.template), '/grpo',
                                     batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, seed=seed, repeat=repeat)
  limit = max_prompt_length(cfg)

  def keep_fn(item, dropped):
    index, n = item
    if n > limit:
      return None
    return {'index': np.int32(index), 'dropped': np.int32(dropped)}

  it = pipeline.CountDrops(
      it, keep_fn, share if repeat else 2**62,
      lambda n: f'{records.name}: {n} prompts in a row leave no room for '
                f'grpo.max_completion_length={cfg.grpo.max_completion_length} tokens within '
                f'data.seq_len={cfg.data.seq_len}: raise data.seq_len')
  return iter(formats.finish(cfg, it.batch(batch_size, drop_remainder=True)))
