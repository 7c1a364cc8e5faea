"""Like/dislike feedback -> token rows for KTO: each example is two rows, the example and
its KL row.

Examples (a JSONL line or a TFDS record), as TRL's KTOTrainer takes unpaired data:
    {"prompt": str, "completion": str, "label": true | false}
    {"prompt": [messages], "completion": [assistant messages], "label": true | false}
and preference pairs as data/preference.py reads them ({"prompt", "chosen", "rejected"},
or implicit-prompt message pairs), each split into a liked example (chosen) and a
disliked one (rejected); a pair with a soft label ("label" or "p" in [0, 1], e.g. an AI
judge's) is split by it, both examples weighted |2p - 1| (normalize_feedback). A label
that is not a JSON boolean is a malformed line: skipped and counted, or DataError naming
file:line (kto.on_error='fail'). Splits as formats.split_files reads them (kto.path,
kto.eval_path); kto.path='builtin:synthetic' is the built-in preference pairs
(data/sft_task.py `make_pairs`: the right answer liked, a plausible wrong one disliked).

Rows: example i is rows 2i (its prompt and completion) and 2i + 1 (its KL row: the same
prompt with the completion of a fixed partner example), encoded together by
preference.encode_pair, so both rows hold the prompt's tokens exactly as a DPO pair does
(template sft.template, loss mask on the completion tokens). The partner is the next
example in a permutation cycle of the whole split seeded by cfg.seed (`partners`): never
the example itself, the same for every epoch, process and resume, so a precomputed
reference table (train/ref_logps.py: [n_examples, 2] = example row, KL row) and a resumed
stream see the same rows. TRL's KTOTrainer also fixes the mismatch once before training,
but by rotating the completions within each batch of the dataset (`_get_kl_dataset`), so
its partners depend on its batch size; here they do not.

Overlong examples (kto.overlong) are judged with their KL row, as a DPO pair's rows are
(preference.pair_fate): an example is dropped or truncated when either row is too long.
Each row pair carries 'label' (1 liked, 0 disliked; the example's, on both rows), 'weight'
(the example's loss weight: 1, or |2p - 1| for a pair with a soft label p) and
'dropped' / 'truncated' counts on the example row (0 on the KL row), as formats.COUNTS.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lmjax.data import formats, pipeline, preference
from lmjax.data.sources import DataError

COUNTS = formats.COUNTS


def _bool(value) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise ValueError(f'"label" must be true (liked) or false (disliked), got {value!r}')


def normalize_feedback(obj: Any) -> list[tuple[list, list, bool, float]]:
  """A record -> [(prompt turns, completion turns, liked, weight)]: one example (weight
  1), or two for a preference pair: chosen liked and rejected disliked, weight 1; with a
  soft label p (the pair's "label" or "p" column: an AI judge's probability that chosen is
  better), chosen is liked iff p > 0.5 and rejected iff p < 0.5, both weighted |2p - 1|
  (a near-tie teaches little). ValueError if malformed."""
  if not isinstance(obj, dict):
    raise ValueError(f'an example must be a JSON object, got {type(obj).__name__}')
  if 'chosen' in obj or 'rejected' in obj:
    prompt, chosen, rejected, extras = preference.normalize_pair(obj, ('label',))
    p = extras['label']
    w = abs(2.0 * p - 1.0)
    return [(prompt, chosen, p > 0.5, w), (prompt, rejected, p < 0.5, w)]
  if not {'prompt', 'completion', 'label'} <= set(obj):
    raise ValueError('an example needs "prompt", "completion" and "label" (or a pair: '
                     f'"chosen" and "rejected"), has {sorted(obj)}')
  label = _bool(obj['label'])
  turns = preference.parse_turns
  prompt, completion = turns(obj['prompt'], 'prompt'), turns(obj['completion'], 'completion')
  if isinstance(obj['prompt'], (str, bytes)) and isinstance(obj['completion'], (str, bytes)):
    prompt[0]['sep'] = ''  # plain template: prompt + completion exactly, as formats does
  if completion[-1]['role'] != 'assistant':
    raise ValueError('"completion" must end with an assistant turn')
  if prompt[-1]['role'] == 'assistant':
    raise ValueError('the prompt must not end with an assistant turn')
  return [(prompt, completion, label, 1.0)]


def read_feedback(paths: list[str], on_error: str = 'skip') -> tuple[list, dict]:
  """The examples of JSONL files (a pair's two in order) and formats.read_records' stats,
  per example (a pair's two examples share its file:line)."""
  records, stats = formats.read_records(paths, normalize_feedback, on_error=on_error,
                                        what='feedback example', field='kto.on_error')
  sizes = [len(r) for r in records]
  repeat = lambda xs: [x for x, k in zip(xs, sizes) for _ in range(k)]
  starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  stats = dict(stats, examples=int(starts[-1]), tags=repeat(stats['tags']),
               lines=repeat(stats['lines']),
               files=[(int(starts[first]), path) for first, path in stats['files']])
  return [ex for r in records for ex in r], stats


def partners(n: int, seed: int, split: str) -> np.ndarray:
  """[n] the KL partner of each example: the next in a permutation cycle of the split
  seeded by (seed, split) (never itself for n >= 2)."""
  rng = np.random.default_rng(pipeline.shuffle_seed(seed, f'/kto-kl/{split}'))
  perm = rng.permutation(n)
  out = np.empty(n, np.int64)
  out[perm] = np.roll(perm, -1)
  return out


class Feedback:
  """Random-access examples of one split (len + __getitem__, for grain): example i ->
  (prompt, completion, its KL partner's completion, liked). TFDS records are normalized
  on access: a split of pairs is two examples per record, (2r: chosen, 2r + 1: rejected)."""

  def __init__(self, items, name: str, stats: dict | None = None, raw: bool = False,
               seed: int = 0, split: str = ''):
    self._items, self.name, self.stats, self._raw = items, name, stats or {}, raw
    self._per = 1
    if raw and len(items) and ('chosen' in items[0] or 'rejected' in items[0]):
      self._per = 2
    self.partner = partners(len(self), seed, split)

  def __len__(self) -> int:
    return len(self._items) * self._per

  def where(self, index: int) -> str:
    """Where example `index` came from: 'file:line', or 'name[record]'."""
    return formats.where(self.stats, self.name, int(index) // self._per)

  def example(self, index: int) -> tuple[list, list, bool, float]:
    """(prompt, completion, liked, weight) of example `index`."""
    index = int(index)
    if not self._raw:
      return self._items[index]
    try:
      return normalize_feedback(dict(self._items[index // self._per]))[index % self._per]
    except (ValueError, IndexError) as e:
      raise DataError(f'{self.name}[{index // self._per}]: malformed feedback example: '
                      f'{e}') from None

  def __getitem__(self, index: int):
    prompt, completion, liked, weight = self.example(index)
    return prompt, completion, self.example(self.partner[int(index)])[1], liked, weight

  def labels(self) -> np.ndarray:
    """[n] bool: which examples are liked."""
    return np.array([self.example(i)[2] for i in range(len(self))], bool)


def get_examples(cfg, split: str) -> Feedback:
  """The examples of `split` from cfg.kto (JSONL files, a TFDS dataset, or the built-in
  pairs), with their KL partners."""
  make = lambda items, name, stats=None, raw=False: Feedback(items, name, stats, raw,
                                                             cfg.seed, split)
  out = formats.read_split(cfg, split, 'kto', read_feedback, make,
                           lambda records, name: make(records, name, raw=True), 'examples')
  if len(out) < 2:
    raise DataError(f'kto split {split!r} ({out.name}) has {len(out)} example: a KL row '
                    "needs another example's completion; give kto.path at least 2")
  return out


def answer_examples(cfg, split: str, limit: int, tokenizer=None) -> list[dict[str, str]]:
  """[{'prompt', 'answer', 'task'}] of the first `limit` liked examples of a cfg.kto
  split, for evaluate.exact_match (as preference.answer_examples: meaningful when a liked
  answer is the only right one, as in the built-in task)."""
  examples = get_examples(cfg, split)
  tags = examples.stats.get('tags') or []
  out = []
  for i in range(len(examples)):
    if len(out) >= limit:
      break
    prompt, completion, liked, _ = examples.example(i)
    if liked:
      out.append({'prompt': formats.render_prompt(prompt + completion, cfg.sft.template,
                                                  tokenizer),
                  'answer': completion[-1]['content'], 'task': tags[i] if i < len(tags) else ''})
  return out


class _Encode(grain.transforms.Map):

  def __init__(self, tokenizer, template: str):
    self.tokenizer, self.template = tokenizer, formats.resolve_template(template, tokenizer)

  def map(self, item):
    index, (prompt, completion, kl_completion, liked, weight) = item
    encoded = preference.encode_pair((prompt, completion, kl_completion), self.tokenizer,
                                     self.template)
    return index, encoded, (liked, weight)


def _rows(seq_len: int, mode: str, name: str, with_index: bool, ref_logps):
  """keep((index, encoded, (liked, weight)), dropped) for pipeline.CountDrops: a DPO
  pair's rows (preference.pair_row_keeper) plus 'label' [2] and 'weight' [2]."""
  pair = preference.pair_row_keeper(seq_len, mode, name, with_index, ref_logps)

  def keep(item, dropped):
    index, encoded, (liked, weight) = item
    rows = pair((index, encoded, {}), dropped)
    if rows is not None:
      rows['label'] = np.full(2, int(liked), np.int32)
      rows['weight'] = np.full(2, weight, np.float32)
    return rows

  return keep


def make_feedback_iterator(cfg, tokenizer, split: str, *, batch_size: int,
                           process_index: int = 0, process_count: int = 1,
                           seed: int | None = None, repeat: bool = True,
                           with_index: bool = False, ref_logps: np.ndarray | None = None,
                           keep=None) -> grain.DatasetIterator:
  """Batches of `batch_size` examples of this process's share of the cfg.kto `split`:
  {inputs, targets, segment_ids, positions, loss_mask} [2·batch_size, seq_len] (example i
  in row 2i, its KL row in 2i + 1), 'label' [2·batch_size] int32, 'weight'
  [2·batch_size] float32 (the example's loss weight), 'dropped'/'truncated' counts.
  Arguments as preference.make_pair_iterator's (ref_logps: [n_examples, 2], the example
  row's and the KL row's reference log-probs)."""
  seed = cfg.seed if seed is None else seed
  examples = get_examples(cfg, split)
  if ref_logps is not None and np.shape(ref_logps) != (len(examples), 2):
    raise DataError(f'precomputed reference log-probs of shape {np.shape(ref_logps)} do not '
                    f'match the {len(examples)} examples of {examples.name}')
  if keep is not None and not len(keep):
    raise DataError(f'kto split {split!r} ({examples.name}) has no example left to train on')
  it, share = formats.encoded_stream(
      cfg, preference.Indexed(examples, keep), split,
      _Encode(tokenizer, cfg.sft.template), '/kto', batch_size=batch_size,
      process_index=process_index, process_count=process_count, seed=seed, repeat=repeat)
  seq_len, mode = cfg.data.seq_len, cfg.kto.overlong
  it = pipeline.CountDrops(
      it, _rows(seq_len, mode, examples.name, with_index, ref_logps),
      share if repeat else 2**62,
      lambda n: f'{examples.name}: {n} examples in a row do not fit data.seq_len={seq_len} '
                f'(kto.overlong={mode!r}): raise data.seq_len')
  return iter(formats.finish(cfg, it.batch(batch_size, drop_remainder=True)
                             .map(preference.flatten_pairs)))
