"""Input-pipeline throughput of each corpus format, and the memory of reading a large shard.

  python tools/bench_corpora.py [--config=configs/pretrain_tiny.py] [--out=DIR]
      [--batches=300] [--threads=2] [--big_gb=2] [--formats=jsonl,parquet,...]
      [--config.KEY=VALUE ...]

Throughput: the train split of the config's corpus (default: the stdlib files, its 4k BPE
tokenizer) is written in each format (4 shards each, '{split}' names), then each is read
through pipeline.make_lm_iterator (shuffled, tokenized on the fly, packed, batches of 16 x
data.seq_len; the first batch untimed; the median of --repeat passes) beside the
local_text dataset (array_record) on the fly and pretokenized. Columns: index build
(first use: offsets, or the converted copy), the index or copy on disk, random reads (MB/s
of text, every document once in a shuffled order, one thread: the reader alone), tokens/s.

Memory: one JSONL shard of --big_gb GB (the documents repeated, with ids and a metadata
field as web corpora have; and the same shard gzipped) is read in a fresh process:
indexed, then --batches shuffled batches; and the config's own corpus the same way, for
comparison. Peak RSS (getrusage) and, at the end, the resident anonymous and file-backed
(memory-mapped: libraries, indexes) pages, beside the shard's size.
Writes under --out (default /tmp/lmjax_bench_corpora; removed at the end unless --keep)
and prints markdown tables. --big_gb=0 skips the memory part.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from lmjax import cli

FORMATS = ('jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet', 'hf_disk')
BATCH = 16


def _write(fmt: str, docs: list[str], base: str, shards: int = 4) -> tuple[str, str]:
  """docs as the train split of `fmt` under base/: (data.source, data.files)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  os.makedirs(base, exist_ok=True)
  parts = [list(p) for p in np.array_split(np.arange(len(docs)), shards)]
  rows = lambda part: [{'id': f'doc-{i}', 'text': docs[i], 'meta': {'n': int(i)}}
                       for i in part]
  if fmt == 'hf_disk':
    split_dir = os.path.join(base, 'ds', 'train')
    os.makedirs(split_dir, exist_ok=True)
    names = []
    for k, part in enumerate(parts):
      names.append(f'data-{k:05d}-of-{shards:05d}.arrow')
      table = pa.table({'text': [docs[i] for i in part], 'id': [f'doc-{i}' for i in part]})
      with pa.OSFile(os.path.join(split_dir, names[-1]), 'wb') as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
          writer.write_table(table, max_chunksize=1000)
    with open(os.path.join(split_dir, 'state.json'), 'w', encoding='utf-8') as f:
      json.dump({'_data_files': [{'filename': n} for n in names], '_split': 'train'}, f)
    with open(os.path.join(base, 'ds', 'dataset_dict.json'), 'w', encoding='utf-8') as f:
      json.dump({'splits': ['train']}, f)
    return 'hf_disk', os.path.join(base, 'ds')
  for k, part in enumerate(parts):
    path = os.path.join(base, f'train-{k:05d}.{fmt}')
    if fmt == 'parquet':
      pq.write_table(pa.table({'id': [f'doc-{i}' for i in part],
                               'text': [docs[i] for i in part]}), path, row_group_size=256)
      continue
    data = ''.join(json.dumps(r) + '\n' for r in rows(part)).encode('utf-8')
    if fmt == 'jsonl.gz':
      data = gzip.compress(data, compresslevel=6)
    elif fmt == 'jsonl.zst':
      import zstandard  # pylint: disable=import-outside-toplevel
      data = zstandard.ZstdCompressor(level=3).compress(data)
    with open(path, 'wb') as f:
      f.write(data)
  return ('parquet' if fmt == 'parquet' else 'jsonl'), os.path.join(base, '{split}-*.' + fmt)


def _du(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def tokens_per_s(cfg, tok, batches: int, repeat: int = 1) -> float:
  """The median over `repeat` fresh iterators of tokens/s over `batches` batches."""
  from lmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  rates = []
  for _ in range(repeat):
    it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=BATCH, seed=0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * BATCH * cfg.data.seq_len / (time.perf_counter() - t0))
    it.close()
  return sorted(rates)[len(rates) // 2]


def read_mb_per_s(source) -> float:
  """MB/s of text of reading every document once in a random order (one thread)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  order = np.random.default_rng(0).permutation(len(source))
  t0, n = time.perf_counter(), 0
  for i in order:
    n += len(source[int(i)].encode('utf-8'))
  return n / 1e6 / (time.perf_counter() - t0)


def throughput(cfg, tok, out: str, formats: list[str], batches: int,
               repeat: int = 1) -> list[dict]:
  """One row per format (and the local_text baselines): index time, its size, tokens/s."""
  from lmjax.data import corpora, sources, tokenized  # pylint: disable=import-outside-toplevel
  train = sources.get_source(cfg.data, 'train')
  docs = [train[i] for i in range(len(train))]
  size = sum(len(d.encode('utf-8')) for d in docs)
  rows = [dict(format=f'{cfg.data.source} (array_record), on the fly', index_s=None,
               index_bytes=None, read_mb_s=read_mb_per_s(train),
               tokens_per_s=tokens_per_s(cfg, tok, batches, repeat))]
  pre = cfg.copy_and_resolve_references()
  pre.data.pretokenize = True
  tokenized.get_source(pre.data, 'train', tok, max(int(cfg.data.worker_threads), 1))
  rows.append(dict(format=f'{cfg.data.source}, pretokenized (array_record)', index_s=None,
                   index_bytes=None, read_mb_s=None,
                   tokens_per_s=tokens_per_s(pre, tok, batches, repeat)))
  for fmt in formats:
    source, files = _write(fmt, docs, os.path.join(out, 'formats', fmt.replace('.', '_')))
    c = cfg.copy_and_resolve_references()
    c.data.update(source=source, files=files, data_dir=os.path.join(out, 'cache', fmt))
    t0 = time.perf_counter()
    src = corpora.get_source(c.data, 'train')
    index_s = time.perf_counter() - t0
    assert len(src) == len(docs), (fmt, len(src), len(docs))
    cache = os.path.join(out, 'cache', fmt, 'corpora')
    rows.append(dict(format=fmt, index_s=index_s,
                     index_bytes=_du(cache) if os.path.isdir(cache) else 0,
                     read_mb_s=read_mb_per_s(src),
                     tokens_per_s=tokens_per_s(c, tok, batches, repeat)))
  for r in rows:
    r.update(documents=len(docs), text_bytes=size)
  return rows


def write_big(path: str, docs: list[str], gb: float) -> int:
  """A JSONL shard of >= gb GB: the documents over and over, each copy distinct (id,
  a first line naming the copy); returns its records."""
  target, n, written = gb * 1e9, 0, 0
  with open(path, 'w', encoding='utf-8') as f:
    while written < target:
      for doc in docs:
        line = json.dumps({'id': f'r{n}', 'text': f'# copy {n}\n{doc}',
                           'meta': {'source': 'bench', 'n': n}}) + '\n'
        f.write(line)
        written += len(line)
        n += 1
        if written >= target:
          break
  return n


def _status() -> dict:
  out = {}
  with open('/proc/self/status', encoding='utf-8') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('VmRSS', 'RssAnon', 'RssFile'):
        out[key] = int(value.split()[0]) * 1024
  return out


def measure_big(args, flags: list[str]) -> dict:
  """In this (fresh) process: index the big shard, read --batches shuffled batches."""
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from lmjax.data import pipeline, sources, tokenizer  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(args.config, flags=flags)
  tok = tokenizer.load_tokenizer(cfg)
  base = _status()['VmRSS']
  peak_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  cfg = cfg.copy_and_resolve_references()
  baseline = args.measure_big == 'config'  # the config's own source, for comparison
  if not baseline:
    cfg.data.update(source='jsonl', files=args.measure_big, data_dir=args.cache,
                    val_fraction=0.0)
  t0 = time.perf_counter()
  src = sources.get_source(cfg.data, 'train')
  index_s = time.perf_counter() - t0
  after_index = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=BATCH, seed=0)
  t0 = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return dict(shard=src.name if baseline else args.measure_big,
              shard_bytes=None if baseline else os.path.getsize(args.measure_big),
              records=len(src), index_s=index_s, rss_start=base, peak_start=peak_start,
              peak_after_index=after_index,
              peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              tokens_per_s=args.batches * BATCH * cfg.data.seq_len / dt, **_status())


def _mb(n) -> str:
  if n is None:
    return '-'
  return f'{n / 1e6:,.1f} MB' if n >= 1e5 else f'{n / 1e3:,.1f} kB'


def tables(rows: list[dict], big: list[dict]) -> str:
  out = []
  if rows:
    r0 = rows[0]
    out += [f'{r0["documents"]:,} documents, {_mb(r0["text_bytes"])} of text:', '',
            '| format | index build | index / copy on disk | random reads | tokens/s |',
            '|---|---|---|---|---|']
    for r in rows:
      index = '-' if r['index_s'] is None else f'{r["index_s"]:.1f} s'
      reads = '-' if r['read_mb_s'] is None else f'{r["read_mb_s"]:,.0f} MB/s'
      out.append(f'| {r["format"]} | {index} | {_mb(r["index_bytes"])} | {reads} | '
                 f'{r["tokens_per_s"] / 1e6:.2f}M |')
  if big:
    out += ['', '| shard | size | records | index build | RSS before | peak RSS | RSS at the '
            'end: anon / file-backed | tokens/s |', '|---|---|---|---|---|---|---|---|']
    for b in big:
      out.append(f'| {os.path.basename(b["shard"])} | {_mb(b["shard_bytes"])} | '
                 f'{b["records"]:,} | {b["index_s"]:.1f} s | {_mb(b["rss_start"])} | '
                 f'{_mb(b["peak_rss"])} | {_mb(b.get("RssAnon"))} / '
                 f'{_mb(b.get("RssFile"))} | {b["tokens_per_s"] / 1e6:.2f}M |')
  return '\n'.join(out)


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', default='configs/pretrain_tiny.py')
  parser.add_argument('--out', default='/tmp/lmjax_bench_corpora')
  parser.add_argument('--batches', type=int, default=300)
  parser.add_argument('--repeat', type=int, default=3,
                      help='throughput: the median of this many passes per format')
  parser.add_argument('--threads', type=int, default=2, help='data.worker_threads')
  parser.add_argument('--formats', default=','.join(FORMATS))
  parser.add_argument('--big_gb', type=float, default=2.0)
  parser.add_argument('--keep', action='store_true', help='keep --out')
  parser.add_argument('--json', default=None, help='write the rows to this JSON file')
  parser.add_argument('--measure_big', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--cache', default=None, help=argparse.SUPPRESS)
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  flags = rest + [f'--config.data.worker_threads={args.threads}']
  if args.measure_big:
    print(json.dumps(measure_big(args, flags)))
    return 0
  from lmjax.data import sources, tokenizer  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(args.config, flags=flags)
  tok = tokenizer.load_tokenizer(cfg)
  formats = [f for f in args.formats.split(',') if f]
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    parser.error(f'--formats: unknown {unknown[0]!r} (known: {", ".join(FORMATS)})')
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  try:
    rows = throughput(cfg, tok, args.out, formats, args.batches, args.repeat)
    big = []
    if args.big_gb > 0:
      train = sources.get_source(cfg.data, 'train')
      docs = [train[i] for i in range(len(train))]
      path = os.path.join(args.out, 'big.jsonl')
      t0 = time.perf_counter()
      write_big(path, docs, args.big_gb)
      print(f'wrote {path}: {_mb(os.path.getsize(path))} in {time.perf_counter() - t0:.0f}s',
            flush=True)
      shards = ['config', path]
      if 'jsonl.gz' in formats:
        with open(path, 'rb') as src, gzip.open(path + '.gz', 'wb', compresslevel=1) as dst:
          shutil.copyfileobj(src, dst, 1 << 22)
        shards.append(path + '.gz')
      for shard in shards:
        res = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f'--config={args.config}',
             f'--measure_big={shard}', f'--cache={os.path.join(args.out, "big_cache")}',
             f'--batches={args.batches}', f'--threads={args.threads}', *rest],
            capture_output=True, text=True, check=False)
        if res.returncode:
          raise RuntimeError(f'measuring {shard} failed:\n{res.stderr[-3000:]}')
        big.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(tables(rows, big))
    if args.json:
      with open(args.json, 'w', encoding='utf-8') as f:
        json.dump({'throughput': rows, 'big': big}, f, indent=1)
  finally:
    if not args.keep:
      shutil.rmtree(args.out, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
