"""Preference pairs -> token rows for DPO and reward models: each pair is two rows, chosen
then rejected.

Examples (a JSONL line or a TFDS record), as TRL's DPOTrainer takes them:
    {"prompt": str, "chosen": str, "rejected": str}
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}
    {"chosen": [messages], "rejected": [messages]}   (the shared leading turns = prompt)
    {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}
                                                     (the public Constitutional AI datasets'
                                                      layout: chosen and rejected repeat the
                                                      prompt's turns, which are dropped)
Reward-model pairs (cfg.reward) may add per-pair columns (group_columns): "margin" (a
finite number, default 0) and "label" (in [0, 1]: the share of judges preferring chosen,
default 1; "p", an AI judge's probability that chosen is better (tools/ai_feedback.py),
is read as the label when "label" is absent); DPO pairs carry "label" with
dpo.soft_labels. A bad value makes the record malformed (skipped and counted, or with
on_error='fail' an error naming file:line). Both rows of a pair carry them, float32.
Splits as formats.split_files reads them (<group>.path, <group>.eval_path). Pairs are
rendered with cfg.sft.template (formats.chunks: the prompt's chunks are encoded on their
own, so prompt tokens are identical in both rows), [BOS] prompt completion [EOS], loss mask
on the completion tokens (the assistant content, its end-of-turn marker and EOS).

A row holds one sequence, padded to data.seq_len (segment id 0 on padding), so a batch of
B pairs is [2B, seq_len] with pair i in rows 2i (chosen) and 2i + 1 (rejected): a pair
stays on one device under data parallelism. Longer pairs (<group>.overlong): 'truncate'
cuts each completion to fit, and drops the pair when its prompt leaves no completion token
in either row; 'drop' drops any pair longer than seq_len. Chosen rows carry 'dropped' (pairs
dropped since the previous pair) and 'truncated' (0/1) counts, as formats.COUNTS, 0 on
rejected rows: sums over a batch are its totals.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lmjax.data import chat_template, formats, pipeline
from lmjax.data.sources import DataError

COUNTS = formats.COUNTS


def parse_turns(value, what: str) -> list[dict[str, str]]:
  text = lambda v: v.decode('utf-8') if isinstance(v, bytes) else v
  if isinstance(value, (str, bytes)):
    return [{'role': 'assistant' if what != 'prompt' else 'user', 'content': text(value)}]
  if isinstance(value, dict) and set(value) >= {'role', 'content'}:  # TFDS parallel arrays
    value = [dict(role=r, content=c) for r, c in zip(value['role'], value['content'])]
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f'"{what}" must be a string or a non-empty list of messages')
  turns = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise ValueError(f'"{what}" message {i} needs "role" and "content"')
    role, content = text(m['role']), text(m['content'])
    if role not in formats.ROLES or not isinstance(content, str):
      raise ValueError(f'"{what}" message {i}: role {role!r} must be one of '
                       f'{formats.ROLES} and content a string')
    turns.append({'role': role, 'content': content})
  return turns


def _number(value, name: str) -> float:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
    raise ValueError(f'"{name}" must be a number, got {value!r}')
  if not np.isfinite(value):
    raise ValueError(f'"{name}" must be finite, got {value!r}')
  return float(value)


def _label(value) -> float:
  p = _number(value, 'label')
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'"label" (the share of judges preferring chosen) must be in [0, 1], '
                     f'got {value!r}')
  return p


# Optional per-pair columns: name -> (default, parse: value -> float or ValueError).
COLUMNS = {'margin': (0.0, lambda v: _number(v, 'margin')), 'label': (1.0, _label)}
# Other names a column is read from when it is absent: an AI judge's "p" is a soft label.
ALIASES = {'label': ('p',)}
# The columns each data group's pairs keep (as a 4th item, {name: float}).
GROUP_COLUMNS = {'dpo': (), 'reward': ('margin', 'label')}


def group_columns(cfg, group: str) -> tuple[str, ...]:
  """The per-pair columns cfg.<group>'s pairs carry: GROUP_COLUMNS, plus 'label' for DPO
  with dpo.soft_labels."""
  if group == 'dpo' and cfg is not None and cfg.dpo.get('soft_labels', False):
    return ('label',)
  return GROUP_COLUMNS[group]


def _strip_prompt(prompt, turns):
  """`turns` without a leading copy of the prompt's turns (role and content equal)."""
  key = lambda ts: [(t['role'], t['content']) for t in ts]
  n = len(prompt)
  if len(turns) > n and key(turns[:n]) == key(prompt):
    return turns[n:]
  return turns


def normalize_pair(obj: Any, columns: tuple[str, ...] = ()) -> tuple:
  """A pair object -> (prompt turns, chosen turns, rejected turns); ValueError if malformed.
  Chosen and rejected end with an assistant turn; the prompt does not. With `columns`
  (names in COLUMNS), a 4th item {name: value}: the object's, or the default when absent
  or null."""
  if not isinstance(obj, dict):
    raise ValueError(f'a pair must be a JSON object, got {type(obj).__name__}')
  if 'chosen' not in obj or 'rejected' not in obj:
    raise ValueError(f'a pair needs "chosen" and "rejected", has {sorted(obj)}')
  chosen = parse_turns(obj['chosen'], 'chosen')
  rejected = parse_turns(obj['rejected'], 'rejected')
  if 'prompt' in obj:
    prompt = parse_turns(obj['prompt'], 'prompt')
    if isinstance(obj['prompt'], (str, bytes)) and isinstance(obj['chosen'], (str, bytes)):
      prompt[0]['sep'] = ''  # plain template: prompt + completion exactly, as formats does
    # chosen / rejected holding the whole conversation (the CAI datasets' layout)
    chosen = _strip_prompt(prompt, chosen)
    rejected = _strip_prompt(prompt, rejected)
  else:  # implicit prompt: the longest shared prefix of whole turns
    n = 0
    while (n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]):
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  if not prompt:
    raise ValueError('a pair needs a prompt (or chosen/rejected sharing leading turns)')
  for name, turns in (('chosen', chosen), ('rejected', rejected)):
    if turns[-1]['role'] != 'assistant':
      raise ValueError(f'"{name}" must end with an assistant turn')
  if prompt[-1]['role'] == 'assistant':
    raise ValueError('the prompt must not end with an assistant turn')
  if not columns:
    return prompt, chosen, rejected
  extras = {}
  for name in columns:
    default, parse = COLUMNS[name]
    value = obj.get(name)
    for alias in ALIASES.get(name, ()):
      if value is None:
        value = obj.get(alias)
    extras[name] = default if value is None else parse(value)
  return prompt, chosen, rejected, extras


def encode_pair(pair: tuple[list, list, list], tokenizer, template: str):
  """(prompt_len, chosen tokens, chosen mask, rejected tokens, rejected mask): each row is
  [BOS] prompt completion [EOS] under a built-in template, mask 1 on the completion; under
  the model's template, the prompt rendered with its generation prompt and encoded alone,
  then the rest of the conversation, mask 1 on its assistant tokens (no extra EOS: the
  template ends the turn). The rows share prompt_len tokens."""
  prompt, chosen, rejected = pair[:3]
  if formats.resolve_template(template, tokenizer) == 'model':
    tmpl = chat_template.ModelTemplate(tokenizer)
    rows = []
    for c in (chosen, rejected):
      p_ids, c_ids, c_mask = tmpl.encode_completion(prompt, c)
      rows.append((np.asarray(p_ids + c_ids, np.int32),
                   np.asarray([0] * len(p_ids) + c_mask, np.int32)))
    starts = [len(p_ids)] * 2
  else:
    rows = [formats.encode(prompt + c, tokenizer, template) for c in (chosen, rejected)]
    starts = [int(np.argmax(m > 0)) for _, m in rows]
  if starts[0] != starts[1] or not np.array_equal(rows[0][0][:starts[0]],
                                                  rows[1][0][:starts[1]]):
    raise ValueError('chosen and rejected render different prompts')  # cannot happen
  return starts[0], rows[0][0], rows[0][1], rows[1][0], rows[1][1]


def _row(tokens, mask, seq_len):
  """One sequence padded to seq_len (segment id 0 on padding) -> model features."""
  n = len(tokens)
  pad = lambda x: np.pad(np.asarray(x, np.int32), (0, seq_len - n))
  return pipeline.features(pad(tokens), pad(np.ones(n)), np.arange(seq_len), pad(mask))


def pair_fate(encoded, seq_len: int, overlong: str = 'truncate') -> str | None:
  """What the pipeline does with an encoded pair under dpo.overlong=`overlong`: None (it
  fits), 'truncated', 'dropped' (longer than seq_len, overlong 'drop'), or 'no_room' (the
  prompt leaves no completion token within seq_len: dropped)."""
  start, ct, _, rt, _ = encoded
  if max(len(ct), len(rt)) <= seq_len:
    return None
  if start + 1 >= seq_len:  # no target token would be a completion's
    return 'no_room'
  return 'dropped' if overlong == 'drop' else 'truncated'


def pair_rows(encoded, seq_len: int, overlong: str = 'truncate'):
  """Two rows (chosen, rejected) of seq_len for an encoded pair, and whether it was cut;
  None when the pair is dropped (see the module doc)."""
  start, ct, cm, rt, rm = encoded
  fate = pair_fate(encoded, seq_len, overlong)
  if fate is None:
    return (_row(ct, cm, seq_len), _row(rt, rm, seq_len)), False
  if fate != 'truncated':
    return None
  return (_row(ct[:seq_len], cm[:seq_len], seq_len),
          _row(rt[:seq_len], rm[:seq_len], seq_len)), True


def read_pairs(paths: list[str], on_error: str = 'skip', group: str = 'dpo',
               columns: tuple[str, ...] | None = None) -> tuple[list, dict]:
  """Normalized pairs of JSONL files (with `columns`, default the group's GROUP_COLUMNS)
  and stats (formats.read_records); on_error='fail' raises DataError('file:line: ...')."""
  columns = GROUP_COLUMNS[group] if columns is None else columns
  return formats.read_records(paths, lambda obj: normalize_pair(obj, columns),
                              on_error=on_error, what='preference pair',
                              field=f'{group}.on_error')


class Pairs:
  """Random-access normalized pairs of one split (len + __getitem__, for grain)."""

  def __init__(self, items, name: str, stats: dict | None = None, raw: bool = False,
               columns: tuple[str, ...] = ()):
    self._items, self.name, self.stats, self._raw = items, name, stats or {}, raw
    self.columns = columns

  def __len__(self) -> int:
    return len(self._items)

  def where(self, index: int) -> str:
    """Where pair `index` came from: 'file:line', or 'name[index]'."""
    return formats.where(self.stats, self.name, index)

  def __getitem__(self, index: int):
    item = self._items[int(index)]
    if not self._raw:
      return item
    try:
      return normalize_pair(dict(item), self.columns)
    except ValueError as e:
      raise DataError(f'{self.name}[{index}]: malformed preference pair: {e}') from None


def get_pairs(cfg, split: str, group: str = 'dpo') -> Pairs:
  """The pairs of `split` from cfg.<group> ('dpo' or 'reward': JSONL files, a TFDS
  dataset, or the built-in task), with the group's columns (group_columns)."""
  columns = group_columns(cfg, group)
  return formats.read_split(
      cfg, split, group, lambda paths, on_error: read_pairs(paths, on_error, group, columns),
      lambda items, name, stats: Pairs(items, name, stats, columns=columns),
      lambda records, name: Pairs(records, name, raw=True, columns=columns), 'pairs')


def answer_examples(cfg, split: str, limit: int | None = None, tokenizer=None
                    ) -> list[dict[str, str]]:
  """[{'prompt', 'answer', 'task'}] of the first `limit` pairs of a cfg.dpo split, for
  evaluate.exact_match: prompt = the chat up to the chosen turn's header (encode it with
  formats.prompt_ids), answer = the chosen completion's last turn, task = the record's
  'task' field ('' if none). Meaningful for pairs whose chosen answer is the only right
  one (the built-in task's)."""
  pairs = get_pairs(cfg, split)
  tags = pairs.stats.get('tags') or []
  n = len(pairs) if limit is None else min(limit, len(pairs))
  out = []
  for i in range(n):
    prompt, chosen = pairs[i][:2]
    out.append({'prompt': formats.render_prompt(prompt + chosen, cfg.sft.template, tokenizer),
                'answer': chosen[-1]['content'], 'task': tags[i] if i < len(tags) else ''})
  return out


class Indexed:
  """pairs[i] -> (i, pairs[i]): a pair keeps its index in the split through shuffling and
  sharding (the key of its precomputed reference log-probs). keep: the indices to read
  (None = all)."""

  def __init__(self, pairs: Pairs, keep=None):
    self._pairs, self.name = pairs, pairs.name
    self._keep = None if keep is None else np.asarray(keep, np.int64)

  def __len__(self) -> int:
    return len(self._pairs) if self._keep is None else len(self._keep)

  def __getitem__(self, index: int):
    index = int(index) if self._keep is None else int(self._keep[int(index)])
    return index, self._pairs[index]


class _Encode(grain.transforms.Map):

  def __init__(self, tokenizer, template: str):
    self.tokenizer, self.template = tokenizer, formats.resolve_template(template, tokenizer)

  def map(self, item):
    index, pair = item
    extras = pair[3] if len(pair) > 3 else {}
    return index, encode_pair(pair, self.tokenizer, self.template), extras


def pair_row_keeper(seq_len: int, mode: str, name: str, with_index: bool, ref_logps):
  """keep((index, encoded pair, columns), dropped) for pipeline.CountDrops: {feature:
  [2, seq_len]} row pairs with their counts (module doc) and columns, or None for a
  dropped pair."""

  def keep(item, dropped):
    index, encoded, extras = item
    out = pair_rows(encoded, seq_len, mode)
    if out is None:
      return None
    (c, r), cut = out
    rows = {k: np.stack([c[k], r[k]]) for k in c}
    rows['dropped'] = np.array([dropped, 0], np.int32)
    rows['truncated'] = np.array([int(cut), 0], np.int32)
    for k, v in extras.items():  # the pair's columns, on both rows
      rows[k] = np.full(2, v, np.float32)
    if with_index:
      rows['index'] = np.array([index, index], np.int32)
    if ref_logps is not None:
      rows['ref_logps'] = np.asarray(ref_logps[index], np.float32)
      if not np.all(np.isfinite(rows['ref_logps'])):
        raise DataError(f'{name}[{index}]: no precomputed reference log-probs for this '
                        'pair (the table was computed for other data or settings)')
    return rows

  return keep


def flatten_pairs(batch):
  """{k: [B, 2, ...]} -> {k: [2B, ...]}: rows 2i chosen, 2i + 1 rejected."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def make_pair_iterator(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, seed: int | None = None,
                       repeat: bool = True, with_index: bool = False,
                       ref_logps: np.ndarray | None = None,
                       keep=None, group: str = 'dpo') -> grain.DatasetIterator:
  """Batches of `batch_size` pairs of this process's share of the cfg.<group> `split`
  ('dpo' or 'reward'): {inputs, targets, segment_ids, positions, loss_mask}
  [2·batch_size, seq_len] (pair i in rows 2i, 2i + 1) plus 'dropped'/'truncated'
  [2·batch_size] counts, and the group's columns (group_columns: 'margin', 'label':
  [2·batch_size] float32, the pair's value on both rows). The train split is
  shuffled when cfg.data.shuffle; repeat=False: one pass. get_state()/set_state() resume
  the exact stream (JSON-safe).

  with_index: rows carry 'index' [2·batch_size] int32, the pair's index in the split.
  ref_logps: the split's precomputed reference log-probs, [n_pairs, 2] (chosen, rejected;
  train/ref_logps.py): rows carry 'ref_logps' [2·batch_size] float32.
  keep: the indices of the split's pairs to read (the data check's, which drops degenerate
  ones: data/check.py), before sharding and shuffling; None = all. A pair keeps its index.
  """
  seed = cfg.seed if seed is None else seed
  pairs = get_pairs(cfg, split, group)
  if ref_logps is not None and np.shape(ref_logps) != (len(pairs), 2):
    raise DataError(f'precomputed reference log-probs of shape {np.shape(ref_logps)} do not '
                    f'match the {len(pairs)} pairs of {pairs.name}')
  if keep is not None and not len(keep):
    raise DataError(f'{group} split {split!r} ({pairs.name}) has no pair left to train on')
  it, share = formats.encoded_stream(cfg, Indexed(pairs, keep), split,
                                     _Encode(tokenizer, cfg.sft.template), f'/{group}',
                                     batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, seed=seed, repeat=repeat)
  seq_len, mode = cfg.data.seq_len, cfg[group].overlong
  it = pipeline.CountDrops(
      it, pair_row_keeper(seq_len, mode, pairs.name, with_index, ref_logps),
      share if repeat else 2**62,
      lambda n: f'{pairs.name}: {n} pairs in a row do not fit data.seq_len={seq_len} '
                f'({group}.overlong={mode!r}): raise data.seq_len')
  return iter(formats.finish(cfg, it.batch(batch_size, drop_remainder=True)
                             .map(flatten_pairs)))
