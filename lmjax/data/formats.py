"""Chat and prompt/completion examples -> token ids + loss masks -> packed SFT batches.

Examples (one JSON object per line of a JSONL file, or a TFDS record):
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}      (= one user turn and one assistant turn)
A conversation must end with an assistant turn. Malformed lines are skipped and counted
(cfg.sft.on_error='skip') or raise DataError naming file:line ('fail').

Splits (split_files): cfg.sft.path with '{split}' names every split; a path without it holds
the train split (data.train_split) only, and the eval split (data.eval_split) is
cfg.sft.eval_path when set, else there is none (never the training file again).

Templates (cfg.sft.template):
    model:  the tokenizer's own Jinja chat template (data/chat_template.py), rendered as
            transformers' apply_chat_template renders it; the template writes BOS and the
            end-of-turn tokens itself, and the mask is 1 on the assistant tokens (generation
            tags, or prefix renders), as transformers' return_assistant_tokens_mask.
    auto:   'model' when the tokenizer has a chat template, else 'chatml' (the default).
    Built-in templates, for models without one; their markers such as '<|im_start|>' are
    text (the tokenizer's special ids when it has them as special tokens, else several
    ordinary pieces):
    llama3: [BOS] <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ... [EOS]
    chatml: [BOS] <|im_start|>{role}\\n{content}<|im_end|>\\n ... [EOS]
    plain:  [BOS] {prompt}{completion} [EOS]   (messages: {content}\\n per turn, the
            final assistant turn without it; no role names)
A built-in template renders a conversation as alternating text chunks, prompt (system/user
turns and the assistant header) and assistant (content + end-of-turn marker), each
encoded on its own (so the mask boundary is exact), then [BOS] + ... + [EOS]: one BOS (none
for a tokenizer without one), one EOS after the final assistant turn. The per-token mask
is 1 on assistant chunks and the final EOS. `render_prompt` gives the text of a
conversation up to the final assistant turn's header; `prompt_ids` its token ids (for a
built-in template [BOS] + its encoding, exactly the training prefix).

Packing (grain FirstFitPackIterDataset): whole conversations into rows of seq_len with
segment ids and per-conversation positions; one is never split across rows. As in
pretraining, targets[t] = inputs[t + 1] within a segment (else 0), and loss_mask[t] = 1
only where that target token is an assistant token. Longer conversations are truncated
to seq_len or dropped (cfg.sft.overlong); each row carries 'dropped' and 'truncated' [B]
int32 counts of such conversations since the previous row (sums over rows = totals).
"""

from __future__ import annotations

import array
import bisect
import glob as glob_lib
import json
import os
from typing import Any, Iterator

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from lmjax import config as config_lib
from lmjax.data import chat_template, pipeline, sft_task, sources
from lmjax.data.pipeline import shuffle_seed
from lmjax.data.sources import DataError
from lmjax.models import attention

ROLES = ('system', 'user', 'assistant')
TEMPLATES = ('auto', 'model', 'llama3', 'chatml', 'plain')
BUILTIN_TEMPLATES = ('llama3', 'chatml', 'plain')
COUNTS = ('dropped', 'truncated')  # per-row extra features (strip before the step)


# ---- Parsing ------------------------------------------------------------------------

def normalize_example(obj: Any) -> list[dict[str, str]]:
  """An example object -> its list of {'role', 'content'} turns; ValueError if malformed.

  Also accepts TFDS-style records: bytes strings, and messages stored as a dict of
  parallel arrays {'role': [...], 'content': [...]}.
  """
  text = lambda v: v.decode('utf-8') if isinstance(v, bytes) else v
  if not isinstance(obj, dict):
    raise ValueError(f'an example must be a JSON object, got {type(obj).__name__}')
  if 'messages' in obj:
    msgs = obj['messages']
    if isinstance(msgs, dict) and set(msgs) >= {'role', 'content'}:
      msgs = [dict(role=r, content=c) for r, c in zip(msgs['role'], msgs['content'])]
    if not isinstance(msgs, (list, tuple)) or not msgs:
      raise ValueError('"messages" must be a non-empty list')
    turns = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
        raise ValueError(f'message {i} needs "role" and "content"')
      role, content = text(m['role']), text(m['content'])
      if role not in ROLES:
        raise ValueError(f'message {i} has role {role!r}, not one of {ROLES}')
      if not isinstance(content, str):
        raise ValueError(f'message {i} content must be a string')
      turns.append(dict(role=role, content=content))
  elif 'prompt' in obj and 'completion' in obj:
    prompt, completion = text(obj['prompt']), text(obj['completion'])
    if not isinstance(prompt, str) or not isinstance(completion, str):
      raise ValueError('"prompt" and "completion" must be strings')
    turns = [dict(role='user', content=prompt, sep=''),
             dict(role='assistant', content=completion)]
  else:
    raise ValueError(f'an example needs "messages" or "prompt" + "completion", has '
                     f'{sorted(obj)}')
  if turns[-1]['role'] != 'assistant':
    raise ValueError('the last message must be an assistant turn')
  return turns


def read_records(paths: list[str], normalize, *, on_error: str = 'skip',
                 what: str = 'example', field: str = 'sft.on_error') -> tuple[list, dict]:
  """normalize(obj) of every JSON line of the files, in order; and stats {'examples',
  'skipped', 'first_error', 'tags': each line's 'task' field or '', 'lines' and 'files':
  where each record came from (see `where`)}. A line that is not JSON or that normalize
  rejects (ValueError) is skipped and counted, or with on_error='fail' raises
  DataError('file:line: malformed <what>: ...')."""
  if on_error not in ('skip', 'fail'):
    raise DataError(f"{field} must be 'skip' or 'fail', got {on_error!r}")
  out, tags, skipped, first = [], [], 0, None
  lines, starts = array.array('q'), []
  for path in paths:
    starts.append((len(out), path))
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
          out.append(normalize(obj))
          tags.append(str(obj.get('task', '')))
          lines.append(n)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
          msg = f'{path}:{n}: malformed {what}: {e}'
          if on_error == 'fail':
            raise DataError(msg) from None
          skipped += 1
          first = first or msg
  return out, {'examples': len(out), 'skipped': skipped, 'first_error': first, 'tags': tags,
               'lines': lines, 'files': starts}


def where(stats: dict, name: str, index: int) -> str:
  """'file:line' of record `index` of read_records' stats, else 'name[index]'."""
  if not stats.get('files'):
    return f'{name}[{index}]'
  first = [start for start, _ in stats['files']]
  path = stats['files'][bisect.bisect_right(first, index) - 1][1]
  return f'{path}:{stats["lines"][index]}'


def read_jsonl(paths: list[str], on_error: str = 'skip') -> tuple[list, dict]:
  """Conversations (lists of turns) of the JSONL files (read_records)."""
  return read_records(paths, normalize_example, on_error=on_error)


class Conversations:
  """Random-access conversations of one split (len + __getitem__, for grain)."""

  def __init__(self, items, name: str, stats: dict | None = None):
    self._items, self.name, self.stats = items, name, stats or {}

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> list[dict[str, str]]:
    item = self._items[int(index)]
    return item if isinstance(item, list) else normalize_example(item)

  def __repr__(self) -> str:
    return f'Conversations({self.name}, {len(self)})'

  def where(self, index: int) -> str:
    """Where conversation `index` came from: 'file:line', or 'name[index]'."""
    return where(self.stats, self.name, index)

  def tag(self, index: int, key: str = 'task') -> str:
    """A string field of the raw example besides its turns ('' if none), e.g. its task."""
    if key == 'task' and self.stats.get('tags'):
      return self.stats['tags'][int(index)]
    item = self._items[int(index)]
    value = item.get(key, '') if hasattr(item, 'get') else ''
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class _TfdsConversations(Conversations):
  """A TFDS split's records, normalized on access (malformed: DataError with index)."""

  def __getitem__(self, index: int) -> list[dict[str, str]]:
    try:
      return normalize_example(dict(self._items[int(index)]))
    except ValueError as e:
      raise DataError(f'{self.name}[{index}]: malformed example: {e}') from None


class Subset:
  """The records `keep` (indices) of a split (len + __getitem__, with .name): what the
  pipeline reads once the data check has dropped some (data/check.py)."""

  def __init__(self, records, keep):
    self._records, self._keep, self.name = records, np.asarray(keep, np.int64), records.name

  def __len__(self) -> int:
    return len(self._keep)

  def __getitem__(self, index: int):
    return self._records[int(self._keep[int(index)])]

  def __repr__(self) -> str:
    return f'Subset({self.name}, {len(self)} of {len(self._records)})'


# The built-in synthetic task (data/sft_task.py: conversations for sft.path, preference
# pairs for dpo.path), written under data.data_dir on first use; it has every split.
BUILTIN = config_lib.BUILTIN_DATA  # sft.path / dpo.path of the built-in synthetic task


def is_builtin(path: str) -> bool:
  """Whether a data path names the built-in synthetic task."""
  return path.strip() == BUILTIN


def empty_path_message(group: str) -> str:
  """The error for an unset <group>.path."""
  return (f"{group}.path is empty: set it to your JSONL files (e.g. "
          f"'data/{{split}}.jsonl') or to {BUILTIN!r} for the built-in synthetic task")


def split_source(cfg, split: str, group: str = 'sft') -> tuple[str, str] | None:
  """(path, field) of the JSONL files that hold `split` of cfg.<group> ('sft' or 'dpo';
  BUILTIN = the built-in task), or None when there is no such split: the eval split
  (data.eval_split) is <group>.eval_path when set; a path with '{split}' (or the built-in
  task) names every split; one without it holds data.train_split only."""
  g = cfg[group]
  if split == cfg.data.eval_split and g.eval_path:
    return g.eval_path, f'{group}.eval_path'
  if is_builtin(g.path) or '{split}' in g.path or split == cfg.data.train_split:
    return g.path, f'{group}.path'
  return None


def has_split(cfg, split: str, group: str = 'sft') -> bool:
  """Whether cfg.<group>'s data has `split` (TFDS datasets: assumed; see split_source)."""
  return cfg[group].source != 'jsonl' or split_source(cfg, split, group) is not None


def split_files(cfg, split: str, group: str = 'sft') -> list[str]:
  """The JSONL files of `split` of cfg.<group> ('sft' or 'dpo'; see split_source): a file, a
  glob or comma-separated globs, '{split}' filled in; BUILTIN = the built-in synthetic task
  (written on first use). DataError when the data has no such split or no path."""
  g, source = cfg[group], split_source(cfg, split, group)
  if source is None:
    raise DataError(
        f"{group}.path {g.path!r} has no '{{split}}', so it holds the "
        f'{cfg.data.train_split!r} split only: there is no {split!r} split; set '
        f'{group}.eval_path to held-out examples (the {cfg.data.eval_split!r} split) or put '
        f"'{{split}}' in {group}.path")
  path, field = source
  if not path.strip():
    raise DataError(empty_path_message(field.split('.')[0]))
  if is_builtin(path):
    # conversations (SFT; GRPO's prompts with their answers) or preference pairs
    root = (sft_task.ensure(cfg) if group in ('sft', 'grpo')
            else sft_task.ensure_pairs(cfg, group))
    return [os.path.join(root, f'{split}.jsonl')]
  return split_files_of(path, split, field)


def split_files_of(path: str, split: str, field: str) -> list[str]:
  """The files of `split` named by `path` ('{split}' filled in; a file, a glob or
  comma-separated globs); DataError naming `field` if none."""
  files = []
  for pattern in path.split(','):
    pattern = os.path.expanduser(pattern.strip().replace('{split}', split))
    files.extend(sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)))
  if not files:
    raise DataError(f'{field} {path!r} matches no file for split {split!r}')
  return files


def read_split(cfg, split: str, group: str, read, from_jsonl, from_tfds, unit: str):
  """The records of `split` of a chat data group (cfg.sft, cfg.dpo): from its JSONL files,
  read(files, on_error) -> (items, stats) wrapped as from_jsonl(items, name, stats) (its
  malformed lines skipped are reported), or from its TFDS dataset's records wrapped as
  from_tfds(records, name). DataError when none is usable."""
  g = cfg[group]
  if g.source == 'jsonl':
    files = split_files(cfg, split, group)
    items, stats = read(files, g.on_error)
    name = (files[0] if len(files) == 1
            else f'{len(files)} files of {split_source(cfg, split, group)[0]}')
    if stats['skipped']:
      print(f'lmjax: {group} {split}: skipped {stats["skipped"]} malformed {unit} of '
            f'{name} (first: {stats["first_error"]})', flush=True)
    out = from_jsonl(items, name, stats)
  elif g.source == 'tfds':
    d = cfg.data.copy_and_resolve_references()
    with d.unlocked():
      d.source, d.tfds_name = 'tfds', g.tfds_name
    src = sources.get_source(d, split)
    out = from_tfds(src._source, src.name)  # pylint: disable=protected-access
  else:
    raise DataError(f"{group}.source must be 'jsonl' or 'tfds', got {g.source!r}")
  if len(out) == 0:
    raise DataError(f'{group} split {split!r} ({out.name}) has no usable '
                    f'{unit.rstrip("s")}')
  return out


def get_conversations(cfg, split: str) -> Conversations:
  """The conversations of `split` from cfg.sft (jsonl files or a TFDS dataset)."""
  return read_split(cfg, split, 'sft', read_jsonl, Conversations, _TfdsConversations,
                    'examples')


# ---- Templates ----------------------------------------------------------------------

_SPEC = {  # prefix(role), end of turn, separator after a turn
    'llama3': (lambda r: f'<|start_header_id|>{r}<|end_header_id|>\n\n', '<|eot_id|>', ''),
    'chatml': (lambda r: f'<|im_start|>{r}\n', '<|im_end|>', '\n'),
    'plain': (lambda r: '', '', '\n'),
}


def _spec(template: str):
  if template not in _SPEC:
    raise DataError(f'sft.template must be one of {TEMPLATES}, got {template!r}')
  return _SPEC[template]


def resolve_template(template: str, tokenizer=None) -> str:
  """'auto' -> 'model' when the tokenizer has a chat template, else 'chatml'; other names
  are checked and returned."""
  if template not in TEMPLATES:
    raise DataError(f'sft.template must be one of {TEMPLATES}, got {template!r}')
  if template == 'auto':
    return 'model' if getattr(tokenizer, 'chat_template', None) else 'chatml'
  return template


def _model_template(tokenizer):
  if tokenizer is None:
    raise DataError("sft.template='model' renders with the tokenizer's chat template: "
                    'pass the tokenizer')
  return chat_template.ModelTemplate(tokenizer)


def end_marker(template: str) -> str:
  """The text that ends an assistant turn of a built-in template ('' for plain: EOS alone
  ends it; '' for the model's template, whose end-of-turn token is a stop token)."""
  return '' if template == 'model' else _spec(template)[1]


def chunks(turns: list[dict[str, str]], template: str) -> list[tuple[str, bool]]:
  """(text, is_assistant) chunks of a conversation under a built-in template, alternating,
  prompt chunks merged.

  plain: a turn's content then its 'sep' (default '\\n'); a prompt/completion example's
  prompt has sep '' (exactly prompt + completion: the data decides the spacing).
  """
  prefix, end, sep = _spec(template)
  out: list[tuple[str, bool]] = []

  def add(text, assistant):
    if out and out[-1][1] == assistant:
      out[-1] = (out[-1][0] + text, assistant)
    elif text or assistant:
      out.append((text, assistant))

  for i, t in enumerate(turns):
    last = i == len(turns) - 1
    add(prefix(t['role']), False)
    if t['role'] == 'assistant':
      add(t['content'] + end + ('' if last or template != 'plain' else sep), True)
      if not last and template != 'plain':
        add(sep, False)
    else:
      add(t['content'] + (t.get('sep', sep) if template == 'plain' else end + sep), False)
  return out


def render_prompt(turns: list[dict[str, str]], template: str, tokenizer=None) -> str:
  """The prompt text up to (and including) the header of the final assistant turn (for
  'model' and 'auto', the tokenizer's template with its generation prompt)."""
  template = resolve_template(template, tokenizer)
  if template == 'model':
    return _model_template(tokenizer).render(turns[:-1], add_generation_prompt=True)
  cs = chunks(turns, template)
  return ''.join(text for text, _ in cs[:-1])


def prompt_ids(prompt: str, tokenizer, template: str) -> list[int]:
  """Token ids of a rendered prompt (render_prompt's text) to generate from: [BOS] + its
  encoding for a built-in template; for the model's template its encoding alone (the
  template writes BOS itself)."""
  if resolve_template(template, tokenizer) == 'model':
    return tokenizer.encode(prompt, specials=True)
  return tokenizer.bos + tokenizer.encode(prompt, specials=True)


def encode(turns: list[dict[str, str]], tokenizer, template: str
           ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) int32 of one conversation. Built-in templates: [BOS] chunks [EOS],
  mask 1 on assistant chunks and the EOS; the model's template: its rendering, mask 1 on
  the assistant tokens."""
  template = resolve_template(template, tokenizer)
  if template == 'model':
    ids, mask = _model_template(tokenizer).encode(turns)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  if tokenizer.eos_id is None:
    raise DataError(f'sft.template={template!r} ends a conversation with EOS, but the '
                    f'tokenizer {tokenizer.location} has none: use its chat template '
                    "(sft.template='model') or one with an eos_token")
  ids = list(tokenizer.bos)
  mask = [0] * len(ids)
  for text, assistant in chunks(turns, template):
    piece = tokenizer.encode(text, specials=True) if text else []
    ids += piece
    mask += [int(assistant)] * len(piece)
  ids.append(tokenizer.eos_id)
  mask.append(1)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def answer_examples(cfg, split: str, limit: int | None = None, tokenizer=None
                    ) -> list[dict[str, str]]:
  """[{'prompt', 'answer', 'task'}] of the first `limit` conversations of a cfg.sft split,
  for evaluate.exact_match: prompt = the rendered chat up to the final assistant turn's
  header (encode it with prompt_ids), answer = that turn's content, task = the example's
  'task' field ('' if none). The tokenizer renders 'model' / 'auto' templates."""
  conv = get_conversations(cfg, split)
  n = len(conv) if limit is None else min(limit, len(conv))
  out = []
  for i in range(n):
    turns = conv[i]
    out.append({'prompt': render_prompt(turns, cfg.sft.template, tokenizer),
                'answer': turns[-1]['content'], 'task': conv.tag(i)})
  return out


def answer_normalizer(template: str, tokenizer=None):
  """For evaluate.exact_match(normalize=...): cuts a generation at a built-in template's
  end-of-turn marker (and, for the marker templates, at the first '<|', where any
  marker starts: a generation cut by max_new_tokens mid-marker still yields its answer),
  then keeps the first line, stripped. (The model's template ends answers with a special
  stop token, which generation stops at.)"""
  cut = end_cutter(template, tokenizer)

  def normalize(text: str) -> str:
    return cut(text).strip().split('\n', 1)[0].strip()

  return normalize


def end_cutter(template: str, tokenizer=None):
  """text -> text before a built-in template's end-of-turn marker (for the marker
  templates, before the first '<|', where any marker starts), the rest unchanged: a
  generated answer as its reader sees it. (The model's template ends answers with a stop
  token, which generation stops at.)"""
  end = end_marker(resolve_template(template, tokenizer))

  def cut(text: str) -> str:
    return text.split(end, 1)[0].split('<|', 1)[0] if end else text

  return cut


def file_answer_examples(path: str, template: str = 'llama3', limit: int | None = None
                  ) -> list[dict[str, str]]:
  """[{'prompt', 'answer', 'task'}] of a messages JSONL file for evaluate.exact_match:
  prompt = the rendered chat up to the final assistant turn's header (encode it as
  [BOS] + tokenizer.encode(prompt), as lmjax.api does), answer = that turn's content.
  Pass normalize=answer_normalizer(template) to cut at the end-of-turn marker."""
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      obj = json.loads(line)
      try:
        turns = normalize_example(obj)
      except ValueError as e:
        raise DataError(f'{path}:{n}: malformed example: {e}') from None
      out.append({'prompt': render_prompt(turns, template),
                  'answer': turns[-1]['content'], 'task': obj.get('task', '')})
      if limit is not None and len(out) >= limit:
        break
  return out


# ---- The grain pipeline -------------------------------------------------------------

class _Encode(grain.transforms.Map):

  def __init__(self, tokenizer, template: str):
    self.tokenizer, self.template = tokenizer, resolve_template(template, tokenizer)
    if self.template == 'model':
      _model_template(tokenizer)  # fails now, not in a data thread, without a template

  def map(self, turns) -> dict[str, np.ndarray]:
    tokens, mask = encode(turns, self.tokenizer, self.template)
    return {'tokens': tokens, 'mask': mask}


def overlong_fate(mask: np.ndarray, seq_len: int, mode: str) -> str | None:
  """What the pipeline does with an encoded conversation (its loss `mask`) under
  sft.overlong=`mode`: None (it fits), 'truncated', 'dropped' (longer than seq_len, mode
  'drop'), or 'no_room' (longer, and no assistant token is left within seq_len: dropped)."""
  if len(mask) <= seq_len:
    return None
  if not np.any(mask[1:seq_len]):
    return 'no_room'
  return 'dropped' if mode == 'drop' else 'truncated'


def _overlong(seq_len: int, mode: str):
  """keep(example, dropped) for pipeline.CountDrops: truncates or drops conversations
  longer than seq_len (a truncated one with no loss token left is dropped instead); a kept
  one carries the number dropped since the previous one ('dropped') and whether it was cut
  ('truncated'), as [L] features whose first entry holds the count."""
  if mode not in ('truncate', 'drop'):
    raise DataError(f"sft.overlong must be 'truncate' or 'drop', got {mode!r}")

  def keep(ex, dropped):
    fate = overlong_fate(ex['mask'], seq_len, mode)
    if fate in ('dropped', 'no_room'):
      return None
    cut = int(fate == 'truncated')
    if cut:
      ex = {k: v[:seq_len] for k, v in ex.items()}
    counts = {k: np.zeros(len(ex['tokens']), np.int32) for k in COUNTS}
    counts['dropped'][0], counts['truncated'][0] = dropped, cut
    return {**ex, **counts}

  return keep


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row -> {inputs, targets, segment_ids, positions, loss_mask, dropped,
  truncated}: loss where the target is an assistant token of the same conversation."""
  return {**pipeline.features(row['tokens'], row['tokens_segment_ids'],
                              row['tokens_positions'], row['mask']),
          **{k: np.int32(row[k].sum()) for k in COUNTS}}


def make_sft_dataset(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                     process_count: int = 1, seed: int | None = None,
                     repeat: bool = True, keep=None) -> grain.IterDataset:
  """The grain dataset behind make_sft_iterator (same arguments)."""
  d, s = cfg.data, cfg.sft
  seed = cfg.seed if seed is None else seed
  conv = get_conversations(cfg, split)
  if keep is not None:
    conv = Subset(conv, keep)
    if not len(conv):
      raise DataError(f'sft split {split!r} ({conv.name}) has no example left to train on')
  it, share = encoded_stream(cfg, conv, split, _Encode(tokenizer, s.template), '/sft',
                             batch_size=batch_size, process_index=process_index,
                             process_count=process_count, seed=seed, repeat=repeat)
  it = pipeline.CountDrops(
      it, _overlong(d.seq_len, s.overlong), share if repeat else 2**62,
      lambda n: f'{conv.name}: {n} examples in a row are longer than data.seq_len='
                f'{d.seq_len} (sft.overlong={s.overlong!r}; a truncated one needs an '
                'assistant token left): raise data.seq_len')
  lengths = {k: d.seq_len for k in ('tokens', 'mask') + COUNTS}
  # cuDNN attention takes at most model.max_segments runs a row: conversations + padding.
  per_bin = (cfg.model.max_segments - 1
             if attention.implementation(cfg.model) == 'cudnn' else None)
  it = FirstFitPackIterDataset(it, length_struct=lengths, num_packing_bins=s.packing_bins,
                               seed=shuffle_seed(seed, '/sft-bins'),
                               meta_features=('mask',) + COUNTS,
                               max_sequences_per_bin=per_bin or None)
  return finish(cfg, it.map(_to_example).batch(batch_size, drop_remainder=True))


def encoded_stream(cfg, examples, split: str, encode: grain.transforms.Map, salt: str, *,
                   batch_size: int, process_index: int, process_count: int, seed: int,
                   repeat: bool) -> tuple[grain.IterDataset, int]:
  """The head of a chat example pipeline (SFT conversations, DPO pairs): pipeline.
  example_stream on cfg.data.worker_threads threads. Returns (the stream, the size of
  this process's share)."""
  d = cfg.data
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  ds = pipeline.example_stream(d, examples, split, encode, process_index=process_index,
                               process_count=process_count, seed=seed, salt=salt,
                               repeat=False)
  share = len(ds)  # this process's examples, once
  if repeat:
    ds = ds.repeat()
  threads = max(int(d.worker_threads), 0)
  return ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * threads)), share


def finish(cfg, it: grain.IterDataset) -> grain.IterDataset:
  """The tail of a batch pipeline: pipeline.finish (prefetch, JSON-safe state)."""
  return pipeline.finish(cfg.data, it)


def make_sft_iterator(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1, seed: int | None = None,
                      repeat: bool = True, keep=None) -> grain.DatasetIterator:
  """Batches {inputs, targets, segment_ids, positions: int32, loss_mask: float32}, each
  [batch_size, cfg.data.seq_len], plus 'dropped' and 'truncated' [batch_size] int32
  (overlong conversations since the previous row: log their sums, strip before the
  step), of this process's share of the SFT `split` (cfg.sft).

  seed: shuffle seed (default cfg.seed); cfg.data.train_split is shuffled when
  cfg.data.shuffle. repeat=False: one pass (the last partial batch is dropped).
  keep: the indices of the split's conversations to read (the data check's, which drops
  degenerate ones: data/check.py), before sharding and shuffling; None = all.
  get_state()/set_state() resume the exact stream (JSON-safe).
  """
  return iter(make_sft_dataset(cfg, tokenizer, split, batch_size=batch_size,
                               process_index=process_index, process_count=process_count,
                               seed=seed, repeat=repeat, keep=keep))


def iter_rows(batches) -> Iterator[dict[str, np.ndarray]]:
  """The rows of batches (for tests and inspection)."""
  for b in batches:
    for i in range(len(b['inputs'])):
      yield {k: v[i] for k, v in b.items()}
