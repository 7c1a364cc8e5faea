"""Corpora in their own formats (data/corpora.py): JSONL (plain, .gz, .zst), Parquet and
save_to_disk directories, end to end through the pretraining pipeline.

The save_to_disk directories are written with pyarrow in the layout `datasets` uses (Arrow
IPC stream files listed in state.json, dataset_info.json; a DatasetDict's dataset_dict.json
and one subdirectory per split): the `datasets` package itself is not a dependency."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmjax import config as config_lib
from lmjax.data import corpora, pipeline, sources, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
SEQ = 64
WORDS = 'alpha beta gamma delta model data token batch shard value return print'.split()


def make_docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f'doc {i}: ' + ' '.join(rng.choice(WORDS, int(rng.integers(5, 60)))) + '.\n'
          + f'def fn_{i}(x):\n    return x * {i}' for i in range(n)]


# ---- Writers: the same records in each format --------------------------------------------

def write_jsonl(path, docs, ids=None, opener=open):
  with opener(path, 'wt', encoding='utf-8') as f:
    for i, doc in enumerate(docs):
      f.write(json.dumps({'id': ids[i] if ids else f'r{i}', 'text': doc, 'meta': {'n': i}})
              + '\n')


def write_zst(path, docs):
  zstandard = pytest.importorskip('zstandard')
  raw = ''.join(json.dumps({'id': f'r{i}', 'text': d}) + '\n' for i, d in enumerate(docs))
  with open(path, 'wb') as f:
    f.write(zstandard.ZstdCompressor().compress(raw.encode()))


def write_parquet(path, docs, row_group_size=7):
  table = pa.table({'id': [f'r{i}' for i in range(len(docs))], 'text': docs})
  pq.write_table(table, path, row_group_size=row_group_size)


def write_hf_dataset(directory, docs, n_files=2, batch=5):
  """A Dataset.save_to_disk directory: Arrow stream files, state.json, dataset_info.json."""
  os.makedirs(directory, exist_ok=True)
  parts = np.array_split(np.arange(len(docs)), n_files)
  names = []
  for k, part in enumerate(parts):
    names.append(f'data-{k:05d}-of-{n_files:05d}.arrow')
    table = pa.table({'text': [docs[i] for i in part], 'id': [f'r{i}' for i in part]})
    with pa.OSFile(os.path.join(directory, names[-1]), 'wb') as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch)
  with open(os.path.join(directory, 'state.json'), 'w') as f:
    json.dump({'_data_files': [{'filename': n} for n in names], '_fingerprint': 'x',
               '_format_columns': None, '_format_kwargs': {}, '_format_type': None,
               '_output_all_columns': False, '_split': None}, f)
  with open(os.path.join(directory, 'dataset_info.json'), 'w') as f:
    json.dump({'features': {'text': {'dtype': 'string', '_type': 'Value'},
                            'id': {'dtype': 'string', '_type': 'Value'}}}, f)


def write_hf_dict(directory, splits):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'dataset_dict.json'), 'w') as f:
    json.dump({'splits': list(splits)}, f)
  for name, docs in splits.items():
    write_hf_dataset(os.path.join(directory, name), docs)


TRAIN, VAL = make_docs(60), make_docs(12, seed=1)
FORMATS = ['jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet', 'hf_disk']


def write_format(root, fmt):
  """TRAIN (two shards) and VAL (one) in format `fmt` under root/fmt: (source, files)."""
  base = root / fmt.replace('.', '_')
  base.mkdir(parents=True, exist_ok=True)
  if fmt == 'hf_disk':
    write_hf_dict(str(base / 'ds'), {'train': TRAIN, 'validation': VAL})
    return 'hf_disk', str(base / 'ds')
  shards = {'train-0': TRAIN[:35], 'train-1': TRAIN[35:], 'validation-0': VAL}
  for name, docs in shards.items():
    path = str(base / f'{name}.{fmt}')
    if fmt == 'jsonl':
      write_jsonl(path, docs)
    elif fmt == 'jsonl.gz':
      write_jsonl(path, docs, opener=gzip.open)
    elif fmt == 'jsonl.zst':
      write_zst(path, docs)
    else:
      write_parquet(path, docs)
  return ('parquet' if fmt == 'parquet' else 'jsonl'), str(base / f'{{split}}-*.{fmt}')


def make_cfg(root, source='jsonl', files='', **data):
  cfg = config_lib.base_config()
  cfg.data.update(source=source, files=files, data_dir=str(root / 'cache'), seq_len=SEQ,
                  worker_threads=2, prefetch=2, val_fraction=0.2)
  cfg.data.update(**data)
  cfg.tokenizer.update(vocab_size=VOCAB)
  cfg.model.vocab_size = VOCAB
  return cfg


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  root = tmp_path_factory.mktemp('tok')
  return tokenizer.train_sentencepiece(TRAIN + VAL, str(root / 'sp'), VOCAB)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('corpora')


def docs_of(cfg, split):
  src = sources.get_source(cfg.data, split)
  return [src[i] for i in range(len(src))]


def _assert_same(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    assert set(a) == set(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def token_docs(batches, bos):
  stream = []
  for b in batches:
    for row, seg in zip(b['inputs'], b['segment_ids']):
      stream.extend(row[seg > 0].tolist())
  starts = [i for i, t in enumerate(stream) if t == bos] + [len(stream)]
  return [tuple(stream[a:b]) for a, b in zip(starts, starts[1:])]


# ---- Each format end to end --------------------------------------------------------------

@pytest.mark.parametrize('fmt', FORMATS)
def test_each_format_reads_the_same_documents_and_token_stream(root, tok, fmt):
  """Every format holding the same records gives the same documents, in order, and the
  same shuffled, packed batches; mid-shard resume is exact."""
  source, files = write_format(root, fmt)
  cfg = make_cfg(root, source, files)
  assert docs_of(cfg, 'train') == TRAIN and docs_of(cfg, 'validation') == VAL
  make = lambda: pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=2, seed=3)
  it = make()
  stream = [next(it) for _ in range(12)]
  reference = make_cfg(root, *write_format(root, 'jsonl'))
  it = pipeline.make_lm_iterator(reference, tok, 'train', batch_size=2, seed=3)
  _assert_same([next(it) for _ in range(12)], stream)
  # Resume mid-shard (5 batches ~ 10 documents into a 35-document shard), through JSON.
  it = make()
  for _ in range(5):
    next(it)
  fresh = make()
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  _assert_same(stream[5:12], [next(fresh) for _ in range(7)])
  # One ordered pass of validation holds every document once.
  val = list(pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=1, repeat=False))
  assert token_docs(val, tok.bos_id) == [
      tuple([tok.bos_id] + tok.encode(d) + [tok.eos_id]) for d in VAL]


def test_ids_and_locations(root):
  cfg = make_cfg(root, *write_format(root, 'jsonl'), id_key='id')
  src = sources.get_source(cfg.data, 'train')
  assert src.record_id(36) == 'r1' and src.where(36).endswith('train-1.jsonl:2')
  pcfg = make_cfg(root, *write_format(root, 'parquet'), id_key='id')
  src = sources.get_source(pcfg.data, 'train')
  assert src.record_id(36) == 'r1' and src.where(36).endswith('train-1.parquet: row 1')


def test_indexes_are_cached_and_rebuilt_when_a_shard_changes(tmp_path, capsys):
  write_jsonl(tmp_path / 'a.jsonl', TRAIN[:10])
  cfg = make_cfg(tmp_path, files=str(tmp_path / '*.jsonl'))
  assert len(docs_of(cfg, 'train')) + len(docs_of(cfg, 'validation')) == 10
  assert 'indexed 1 of 1 jsonl shards' in capsys.readouterr().out
  corpora._CORPORA.clear(), corpora._SOURCES.clear()  # as a new process would
  docs_of(cfg, 'train')
  assert 'indexed' not in capsys.readouterr().out  # reused
  write_jsonl(tmp_path / 'a.jsonl', TRAIN[:12])
  corpora._CORPORA.clear(), corpora._SOURCES.clear()
  assert len(docs_of(cfg, 'train')) + len(docs_of(cfg, 'validation')) == 12
  assert 'indexed 1 of 1' in capsys.readouterr().out


# ---- Splits -----------------------------------------------------------------------------

def test_splits_by_record_hash_are_disjoint_complete_and_stable(tmp_path):
  docs = make_docs(400, seed=2)
  (tmp_path / 'c').mkdir()
  for k in range(4):
    write_jsonl(tmp_path / 'c' / f'part-{k}.jsonl', docs[k * 100:(k + 1) * 100])
  cfg = make_cfg(tmp_path, files=str(tmp_path / 'c' / '*.jsonl'), val_fraction=0.1)
  train, val = docs_of(cfg, 'train'), docs_of(cfg, 'validation')
  assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
  assert 20 <= len(val) <= 60  # ~10% of 400, spread over the shards
  # The hash uses paths under the glob root: a moved copy splits the same way.
  os.rename(tmp_path / 'c', tmp_path / 'moved')
  moved = make_cfg(tmp_path, files=str(tmp_path / 'moved' / '*.jsonl'), val_fraction=0.1)
  assert docs_of(moved, 'validation') == val
  # A tiny corpus still gets one record each way; val_fraction=0: no validation split.
  write_jsonl(tmp_path / 'two.jsonl', docs[:2])
  two = make_cfg(tmp_path, files=str(tmp_path / 'two.jsonl'), val_fraction=0.01)
  assert len(docs_of(two, 'train')) == len(docs_of(two, 'validation')) == 1
  none = make_cfg(tmp_path, files=str(tmp_path / 'two.jsonl'), val_fraction=0.0)
  assert len(docs_of(none, 'train')) == 2
  with pytest.raises(sources.DataError, match=r"no records in split 'validation' "
                                              r'\(data.val_fraction is 0'):
    docs_of(none, 'validation')
  with pytest.raises(sources.DataError, match=r"has no split 'test'"):
    docs_of(two, 'test')


def test_split_files_must_exist_and_differ(tmp_path):
  write_jsonl(tmp_path / 'train.jsonl', TRAIN[:5])
  cfg = make_cfg(tmp_path, files=str(tmp_path / '{split}.jsonl'))
  assert len(docs_of(cfg, 'train')) == 5
  with pytest.raises(sources.DataError, match=r"matches no file for split 'validation'"):
    docs_of(cfg, 'validation')
  both = make_cfg(tmp_path, files=str(tmp_path / '{split}.jsonl') + ','
                  + str(tmp_path / 'train.jsonl'))
  with pytest.raises(sources.DataError, match=r"train.jsonl for both the 'train' and the "
                                              r"'validation' split"):
    docs_of(both, 'validation')


def test_hf_dataset_without_splits_is_split_by_hash(tmp_path):
  write_hf_dataset(str(tmp_path / 'one'), TRAIN, n_files=3)
  cfg = make_cfg(tmp_path, 'hf_disk', str(tmp_path / 'one'))
  train, val = docs_of(cfg, 'train'), docs_of(cfg, 'validation')
  assert sorted(train + val) == sorted(TRAIN) and val and not set(train) & set(val)
  with pytest.raises(sources.DataError, match=r"this DatasetDict has no split 'test'; it "
                                              r"has \['train', 'validation'\]"):
    write_hf_dict(str(tmp_path / 'dd'), {'train': TRAIN, 'validation': VAL})
    docs_of(make_cfg(tmp_path, 'hf_disk', str(tmp_path / 'dd')), 'test')


# ---- Sharding, mixtures, pretokenize ----------------------------------------------------

def test_processes_read_disjoint_shares_and_data_shards(root, tok):
  cfg = make_cfg(root, *write_format(root, 'jsonl.gz'))
  shares = []
  for p in range(2):
    it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=1, process_index=p,
                                   process_count=2, repeat=False)
    shares.append(token_docs(it, tok.bos_id))
  want = sorted(tuple([tok.bos_id] + tok.encode(d) + [tok.eos_id]) for d in TRAIN)
  assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == want

  def make(**kw):
    return pipeline.make_lm_iterator(cfg, tok, 'train', seed=4, **kw)
  one = pipeline.shard_iterator(make, 2, batch_size=4, process_index=0, process_count=1)
  two = [pipeline.shard_iterator(make, 2, batch_size=2, process_index=p, process_count=2)
         for p in (0, 1)]
  for _ in range(3):
    parts = [next(it) for it in two]
    _assert_same([{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}], [next(one)])


def test_mixture_of_a_jsonl_corpus_and_text_files(root, tok, tmp_path):
  text_dir = tmp_path / 'text'
  text_dir.mkdir()
  for i, doc in enumerate(make_docs(20, seed=5)):
    (text_dir / f'{i}.txt').write_text(doc)
  source, files = write_format(root, 'jsonl')
  cfg = make_cfg(root, source, files)
  cfg.data.mixture = dict(
      web=config_lib.data_source(source='jsonl', files=files, weight=3.0),
      code=config_lib.data_source(source='local_text', text_glob=str(text_dir / '*.txt'),
                                  weight=1.0))
  config_lib.validate(cfg)
  make = lambda: pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=2, seed=1)
  it = make()
  batches = [next(it) for _ in range(10)]
  ids = np.concatenate([b['source'].ravel() for b in batches])
  assert {1, 2} <= set(ids.tolist())  # code = 1, web = 2 (sorted names)
  assert (ids == 2).sum() > (ids == 1).sum()
  it = make()
  for _ in range(4):
    next(it)
  fresh = make()
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  _assert_same(batches[4:10], [next(fresh) for _ in range(6)])
  web = pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=1, repeat=False,
                                  source='web')
  assert len(token_docs(web, tok.bos_id)) == len(VAL)


def test_pretokenized_corpus_gives_the_same_stream(root, tok):
  cfg = make_cfg(root, *write_format(root, 'parquet'))
  pre = cfg.copy_and_resolve_references()
  pre.data.pretokenize = True
  want = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=2, seed=5)
  got = pipeline.make_lm_iterator(pre, tok, 'train', batch_size=2, seed=5)
  _assert_same([next(want) for _ in range(8)], [next(got) for _ in range(8)])


# ---- Bad input ------------------------------------------------------------------------

_BAD_LINES = {'malformed': '{"text": "broken', 'missing': json.dumps({'body': 'no text'}),
              'not_string': json.dumps({'text': 7}),
              'not_object': json.dumps(['not', 'an', 'object'])}


def _bad_jsonl(path, *cases):
  """'good one', a blank line, the bad lines of `cases` (lines 3, 4, ...), 'good two'."""
  lines = [json.dumps({'text': 'good one'}), '  '] + [_BAD_LINES[c] for c in cases]
  path.write_text('\n'.join(lines + [json.dumps({'text': 'good two'})]) + '\n')


@pytest.mark.parametrize('case,message', [
    ('malformed', r'bad.jsonl:3: malformed JSON \(Unterminated string'),
    ('missing', r"bad.jsonl:3: no field data.text_key='text' \(fields: body\)"),
    ('not_string', r"bad.jsonl:3: field 'text' is int, not a string"),
    ('not_object', r'bad.jsonl:3: malformed JSON record \(a JSON list, not an object\)'),
    ('empty', r'empty.jsonl: empty shard \(no records\)'),
    ('truncated_gz', r'cut.jsonl.gz:\d+: truncated gzip stream'),
    ('truncated_zst', r'cut.jsonl.zst:\d+: truncated zstd stream'),
    ('parquet_null', r"p.parquet: row 3: field 'text' is null, not a string"),
    ('parquet_column', r"p.parquet: no column data.text_key='text' \(columns: body\)"),
    ('arrow_null', r"data-00000-of-00001.arrow: row 2: field 'text' is null"),
])
def test_bad_input_fails_naming_the_place_or_is_skipped_and_counted(tmp_path, capsys, case,
                                                                   message):
  source, pattern, good = 'jsonl', str(tmp_path / '*.jsonl*'), 2
  if case in _BAD_LINES:
    _bad_jsonl(tmp_path / 'bad.jsonl', case)
  elif case == 'empty':
    (tmp_path / 'empty.jsonl').write_text('\n  \n')
    write_jsonl(tmp_path / 'ok.jsonl', ['good one', 'good two'])
  elif case.startswith('truncated'):
    docs = make_docs(2000)  # several zstd blocks: the first ones decode
    if case == 'truncated_gz':
      raw = gzip.compress(''.join(json.dumps({'text': d}) + '\n' for d in docs).encode())
      (tmp_path / 'cut.jsonl.gz').write_bytes(raw[:len(raw) // 2])
    else:
      zstandard = pytest.importorskip('zstandard')
      raw = zstandard.ZstdCompressor().compress(
          ''.join(json.dumps({'text': d}) + '\n' for d in docs).encode())
      (tmp_path / 'cut.jsonl.zst').write_bytes(raw[:len(raw) // 2])
    good = None
  elif case.startswith('parquet'):
    source, pattern = 'parquet', str(tmp_path / '*.parquet')
    col = 'text' if case == 'parquet_null' else 'body'
    pq.write_table(pa.table({col: ['a', 'b', 'c', None, 'e']}), tmp_path / 'p.parquet',
                   row_group_size=2)
    write_parquet(str(tmp_path / 'q.parquet'), ['good one', 'good two'])
    good = 6 if case == 'parquet_null' else 2
  else:
    source, pattern = 'hf_disk', str(tmp_path / 'ds')
    write_hf_dataset(str(tmp_path / 'ds'), ['a', 'b', 'c', 'd'], n_files=1)
    table = pa.table({'text': ['a', 'b', None, 'd'], 'id': ['0', '1', '2', '3']})
    with pa.OSFile(str(tmp_path / 'ds' / 'data-00000-of-00001.arrow'), 'wb') as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    good = 3
  cfg = make_cfg(tmp_path, source, pattern, val_fraction=0.0)
  with pytest.raises(sources.DataError, match=message + r'.*set data.on_error=skip'):
    docs_of(cfg, 'train')
  corpora._SOURCES.clear()
  skip = make_cfg(tmp_path, source, pattern, val_fraction=0.0, on_error='skip')
  docs = docs_of(skip, 'train')
  out = capsys.readouterr().out
  assert 'data.on_error=skip left out' in out and out.count('left out') == 1
  assert 'records read. First: ' in out and message.split(':')[0].split('.')[0] in out
  if good is not None:
    assert len(docs) == good
  else:  # a truncated stream keeps the records before the break, each one whole
    assert 0 < len(docs) < 2000 and docs == make_docs(2000)[:len(docs)]
    assert '1 truncated / corrupt shards' in out
  if case in _BAD_LINES:
    assert docs == ['good one', 'good two']


def test_skip_counts_each_kind_in_one_line(tmp_path, capsys):
  _bad_jsonl(tmp_path / 'bad.jsonl', *_BAD_LINES)
  (tmp_path / 'empty.jsonl').write_text('')
  cfg = make_cfg(tmp_path, files=str(tmp_path / '*.jsonl'), on_error='skip', val_fraction=0.0)
  assert docs_of(cfg, 'train') == ['good one', 'good two']
  out = [l for l in capsys.readouterr().out.splitlines() if 'left out' in l]
  assert len(out) == 1 and ("left out 2 malformed JSON, 1 without the text field, 1 with "
                            "non-string text, 1 empty shards; 2 records read. First: ") in out[0]
  assert out[0].endswith("bad.jsonl:3: malformed JSON (Unterminated string starting at: "
                         "line 1 column 10 (char 9))")


def test_zst_without_zstandard_names_the_package(tmp_path, monkeypatch):
  (tmp_path / 'a.jsonl.zst').write_bytes(b'\x28\xb5\x2f\xfd')
  monkeypatch.setitem(sys.modules, 'zstandard', None)
  cfg = make_cfg(tmp_path, files=str(tmp_path / '*.zst'))
  with pytest.raises(sources.DataError, match=r'a.jsonl.zst: reading .zst files needs the '
                                              r'zstandard package: pip install zstandard'):
    docs_of(cfg, 'train')


def test_config_checks(tmp_path):
  cfg = make_cfg(tmp_path, files='')
  with pytest.raises(config_lib.ConfigError, match=r"data.files must name the shards when "
                                                   r"data.source='jsonl'"):
    config_lib.validate(cfg)
  cfg = make_cfg(tmp_path, files='/x/*.jsonl', on_error='ignore')
  with pytest.raises(config_lib.ConfigError, match=r"'data.on_error' must be one of"):
    config_lib.validate(cfg)
  cfg = make_cfg(tmp_path, files='')  # a mixture's entries name the files
  cfg.data.mixture = dict(a=config_lib.data_source(source='parquet', files='/x/*.parquet'),
                          b=config_lib.data_source(source='parquet'))
  with pytest.raises(config_lib.ConfigError, match=r"data.mixture.b.files must be set"):
    config_lib.validate(cfg)
  with pytest.raises(sources.DataError, match=r"data.files '/nowhere/\*.jsonl' matches no "
                                              r'file'):
    docs_of(make_cfg(tmp_path, files='/nowhere/*.jsonl'), 'train')
  with pytest.raises(sources.DataError, match=r'not a directory written by save_to_disk'):
    (tmp_path / 'plain').mkdir()
    docs_of(make_cfg(tmp_path, 'hf_disk', str(tmp_path / 'plain')), 'train')


# ---- Cleaning and training on a corpus ---------------------------------------------------

def test_prepare_data_reads_a_jsonl_corpus_and_reports_ids(tmp_path):
  docs = make_docs(12, seed=3)
  docs[7] = docs[2].upper()  # an exact duplicate once normalised
  write_jsonl(tmp_path / 'a.jsonl.gz', docs, ids=[f'web-{i}' for i in range(12)],
              opener=gzip.open)
  out = tmp_path / 'out'
  res = subprocess.run(
      [sys.executable, 'tools/prepare_data.py', '--config=configs/data/prepare_stdlib.py',
       f'--out={out}', '--config.data.source=jsonl', f'--config.data.files={tmp_path}/*.gz',
       '--config.data.id_key=id', f'--config.data.data_dir={tmp_path}/cache',
       '--config.data.val_fraction=0.0', "--config.splits=('train',)",
       '--config.quality.enabled=False', '--config.near_dedup.enabled=False',
       '--config.workers=2', '--config.shard_size=4'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.load(open(out / 'report.json'))
  s = report['splits']['train']
  assert (s['documents_in'], s['documents_out']) == (12, 11)
  ex = s['steps']['exact_dedup']['examples'][0]
  assert ex['id'] == 'web-7' and ex['reason'] == 'duplicate of document 2 (id web-2)'
  assert 'removed document 7 (id web-7)' in res.stdout


@pytest.mark.slow
def test_train_on_a_jsonl_corpus(tmp_path):
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  from util import tiny_config  # pylint: disable=import-outside-toplevel
  write_jsonl(tmp_path / 'web-0.jsonl.gz', TRAIN, opener=gzip.open)
  write_jsonl(tmp_path / 'web-1.jsonl', VAL)
  cfg = tiny_config(vocab_size=VOCAB)
  cfg.data.update(source='jsonl', files=str(tmp_path / 'web-*'), data_dir=str(tmp_path / 'c'),
                  val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=VOCAB, max_sentences=20_000)
  cfg.train.update(steps=3, eval_every=3, eval_batches=1)
  cfg.mesh.update(data=-1)  # the 8 test devices, data parallel
  config_lib.validate(cfg)
  out = loop.train(cfg, str(tmp_path / 'run'))
  assert out.tokenizer.path == tokenizer.default_path(cfg)  # trained on the train split
  assert corpora.dataset_name(cfg.data) in out.tokenizer.path
  assert [e['step'] for e in out.evals] == [0, 3] and np.isfinite(out.evals[-1]['eval_loss'])


@pytest.mark.slow
def test_bench_corpora_smoke(tmp_path, monkeypatch, capsys):
  """tools/bench_corpora.py end to end on a tiny corpus (its figures: docs/benchmarks.md)."""
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import bench_corpora  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('PYTHONPATH', ROOT)  # its memory measurement runs in a child process
  text = tmp_path / 'text'
  text.mkdir()
  for i, doc in enumerate(TRAIN):
    (text / f'{i}.txt').write_text(doc)
  out = tmp_path / 'rows.json'
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--batches=3',
          '--repeat=1', '--threads=1', '--big_gb=0.001', '--formats=jsonl,jsonl.gz,parquet,hf_disk',
          f'--out={tmp_path / "bench"}', f'--json={out}',
          f'--config.data.text_glob={text}/*.txt', f'--config.data.data_dir={tmp_path}/c',
          '--config.data.seq_len=32', f'--config.tokenizer.vocab_size={VOCAB}',
          f'--config.model.vocab_size={VOCAB}']
  assert bench_corpora.main(argv) == 0
  assert '| jsonl.gz |' in capsys.readouterr().out
  rows = json.load(open(out))
  assert [r['format'] for r in rows['throughput']][2:] == ['jsonl', 'jsonl.gz', 'parquet',
                                                           'hf_disk']
  assert all(r['tokens_per_s'] > 0 for r in rows['throughput'])
  big = {os.path.basename(b['shard']): b for b in rows['big']}
  assert big['big.jsonl']['records'] > 0 and big['big.jsonl.gz']['peak_rss'] > 0
  assert not os.path.exists(tmp_path / 'bench')  # removed without --keep
