"""The data check of an SFT, DPO, KTO or reward-model run, before it compiles: degenerate
records, and an eval split that is held out.

Degenerate records teach nothing, or the wrong thing:
    sft: a conversation with an empty (or blank) assistant turn, which trains the model to
         answer with nothing; one whose prompt leaves no room for an answer within
         data.seq_len (no assistant token left once cut: the pipeline drops it).
    dpo: chosen == rejected (equal token rows once cut to data.seq_len: no DPO gradient);
         an empty (or blank) completion; a prompt that leaves no room for a completion.
    kto: an empty (or blank) completion; a prompt that leaves no room for a completion
         (judged with the example's KL row, as the pipeline encodes them together).
    grpo: an empty (or blank) prompt; one that leaves no room for
         grpo.max_completion_length tokens within data.seq_len.
    reward: the same as dpo (its pairs are read the same way; equal rows get equal
         rewards: no gradient).
Every record of a split is encoded as the pipeline encodes it (template, tokenizer,
data.seq_len, <group>.overlong: formats.overlong_fate, preference.pair_fate) and counted:
one console line per split, and the checkpoint meta's 'data_check'. With
<group>.on_degenerate='drop' (the default) they are dropped by index before the grain
pipeline is built, so a resumed run (which checks again) continues the exact stream;
'warn' trains on them, 'fail' refuses any. More than <group>.max_degenerate of a split
fails whatever on_degenerate says.

The eval split (data.eval_split): a <group>.path without '{split}' holds the train split
only, so there is none unless <group>.eval_path names one; the loop then skips eval_loss
and exact match, and says so. An eval split that shares records (equal, by hash) or files
with the train split is an error, or a warning with their count under
<group>.allow_overlap. The built-in tasks' splits hold disjoint questions
(data/sft_task.py), so they pass as any held-out data must.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import numpy as np

from lmjax.data import feedback, formats, preference, prompts
from lmjax.data.sources import DataError

CATEGORIES = {  # group -> (category, how a count of it reads)
    'sft': (('empty_turn', 'with an empty assistant turn'),
            ('no_room', 'whose prompt leaves no room for an answer within data.seq_len')),
    'dpo': (('identical', 'with chosen == rejected'),
            ('empty_completion', 'with an empty completion'),
            ('no_room', 'whose prompt leaves no room for a completion within data.seq_len')),
    'kto': (('empty_completion', 'with an empty completion'),
            ('no_room', 'whose prompt leaves no room for a completion within data.seq_len')),
    'grpo': (('empty_prompt', 'with an empty prompt'),
             ('no_room', 'whose prompt leaves no room for grpo.max_completion_length '
              'tokens within data.seq_len')),
}
CATEGORIES['reward'] = CATEGORIES['dpo']
UNITS = {'sft': 'examples', 'dpo': 'pairs', 'kto': 'examples', 'reward': 'pairs',
         'grpo': 'prompts'}


@dataclasses.dataclass
class SplitCheck:
  """The check of one split: `counts` of degenerate records by category (a record may be
  in several), `degenerate` records in any, `overlong` ones the pipeline truncates or
  drops as longer than data.seq_len (not degenerate), what became of the degenerate ones
  (`action`: 'none', 'dropped' or 'kept'), the indices of the records to read (`keep`,
  None = all), and for the eval split how many of its records the train split holds."""
  group: str
  split: str
  name: str
  records: int
  counts: dict[str, int]
  degenerate: int
  overlong: int
  first: str | None = None
  action: str = 'none'
  keep: np.ndarray | None = None
  overlap: int | None = None
  seconds: float = 0.0
  hashes: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def meta(self) -> dict:
    """The JSON-safe summary the checkpoint meta records."""
    out = {'records': self.records, 'degenerate': self.degenerate, **self.counts,
           'overlong': self.overlong, 'action': self.action}
    if self.overlap is not None:
      out['overlap'] = self.overlap
    return out

  def details(self, seq_len: int) -> str:
    """'3 with an empty assistant turn, 1 whose prompt ...; first: file:line'."""
    parts = [f'{self.counts[k]} {text}' + ('=' + str(seq_len) if k == 'no_room' else '')
             for k, text in CATEGORIES[self.group] if self.counts[k]]
    return ', '.join(parts) + (f'; first: {self.first}' if self.first else '')


@dataclasses.dataclass
class StageCheck:
  """The check of a run's data: each checked split, and whether the data has an eval
  split (`has_eval`: else evaluation is skipped)."""
  splits: dict[str, SplitCheck]
  has_eval: bool = True

  @property
  def keep(self) -> dict[str, np.ndarray]:
    """{split: indices of the records to read} of the splits that dropped some."""
    return {s: c.keep for s, c in self.splits.items() if c.keep is not None}

  @property
  def meta(self) -> dict | None:
    """{split: SplitCheck.meta()} for the checkpoint meta (None: nothing was checked)."""
    return {s: c.meta() for s, c in self.splits.items()} or None


def _blank(turns) -> bool:
  return any(t['role'] == 'assistant' and not t['content'].strip() for t in turns)


def _records(cfg, split: str, group: str):
  if group == 'sft':
    return formats.get_conversations(cfg, split)
  if group == 'kto':
    return feedback.get_examples(cfg, split)
  if group == 'grpo':
    return prompts.get_prompts(cfg, split)
  return preference.get_pairs(cfg, split, group)


def check_split(cfg, tokenizer, split: str, group: str) -> SplitCheck:
  """Counts the degenerate records of `split` of cfg.<group> ('sft', 'dpo', 'kto', 'reward') and
  applies <group>.on_degenerate / max_degenerate: DataError when the split fails (the
  message names the counts, the first such record and the fields to change)."""
  g, seq_len = cfg[group], cfg.data.seq_len
  t0 = time.perf_counter()
  records = _records(cfg, split, group)
  template = formats.resolve_template(cfg.sft.template, tokenizer)
  names = [k for k, _ in CATEGORIES[group]]
  flags = np.zeros((len(records), len(names)), bool)
  overlong = np.zeros(len(records), bool)
  hashes = np.zeros(len(records), np.int64)
  for i in range(len(records)):
    rec = records[i]
    hashes[i] = hash(json.dumps(rec if group != 'kto' else records.example(i)[:3],
                                sort_keys=True))  # a KTO example without its KL partner
    if group == 'sft':
      _, mask = formats.encode(rec, tokenizer, template)
      fate = formats.overlong_fate(mask, seq_len, g.overlong)
      flags[i] = (_blank(rec), fate == 'no_room')
    elif group == 'grpo':  # (prompt turns, columns)
      n = len(prompts.encode_prompt(rec[0], tokenizer, template))
      fate = None  # a prompt too long is degenerate (no_room), never cut
      flags[i] = (all(not t['content'].strip() for t in rec[0]),
                  n > prompts.max_prompt_length(cfg))
    elif group == 'kto':  # (prompt, completion, KL partner's completion, liked)
      enc = preference.encode_pair(rec[:3], tokenizer, template)
      fate = preference.pair_fate(enc, seq_len, g.overlong)
      flags[i] = (_blank(rec[1]), fate == 'no_room')
    else:
      enc = preference.encode_pair(rec, tokenizer, template)  # rec[3]: columns, if any
      fate = preference.pair_fate(enc, seq_len, g.overlong)
      n = seq_len if fate in (None, 'truncated') else None  # the rows as the pipeline cuts them
      flags[i] = (np.array_equal(enc[1][:n], enc[3][:n]), _blank(rec[1] + rec[2]),
                  fate == 'no_room')
    overlong[i] = fate in ('truncated', 'dropped')
  bad = flags.any(axis=1)
  first = int(np.argmax(bad)) if bad.any() else None
  out = SplitCheck(group=group, split=split, name=records.name, records=len(records),
                   counts=dict(zip(names, flags.sum(axis=0).tolist())),
                   degenerate=int(bad.sum()), overlong=int(overlong.sum()),
                   first=None if first is None else records.where(first), hashes=hashes)
  if out.degenerate:
    frac = out.degenerate / out.records
    head = (f'{group} data, {split} split ({out.name}): {out.degenerate} of {out.records} '
            f'{UNITS[group]} ({frac:.1%}) are degenerate ({out.details(seq_len)})')
    if frac > g.max_degenerate:
      then = ' to train without them' if g.on_degenerate == 'drop' else ''
      raise DataError(f'{head}, more than {group}.max_degenerate={g.max_degenerate}: fix the '
                      f'data, or raise {group}.max_degenerate{then}')
    if g.on_degenerate == 'fail':
      raise DataError(f"{head} and {group}.on_degenerate='fail': fix the data, or set "
                      f"{group}.on_degenerate='drop' to train without them")
    out.action = 'dropped' if g.on_degenerate == 'drop' else 'kept'
    if out.action == 'dropped':
      out.keep = np.flatnonzero(~bad)
  out.seconds = time.perf_counter() - t0
  return out


def line(check: SplitCheck, cfg) -> str:
  """The console line of a split's check."""
  g, unit = cfg[check.group], UNITS[check.group]
  head = f'{check.group} data, {check.split} split: {check.records} {unit} of {check.name}'
  if not check.degenerate:
    text = f'lmjax: {head}, none degenerate'
  elif check.action == 'dropped':
    text = (f'lmjax: {head}, {check.degenerate} degenerate dropped '
            f'({check.details(cfg.data.seq_len)})')
  else:
    text = (f'WARNING: {head}, {check.degenerate} degenerate kept '
            f"({check.group}.on_degenerate='warn'; {check.details(cfg.data.seq_len)})")
  if check.overlong:
    text += (f'; {check.overlong} longer than data.seq_len={cfg.data.seq_len} '
             f'({check.group}.overlong={g.overlong!r})')
  if check.overlap and check.split != cfg.data.train_split:
    text += f'; {check.overlap} also in the train split'
  return text + f'; checked in {check.seconds:.2f}s'


def _shared_files(cfg, group: str) -> list[str]:
  if cfg[group].source != 'jsonl':
    return []
  files = [{os.path.realpath(p) for p in formats.split_files(cfg, s, group)}
           for s in (cfg.data.train_split, cfg.data.eval_split)]
  return sorted(files[0] & files[1])


def check_overlap(cfg, train: SplitCheck, held: SplitCheck,
                  log: Callable[[str], None] = print) -> None:
  """Sets held.overlap (its records that the train split holds too); DataError when there
  are any, unless <group>.allow_overlap (then a warning)."""
  group = held.group
  held.overlap = int(np.isin(held.hashes, train.hashes).sum())
  shared = _shared_files(cfg, group)
  if not (held.overlap or shared):
    return
  files = (f' (both splits read {", ".join(shared[:2])}{", ..." if len(shared) > 2 else ""})'
           if shared else '')
  what = (f'{group} data: {held.overlap} of {held.records} {UNITS[group]} of the '
          f'{held.split} split ({held.name}) are also in the train split ({train.name})'
          f'{files}')
  if not cfg[group].allow_overlap:
    raise DataError(f'{what}: eval_loss and exact match would measure training data; hold '
                    f'them out ({group}.eval_path), or set {group}.allow_overlap=True to '
                    'evaluate anyway')
  log(f'WARNING: {what}; evaluating anyway ({group}.allow_overlap=True): eval_loss and '
      'exact match partly measure training data')


def check_stage(cfg, tokenizer, group: str,
                log: Callable[[str], None] = print) -> StageCheck:
  """The data check of cfg.<group>'s chat data ('sft' conversations, 'dpo' or 'reward'
  pairs, 'kto' examples): its train split, and its eval split when the run evaluates and
  the data has one (else a line saying that evaluation is skipped). Logs one line per
  split; DataError when the data fails."""
  d, evaluates = cfg.data, cfg.train.eval_every > 0
  has_eval = formats.has_split(cfg, d.eval_split, group)
  if evaluates and not has_eval:
    log(f"lmjax: {group} data has no {d.eval_split!r} split ({group}.path "
        f"{cfg[group].path!r} has no '{{split}}', and {group}.eval_path is unset): "
        'eval_loss and exact match are skipped, not measured on training data; set '
        f'{group}.eval_path to held-out {UNITS[group]}')
  train = check_split(cfg, tokenizer, d.train_split, group)
  splits = {d.train_split: train}
  if evaluates and has_eval and d.eval_split == d.train_split:
    check_overlap(cfg, train, train, log)  # every record: an error unless allowed
  log(line(train, cfg))
  if evaluates and has_eval and d.eval_split != d.train_split:
    held = splits[d.eval_split] = check_split(cfg, tokenizer, d.eval_split, group)
    check_overlap(cfg, train, held, log)
    log(line(held, cfg))
  return StageCheck(splits, has_eval=has_eval)
