"""Pre-tokenized documents: a split's token ids written once to array_record files.

With cfg.data.pretokenize the pretraining pipeline reads each source's split from
<data_dir>/tokenized/<name>/ (one record per document: its sentencepiece ids as little-
endian int32, without BOS/EOS, which the pipeline adds as before) instead of tokenizing on
the fly, so the stream is identical and the input threads only pack. The directory is
keyed by the source (its name, data_dir and size) and the tokenizer files' SHA-256: a
different tokenizer or corpus gets its own directory, never a stale one. It is built on
first use (atomically: written under a temporary name, then renamed) or ahead of time
with tools/pretokenize.py, which a multi-host run should do once before launching.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lmjax.data import sources
from lmjax.data.sources import DataError

DOCS_PER_FILE = 100_000


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def directory(cfg_data, split: str, tokenizer) -> tuple[str, sources.TextSource, dict]:
  """(the tokenized split's directory, its text source, the identity recorded there)."""
  text = sources.get_source(cfg_data, split)
  ident = {'source': text.name, 'data_dir': sources.default_data_dir(cfg_data),
           'documents': len(text), 'tokenizer': os.path.abspath(tokenizer.path),
           'tokenizer_sha256': tokenizer.sha256()}
  if getattr(text, 'fingerprint', None):  # corpora: the shards' paths, sizes and mtimes
    ident['fingerprint'] = text.fingerprint
  key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
  slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', text.name).strip('_')
  return os.path.join(ident['data_dir'], 'tokenized', f'{slug}-{key}'), text, ident


class TokenSource:
  """Random-access documents as int32 id arrays (len + __getitem__, for grain)."""

  def __init__(self, root: str, meta: dict):
    self.name, self.meta = f'{meta["source"]} (pretokenized: {root})', meta
    self._source = grain.sources.ArrayRecordDataSource(
        [os.path.join(root, f) for f in meta['files']])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[int(index)], dtype='<i4').astype(np.int32)


def get_source(cfg_data, split: str, tokenizer, threads: int = 2) -> TokenSource:
  """The tokenized documents of `split`, built first if missing."""
  root, text, ident = directory(cfg_data, split, tokenizer)
  meta_path = os.path.join(root, 'meta.json')
  if not os.path.exists(meta_path):
    build(root, text, tokenizer, ident, threads)
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  if len(meta['files']) == 0 or meta['documents'] != len(text):
    raise DataError(f'{root}: holds {meta["documents"]} documents, the source '
                    f'{text.name} {len(text)}: delete the directory to rebuild it')
  return TokenSource(root, meta)


class _Encode(grain.transforms.Map):

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, text: str) -> bytes:
    return np.asarray(self.tokenizer.encode(text), '<i4').tobytes()


def build(root: str, text: sources.TextSource, tokenizer, ident: dict,
          threads: int = 2) -> dict:
  """Tokenizes every document of `text` into root/ (see the module doc); returns the
  meta. Safe against concurrent builders: the first complete directory wins."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + '.tmp', dir=os.path.dirname(root))
  t0, n_tokens, files = time.perf_counter(), 0, []
  n = len(text)
  n_files = max(1, -(-n // DOCS_PER_FILE))
  ds = grain.MapDataset.source(text).map(_Encode(tokenizer)).to_iter_dataset(
      grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=256))
  writer = None
  try:
    for i, record in enumerate(tqdm(ds, total=n, desc=f'tokenize {text.name}',
                                    mininterval=2.0, disable=None)):
      if i % DOCS_PER_FILE == 0:
        if writer is not None:
          writer.close()
        files.append(f'data.array_record-{len(files):05d}-of-{n_files:05d}')
        writer = ArrayRecordWriter(os.path.join(tmp, files[-1]), 'group_size:1')
      writer.write(record)
      n_tokens += len(record) // 4
    if writer is not None:
      writer.close()
      writer = None
    meta = dict(ident, files=files, tokens=n_tokens)
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.exists(os.path.join(root, 'meta.json')):
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
  except BaseException:
    if writer is not None:
      writer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  dt = time.perf_counter() - t0
  print(f'lmjax: pretokenized {text.name}: {n} documents, {n_tokens:,} tokens in {dt:.1f}s '
        f'({n_tokens / max(dt, 1e-9):,.0f} tokens/s) -> {root}', flush=True)
  return meta
