"""grain input pipeline for language modelling.

source -> shard by process -> shuffle (reshuffled every epoch) -> tokenize ->
pack (concat-then-split, segment ids, per-document positions) -> next-token targets
-> batch -> threaded prefetch.

Rows are packed to seq_len + 1 tokens, then split into `inputs` (first seq_len) and
`targets` (last seq_len), so every position has a next token; a target that belongs to
another document than its input gets loss_mask 0. The returned grain iterator has
get_state()/set_state(): checkpoints store it, and a restored iterator continues the
exact stream.
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from lmjax.data import sources


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
    self.tokenizer = tokenizer
    self.bos = [tokenizer.bos_id] if add_bos else []
    self.eos = [tokenizer.eos_id] if add_eos else []

  def map(self, text: str):
    ids = self.bos + self.tokenizer.encode(text) + self.eos
    return {'tokens': np.asarray(ids, np.int32)}


def _to_example(row: dict) -> dict:
  """Packed row of seq_len + 1 -> inputs/targets/segment_ids/positions/loss_mask."""
  tokens, seg, pos = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
  same_doc = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
  return {
      'inputs': tokens[:-1],
      'targets': tokens[1:],
      'segment_ids': seg[:-1],
      'positions': pos[:-1],
      'loss_mask': same_doc.astype(np.float32),
  }


def make_lm_dataset(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                    process_count: int = 1, seed: int | None = None,
                    repeat: bool = True) -> grain.IterDataset:
  d = cfg.data
  source = sources.get_source(d, split)
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    if len(source) < process_count:
      raise sources.DataError(f'{source.name} has {len(source)} documents, fewer than the '
                              f'{process_count} processes that share it')
    ds = ds[process_index::process_count]
  if d.shuffle and repeat:
    ds = ds.shuffle(seed=cfg.seed if seed is None else seed)
  if repeat:
    ds = ds.repeat()  # reshuffles each epoch
  ds = ds.map(_Tokenize(tokenizer, d.add_bos, d.add_eos))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(d.worker_threads, 1),
                                            prefetch_buffer_size=64))
  it = ConcatThenSplitIterDataset(it, length_struct={'tokens': d.seq_len + 1})
  it = it.map(_to_example)
  it = it.batch(batch_size, drop_remainder=True)
  if d.prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch)
  return it


def make_lm_iterator(cfg, tokenizer, split: str, **kwargs) -> grain.DatasetIterator:
  """An iterator of numpy batches {inputs, targets, segment_ids, positions, loss_mask},
  each [batch_size, seq_len]; see make_lm_dataset for the arguments."""
  return iter(make_lm_dataset(cfg, tokenizer, split, **kwargs))
