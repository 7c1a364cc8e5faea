"""grain input pipeline for language modelling.

source -> shard by process -> shuffle (train; reshuffled every epoch) -> repeat ->
tokenize ([bos] + ids + [eos]; with data.pretokenize the ids come from an array_record
copy of the split, data/tokenized.py) -> pack (concat-then-split into rows of seq_len, with
segment ids and per-segment positions) -> next-token targets -> batch -> threaded prefetch.

Every row is [seq_len]; `targets[t] = inputs[t + 1]` where both belong to the same
document, else 0 with loss_mask 0 (so the last column never counts, and neither does a
token whose successor opens the next document or lies in the next row). Positions restart
at 0 for every segment of a row, including the continuation of a document split at the
previous row's end. Padding (only at the end of a finite pass) has segment id 0.

Mixtures (cfg.data.mixture): each named source is read, sharded, shuffled, repeated and
tokenized on its own, then grain's `IterDataset.mix` interleaves the documents of the
sources in proportion to their weights (deterministically) before packing. Rows then
also carry 'source': per token, 1 + the index of its source in sorted-name order (0 =
padding), which the loop counts (tokens/<name>) and strips before the step.

The returned grain `DatasetIterator` has get_state()/set_state() (JSON-safe, exact): a
checkpoint stores it, and a restored iterator continues the stream where it stopped.
"""

from __future__ import annotations

import atexit
import hashlib
import weakref
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchDatasetIterator

from lmjax import config as config_lib
from lmjax.data import sources, tokenized

FEATURES = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
SOURCE = 'source'  # the extra per-token feature of a mixture's rows


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer, add_bos: bool, add_eos: bool, source_id: int = 0):
    self.tokenizer = tokenizer
    self.bos = list(tokenizer.bos) if add_bos else []  # none for a tokenizer without BOS
    self.eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
    self.source_id = source_id  # > 0: tag every token with it (mixtures)

  def map(self, text) -> dict[str, np.ndarray]:
    if isinstance(text, np.ndarray):  # its ids already (data.pretokenize: data/tokenized.py)
      ids = np.concatenate([np.asarray(self.bos, np.int32), text,
                            np.asarray(self.eos, np.int32)])
    else:
      ids = np.asarray(self.bos + self.tokenizer.encode(text) + self.eos, np.int32)
    if self.source_id:
      return {'tokens': ids, SOURCE: np.full(ids.shape, self.source_id, np.int32)}
    return {'tokens': ids}


def _has_tokens(example) -> bool:
  return len(example['tokens']) > 0


def features(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
             mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The model features of a row of packed sequences (every objective's rows):
  targets[t] = tokens[t + 1] where both belong to the same sequence (segment id > 0), else
  0; loss_mask[t] = 1 there, and only where mask[t + 1] > 0 when a per-token `mask` is
  given (e.g. 1 on assistant tokens)."""
  seg = segment_ids.astype(np.int32)
  same = np.zeros(tokens.shape, bool)
  same[:-1] = (seg[1:] == seg[:-1]) & (seg[:-1] != 0)
  targets = np.zeros_like(tokens)
  targets[:-1] = np.where(same[:-1], tokens[1:], 0)
  if mask is not None:
    same[:-1] &= mask[1:] > 0
  return {'inputs': tokens, 'targets': targets, 'segment_ids': seg,
          'positions': positions.astype(np.int32), 'loss_mask': same.astype(np.float32)}


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row of documents (tokens, tokens_segment_ids, tokens_positions) -> model
  features (and the mixture's per-token source tag)."""
  example = features(row['tokens'], row['tokens_segment_ids'], row['tokens_positions'])
  if SOURCE in row:
    example[SOURCE] = row[SOURCE].astype(np.int32)
  return example


def shuffle_seed(seed: int, salt: str = '') -> int:
  """A 32-bit shuffle seed from the run seed (and a mixture source's name as salt).
  grain reshuffles epoch e with seed + e, so raw seeds s and s + 1 would share orders
  one epoch apart; hashing decorrelates them."""
  digest = hashlib.sha256(f'lmjax-shuffle-{int(seed)}{salt}'.encode()).digest()
  return int.from_bytes(digest[:4], 'big')


def _tuples(state: Any) -> Any:
  """JSON turns tuples into lists; grain's packing state compares slices to a tuple."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) if isinstance(v, list) else v for f, v in s.items()}
                if k == 'remainder_slices' else _tuples(s)) for k, s in state.items()}
  if isinstance(state, list):
    return [_tuples(v) for v in state]
  return state


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  # grain's prefetch thread is stopped in __del__, which at interpreter exit runs after
  # the modules it needs are gone (an 'Exception ignored' traceback): stop it before.
  for it in list(_LIVE):
    it.close()


class _JsonSafeStateIterator(grain.DatasetIterator):
  """Passes elements through; set_state accepts a state that went through JSON (as in
  grain's Orbax checkpoint handler), whose packing slices came back as lists."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    _LIVE.add(self)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuples(state))

  def start_prefetch(self) -> None:
    self._parent.start_prefetch()


class _JsonSafeState(grain.IterDataset):

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeStateIterator(self._parent.__iter__())


class _ThreadPrefetchIterator(ThreadPrefetchDatasetIterator):
  """grain's thread prefetch, closing once: its own close() is not idempotent, and the
  second call from __del__ at interpreter exit fails on torn-down modules."""

  def close(self) -> None:
    if not self._closed:
      super().close()


class _ThreadPrefetch(grain.IterDataset):
  """Prepares `buffer` batches ahead in a background thread (ThreadPrefetchIterDataset)."""

  def __init__(self, parent: grain.IterDataset, buffer: int):
    super().__init__(parent)
    self._buffer = buffer

  def __iter__(self) -> grain.DatasetIterator:
    return _ThreadPrefetchIterator(self._parent.__iter__(), self._buffer)


class ShardsIterator(grain.DatasetIterator):
  """The batches of several data shards, concatenated along rows: a process that reads
  shards k..k+n-1 of data.shards (see shard_iterators). State: the shards' states."""

  def __init__(self, parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._shards = list(parents)
    _LIVE.add(self)

  def __next__(self):
    batches = [next(it) for it in self._shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {'shards': [it.get_state() for it in self._shards]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['shards']) != len(self._shards):
      raise sources.DataError(
          f'the data state holds {len(state["shards"])} shards, this process reads '
          f'{len(self._shards)}: data.shards / the process count changed since it was saved')
    for it, st in zip(self._shards, state['shards']):
      it.set_state(st)

  def close(self) -> None:
    for it in self._shards:
      it.close()


def shard_iterator(make, shards: int, *, batch_size: int, process_index: int,
                   process_count: int):
  """make(batch_size=, process_index=, process_count=) for this process's share of a
  global batch split into `shards` data shards (0 = one per process): with more shards than
  processes, each process reads shards/processes of them (batch_size / that many rows
  each) and concatenates their batches, so the global batches depend on data.shards only,
  not on how many processes read them (a 1-process run with shards=2 sees a 2-process
  run's batches)."""
  if not shards or shards == process_count:
    return make(batch_size=batch_size, process_index=process_index,
                process_count=process_count)
  if shards % process_count:
    raise sources.DataError(f'data.shards ({shards}) must be a multiple of the '
                            f'{process_count} processes')
  per = shards // process_count
  if batch_size % per:
    raise sources.DataError(f'this process\'s batch ({batch_size} rows) is not divisible by '
                            f'its {per} data shards (data.shards={shards})')
  return ShardsIterator([make(batch_size=batch_size // per, process_index=process_index * per
                              + j, process_count=shards) for j in range(per)])


def example_stream(d, examples, split: str, encode, *, process_index: int,
                   process_count: int, seed: int, salt: str, repeat: bool,
                   unit: str = 'examples') -> grain.MapDataset:
  """The head of every example pipeline (documents, conversations, pairs): this process's
  share of `examples` (len + __getitem__, with .name; disjoint shares fixed for the whole
  run), shuffled for the train split when d.shuffle (reshuffled every epoch: grain folds
  the epoch into the seed), repeated, mapped by `encode`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  ds = grain.MapDataset.source(examples)
  if process_count > 1:
    if len(examples) < process_count:
      raise sources.DataError(f'{examples.name} has {len(examples)} {unit}, fewer than the '
                              f'{process_count} processes that share it')
    ds = ds[process_index::process_count]
  if d.shuffle and split == d.train_split:
    ds = ds.shuffle(seed=shuffle_seed(seed, salt))
  if repeat:
    ds = ds.repeat()
  return ds.map(encode)


class _CountDropsIterator(grain.DatasetIterator):
  """keep(example, dropped) -> the example to yield, or None to drop it (counted; the next
  kept one is told how many were dropped since the previous). `limit` drops in a row (a
  whole epoch) raise DataError(too_many(count)). State: the parent's and the count."""

  def __init__(self, parent, keep, limit: int, too_many):
    super().__init__(parent)
    self._keep, self._limit, self._too_many, self._pending = keep, limit, too_many, 0

  def __next__(self):
    while True:
      out = self._keep(next(self._parent), self._pending)
      if out is not None:
        self._pending = 0
        return out
      self._pending += 1
      if self._pending >= self._limit:
        raise sources.DataError(self._too_many(self._pending))

  def get_state(self):
    return {'parent': self._parent.get_state(), 'pending': self._pending}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._pending = int(state['pending'])


class CountDrops(grain.IterDataset):
  """The counting filter of an example pipeline (see _CountDropsIterator): overlong
  conversations or pairs dropped, and counted in the examples that follow."""

  def __init__(self, parent, keep, limit: int, too_many):
    super().__init__(parent)
    self._args = (keep, max(int(limit), 1), too_many)

  def __iter__(self):
    return _CountDropsIterator(self._parent.__iter__(), *self._args)


def finish(d, it: grain.IterDataset) -> grain.IterDataset:
  """The tail of every batch pipeline: d.prefetch batches ahead in a thread, and a
  JSON-safe, exactly resumable state."""
  if d.prefetch > 0:
    it = _ThreadPrefetch(it, d.prefetch)
  return _JsonSafeState(it)


def _documents(d, tokenizer, split: str, *, process_index: int, process_count: int,
               seed: int, salt: str, repeat: bool, source_id: int = 0) -> grain.MapDataset:
  """Tokenized documents of one source's split: this process's share, shuffled (train
  split, when d.shuffle), repeated; empty documents dropped. With d.pretokenize the ids
  are read from the split's array_record copy (built on first use)."""
  if d.pretokenize:
    source = tokenized.get_source(d, split, tokenizer, max(int(d.worker_threads), 1))
  else:
    source = sources.get_source(d, split)
  return example_stream(d, source, split, _Tokenize(tokenizer, d.add_bos, d.add_eos, source_id),
                        process_index=process_index, process_count=process_count, seed=seed,
                        salt=salt, repeat=repeat, unit='documents').filter(_has_tokens)


def source_split(d, source_d, split: str) -> str:
  """cfg.data's train/eval split names stand for each source's own train/eval split."""
  if split == d.train_split:
    return source_d.train_split
  if split == d.eval_split:
    return source_d.eval_split
  return split


def make_lm_dataset(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                    process_count: int = 1, seed: int | None = None, repeat: bool = True,
                    source: str | None = None) -> grain.IterDataset:
  """The grain dataset behind make_lm_iterator (same arguments)."""
  d = cfg.data
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  seed = cfg.seed if seed is None else seed
  threads = max(int(d.worker_threads), 0)
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * threads)
  shard = dict(process_index=process_index, process_count=process_count, seed=seed,
               repeat=repeat)
  mixture = config_lib.mixture_sources(d) if source is None else {}
  if source is not None:
    named = config_lib.eval_sources(d)
    if source not in named:
      raise sources.DataError(f'no data source named {source!r} (data.mixture and '
                              f'data.eval_sources name {sorted(named)})')
    one = named[source]
    docs = _documents(one, tokenizer, source_split(d, one, split), salt=f'/{source}', **shard)
    it, lengths = docs.to_iter_dataset(read), {'tokens': d.seq_len}
  elif not mixture:
    docs = _documents(d, tokenizer, split, salt='', **shard)
    it, lengths = docs.to_iter_dataset(read), {'tokens': d.seq_len}
  else:
    streams, weights = {}, {}
    for i, (name, (weight, sd)) in enumerate(mixture.items()):
      docs = _documents(sd, tokenizer, source_split(d, sd, split), salt=f'/{name}',
                        source_id=i + 1, **shard)
      streams[name], weights[name] = docs.to_iter_dataset(read), weight
    # By documents, in proportion to the weights; keyed by name, so a checkpoint restores
    # each source's position even if the mixture is edited (finite streams: stops at the
    # first source that runs out).
    it = grain.IterDataset.mix(streams, weights)
    lengths = {'tokens': d.seq_len, SOURCE: d.seq_len}
  it = ConcatThenSplitIterDataset(it, length_struct=lengths)
  it = it.map(_to_example)
  return finish(d, it.batch(batch_size, drop_remainder=True))


def make_lm_iterator(cfg, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                     process_count: int = 1, seed: int | None = None, repeat: bool = True,
                     source: str | None = None) -> grain.DatasetIterator:
  """Batches {inputs, targets, segment_ids, positions: int32, loss_mask: float32}, each
  [batch_size, cfg.data.seq_len], of this process's share of `split`.

  source: None = the training data (cfg.data.mixture when set: batches then also hold
  'source', see the module docstring), or the name of one mixture / eval source.
  split: with named sources, cfg.data.train_split / eval_split stand for each source's.
  seed: shuffle seed (default cfg.seed); the train split is shuffled when cfg.data.shuffle.
  repeat: endless epochs; False gives one pass (the last partial batch is dropped).
  The iterator's get_state()/set_state() resume the exact stream (also across processes
  and through grain.checkpoint.CheckpointSave/CheckpointRestore).
  """
  return iter(make_lm_dataset(cfg, tokenizer, split, batch_size=batch_size,
                              process_index=process_index, process_count=process_count,
                              seed=seed, repeat=repeat, source=source))
