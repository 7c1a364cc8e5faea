"""Data layer: the local TFDS text builder, sentencepiece, and the grain LM pipeline."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.data import pipeline, sources, tokenizer

N_DOCS = 30
VOCAB = 320
SEQ = 64


def write_corpus(root, n=N_DOCS, seed=0):
  """n distinct documents of code-like and prose lines (some in a subfolder), plus one
  file that is not UTF-8 and one empty file, which the builder must skip."""
  rng = np.random.default_rng(seed)
  words = 'alpha beta gamma delta model data token batch shard value return print'.split()
  for i in range(n):
    lines = []
    for j in range(int(rng.integers(3, 40))):
      if j % 4 == 0:
        lines.append(f'def fn_{i}_{j}(x, y):\n    return x * {j} + y  # doc {i}')
      else:
        lines.append(' '.join(rng.choice(words, int(rng.integers(3, 10)))) + '.')
    folder = root / 'sub' if i % 5 == 0 else root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'doc_{i:02d}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  (root / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me\n'.encode('latin-1'))
  (root / 'empty.txt').write_text('')
  return str(root / '**' / '*.txt')


def make_cfg(text_glob, data_dir, **data):
  cfg = config_lib.base_config()
  cfg.data.update(source='local_text', text_glob=text_glob, data_dir=str(data_dir),
                  val_fraction=0.2, seq_len=SEQ, worker_threads=2, prefetch=2)
  cfg.data.update(**data)
  cfg.tokenizer.update(vocab_size=VOCAB, max_sentences=20_000)
  cfg.model.vocab_size = VOCAB
  return cfg


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  cfg = make_cfg(write_corpus(root / 'corpus'), root / 'tfds')
  tok = tokenizer.load_tokenizer(cfg)  # builds the dataset, then trains the tokenizer
  return cfg, tok


def docs_of(cfg, split):
  src = sources.get_source(cfg.data, split)
  return [src[i] for i in range(len(src))]


def encoded(tok, doc):
  return tuple([tok.bos_id] + tok.encode(doc) + [tok.eos_id])


def token_stream(batches):
  """The real tokens of consecutive packed batches, in order (rows are consecutive
  windows of one stream; padding only ends a finite pass)."""
  out = []
  for b in batches:
    for row, seg in zip(b['inputs'], b['segment_ids']):
      out.extend(row[seg > 0].tolist())
  return out


def split_at_bos(stream, bos):
  starts = [i for i, t in enumerate(stream) if t == bos] + [len(stream)]
  return [tuple(stream[a:b]) for a, b in zip(starts, starts[1:])]


def copy_cfg(cfg, **data):
  c = cfg.copy_and_resolve_references()
  c.data.update(**data)
  return c


# ---- Sources --------------------------------------------------------------------------

def test_splits_are_disjoint_complete_and_deterministic(setup, tmp_path):
  cfg, _ = setup
  builder = sources.local_text_builder(cfg.data)
  meta = builder.info.metadata
  assert (meta['files_matched'], meta['skipped_not_utf8'], meta['skipped_empty']) == (32, 1, 1)
  paths = {s: [r['path'].decode() for r in builder.as_data_source(split=s)]
           for s in ('train', 'validation')}
  assert len(paths['train']) + len(paths['validation']) == N_DOCS
  assert 1 <= len(paths['validation']) < N_DOCS // 2
  assert not set(paths['train']) & set(paths['validation'])
  assert 'sub/doc_00.txt' in paths['train'] + paths['validation']  # key: path under the root
  # The split depends only on paths relative to the glob root: the same files elsewhere,
  # built into another data_dir, split the same way.
  shutil.copytree(builder.info.metadata['root'], tmp_path / 'moved')
  moved = make_cfg(str(tmp_path / 'moved' / '**' / '*.txt'), tmp_path / 'tfds')
  again = sources.local_text_builder(moved.data)
  assert again.builder_config.name != builder.builder_config.name  # another glob, another name
  assert [r['path'].decode() for r in again.as_data_source(split='validation')
         ] == paths['validation']
  assert docs_of(moved, 'train') == docs_of(cfg, 'train')


def test_changed_corpus_is_reported(tmp_path, capsys):
  cfg = make_cfg(write_corpus(tmp_path / 'corpus', n=4), tmp_path / 'tfds')
  sources.get_source(cfg.data, 'train')
  assert 'built dataset' in capsys.readouterr().out
  (tmp_path / 'corpus' / 'new.txt').write_text('another document\n')
  sources._BUILDERS.clear()  # as a new process would
  assert len(sources.get_source(cfg.data, 'train')) == 3  # prepared data is reused ...
  assert 'WARNING: the files of data.text_glob' in capsys.readouterr().out  # ... and flagged


def test_split_files_rules():
  files = [f'/r/f{i}.txt' for i in range(200)]
  split = sources.split_files('/r', files, 0.1)
  assert 10 <= len(split['validation']) <= 30  # ~ 10% of 200 by hash
  assert sorted(split['train'] + split['validation']) == sorted(files)
  assert sources.split_files('/r', files, 0.1) == split
  two = sources.split_files('/r', files[:2], 0.01)  # tiny corpus: one file each
  assert (len(two['train']), len(two['validation'])) == (1, 1)
  assert sources.split_files('/r', files[:2], 0.9)['train']  # never an empty train split
  assert sources.split_files('/r', files, 0.0)['validation'] == []
  with pytest.raises(sources.DataError, match='data.val_fraction'):
    sources.split_files('/r', files, 1.0)


def test_dataset_names_and_roots():
  assert sources.dataset_name('stdlib') == 'stdlib'
  name = sources.dataset_name('/data/**/*.txt')
  assert name.startswith('glob_') and len(name) == 13 and int(name[5:], 16) >= 0
  assert name == sources.dataset_name('/data/**/*.txt')
  assert name != sources.dataset_name('/data/*.txt')
  assert sources.dataset_name('stdlib', 0.05) == 'stdlib_val0p05'
  assert sources.glob_root('/data/corpus/**/*.txt') == '/data/corpus'
  assert sources.glob_root('/data/c*/x/*.md') == '/data'
  assert sources.glob_root('/data/one.txt') == '/data'


def test_stdlib_corpus_lists_real_source_files():
  root, files = sources.stdlib_files()
  assert len(files) > 500 and files == sorted(files)
  assert f'{root}/os.py' in files
  assert not any('site-packages' in f for f in files)


def test_site_packages_corpus():
  root, files = sources.resolve_glob('site:optax, flax')
  import flax
  import optax
  assert root == os.path.dirname(os.path.dirname(optax.__file__))
  assert os.path.join(os.path.dirname(optax.__file__), '__init__.py') in files
  assert any(f.startswith(os.path.dirname(flax.__file__) + os.sep) for f in files)
  assert files == sorted(files) and all(f.endswith('.py') for f in files)
  assert sources.dataset_name('site:jax,flax,optax') == 'site_jax_flax_optax'
  assert sources.dataset_name('site:jax.numpy').startswith('glob_')
  with pytest.raises(sources.DataError, match=r"no installed package 'no_such_pkg_x'"):
    sources.resolve_glob('site:optax,no_such_pkg_x')


def test_iter_texts_spreads_max_docs(setup):
  cfg, _ = setup
  train = docs_of(cfg, 'train')
  assert list(sources.iter_texts(cfg.data, 'train')) == train
  some = list(sources.iter_texts(cfg.data, 'train', max_docs=3))
  assert some == [train[0], train[len(train) // 2], train[-1]]


# ---- Tokenizer ------------------------------------------------------------------------

def test_tokenizer_ids_round_trip_and_reuse(setup, capsys):
  cfg, tok = setup
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.path == tokenizer.default_path(cfg)
  assert tok.path.endswith(f'/tokenizers/{sources.dataset_name(cfg.data.text_glob, 0.2)}'
                           f'_bpe_{VOCAB}.model')
  texts = docs_of(cfg, 'validation')[:3] + [
      'def fn_1_2(x):\n\treturn x  *  12345\n\n\n', '   leading and trailing   ',
      'ünïcödé ✓ 日本語 — not in the corpus: bytes']
  for text in texts:
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB for i in ids) and tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
  # Code-aware: digits split, whitespace runs are pieces, common words are single pieces.
  assert len(tok.encode('return')) == 1
  assert len(tok.encode('12345')) == 5
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(texts[0]) == tok.encode(texts[0])
  # A second load reuses the file: no training, no message.
  capsys.readouterr()
  assert tokenizer.load_tokenizer(cfg).encode(texts[0]) == tok.encode(texts[0])
  assert 'trained' not in capsys.readouterr().out


def test_sentence_sampling_is_deterministic():
  texts = [f'line {i}\n' * 20 + f'end {i}' for i in range(100)]  # 300 chunks of <= 8 lines
  everything = tokenizer.sample_sentences(texts, 10_000)
  assert len(everything) == 300 and everything[0] == 'line 0\n' * 8
  some = tokenizer.sample_sentences(texts, 50)
  assert len(some) == 50 and some == tokenizer.sample_sentences(texts, 50)
  assert set(some) <= set(everything) and some != everything[:50]


def test_train_sentencepiece_writes_atomically(setup, tmp_path):
  cfg, _ = setup
  tok = tokenizer.train_sentencepiece(docs_of(cfg, 'train'), str(tmp_path / 'out' / 'sp'), 310)
  assert tok.vocab_size == 310 and tok.path == str(tmp_path / 'out' / 'sp.model')
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['sp.model', 'sp.vocab']


# ---- Pipeline -------------------------------------------------------------------------

def test_batches_shapes_targets_segments_positions(setup):
  cfg, tok = setup
  it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=4)
  batches = [next(it) for _ in range(12)]
  saw_inner_start = saw_continuation = False
  for b in batches:
    assert set(b) == set(pipeline.FEATURES)
    for k, v in b.items():
      assert v.shape == (4, SEQ), k
      assert v.dtype == (np.float32 if k == 'loss_mask' else np.int32), k
    x, y, seg, pos, mask = (b[k] for k in pipeline.FEATURES)
    assert np.all(seg > 0)  # an endless stream has no padding
    same = np.zeros_like(mask, bool)
    same[:, :-1] = seg[:, 1:] == seg[:, :-1]
    # A target is the next token of the same document, else 0 and masked out.
    np.testing.assert_array_equal(mask, same.astype(np.float32))
    np.testing.assert_array_equal(y[:, :-1][same[:, :-1]], x[:, 1:][same[:, :-1]])
    assert np.all(y[~same] == 0) and np.all(mask[:, -1] == 0)
    # Segment ids count 1, 2, ... per row; positions restart at 0 with each segment.
    starts = np.ones_like(same)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert np.all(seg[:, 0] == 1) and np.all(np.diff(seg, axis=1) >= 0)
    assert np.all(pos[starts] == 0)
    np.testing.assert_array_equal(pos[:, 1:][~starts[:, 1:]], pos[:, :-1][~starts[:, 1:]] + 1)
    # A document starting inside a row starts with BOS; the one ending before it with EOS.
    inner = starts.copy()
    inner[:, 0] = False
    assert np.all(x[inner] == tok.bos_id)
    assert np.all(x[:, :-1][inner[:, 1:]] == tok.eos_id)
    saw_inner_start |= inner.any()
    saw_continuation |= (x[:, 0] != tok.bos_id).any()
  assert saw_inner_start and saw_continuation  # the checks above were exercised


def test_first_epochs_hold_every_document_once(setup):
  cfg, tok = setup
  expected = sorted(encoded(tok, d) for d in docs_of(cfg, 'train'))
  n_tokens = sum(map(len, expected))
  n_batches = 2 * n_tokens // (4 * SEQ) + 3  # a little over two epochs
  it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=4)
  docs = split_at_bos(token_stream(next(it) for _ in range(n_batches)), tok.bos_id)
  n = len(expected)
  assert len(docs) > 2 * n
  # Concat-then-split loses nothing: each epoch is every document, whole, exactly once.
  assert sorted(docs[:n]) == expected and sorted(docs[n:2 * n]) == expected
  assert docs[:n] != docs[n:2 * n]  # reshuffled per epoch
  assert docs[:n] != [encoded(tok, d) for d in docs_of(cfg, 'train')]  # shuffled at all


def test_validation_is_one_ordered_pass(setup):
  cfg, tok = setup
  val = [encoded(tok, d) for d in docs_of(cfg, 'validation')]
  batches = list(pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=1, repeat=False))
  assert split_at_bos(token_stream(batches), tok.bos_id) == val  # unshuffled, nothing lost
  last = batches[-1]
  pad = last['segment_ids'] == 0
  assert np.all(last['inputs'][pad] == tok.pad_id) and np.all(last['loss_mask'][pad] == 0)
  # With a larger batch only the final partial batch is dropped.
  rows = len(list(pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=3,
                                            repeat=False)))
  assert rows == len(batches) // 3


def test_processes_read_disjoint_shares(setup):
  cfg, tok = setup
  shares = []
  for p in range(2):
    it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=1, process_index=p,
                                   process_count=2, repeat=False)
    shares.append(split_at_bos(token_stream(it), tok.bos_id))
  train = sorted(encoded(tok, d) for d in docs_of(cfg, 'train'))
  assert min(map(len, shares)) >= len(train) // 2
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == train


def _assert_same(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    assert set(a) == set(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize('threads,prefetch', [(2, 2), (0, 0)])
def test_resume_from_state_is_exact(setup, threads, prefetch):
  cfg, tok = setup
  cfg = copy_cfg(cfg, worker_threads=threads, prefetch=prefetch)
  make = lambda: pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=4, seed=7)
  it = make()
  stream = [next(it) for _ in range(16)]
  for k in (0, 3, 9):
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    fresh = make()
    fresh.set_state(state)
    _assert_same(stream[k:k + 7], [next(fresh) for _ in range(7)])


def test_resume_through_grain_checkpoint_handler(setup, tmp_path):
  cfg, tok = setup
  make = lambda: pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=2, seed=3)
  it = make()
  for _ in range(5):
    next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
  want = [next(it) for _ in range(4)]
  restored = handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(make()))
  _assert_same(want, [next(restored) for _ in range(4)])


def test_seed_controls_the_stream(setup):
  cfg, tok = setup
  first = lambda seed: next(pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=4,
                                                      seed=seed))['inputs']
  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))
  assert pipeline.shuffle_seed(1) != pipeline.shuffle_seed(2) - 1  # seeds decorrelated


# ---- Errors ---------------------------------------------------------------------------

def test_clear_errors(setup, tmp_path):
  cfg, tok = setup
  with pytest.raises(sources.DataError, match=r"data.text_glob '.*nothing.*' matches no files"):
    sources.get_source(copy_cfg(cfg, text_glob=str(tmp_path / 'nothing' / '*.txt')).data,
                       'train')
  (tmp_path / 'blank').mkdir()
  (tmp_path / 'blank' / 'a.txt').write_text('  \n')
  with pytest.raises(sources.DataError, match=r'none of its 1 files is non-empty UTF-8'):
    sources.get_source(copy_cfg(cfg, text_glob=str(tmp_path / 'blank' / '*.txt')).data,
                       'train')
  with pytest.raises(sources.DataError, match=r"has no split 'test'.*data.train_split"):
    sources.get_source(cfg.data, 'test')
  with pytest.raises(sources.DataError, match=r"has no split 'validation'.*val_fraction"):
    sources.get_source(copy_cfg(cfg, val_fraction=0.0).data, 'validation')
  tfds_cfg = copy_cfg(cfg, source='tfds', tfds_name='lm1b', data_dir=str(tmp_path / 'no'))
  with pytest.raises(sources.DataError, match=r"data.tfds_name 'lm1b' is not prepared"):
    sources.get_source(tfds_cfg.data, 'train')
  with pytest.raises(sources.DataError, match=r"data.tfds_name 'no_such_dataset_x'"):
    sources.get_source(copy_cfg(tfds_cfg, tfds_name='no_such_dataset_x').data, 'train')
  with pytest.raises(sources.DataError, match=r'fewer than the 64 processes'):
    pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=1, process_index=0,
                              process_count=64)


def test_tokenizer_errors(setup, tmp_path):
  cfg, tok = setup
  small = cfg.copy_and_resolve_references()
  small.model.vocab_size = 256
  with pytest.raises(ValueError, match=rf'tokenizer vocab_size {VOCAB} .* exceeds '
                                       r'model.vocab_size 256'):
    tokenizer.load_tokenizer(small)
  missing = cfg.copy_and_resolve_references()
  missing.tokenizer.update(path=str(tmp_path / 'none.model'), train_if_missing=False)
  with pytest.raises(FileNotFoundError, match=r'tokenizer.path: no tokenizer at '
                                              r'.*none.model'):
    tokenizer.load_tokenizer(missing)
  with pytest.raises(ValueError, match=r'could not train a 262-piece bpe model '
                                       r'\(tokenizer.vocab_size=262\)'):
    tokenizer.train_sentencepiece(docs_of(cfg, 'train'), str(tmp_path / 't'), 262)
  assert not list(tmp_path.glob('t.*')) and not list(tmp_path.glob('.sp-train-*'))


# ---- Other ways in --------------------------------------------------------------------

def test_tfds_source_by_name(setup):
  """A prepared TFDS dataset is read by name and text_key (the path real datasets take)."""
  cfg, _ = setup
  name = sources.local_text_builder(cfg.data).builder_config.name
  by_name = copy_cfg(cfg, source='tfds', tfds_name=f'local_text/{name}')
  assert docs_of(by_name, 'validation') == docs_of(cfg, 'validation')
  paths = copy_cfg(by_name, text_key='path')
  assert docs_of(paths, 'validation')[0].endswith('.txt')
  with pytest.raises(sources.DataError, match=r"no field data.text_key='body'"):
    docs_of(copy_cfg(by_name, text_key='body'), 'validation')


def test_train_tokenizer_tool(setup, tmp_path):
  cfg, _ = setup
  out = tmp_path / 'tok.model'
  res = subprocess.run([sys.executable, 'tools/train_tokenizer.py',
                        '--config=configs/pretrain_tiny.py',
                        f'--config.data.text_glob={cfg.data.text_glob}',
                        f'--config.data.data_dir={cfg.data.data_dir}',
                        '--config.data.val_fraction=0.2',
                        '--vocab_size=310', f'--output={out}'],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'trained a 310-piece bpe tokenizer' in res.stdout
  assert "'validation'" in res.stdout and 'bytes/token' in res.stdout
  assert tokenizer.from_path(str(out)).vocab_size == 310
  res = subprocess.run([sys.executable, 'tools/train_tokenizer.py',
                        '--config=configs/pretrain_tiny.py', '--config.data.text_glob=/no/*.x'],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and "error: data.text_glob '/no/*.x' matches no files" in res.stderr


# ---- Pre-tokenized data ------------------------------------------------------------------

def test_pretokenized_stream_equals_the_on_the_fly_stream(setup, tmp_path):
  """data.pretokenize: the ids come from an array_record copy built on first use (keyed by
  source and tokenizer); the batches and a resume are identical, a rebuild is not done."""
  from lmjax.data import tokenized
  cfg, tok = setup
  pre = copy_cfg(cfg, pretokenize=True)
  make = lambda c: pipeline.make_lm_iterator(c, tok, 'train', batch_size=4, seed=5)
  it = make(cfg)
  want = [next(it) for _ in range(12)]
  it = make(pre)
  got = [next(it) for _ in range(12)]
  _assert_same(want, got)
  root, text, _ = tokenized.directory(cfg.data, 'train', tok)
  meta = json.load(open(os.path.join(root, 'meta.json')))
  assert meta['documents'] == len(text) and meta['tokens'] > 1000
  assert meta['tokenizer_sha256'] == tok.sha256()
  stamp = os.stat(os.path.join(root, 'meta.json')).st_mtime_ns
  it = make(pre)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  fresh = make(pre)
  fresh.set_state(state)
  _assert_same(want[5:9], [next(fresh) for _ in range(4)])
  assert os.stat(os.path.join(root, 'meta.json')).st_mtime_ns == stamp  # reused
  assert not [p for p in os.listdir(os.path.dirname(root)) if '.tmp' in p]
  # Another tokenizer gets another directory, never the stale ids.
  other = tokenizer.train_sentencepiece([text[i] for i in range(len(text))],
                                        str(tmp_path / 'other'), VOCAB - 10)
  assert tokenized.directory(cfg.data, 'train', other)[0] != root


@pytest.mark.slow
def test_pretokenize_tool(setup):
  cfg, tok = setup
  res = subprocess.run([sys.executable, 'tools/pretokenize.py',
                        '--config=configs/pretrain_tiny.py',
                        f'--config.data.text_glob={cfg.data.text_glob}',
                        f'--config.data.data_dir={cfg.data.data_dir}',
                        '--config.data.val_fraction=0.2', f'--config.tokenizer.path={tok.path}',
                        '--config.model.vocab_size=320', '--config.tokenizer.vocab_size=320'],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'data[train]:' in res.stdout and 'data[validation]:' in res.stdout
  assert 'pretokenized:' in res.stdout
  res = subprocess.run([sys.executable, 'tools/pretokenize.py',
                        '--config=configs/sft_lora_tiny.py'],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "stage='sft': pretokenize is for the pretraining" in res.stderr


def test_data_shards_make_batches_independent_of_the_process_count(setup):
  """data.shards=2 read by one process = the two processes' batches of a 2-process run,
  row-concatenated (process 0's rows first, as the global batch places them); its state
  round-trips through JSON."""
  cfg, tok = setup

  def make(**kw):
    return pipeline.make_lm_iterator(cfg, tok, 'train', seed=4, **kw)
  one = pipeline.shard_iterator(make, 2, batch_size=4, process_index=0, process_count=1)
  two = [pipeline.shard_iterator(make, 2, batch_size=2, process_index=p, process_count=2)
         for p in (0, 1)]
  for _ in range(3):
    parts = [next(it) for it in two]
    want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _assert_same([want], [next(one)])
  state = json.loads(json.dumps(one.get_state()))
  want = [next(one) for _ in range(2)]
  again = pipeline.shard_iterator(make, 2, batch_size=4, process_index=0, process_count=1)
  again.set_state(state)
  _assert_same(want, [next(again) for _ in range(2)])
  with pytest.raises(sources.DataError, match=r'data.shards \(3\) must be a multiple of the 2'):
    pipeline.shard_iterator(make, 3, batch_size=4, process_index=0, process_count=2)
  with pytest.raises(sources.DataError, match='holds 1 shards, this process reads 2'):
    again.set_state({'shards': [state['shards'][0]]})
