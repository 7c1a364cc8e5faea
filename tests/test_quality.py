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
