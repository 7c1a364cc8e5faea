"""Corpus cleaning (data/quality.py, tools/prepare_data.py) on crafted corpora: exact and
near duplicates at the Jaccard threshold, each filter's boundary, decontamination of
planted eval text only, determinism across worker counts, the TFDS output and report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmjax.data import quality, sources
from util import sft_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
VOCAB = [''.join(RNG.choice(list('abcdefghijklmnopqrstuvwxyz'), int(RNG.integers(3, 9))))
         for _ in range(2000)]


def prose(seed, n_words=120, per_line=12):
  """Distinct-looking prose: random words, lines ending in a full stop."""
  rng = np.random.default_rng(seed)
  words = list(rng.choice(VOCAB, n_words))
  lines = [' '.join(words[i:i + per_line]) + '.' for i in range(0, n_words, per_line)]
  return '\n'.join(lines) + '\n'


def shingle_jaccard(a, b, n=5):
  grams = lambda t: {' '.join(t.lower().split()[i:i + n]) for i in range(len(t.split()) - n + 1)}
  x, y = grams(a), grams(b)
  return len(x & y) / len(x | y)


def mutate(text, every, seed):
  """Replaces every `every`-th word by another (fewer shared shingles)."""
  rng = np.random.default_rng(seed)
  words = text.split(' ')
  for i in range(every // 2, len(words), every):
    words[i] = str(rng.choice(VOCAB))
  return ' '.join(words)


def test_quality_rules_and_their_boundaries():
  q = quality.default_config().quality
  ok = prose(1)
  assert quality.quality_reasons(ok, q) == []
  assert quality.quality_reasons(' '.join(['word'] * 0 + ok.split()[:49]) + '.', q) == [
      'words 49 < 50']
  assert quality.quality_reasons(' '.join(ok.split()[:50]), q) == []
  long_words = ' '.join(['abcdefghijkl'] + ok.split()[1:] * 0 + ['abcdefghijk'] * 60)
  assert any(r.startswith('mean_word_len') for r in quality.quality_reasons(long_words, q))
  hashes = ok + ' #' * 13          # 13 symbols / 133 words = 0.098 <= 0.1
  assert not any('symbol' in r for r in quality.quality_reasons(hashes, q))
  assert any('symbol_word_ratio' in r for r in quality.quality_reasons(hashes + ' #' * 2, q))
  digits = ok + ' ' + '1' * 300
  assert any(r.startswith('digit_frac') for r in quality.quality_reasons(digits, q))
  lines = ok.splitlines()
  repeated = '\n'.join(lines + [lines[0]] * 5)  # 5 of 15 lines repeat: 0.33 > 0.3
  assert any(r.startswith('dup_line_frac') for r in quality.quality_reasons(repeated, q))
  assert not any(r.startswith('dup_line_frac')
                 for r in quality.quality_reasons('\n'.join(lines + [lines[0]] * 4), q))
  spam = ok + ' buy now' * 40
  reasons = quality.quality_reasons(spam, q)
  assert any(r.startswith('top_2gram_frac') for r in reasons)
  assert any(r.startswith('dup_5gram_frac') for r in reasons)
  q.min_punct_line_frac = 0.5
  assert any('punct_line_frac' in r
             for r in quality.quality_reasons(ok.replace('.', ''), q))
  q.min_words = -1  # a rule < 0 is off
  assert quality.quality_reasons(' '.join(ok.split()[:10]) + '.', q) == []


def test_sanity_rules():
  s = quality.default_config().sanity
  ok = prose(2)
  assert quality.sanity_reasons(ok, s) == []
  assert quality.sanity_reasons(ok + '\ufffd' * 3, s)[0].startswith('replacement_frac')
  assert quality.sanity_reasons(ok + '\x00\x01\x02', s)[0].startswith('control_frac')
  assert quality.sanity_reasons('1234 5678 ' * 50, s)[0].startswith('alpha_frac')


def _cfg(root, **kw):
  cfg = quality.default_config()
  cfg.data.update(source='local_text', text_glob=str(root / 'corpus' / '*.txt'),
                  data_dir=str(root / 'tfds'), val_fraction=0.0)
  cfg.splits = ('train',)
  cfg.shard_size = 4
  cfg.workers = 0
  for k, v in kw.items():
    node, *path, leaf = [cfg] + k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return cfg


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """30 distinct documents and planted problems; {file name: role}."""
  root = tmp_path_factory.mktemp('quality')
  (root / 'corpus').mkdir()
  (root / 'eval').mkdir()
  docs = {f'doc{i:02d}': prose(100 + i) for i in range(30)}
  base = docs['doc03']
  near = mutate(base, 120, seed=1)  # one word changed
  far = mutate(base, 4, seed=2)     # a quarter of the words changed
  assert shingle_jaccard(base, near) > 0.85 and shingle_jaccard(base, far) < 0.4
  eval_text = prose(999, n_words=40)
  eval_words = eval_text.split()
  docs.update({
      'exact': base.upper().replace('\n', '  \n'),      # same text, case and spaces aside
      'near': near, 'far': far,
      'short': 'too short to keep.',
      'junk': prose(5) + '\ufffd' * 20,
      'contaminated': prose(6) + ' ' + ' '.join(eval_words[5:20]) + ' ' + prose(7),
      'overlap12': prose(8) + ' ' + ' '.join(eval_words[0:12]) + ' ' + prose(9),
  })
  for name, text in docs.items():
    (root / 'corpus' / f'{name}.txt').write_text(text, encoding='utf-8')
  (root / 'eval' / 'test.jsonl').write_text(json.dumps({'question': eval_text, 'id': 1}) + '\n')
  return root


def _text(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def _kept_names(cfg, report):
  """(the source's document names in index order, the kept ones, the output source)."""
  raw = sources.get_source(cfg.data, 'train')._source  # pylint: disable=protected-access
  names = [os.path.basename(_text(raw[i]['path']))[:-4] for i in range(len(raw))]
  out = sources.get_source(_tfds_data(report), 'train')
  kept = [names[int(out._source[i]['index'])] for i in range(len(out))]  # pylint: disable=protected-access
  return names, kept, out


def _tfds_data(report):
  from lmjax import config as config_lib
  d = config_lib.base_config().data
  d.update(source='tfds', tfds_name=report['tfds_dir'], text_key='text')
  return d


def test_prepare_removes_exactly_the_planted_documents(corpus, tmp_path):
  cfg = _cfg(corpus, **{'decontam.enabled': True,
                        'decontam.eval_jsonl': str(corpus / 'eval' / '*.jsonl'),
                        'decontam.exempt': ()})
  report = quality.prepare(cfg, str(tmp_path / 'out'))
  names, kept, out = _kept_names(cfg, report)
  removed = set(names) - set(kept)
  trio = ['doc03', 'exact', 'near']  # equal, equal once normalised, one word changed
  first = min(trio, key=names.index)  # the first of a duplicate group in the source's order
  assert removed == {'contaminated', 'junk', 'short'} | (set(trio) - {first})
  assert 'far' in kept and 'overlap12' in kept
  steps = report['splits']['train']['steps']
  assert [s for s in steps] == ['sanity', 'quality', 'exact_dedup', 'decontam', 'near_dedup']
  assert {s: steps[s]['docs_in'] - steps[s]['docs_out'] for s in steps} == {
      'sanity': 1, 'quality': 1, 'exact_dedup': 1, 'decontam': 1, 'near_dedup': 1}
  reasons = {s: steps[s]['examples'][0]['reason'] for s in steps}
  assert reasons['quality'].startswith('words 4 < 50')
  pair_first = min(['doc03', 'exact'], key=names.index)
  assert reasons['exact_dedup'] == f'duplicate of document {names.index(pair_first)}'
  assert reasons['near_dedup'].startswith('near duplicate of document ')
  assert reasons['decontam'] == '3 shared 13-grams'  # 15 planted words: 3 13-grams
  s = report['splits']['train']
  assert s['documents_in'] == 37 and s['documents_out'] == 32 == len(out)
  assert s['tokens_out'] < s['tokens_in'] and report['mb_per_s'] > 0
  text = open(tmp_path / 'out' / 'report.md').read()
  assert 'near_dedup removed document' in text and '| exact_dedup | 35 | 34 |' in text
  # Deterministic: the same decisions with 2 worker processes and other shards.
  cfg2 = _cfg(corpus, **{'decontam.enabled': True, 'workers': 2, 'shard_size': 7,
                         'decontam.eval_jsonl': str(corpus / 'eval' / '*.jsonl'),
                         'decontam.exempt': (), 'name': 'again'})
  report2 = quality.prepare(cfg2, str(tmp_path / 'out2'))
  assert _kept_names(cfg2, report2)[1] == kept


def test_switches_and_the_tool(corpus, tmp_path):
  out = tmp_path / 'tool'
  res = subprocess.run(
      [sys.executable, 'tools/prepare_data.py', '--config=configs/data/prepare_stdlib.py',
       f'--out={out}', f'--config.data.text_glob={corpus}/corpus/*.txt',
       f'--config.data.data_dir={corpus}/tfds', '--config.data.val_fraction=0.0',
       "--config.splits=('train',)", '--config.near_dedup.enabled=False',
       '--config.quality.enabled=False', '--config.workers=0',
       f'--config.tokenizer_path={sft_tokenizer(tmp_path).path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.load(open(out / 'report.json'))
  assert list(report['splits']['train']['steps']) == ['sanity', 'exact_dedup']
  assert report['splits']['train']['documents_out'] == 35  # junk and exact removed
  assert report['unit'] == 'tokens'  # counted with the given sentencepiece model
  s = report['splits']['train']
  assert s['tokens_in'] > sum(len(open(p).read().split())
                              for p in (corpus / 'corpus').glob('*.txt'))
  assert '# stdlib_clean: cleaned' in res.stdout
  bad = subprocess.run([sys.executable, 'tools/prepare_data.py',
                        '--config=configs/data/prepare_stdlib.py', f'--out={out}2',
                        '--config.quality.min_wordz=3'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "unknown config key 'quality.min_wordz'" in bad.stderr


def test_near_duplicates_follow_the_jaccard_threshold():
  base = prose(42, n_words=480)
  variants = {every: mutate(base, every, seed=every) for every in (480, 60, 12, 4)}
  jac = {every: shingle_jaccard(base, v) for every, v in variants.items()}
  assert jac[480] > 0.97 and 0.8 < jac[60] < 0.88 and 0.4 < jac[12] < 0.5 and jac[4] < 0.1
  for threshold, removed in ((0.3, {480, 60, 12}), (0.7, {480, 60}), (0.92, {480})):
    cfg = quality.default_config()
    cfg.update_from_flattened_dict({'near_dedup.threshold': threshold,
                                    'quality.enabled': False, 'sanity.enabled': False,
                                    'exact_dedup.enabled': False})
    texts = [base] + list(variants.values())
    results = [quality.analyze(t, cfg, None) for t in texts]
    keep, counts = quality.decide(results, cfg)
    got = {every for every, k in zip(variants, keep[1:]) if not k}
    assert got == removed, (threshold, jac)
    assert keep[0] and counts['near_dedup'].docs_in == 5


def _only(rule, value):
  """A quality config with one rule on (at `value`), the others off."""
  q = quality.default_config().quality
  for k in q:
    if k != 'enabled':
      q[k] = -1 if isinstance(q[k], int) else -1.0
  q[rule] = value
  return q


W = 'word '
BOUNDARIES = [  # (rule, threshold, text exactly at the threshold, text just past it)
    ('min_words', 10, W * 10, W * 9),
    ('max_words', 10, W * 10, W * 11),
    ('min_mean_word_len', 3.0, 'abc ' * 10, 'abc ' * 9 + 'ab'),
    ('max_mean_word_len', 4.0, 'abcd ' * 10, 'abcd ' * 9 + 'abcde'),
    ('max_symbol_word_ratio', 0.1, W * 9 + '#', W * 8 + '# #'),
    ('max_digit_frac', 0.25, 'aaa1' * 10, 'aaa1' * 10 + '1'),
    ('max_dup_line_frac', 0.5, 'a.\nb.\na.\nb.', 'a.\na.\na.\na.\nb.'),  # 1 - 2/4, 1 - 2/5
    ('min_punct_line_frac', 0.5, 'a.\nb\nc!\nd', 'a.\nb\nc\nd'),
    # the most frequent 2-gram ('x y' twice: 4 of 10 characters) vs 3 times (6 of 6)
    ('max_top_2gram_frac', 0.4, 'x y x y aaaaaa', 'x y x y x y'),
    ('max_top_3gram_frac', 0.5, 'a b c a b c ddd eee', 'a b c a b c a b c'),
    ('max_top_4gram_frac', 0.5, 'a b c d a b c d eee fff hh', 'a b c d a b c d a b c d'),
    # duplicated 5-grams' characters: 10 of 20 vs 10 of 15
    ('max_dup_5gram_frac', 0.5, 'a b c d e a b c d e fffff ggggg', 'a b c d e a b c d e fffff'),
]


@pytest.mark.parametrize('rule,threshold,at,past', BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_quality_rule_at_its_boundary(rule, threshold, at, past):
  q = _only(rule, threshold)
  assert quality.quality_reasons(at, q) == []
  reasons = quality.quality_reasons(past, q)
  assert len(reasons) == 1, reasons


# ---- Across splits and shards, formats, and the Beam pipeline ------------------------

def _split_corpus(root, fmt='jsonl'):
  """A corpus in per-split shards: train (3 shards) holds an exact and a near copy of a
  validation document, a copy of a train document in another shard, and a text sharing
  13-grams with validation; {split: [(id, text)]}."""
  import gzip
  import pyarrow as pa
  import pyarrow.parquet as pq
  val = [(f'v{i}', prose(500 + i)) for i in range(6)]
  train = [(f't{i}', prose(600 + i)) for i in range(14)]
  train[3] = ('t3-exact-of-v2', val[2][1].upper())
  train[7] = ('t7-near-of-v4', mutate(val[4][1], 120, seed=3))
  train[11] = ('t11-exact-of-t1', train[1][1])
  words = val[0][1].split()
  train[12] = ('t12-shares-v0', prose(700) + ' ' + ' '.join(words[10:30]) + ' ' + prose(701))
  (root / 'corpus').mkdir(exist_ok=True)
  for split, docs in (('validation', [val]), ('train', [train[:5], train[5:10], train[10:]])):
    for k, part in enumerate(docs):
      if fmt == 'parquet':
        pq.write_table(pa.table({'id': [d[0] for d in part], 'text': [d[1] for d in part]}),
                       root / 'corpus' / f'{split}-{k}.parquet', row_group_size=2)
      else:
        with gzip.open(root / 'corpus' / f'{split}-{k}.jsonl.gz', 'wt') as f:
          for i, t in part:
            f.write(json.dumps({'id': i, 'text': t}) + '\n')
  return {'validation': val, 'train': train}


def _split_cfg(root, fmt='jsonl', **kw):
  cfg = quality.default_config()
  ext = 'parquet' if fmt == 'parquet' else 'jsonl.gz'
  cfg.data.update(source=fmt, files=str(root / 'corpus' / f'{{split}}-*.{ext}'), id_key='id',
                  data_dir=str(root / 'cache'))
  cfg.update(workers=0, shard_size=3, name='split_test', examples=1)
  cfg.update_from_flattened_dict(kw)
  return cfg


def _kept_ids(report, split):
  out = sources.get_source(_tfds_data(report), split)
  return sorted(int(out._source[i]['index']) for i in range(len(out)))  # pylint: disable=protected-access


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
def test_dedup_and_decontam_across_splits_and_shards(tmp_path, fmt):
  docs = _split_corpus(tmp_path, fmt)
  report = quality.prepare(_split_cfg(tmp_path, fmt), str(tmp_path / 'dedup'))
  assert _kept_ids(report, 'validation') == list(range(6))  # never removed from validation
  removed = set(range(14)) - set(_kept_ids(report, 'train'))
  assert removed == {3, 7, 11}, [docs['train'][i][0] for i in removed]
  train = report['splits']['train']['steps']
  assert train['near_dedup']['cross_split'] == 1
  assert train['near_dedup']['cross_split_examples'][0]['reason'] == (
      'near duplicate of validation document 4 (id v4)')
  # With decontamination, validation's text is evaluation text: the near copy of v4 and
  # the text sharing 13-grams with v0 go at that step.
  cfg = _split_cfg(tmp_path, fmt, **{'decontam.enabled': True})
  report = quality.prepare(cfg, str(tmp_path / 'out'))
  assert _kept_ids(report, 'validation') == list(range(6))
  removed = set(range(14)) - set(_kept_ids(report, 'train'))
  assert removed == {3, 7, 11, 12}, [docs['train'][i][0] for i in removed]
  train = report['splits']['train']['steps']
  assert train['exact_dedup']['cross_split'] == 1
  assert train['decontam']['docs_in'] - train['decontam']['docs_out'] == 2
  ex = train['exact_dedup']['cross_split_examples'][0]
  assert ex['id'] == 't3-exact-of-v2' and ex['of'] == {'split': 'validation', 'document': 2,
                                                        'id': 'v2'}
  assert ex['reason'] == 'duplicate of validation document 2 (id v2)'
  assert [e['id'] for e in train['exact_dedup']['examples']] == ['t3-exact-of-v2']
  assert train['decontam']['examples'][0]['id'] == 't7-near-of-v4'  # validation's 13-grams
  assert 'decontam' not in report['splits']['validation']['steps']
  text = open(tmp_path / 'out' / 'report.md').read()
  assert 'exact_dedup removed document 3 (id t3-exact-of-v2) (duplicate of validation' in text


def test_local_processes_stream_from_the_source(tmp_path, monkeypatch):
  """The workers read their documents themselves; the parent never reads a text (but the
  few report examples), and no result holds one."""
  _split_corpus(tmp_path)
  cfg = _split_cfg(tmp_path, workers=2)
  read = []
  real = sources.get_source

  def counting(d, split):
    src = real(d, split)
    get = src.__getitem__

    class Counted:
      name = src.name
      record_id = src.record_id

      def __len__(self):
        return len(src)

      def __getitem__(self, i):
        read.append((split, i))
        return get(i)
    return Counted()

  monkeypatch.setattr(sources, 'get_source', counting)
  results = quality.analyze_local(cfg, np.zeros(0, np.uint64), str(tmp_path))
  assert read == []  # spawned workers do not see the patch: every text was read there
  assert len(results['train']) == 14 and not any(
      isinstance(v, str) and len(v) > 100 for r in results['train'] for v in r.values())


def test_beam_direct_runner_gives_the_same_result(tmp_path):
  """apache-beam is a test dependency: this runs (never skips) wherever the suite does."""
  _split_corpus(tmp_path)
  kw = {'decontam.enabled': True, 'near_dedup.threshold': 0.5}
  local = quality.prepare(_split_cfg(tmp_path, **kw), str(tmp_path / 'local'))
  beam = quality.prepare(_split_cfg(tmp_path, **kw), str(tmp_path / 'beam'), 'DirectRunner')
  assert beam['runner'] == 'DirectRunner'
  for split in ('train', 'validation'):
    assert _kept_ids(beam, split) == _kept_ids(local, split)
    a, b = local['splits'][split], beam['splits'][split]
    assert a == b


def test_without_beam_the_runner_flag_names_the_package(tmp_path, monkeypatch):
  import builtins
  real = builtins.__import__

  def no_beam(name, *args, **kwargs):
    if name.startswith('apache_beam'):
      raise ImportError(name)
    return real(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_beam)
  from lmjax.data import beam_prepare
  with pytest.raises(beam_prepare.BeamError, match=r'pip install "lmjax\[beam\]"'):
    beam_prepare.run(quality.default_config(), np.zeros(0, np.uint64), str(tmp_path),
                     'DirectRunner', [])


def test_vectorized_rules_match_their_plain_definitions():
  """The numpy counts against the rules written out in Python, on varied text (Unicode
  letters, digits and spaces, control characters, repeated n-grams, ties)."""
  import collections
  import unicodedata
  rng = np.random.default_rng(3)
  pieces = VOCAB[:30] + ['Ünïcödé', 'ΑΒΓ', '١٢٣', '\u2003', '\x1c', '\x00', '\ufffd', '42',
                         '#', '...', 'İstanbul', '\n', '\t', 'ǅ']
  for _ in range(40):
    text = ' '.join(rng.choice(pieces, int(rng.integers(0, 300))))
    lower = text.lower().split()
    c = quality.char_counts(text)
    assert c['alpha'] == sum(ch.isalpha() for ch in text)
    assert c['digit'] == sum(ch.isdigit() for ch in text)
    assert c['space'] == sum(ch.isspace() for ch in text)
    assert c['control'] == sum(unicodedata.category(ch) == 'Cc' and ch not in '\n\t\r'
                               for ch in text)
    w = quality.Words(text)
    assert list(w.lengths) == [len(x) for x in lower] and len(w) == len(lower)
    for n in (2, 3, 4):
      expect = 0.0
      if len(lower) >= n:
        counts = collections.Counter(tuple(lower[i:i + n]) for i in range(len(lower) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count > 1:
          expect = count * sum(map(len, gram)) / max(sum(map(len, lower)), 1)
      assert quality._top_ngram_frac(w, n) == pytest.approx(expect)  # pylint: disable=protected-access
    grams = [tuple(lower[i:i + 5]) for i in range(len(lower) - 4)]
    counts = collections.Counter(grams)
    dup = np.zeros(len(lower), bool)
    for i, g in enumerate(grams):
      if counts[g] > 1:
        dup[i:i + 5] = True
    expect = sum(len(x) for x, d in zip(lower, dup) if d) / max(sum(map(len, lower)), 1)
    assert quality._dup_ngram_frac(w, 5) == pytest.approx(expect if len(lower) >= 5 else 0)  # pylint: disable=protected-access
    distinct = {' '.join(lower[i:i + 13]) for i in range(max(len(lower) - 12, 1))} if lower else set()
    assert len(quality.ngram_hashes(text, 13)) == len(distinct)


def test_minhash_is_seeded_and_estimates_jaccard():
  base = prose(42, n_words=480)
  other = mutate(base, 12, seed=12)
  cfg = quality.default_config()
  a1 = quality.analyze(base, cfg)['minhash']
  assert a1.dtype == np.uint32 and len(a1) == 128
  assert np.array_equal(a1, quality.analyze(base, cfg)['minhash'])
  cfg.near_dedup.seed = 2
  assert not np.array_equal(a1, quality.analyze(base, cfg)['minhash'])
  cfg.near_dedup.seed = 1
  est = np.mean(a1 == quality.analyze(other, cfg)['minhash'])
  assert abs(est - shingle_jaccard(base, other)) < 0.12
