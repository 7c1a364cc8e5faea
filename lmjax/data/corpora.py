"""Corpora in their own formats: shards of JSONL, Parquet, or a Hugging Face `datasets` dir.

data.source='jsonl' | 'parquet' | 'hf_disk' reads the shards named by data.files (globs
separated by commas; hf_disk: directories written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`), one document per record: its data.text_key field (a string),
with data.id_key naming a record id for prepare_data's reports. Nothing is loaded whole:
each format gets a light index, built once and cached under <data_dir>/corpora/ (keyed by
the file's path, size and mtime, and the keys read), so `source[i]` reads one record:

  .jsonl / .json / .ndjson   byte offsets of each valid line (24 bytes per record, memory-
                             mapped); a read is one pread + json.loads.
  .jsonl.gz / .jsonl.zst     compressed streams cannot seek: decompressed once into a copy
                             of the records' text (and ids), UTF-8 concatenated, with the
                             same kind of offsets; a read is one pread + decode.
  Parquet                    a row group is Parquet's unit of random access (reading one
                             row decodes its whole group): converted once, streaming a
                             thousand rows at a time, into the same kind of copy. (grain's
                             ParquetIterDataset reads row groups in order: an IterDataset,
                             without the random access MapDataset's shuffle needs.)
  hf_disk                    its Arrow files are read in place, memory-mapped (as `datasets`
                             reads them; advised random access); nothing is cached.

Memory per process: the indexes are memory-mapped (page cache, not the heap); a split by
hash (below) keeps the positions of its records, 4 bytes each. Reads are thread-safe.
Bad input is found while indexing, before training: a line that is not a JSON object, a
record without the text field or whose text is not a string (null included), an empty
shard, a truncated or corrupt file (.gz, .zst, Parquet, Arrow). data.on_error='fail' raises
DataError naming the file and the line (JSONL, 1-based) or row (Parquet / Arrow, 0-based);
'skip' leaves those records out (a truncated file keeps the records before the break) and
prints one line per split counting them. Blank lines are not records.

Splits: data.files with '{split}' names each split's own shards (e.g.
'/data/{split}/*.jsonl.gz'; a DatasetDict directory holds its splits as subdirectories).
Without it the records are split by a stable hash of (the shard's path under the glob root,
the record's line / row number): data.val_fraction of them (at least one, with two or more
records) form 'validation', the rest 'train'; the two never share a record.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import glob as glob_lib
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from typing import Iterator

import numpy as np

from lmjax.data import sources
from lmjax.data.sources import DataError

FORMATS = ('jsonl', 'parquet', 'hf_disk')
INDEX_VERSION = 2
ON_ERROR = ('fail', 'skip')
_BATCH_ROWS = 1024          # Parquet rows decoded at a time while converting
_CHUNK = 1 << 20            # bytes read at a time while indexing
_KINDS = {  # kinds of bad input, as the skip line names them
    'malformed': 'malformed JSON', 'missing_text': 'without the text field',
    'not_string': 'with non-string text', 'truncated': 'truncated / corrupt shards',
    'empty': 'empty shards'}


# ---- Files and splits -----------------------------------------------------------------

def _patterns(files: str) -> list[str]:
  return [p.strip() for p in files.split(',') if p.strip()]


def _glob(pattern: str, dirs: bool) -> list[str]:
  found = glob_lib.glob(os.path.expanduser(pattern), recursive=True)
  return sorted(os.path.abspath(p) for p in found
                if (os.path.isdir(p) if dirs else os.path.isfile(p)))


def per_split(d) -> bool:
  """Whether data.files names each split's shards ('{split}') rather than one pool."""
  return '{split}' in d.files


def resolve(d, split: str) -> tuple[str, list[str]]:
  """(glob root, sorted paths) of data.files for `split` ('{split}' filled in): files, or
  save_to_disk directories for hf_disk. DataError when nothing matches."""
  if not d.files.strip():
    raise DataError(f"data.files must name the shards when data.source={d.source!r} "
                    "(globs separated by commas, e.g. '/data/corpus/*.jsonl.gz')")
  patterns = [p.replace('{split}', split) for p in _patterns(d.files)]
  found = set()
  for pattern in patterns:
    found.update(_glob(pattern, dirs=d.source == 'hf_disk'))
  if not found:
    what = 'directory' if d.source == 'hf_disk' else 'file'
    for_split = f' for split {split!r}' if per_split(d) else ''
    raise DataError(f'data.files {d.files!r} matches no {what}{for_split}')
  roots = [sources.glob_root(p) for p in patterns]
  root = roots[0] if len(roots) == 1 else os.path.commonpath(roots)
  return root, sorted(found)


def dataset_name(d) -> str:
  """'<source>_<8 hex>' of what defines the corpus's records and splits (names its
  tokenizer and pretokenized copies, as sources.dataset_name does for local_text)."""
  key = json.dumps([d.source, d.files, d.text_key,
                    None if per_split(d) else float(d.val_fraction)])
  return f'{d.source}_{hashlib.sha256(key.encode()).hexdigest()[:8]}'


def _hf_shards(directory: str, split: str, by_split: bool) -> tuple[list[str], bool]:
  """(Arrow files, whether they hold `split` alone) of a save_to_disk directory: a
  DatasetDict's split subdirectory, or a Dataset's files."""
  dict_json = os.path.join(directory, 'dataset_dict.json')
  if os.path.isfile(dict_json) and not by_split:
    with open(dict_json, encoding='utf-8') as f:
      splits = json.load(f).get('splits', [])
    if split not in splits:
      raise DataError(f'{directory}: this DatasetDict has no split {split!r}; it has '
                      f'{splits}: check data.train_split / data.eval_split')
    return _hf_shards(os.path.join(directory, split), split, True)[0], True
  state = os.path.join(directory, 'state.json')
  if not os.path.isfile(state):
    raise DataError(f'{directory}: not a directory written by save_to_disk (no state.json '
                    'or dataset_dict.json): data.files names such directories for hf_disk')
  with open(state, encoding='utf-8') as f:
    data_files = json.load(f).get('_data_files', [])
  paths = [os.path.join(directory, e['filename']) for e in data_files]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f'{state} lists {missing[0]}, which does not exist')
  return paths, by_split


def _record_hash(rel: str, numbers: np.ndarray) -> np.ndarray:
  """Stable numbers in [0, 1) for the records `numbers` (line / row) of a shard at `rel`
  (its path under the glob root): splitmix64 of the path's hash + the number."""
  seed = np.uint64(int.from_bytes(hashlib.sha256(rel.replace(os.sep, '/').encode())
                                  .digest()[:8], 'big'))
  with np.errstate(over='ignore'):
    z = numbers.astype(np.uint64) + seed + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---- Reading shards ---------------------------------------------------------------------

class _Bad(Exception):
  """A bad record: its kind (a key of _KINDS) and what is wrong."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class _Truncated(Exception):
  pass


def compression(path: str) -> str:
  """'gzip', 'zstd' or '' by the file's suffix."""
  if path.endswith('.gz'):
    return 'gzip'
  if path.endswith(('.zst', '.zstd')):
    return 'zstd'
  return ''


def _decompressors(path: str):
  """A factory of decompressor objects for `path`'s compression (one per gzip member /
  zstd frame: both formats may hold several, concatenated)."""
  if compression(path) == 'gzip':
    return lambda: zlib.decompressobj(zlib.MAX_WBITS | 16)
  try:
    import zstandard  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f'{path}: reading .zst files needs the zstandard package: pip install '
                    'zstandard (or lmjax[zstd]), or decompress the shards') from None
  return lambda: zstandard.ZstdDecompressor().decompressobj()


def _chunks(path: str) -> Iterator[bytes]:
  """The file's bytes, decompressed by its suffix; _Truncated if a compressed stream ends
  early or is corrupt (the bytes before are yielded first)."""
  with open(path, 'rb') as f:
    if not compression(path):
      yield from iter(lambda: f.read(_CHUNK), b'')
      return
    new = _decompressors(path)
    d, fed = new(), False
    for block in iter(lambda: f.read(_CHUNK), b''):
      while block:
        try:
          out = d.decompress(block)
        except Exception as e:  # zlib.error, zstandard.ZstdError: corrupt data
          raise _Truncated(f'corrupt {compression(path)} data ({e})') from None
        fed = True
        if out:
          yield out
        if d.eof:  # a member / frame ended: what follows starts the next one
          block, d, fed = d.unused_data, new(), False
        else:
          block = b''
    if fed and not d.eof:
      raise _Truncated(f'truncated {compression(path)} stream (the file ends mid-stream: '
                       'an interrupted download or copy?)')


def _lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, int, bytes]]:
  """(1-based line number, byte offset, line without its newline) of a byte stream."""
  rest, offset, number = b'', 0, 0
  for chunk in chunks:
    parts = (rest + chunk).split(b'\n')
    rest = parts.pop()
    for part in parts:
      number += 1
      yield number, offset, part
      offset += len(part) + 1
  if rest:
    yield number + 1, offset, rest


def parse_record(line: bytes, text_key: str, id_key: str = '') -> tuple[str, str]:
  """(text, id) of a JSON line; _Bad when it is not a JSON object with a string text_key."""
  try:
    obj = json.loads(line)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise _Bad('malformed', f'malformed JSON ({e})') from None
  if not isinstance(obj, dict):
    raise _Bad('malformed', f'malformed JSON record (a JSON {type(obj).__name__}, not an '
                            'object)')
  if text_key not in obj:
    fields = ', '.join(list(obj)[:8]) + (', ...' if len(obj) > 8 else '')
    raise _Bad('missing_text', f'no field data.text_key={text_key!r} (fields: {fields})')
  text = obj[text_key]
  if not isinstance(text, str):
    kind = 'null' if text is None else type(text).__name__
    raise _Bad('not_string', f'field {text_key!r} is {kind}, not a string')
  return text, _id_str(obj.get(id_key)) if id_key else ''


def _id_str(value) -> str:
  return '' if value is None else str(value)


class _Report:
  """What indexing a shard found: bad records by kind and the first messages."""

  def __init__(self, path: str):
    self.path, self.bad, self.errors = path, {}, []

  def add(self, kind: str, where: str, message: str, count: int = 1) -> None:
    self.bad[kind] = self.bad.get(kind, 0) + count
    if len(self.errors) < 3:
      self.errors.append(f'{self.path}{where}: {message}')

  def meta(self, records: int, **extra) -> dict:
    if records == 0 and not self.bad:
      self.add('empty', '', 'empty shard (no records)')
    return dict(records=records, bad=self.bad, errors=self.errors, **extra)


# ---- Index building (cached) -------------------------------------------------------------

def cache_dir(d) -> str:
  """Where shard indexes and converted shards live: <data_dir>/corpora (a local cache
  when data_dir is remote)."""
  data_dir = sources.default_data_dir(d)
  if '://' in data_dir:
    data_dir = os.path.expanduser('~/.cache/lmjax')
  return os.path.join(data_dir, 'corpora')


def _shard_key(path: str, kind: str, text_key: str, id_key: str) -> str:
  st = os.stat(path)
  ident = json.dumps([INDEX_VERSION, kind, os.path.abspath(path), st.st_size,
                      st.st_mtime_ns, text_key, id_key])
  slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(path))[:60]
  return f'{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}'


def _build_jsonl_offsets(path: str, out: str, text_key: str, id_key: str) -> dict:
  """out/index.npy: [start, end, line] (int64) of each valid line of a plain JSONL file."""
  report, rows = _Report(path), array.array('q')
  for number, offset, line in _lines(_chunks(path)):
    if not line.strip():
      continue
    try:
      parse_record(line, text_key, id_key)
    except _Bad as e:
      report.add(e.kind, f':{number}', str(e))
      continue
    rows.extend((offset, offset + len(line), number))
  np.save(os.path.join(out, 'index.npy'), np.frombuffer(rows, np.int64).reshape(-1, 3))
  return report.meta(len(rows) // 3, kind='offsets')


class _TextWriter:
  """Writes records as a converted shard: text.bin (their UTF-8 text, concatenated), with
  ids.bin (their ids) when asked, and index.npy: per record [start, end, line / row] in
  text.bin (+ [start, end] in ids.bin)."""

  def __init__(self, out: str, with_id: bool):
    self._out, self._with_id = out, with_id
    # pylint: disable=consider-using-with  (closed by close())
    self._text = open(os.path.join(out, 'text.bin'), 'wb')
    self._ids = open(os.path.join(out, 'ids.bin'), 'wb') if with_id else None
    self._rows, self._at, self._id_at, self.records = array.array('q'), 0, 0, 0

  def add(self, text: str, record_id: str, number: int) -> None:
    data = text.encode('utf-8')
    self._text.write(data)
    self._rows.extend((self._at, self._at + len(data), number))
    self._at += len(data)
    if self._ids is not None:
      data = record_id.encode('utf-8')
      self._ids.write(data)
      self._rows.extend((self._id_at, self._id_at + len(data)))
      self._id_at += len(data)
    self.records += 1

  def close(self) -> None:
    self._text.close()
    if self._ids is not None:
      self._ids.close()
    columns = 5 if self._ids is not None else 3
    np.save(os.path.join(self._out, 'index.npy'),
            np.frombuffer(self._rows, np.int64).reshape(-1, columns))


def _build_compressed_jsonl(path: str, out: str, text_key: str, id_key: str) -> dict:
  """out/text.bin (+ ids.bin, index.npy): the text (and id) of each valid line of a .gz /
  .zst JSONL file."""
  report, writer, truncated = _Report(path), _TextWriter(out, bool(id_key)), False
  number = 0
  try:
    for number, _, line in _lines(_chunks(path)):
      if not line.strip():
        continue
      try:
        text, record_id = parse_record(line, text_key, id_key)
      except _Bad as e:
        report.add(e.kind, f':{number}', str(e))
        continue
      writer.add(text, record_id, number)
  except _Truncated as e:
    # _lines holds back the unfinished last line: the records kept end at a newline.
    report.add('truncated', f':{number + 1}', f'{e}; the {number} lines before are read')
    truncated = True
  finally:
    writer.close()
  return report.meta(writer.records, kind='text', truncated=truncated)


def _release_memory() -> None:
  """Hands the memory Arrow pooled while converting a shard back to the system."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  pa.default_memory_pool().release_unused()


def _string_column(schema, path: str, key: str, report: _Report, rows: int) -> bool:
  """Whether `schema` has a string column `key`; else the rows are reported bad."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  if key not in schema.names:
    report.add('missing_text', '', f'no column data.text_key={key!r} (columns: '
                                   f'{", ".join(schema.names[:8])})', rows)
    return False
  kind = schema.field(key).type
  is_view = getattr(pa.types, 'is_string_view', lambda _: False)  # pyarrow >= 16
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
    report.add('not_string', '', f'column {key!r} is {kind}, not a string', rows)
    return False
  return True


def _null_rows(column) -> np.ndarray:
  """Positions of the null values of an Arrow array (none: no work)."""
  if not column.null_count:
    return np.zeros(0, np.int64)
  return np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False)))


def _build_parquet(path: str, out: str, text_key: str, id_key: str) -> dict:
  """out/text.bin (+ ids.bin, index.npy): the text (and id) of each row of a Parquet file
  whose text is a string."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  report = _Report(path)
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except  (ArrowInvalid, OSError)
    report.add('truncated', '', f'not a readable Parquet file ({e})')
    return report.meta(0, kind='text', unit='row', truncated=True)
  n_rows = pf.metadata.num_rows
  if not _string_column(pf.schema_arrow, path, text_key, report, n_rows):
    return report.meta(0, kind='skipped')
  columns = [text_key] + ([id_key] if id_key and id_key != text_key else [])
  if id_key and id_key not in pf.schema_arrow.names:
    raise DataError(f'{path}: no column data.id_key={id_key!r} (columns: '
                    f'{", ".join(pf.schema_arrow.names[:8])})')
  writer, row, truncated = _TextWriter(out, bool(id_key)), 0, False
  try:
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
      texts = batch.column(text_key)
      ids = batch.column(id_key).to_pylist() if id_key else None
      for j in _null_rows(texts):
        report.add('not_string', f': row {row + j}', f'field {text_key!r} is null, not a '
                                                     'string')
      for j, text in enumerate(texts.to_pylist()):
        if text is not None:
          writer.add(text, _id_str(ids[j]) if ids else '', row + j)
      row += batch.num_rows
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a damaged page or footer)
    report.add('truncated', f': row {row}', f'unreadable from row {row} on ({e}); the '
                                            f'{row} rows before are read')
    truncated = True
  finally:
    writer.close()
  return report.meta(writer.records, kind='text', unit='row', truncated=truncated)


_BUILDERS = {'offsets': _build_jsonl_offsets, 'compressed': _build_compressed_jsonl,
             'parquet': _build_parquet}


def _builder_kind(source: str, path: str) -> str:
  if source == 'parquet':
    return 'parquet'
  return 'compressed' if compression(path) else 'offsets'


def index_shard(d, path: str) -> tuple[str, dict, bool]:
  """(cache directory, meta, built now) of a JSONL / Parquet shard, built if missing
  (written under a temporary name, then renamed: a crash leaves nothing half-made, and the
  first of several concurrent builders wins)."""
  kind = _builder_kind(d.source, path)
  root = os.path.join(cache_dir(d), _shard_key(path, kind, d.text_key, d.id_key))
  meta_path = os.path.join(root, 'meta.json')
  if os.path.exists(meta_path):
    with open(meta_path, encoding='utf-8') as f:
      return root, json.load(f), False
  if kind == 'compressed' and compression(path) == 'zstd':
    _decompressors(path)  # the missing-package error before any work
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + '.tmp', dir=os.path.dirname(root))
  try:
    t0 = time.perf_counter()
    meta = _BUILDERS[kind](path, tmp, d.text_key, d.id_key)
    if kind == 'parquet':
      _release_memory()
    meta.update(path=path, size=os.path.getsize(path), build_s=time.perf_counter() - t0)
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.exists(meta_path):
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root, meta, True


# ---- Shards: random access to their records ----------------------------------------------

class _IndexedShard:
  """A shard read by byte ranges (pread; memory-mapped index): a plain JSONL file in place
  (index rows [start, end, line] of each valid line: a read parses the line), or a
  converted shard (text.bin / ids.bin, index rows [start, end, number(, id start, id
  end)]: a read decodes the text)."""

  def __init__(self, path: str, root: str, meta: dict, text_key: str, id_key: str):
    self.origin, self.records, self._kind = path, meta['records'], meta['kind']
    self._rows_not_lines = meta.get('unit') == 'row'  # Parquet: 0-based rows
    self._data = path if self._kind == 'offsets' else os.path.join(root, 'text.bin')
    self._ids = os.path.join(root, 'ids.bin')
    self._index_path = os.path.join(root, 'index.npy')
    self._text_key, self._id_key = text_key, id_key
    self._index = None

  def _rows(self) -> np.ndarray:
    if self._index is None:
      self._index = np.load(self._index_path, mmap_mode='r')
    return self._index

  def numbers(self) -> np.ndarray:
    return np.asarray(self._rows()[:, 2])

  def where(self, j: int) -> str:
    number = int(self._rows()[j, 2])
    if self._rows_not_lines:
      return f'{self.origin}: row {number}'
    return f'{self.origin}:{number}'

  @staticmethod
  def _read(path: str, start: int, end: int) -> bytes:
    with open(path, 'rb') as f:
      f.seek(start)
      return f.read(end - start)

  def _record(self, j: int) -> tuple[str, str]:
    start, end, number = (int(v) for v in self._rows()[j, :3])
    line = self._read(self._data, start, end)
    try:
      return parse_record(line, self._text_key, self._id_key)
    except _Bad as e:
      raise DataError(f'{self.origin}:{number}: {e}; the file changed since it was '
                      'indexed: rerun to index it again') from None

  def text(self, j: int) -> str:
    if self._kind == 'offsets':
      return self._record(j)[0]
    start, end = (int(v) for v in self._rows()[j, :2])
    return self._read(self._data, start, end).decode('utf-8')

  def record_id(self, j: int) -> str:
    if not self._id_key:
      return ''
    if self._kind == 'offsets':
      return self._record(j)[1]
    start, end = (int(v) for v in self._rows()[j, 3:5])
    return self._read(self._ids, start, end).decode('utf-8')


def _map(path: str):
  """The file memory-mapped read-only, advised random access: a read faults in its own
  pages, without the kernel's readahead around them (which would make a shuffled pass
  resident in RSS, as reclaimable page cache, many times over the text it reads)."""
  with open(path, 'rb') as f:
    if os.fstat(f.fileno()).st_size == 0:
      return b''
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if hasattr(m, 'madvise') and hasattr(mmap, 'MADV_RANDOM'):
    m.madvise(mmap.MADV_RANDOM)
  return m


class _ArrowShard:
  """Records of an Arrow file (IPC stream or file format: a save_to_disk file), memory-
  mapped; rows with a null text are left out (keep)."""

  def __init__(self, path: str, text_col: str, id_col: str = ''):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    self.origin = path
    self._text_col, self._id_col = text_col, id_col
    source = pa.BufferReader(pa.py_buffer(_map(path)))  # the batches point into the map
    if source.read(6) == b'ARROW1':
      source.seek(0)
      reader = pa.ipc.open_file(source)
      self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    else:
      source.seek(0)
      self.batches = list(pa.ipc.open_stream(source))
    self.schema = self.batches[0].schema if self.batches else None
    self._starts = np.cumsum([0] + [b.num_rows for b in self.batches])
    self.rows = int(self._starts[-1])
    self._keep = None  # row of each record, when some rows are left out
    self.records = self.rows

  def keep(self, rows: np.ndarray) -> None:
    self._keep, self.records = rows, len(rows)

  def _row(self, j: int) -> int:
    return int(self._keep[j]) if self._keep is not None else j

  def _value(self, col: str, row: int):
    b = bisect.bisect_right(self._starts, row) - 1
    return self.batches[b].column(col)[row - int(self._starts[b])].as_py()

  def numbers(self) -> np.ndarray:
    return np.arange(self.rows) if self._keep is None else np.asarray(self._keep)

  def where(self, j: int) -> str:
    return f'{self.origin}: row {self._row(j)}'

  def text(self, j: int) -> str:
    return self._value(self._text_col, self._row(j))

  def record_id(self, j: int) -> str:
    return _id_str(self._value(self._id_col, self._row(j))) if self._id_col else ''


def _open_hf_arrow(path: str, d) -> tuple[_ArrowShard | None, dict]:
  """A save_to_disk Arrow file as a shard (None when it holds no usable record) and its
  meta (checked schema, null texts found per batch)."""
  report = _Report(path)
  try:
    shard = _ArrowShard(path, d.text_key, d.id_key)
  except Exception as e:  # pylint: disable=broad-except  (ArrowInvalid: a damaged file)
    report.add('truncated', '', f'not a readable Arrow file ({e})')
    return None, report.meta(0, truncated=True)
  if shard.schema is None:
    return None, report.meta(0)
  if not _string_column(shard.schema, path, d.text_key, report, shard.rows):
    return None, report.meta(0)
  if d.id_key and d.id_key not in shard.schema.names:
    raise DataError(f'{path}: no column data.id_key={d.id_key!r} (columns: '
                    f'{", ".join(shard.schema.names[:8])})')
  nulls = [start + _null_rows(b.column(d.text_key))
           for start, b in zip(shard._starts, shard.batches)]  # pylint: disable=protected-access
  nulls = np.concatenate(nulls) if nulls else np.zeros(0, np.int64)
  if len(nulls):
    report.add('not_string', f': row {nulls[0]}', f'field {d.text_key!r} is null, not a '
                                                  'string', len(nulls))
    shard.keep(np.setdiff1d(np.arange(shard.rows), nulls))
  return (shard if shard.records else None), report.meta(shard.records)


# ---- Corpora --------------------------------------------------------------------------

@dataclasses.dataclass
class _Corpus:
  """The shards of data.files (one split's, or all when splitting by hash), opened."""
  root: str
  shards: list
  metas: list
  fingerprint: str
  split_dirs: bool  # hf_disk DatasetDicts: the shards hold the split alone
  seconds: float


_CORPORA: dict[str, _Corpus] = {}
_LOCK = threading.Lock()


def _open_corpus(d, split: str) -> _Corpus:
  """The indexed shards of data.files that `split` reads (every shard when records are
  split by hash), memoized per process."""
  by_split = per_split(d)
  root, paths = resolve(d, split if by_split else 'train')
  key = json.dumps([d.source, paths, d.text_key, d.id_key, cache_dir(d),
                    split if d.source == 'hf_disk' else ''])
  with _LOCK:
    if key in _CORPORA:
      return _CORPORA[key]
  t0, shards, metas, built, stamps, split_dirs = time.perf_counter(), [], [], 0, [], False
  if d.source == 'hf_disk':
    files = []
    for directory in paths:
      found, alone = _hf_shards(directory, split, by_split)
      files.extend(found)
      split_dirs |= alone and not by_split
    for path in files:
      shard, meta = _open_hf_arrow(path, d)
      meta['path'] = path
      stamps.append(_stamp(path))
      shards.append(shard)
      metas.append(meta)
      _check_meta(d, meta)
  else:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    for path in tqdm(paths, desc=f'index {d.source} shards', unit='shard', mininterval=2.0,
                     disable=None, leave=False):
      stamps.append(_stamp(path))
      cache, meta, new = index_shard(d, path)
      built += new
      _check_meta(d, meta)
      metas.append(meta)
      if not meta['records']:
        shards.append(None)
      else:
        shards.append(_IndexedShard(path, cache, meta, d.text_key, d.id_key))
  fingerprint = hashlib.sha256('\n'.join(stamps).encode()).hexdigest()[:16]
  corpus = _Corpus(root, shards, metas, fingerprint, split_dirs, time.perf_counter() - t0)
  if built:
    n = sum(m['records'] for m in metas)
    size = sum(m.get('size', 0) for m in metas)
    print(f'lmjax: indexed {built} of {len(paths)} {d.source} shards of data.files '
          f'{d.files!r}: {n:,} records, {size / 1e6:,.1f} MB in {corpus.seconds:.1f}s -> '
          f'{cache_dir(d)}', flush=True)
  with _LOCK:
    _CORPORA[key] = corpus
  return corpus


def _stamp(path: str) -> str:
  st = os.stat(path)
  return f'{path}\0{st.st_size}\0{st.st_mtime_ns}'


def _check_meta(d, meta: dict) -> None:
  """With data.on_error='fail', the shard's first bad input as a DataError."""
  if d.on_error not in ON_ERROR:
    raise DataError(f"data.on_error must be 'fail' or 'skip', got {d.on_error!r}")
  if d.on_error == 'fail' and meta['bad']:
    raise DataError(f'{meta["errors"][0]}: fix or remove it, or set data.on_error=skip to '
                    'leave out bad records (counted)')


def _skip_line(d, split: str, metas: list, records: int) -> str | None:
  bad: dict[str, int] = {}
  for m in metas:
    for kind, n in m['bad'].items():
      bad[kind] = bad.get(kind, 0) + n
  if not any(bad.values()):
    return None
  parts = [f'{n:,} {_KINDS[k]}' for k, n in bad.items() if n]
  first = next(m['errors'][0] for m in metas if m['errors'])
  return (f'lmjax: data.files {d.files!r} [{split}]: data.on_error=skip left out '
          f'{", ".join(parts)}; {records:,} records read. First: {first}')


class CorpusSource:
  """Random-access documents (str) of one split of a corpus (len + __getitem__, as grain's
  MapDataset.source wants; safe to read from several threads)."""

  def __init__(self, name: str, shards: list, selections: list, fingerprint: str):
    self.name, self.fingerprint = name, fingerprint
    self._shards = [s for s, sel in zip(shards, selections) if s is not None
                    and (sel is None or len(sel))]
    self._sel = [sel for s, sel in zip(shards, selections) if s is not None
                 and (sel is None or len(sel))]
    counts = [s.records if sel is None else len(sel) for s, sel in zip(self._shards, self._sel)]
    self._starts = np.cumsum([0] + counts)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, index: int):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{self.name}: record {index} of {len(self)}')
    k = bisect.bisect_right(self._starts, index) - 1
    j = index - int(self._starts[k])
    sel = self._sel[k]
    return self._shards[k], (j if sel is None else int(sel[j]))

  def __getitem__(self, index: int) -> str:
    shard, j = self._locate(index)
    return shard.text(j)

  def record_id(self, index: int) -> str:
    """data.id_key's value of record `index` ('' without id_key)."""
    shard, j = self._locate(index)
    return shard.record_id(j)

  def where(self, index: int) -> str:
    """'file:line' (JSONL) or 'file: row N' (Parquet, Arrow) of record `index`."""
    shard, j = self._locate(index)
    return shard.where(j)

  def __repr__(self) -> str:
    return f'CorpusSource({self.name}, {len(self)} documents)'


def _selections(d, corpus: _Corpus, split: str) -> list:
  """Per shard: None (all its records) or the positions of the records of `split`."""
  if per_split(d) or corpus.split_dirs:
    return [None] * len(corpus.shards)
  if split not in sources.SPLITS:
    raise DataError(f"data.files {d.files!r} has no split {split!r}; without '{{split}}' "
                    f'it holds {list(sources.SPLITS)} (split by record hash): check '
                    'data.train_split / data.eval_split')
  vf = float(d.val_fraction)
  if not 0.0 <= vf < 1.0:
    raise DataError(f'data.val_fraction must be in [0, 1), got {vf}')
  if vf == 0:  # nothing held out
    return [None if split == 'train' else np.zeros(0, np.int32) for _ in corpus.shards]
  hashes = [_record_hash(os.path.relpath(s.origin, corpus.root), s.numbers())
            if s is not None else np.zeros(0) for s in corpus.shards]
  val = [h < vf for h in hashes]
  total = sum(len(h) for h in hashes)
  n_val = sum(int(v.sum()) for v in val)
  if total >= 2 and vf > 0 and n_val in (0, total):
    # A tiny corpus: one record each way (the lowest hash held out / the highest kept).
    lowest = n_val == 0
    _, k = min((h.min() if lowest else -h.max(), i) for i, h in enumerate(hashes) if len(h))
    val[k][np.argmin(hashes[k]) if lowest else np.argmax(hashes[k])] = lowest
  want = split == 'validation'
  return [_positions(v if want else ~v) for v in val]


def _positions(mask: np.ndarray) -> np.ndarray:
  rows = np.flatnonzero(mask)
  return rows.astype(np.int32) if len(mask) < 2**31 else rows


_SOURCES: dict[str, CorpusSource] = {}


def get_source(d, split: str) -> CorpusSource:
  """Random-access documents of `split` of data.files (indexing the shards if needed)."""
  if d.source not in FORMATS:
    raise DataError(f'data.source {d.source!r} is not a corpus format {FORMATS}')
  key = json.dumps([d.source, d.files, d.text_key, d.id_key, d.on_error, cache_dir(d),
                    float(d.val_fraction), split])
  with _LOCK:
    if key in _SOURCES:
      return _SOURCES[key]
  if per_split(d) and split == d.eval_split and d.eval_split != d.train_split:
    _check_disjoint(d, split)
  corpus = _open_corpus(d, split)
  name = f'{dataset_name(d)}[{split}]'
  source = CorpusSource(name, corpus.shards, _selections(d, corpus, split),
                        corpus.fingerprint)
  line = _skip_line(d, split, corpus.metas, len(source))
  if line:
    print(line, flush=True)
  if len(source) == 0:
    hint = (' (data.val_fraction is 0: set it, or name the split\'s shards with '
            "'{split}' in data.files)" if split == 'validation' and not per_split(d)
            and not corpus.split_dirs and d.val_fraction == 0 else '')
    raise DataError(f'{name}: data.files {d.files!r} has no records in split {split!r}'
                    f'{hint}')
  with _LOCK:
    _SOURCES[key] = source
  return source


def _check_disjoint(d, split: str) -> None:
  """data.files with '{split}': the eval split's shards must not be training shards."""
  try:
    train = set(resolve(d, d.train_split)[1])
  except DataError:
    return
  both = sorted(train & set(resolve(d, split)[1]))
  if both:
    raise DataError(f'data.files {d.files!r} names {both[0]} for both the '
                    f'{d.train_split!r} and the {split!r} split: evaluation would be on '
                    'training data')
