"""Corpus cleaning before training: deduplication, quality filters, decontamination.

tools/prepare_data.py runs `prepare(cfg, out)`: the documents of a source (cfg.data: local
text files, a TFDS dataset, or JSONL / Parquet / save_to_disk shards, as the training
configs name them; data.id_key's record ids appear in the report) go through these steps,
each switchable in cfg, in this order:

  sanity       encoding / language sanity: replacement characters (U+FFFD), control
               characters, too few letters.
  quality      Gopher / C4-style heuristics: word count, mean word length, symbol-to-word
               and digit ratios, duplicate lines, the most frequent 2/3/4-gram's share of
               characters, duplicated 5-grams' share, lines ending in punctuation.
  exact_dedup  a hash of the normalised text (lowercase, whitespace collapsed): the first
               document of each group is kept.
  decontam     drops documents sharing a word n-gram (13 by default, as GPT-3's) with the
               evaluation texts named in cfg.decontam.
  near_dedup   MinHash LSH (datasketch) over word 5-gram shingles at a Jaccard threshold,
               candidates confirmed by their signatures' estimated Jaccard: the first
               document of each near-duplicate cluster is kept.

Documents are analysed in parallel (a multiprocessing pool over shards of the split, each
worker reading its documents from the source itself: only hashes, signatures and verdicts
come back, so a corpus larger than memory works), then decided in document order (the
result does not depend on the number of workers), then written as a new TFDS dataset
(array_record) that training reads with data.source='tfds', data.tfds_name=<its dir>.
A report (report.json, report.md) gives documents and tokens in/out per step, examples of
what each step removed, and throughput.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import time
import unicodedata
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lmjax.data import sources
from lmjax.data.sources import DataError

MINHASH_SCHEME = 'affine32'  # datasketch >= 2.0's default, named so signatures round-trip
STEPS = ('sanity', 'quality', 'exact_dedup', 'decontam', 'near_dedup')
_WORD = re.compile(r'\S+')
_END_PUNCT = tuple('.!?"\'')


def default_config() -> ml_collections.ConfigDict:
  """Every field of a preparation config, with its default."""
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict()
  # The source, as in training: local_text / tfds, or a corpus of JSONL / Parquet /
  # save_to_disk shards (data.files; data.id_key names records in the report).
  cfg.data = config_lib.base_config().data
  cfg.splits = ('train', 'validation')
  cfg.name = ''               # the output dataset's name ('' = the source's + '_clean')
  cfg.workers = 2             # analysis processes (0 = in this process)
  cfg.shard_size = 256        # documents per work unit
  cfg.tokenizer_path = ''     # tokenizer to count tokens with: a sentencepiece .model, a
                              # tokenizer.json or a model directory ('' = words)
  cfg.examples = 3            # removed documents shown per step in the report
  cfg.sanity = dict(enabled=True, max_replacement_frac=0.001, max_control_frac=0.001,
                    min_alpha_frac=0.25)
  # Thresholds of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020); a value < 0
  # disables that rule.
  cfg.quality = dict(
      enabled=True, min_words=50, max_words=100_000, min_mean_word_len=3.0,
      max_mean_word_len=10.0, max_symbol_word_ratio=0.1, max_digit_frac=0.25,
      max_dup_line_frac=0.3, max_top_2gram_frac=0.20, max_top_3gram_frac=0.18,
      max_top_4gram_frac=0.16, max_dup_5gram_frac=0.15, min_punct_line_frac=-1.0)
  cfg.exact_dedup = dict(enabled=True)
  cfg.near_dedup = dict(enabled=True, threshold=0.8, num_perm=128, ngram=5, seed=1)
  # Evaluation texts to keep out of training: text files (globs, comma-separated) and
  # JSONL files (every string value of each line is a text); applied to every split
  # except those listed in `exempt`.
  cfg.decontam = dict(enabled=False, ngram=13, eval_globs='', eval_jsonl='',
                      exempt=('validation',))
  cfg.lock()  # a config file updates these fields; a typo in one fails
  return cfg


# ---- Per-document analysis -----------------------------------------------------------

def normalize(text: str) -> str:
  """Lowercase, whitespace collapsed: what exact dedup hashes."""
  return ' '.join(text.lower().split())


def _hash64(s: str) -> int:
  return int.from_bytes(hashlib.blake2b(s.encode('utf-8'), digest_size=8).digest(), 'little')


def ngram_hashes(text: str, n: int) -> set[int]:
  """64-bit hashes of the normalised text's word n-grams (the whole text if shorter)."""
  words = normalize(text).split()
  if len(words) < n:
    return {_hash64(' '.join(words))} if words else set()
  return {_hash64(' '.join(words[i:i + n])) for i in range(len(words) - n + 1)}


def sanity_reasons(text: str, s) -> list[str]:
  n = max(len(text), 1)
  out = []
  repl = text.count('\ufffd') / n
  if repl > s.max_replacement_frac:
    out.append(f'replacement_frac {repl:.4f}')
  control = sum(1 for c in text if unicodedata.category(c) == 'Cc' and c not in '\n\t\r') / n
  if control > s.max_control_frac:
    out.append(f'control_frac {control:.4f}')
  visible = [c for c in text if not c.isspace()]
  alpha = sum(c.isalpha() for c in visible) / max(len(visible), 1)
  if alpha < s.min_alpha_frac:
    out.append(f'alpha_frac {alpha:.3f}')
  return out


def _top_ngram_frac(words: list[str], n: int) -> float:
  """The most frequent word n-gram's characters over all words' characters (Gopher)."""
  if len(words) < n:
    return 0.0
  counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  gram, count = counts.most_common(1)[0]
  if count < 2:
    return 0.0
  return count * sum(map(len, gram)) / max(sum(map(len, words)), 1)


def _dup_ngram_frac(words: list[str], n: int) -> float:
  """Characters in word n-grams that occur more than once, over all characters (each
  word counted once; Gopher's duplicate n-gram fraction)."""
  if len(words) < n:
    return 0.0
  counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  dup = np.zeros(len(words), bool)
  for i in range(len(words) - n + 1):
    if counts[tuple(words[i:i + n])] > 1:
      dup[i:i + n] = True
  return float(sum(len(w) for w, d in zip(words, dup) if d)) / max(sum(map(len, words)), 1)


def quality_reasons(text: str, q) -> list[str]:
  """The quality rules `text` fails (name and value), [] when it passes."""
  words = _WORD.findall(text)
  out = []

  def check(on, bad, what):
    if on and bad:
      out.append(what)

  n = len(words)
  check(q.min_words >= 0, n < q.min_words, f'words {n} < {q.min_words}')
  check(q.max_words >= 0, n > q.max_words, f'words {n} > {q.max_words}')
  if n:
    mean = sum(map(len, words)) / n
    check(q.min_mean_word_len >= 0, mean < q.min_mean_word_len, f'mean_word_len {mean:.2f}')
    check(q.max_mean_word_len >= 0, mean > q.max_mean_word_len, f'mean_word_len {mean:.2f}')
    symbols = text.count('#') + text.count('...') + text.count('\u2026')
    check(q.max_symbol_word_ratio >= 0, symbols / n > q.max_symbol_word_ratio,
          f'symbol_word_ratio {symbols / n:.3f}')
  digits = sum(c.isdigit() for c in text) / max(len(text), 1)
  check(q.max_digit_frac >= 0, digits > q.max_digit_frac, f'digit_frac {digits:.3f}')
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if lines:
    dup_lines = 1 - len(set(lines)) / len(lines)
    check(q.max_dup_line_frac >= 0, dup_lines > q.max_dup_line_frac,
          f'dup_line_frac {dup_lines:.3f}')
    punct = sum(l.endswith(_END_PUNCT) for l in lines) / len(lines)
    check(q.min_punct_line_frac >= 0, punct < q.min_punct_line_frac,
          f'punct_line_frac {punct:.3f}')
  lower = [w.lower() for w in words]
  for k in (2, 3, 4):
    limit = q[f'max_top_{k}gram_frac']
    if limit >= 0:
      frac = _top_ngram_frac(lower, k)
      check(True, frac > limit, f'top_{k}gram_frac {frac:.3f}')
  if q.max_dup_5gram_frac >= 0:
    frac = _dup_ngram_frac(lower, 5)
    check(True, frac > q.max_dup_5gram_frac, f'dup_5gram_frac {frac:.3f}')
  return out


class _Worker:
  """Per-process state: the source, the MinHash permutations, the eval n-grams."""
  cfg = None
  source = None
  perms = None
  eval_ngrams = frozenset()
  tokenizer = None


def _init_worker(cfg_dict: dict, split: str, eval_ngrams: frozenset) -> None:
  cfg = ml_collections.ConfigDict(cfg_dict)
  _Worker.cfg, _Worker.source = cfg, sources.get_source(cfg.data, split)
  _Worker.eval_ngrams = eval_ngrams
  if cfg.near_dedup.enabled:
    from datasketch import MinHash  # pylint: disable=import-outside-toplevel
    _Worker.perms = MinHash(num_perm=cfg.near_dedup.num_perm, seed=cfg.near_dedup.seed,
                            scheme=MINHASH_SCHEME).permutations
  if cfg.tokenizer_path:
    from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    _Worker.tokenizer = tokenizer_lib.from_path(cfg.tokenizer_path)


def analyze(text: str, cfg, perms=None, eval_ngrams=frozenset(), tokenizer=None) -> dict:
  """What the decisions need of one document (no text kept)."""
  out = {'bytes': len(text.encode('utf-8')),
         'tokens': len(tokenizer.encode(text)) if tokenizer else len(_WORD.findall(text))}
  if cfg.sanity.enabled:
    out['sanity'] = sanity_reasons(text, cfg.sanity)
  if cfg.quality.enabled:
    out['quality'] = quality_reasons(text, cfg.quality)
  if cfg.exact_dedup.enabled:
    out['exact'] = hashlib.sha1(normalize(text).encode('utf-8')).digest()
  if cfg.decontam.enabled and eval_ngrams:
    hits = ngram_hashes(text, cfg.decontam.ngram) & eval_ngrams
    out['decontam'] = [f'{len(hits)} shared {cfg.decontam.ngram}-grams'] if hits else []
  if cfg.near_dedup.enabled:
    from datasketch import MinHash  # pylint: disable=import-outside-toplevel
    words = normalize(text).split()
    n = cfg.near_dedup.ngram
    grams = {' '.join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
    m = MinHash(num_perm=cfg.near_dedup.num_perm, seed=cfg.near_dedup.seed, permutations=perms,
                scheme=MINHASH_SCHEME if perms is not None else None)
    m.update_batch([g.encode('utf-8') for g in grams])
    out['minhash'] = m.hashvalues
  return out


def _analyze_shard(bounds: tuple[int, int]) -> list[dict]:
  w = _Worker
  return [analyze(w.source[i], w.cfg, w.perms, w.eval_ngrams, w.tokenizer)
          for i in range(*bounds)]


# ---- Evaluation texts (decontamination) ----------------------------------------------

def eval_texts(d) -> list[str]:
  """The texts cfg.decontam names: files of eval_globs, string values of eval_jsonl lines."""
  texts = []
  if d.eval_globs:
    _, files = sources.resolve_glob(d.eval_globs)
    texts += [t for t in map(sources._read_text, files) if t]  # pylint: disable=protected-access
  for pattern in [p for p in d.eval_jsonl.split(',') if p.strip()]:
    _, files = sources.resolve_glob(pattern.strip())
    for path in files:
      with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
          except ValueError as e:
            raise DataError(f'{path}:{n}: decontam.eval_jsonl: not JSON ({e})') from None
          texts.extend(_strings(obj))
  return texts


def _strings(obj) -> list[str]:
  if isinstance(obj, str):
    return [obj]
  if isinstance(obj, dict):
    return [s for v in obj.values() for s in _strings(v)]
  if isinstance(obj, (list, tuple)):
    return [s for v in obj for s in _strings(v)]
  return []


# ---- The run -----------------------------------------------------------------------

@dataclasses.dataclass
class StepCount:
  docs_in: int = 0
  docs_out: int = 0
  tokens_in: int = 0
  tokens_out: int = 0
  removed: list = dataclasses.field(default_factory=list)  # (index, reason) examples


def decide(results: list[dict], cfg) -> tuple[np.ndarray, dict[str, StepCount]]:
  """Keep mask over the documents and per-step counts: the steps in STEPS order, each
  on the documents the previous ones kept, first occurrences kept by the dedups."""
  keep = np.ones(len(results), bool)
  counts = {}
  lsh = None
  if cfg.near_dedup.enabled:
    from datasketch import MinHash, MinHashLSH  # pylint: disable=import-outside-toplevel
    lsh = MinHashLSH(threshold=cfg.near_dedup.threshold, num_perm=cfg.near_dedup.num_perm)
  for step in STEPS:
    if not cfg[step].enabled or (step == 'decontam' and not any('decontam' in r
                                                                for r in results)):
      continue
    c = counts[step] = StepCount()
    seen = {}
    for i, r in enumerate(results):
      if not keep[i]:
        continue
      c.docs_in += 1
      c.tokens_in += r['tokens']
      reason = None
      if step in ('sanity', 'quality', 'decontam'):
        reason = '; '.join(r.get(step, [])) or None
      elif step == 'exact_dedup':
        first = seen.setdefault(r['exact'], i)
        reason = f'duplicate of document {first}' if first != i else None
      else:  # near_dedup: query the kept documents so far, then index this one
        m = MinHash(num_perm=cfg.near_dedup.num_perm, hashvalues=r['minhash'],
                    scheme=MINHASH_SCHEME)
        # LSH candidates, confirmed by their estimated Jaccard (LSH alone also returns
        # some pairs below the threshold).
        similar = [j for j in lsh.query(m) if np.mean(results[j]['minhash'] == r['minhash'])
                   >= cfg.near_dedup.threshold]
        if similar:
          reason = f'near duplicate of document {min(similar)}'
        else:
          lsh.insert(i, m)
      if reason:
        keep[i] = False
        if len(c.removed) < cfg.examples:
          c.removed.append((i, reason))
      else:
        c.docs_out += 1
        c.tokens_out += r['tokens']
  return keep, counts


def _shards(n: int, size: int) -> list[tuple[int, int]]:
  return [(s, min(s + size, n)) for s in range(0, n, size)]


def analyze_split(cfg, split: str, eval_ngrams: frozenset) -> list[dict]:
  """analyze() of every document of `split`, in order (cfg.workers processes)."""
  source = sources.get_source(cfg.data, split)
  shards = _shards(len(source), max(int(cfg.shard_size), 1))
  args = (cfg.to_dict(), split, eval_ngrams)
  if cfg.workers <= 0:
    _init_worker(*args)
    return [r for s in shards for r in _analyze_shard(s)]
  ctx = multiprocessing.get_context('spawn')  # no forked JAX / TFDS state
  with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=args) as pool:
    return [r for part in pool.imap(_analyze_shard, shards) for r in part]


def prepare(cfg, out_dir: str) -> dict:
  """Cleans every split of cfg.data into a TFDS dataset under out_dir; returns the report
  (also written to out_dir/report.json and report.md)."""
  t0 = time.perf_counter()
  name = cfg.name or _default_name(cfg)
  evals = frozenset()
  if cfg.decontam.enabled:
    texts = eval_texts(cfg.decontam)
    if not texts:
      raise DataError('decontam.enabled but decontam.eval_globs / eval_jsonl name no text')
    evals = frozenset().union(*(ngram_hashes(t, cfg.decontam.ngram) for t in texts))
  report = {'name': name, 'source': None, 'splits': {}, 'config': cfg.to_dict(),
            'unit': 'tokens' if cfg.tokenizer_path else 'words'}
  keeps = {}
  for split in cfg.splits:
    source = sources.get_source(cfg.data, split)
    report['source'] = source.name.rsplit('[', 1)[0]
    ts = time.perf_counter()
    exempt = split in tuple(cfg.decontam.exempt)
    results = analyze_split(cfg, split, frozenset() if exempt else evals)
    analysis_s = time.perf_counter() - ts
    keep, counts = decide(results, cfg)
    keeps[split] = np.flatnonzero(keep)
    total_bytes = sum(r['bytes'] for r in results)
    report['splits'][split] = {
        'documents_in': len(results), 'documents_out': int(keep.sum()),
        'tokens_in': sum(r['tokens'] for r in results),
        'tokens_out': sum(r['tokens'] for r, k in zip(results, keep) if k),
        'analysis_s': analysis_s, 'docs_per_s': len(results) / max(analysis_s, 1e-9),
        'mb_per_s': total_bytes / 1e6 / max(analysis_s, 1e-9),
        'steps': {step: {**{k: v for k, v in dataclasses.asdict(c).items()
                            if k != 'removed'},
                         'examples': [_example(source, cfg.data, i, why)
                                      for i, why in c.removed]}
                  for step, c in counts.items()}}
  tfds_dir = write_dataset(cfg, name, keeps, out_dir)
  report['tfds_dir'] = tfds_dir
  report['total_s'] = time.perf_counter() - t0
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2, default=str)
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(summary(report))
  return report


def _example(source, d, index: int, reason: str) -> dict:
  """A removed document for the report: its index, reason, text; with data.id_key its id
  and the ids of the documents the reason names (the duplicates' firsts)."""
  out = {'document': index, 'reason': reason, 'text': source[index][:300]}
  if d.get('id_key') and hasattr(source, 'record_id'):
    out['id'] = source.record_id(index)
    out['reason'] = re.sub(r'document (\d+)', lambda m: f'{m[0]} (id '
                           f'{source.record_id(int(m[1]))})', reason)
  return out


def _default_name(cfg) -> str:
  d = cfg.data
  if d.source == 'local_text':
    base = sources.dataset_name(d.text_glob, d.val_fraction)
  elif d.source == 'tfds':
    base = re.sub(r'[^a-z0-9_]+', '_', d.tfds_name.lower())
  else:
    from lmjax.data import corpora  # pylint: disable=import-outside-toplevel
    base = corpora.dataset_name(d)
  return base + '_clean'


def summary(report: dict) -> str:
  unit = report['unit']
  lines = [f'# {report["name"]}: cleaned {report["source"]}', '',
           f'Output (TFDS, array_record): `{report.get("tfds_dir")}`; train with '
           f"`--config.data.source=tfds --config.data.tfds_name={report.get('tfds_dir')}`.", '']
  for split, s in report['splits'].items():
    lines += [f'## {split}: {s["documents_in"]} -> {s["documents_out"]} documents, '
              f'{s["tokens_in"]:,} -> {s["tokens_out"]:,} {unit}', '',
              f'Analysis {s["analysis_s"]:.1f} s: {s["docs_per_s"]:,.0f} documents/s, '
              f'{s["mb_per_s"]:.2f} MB/s.', '',
              f'| step | documents in | out | {unit} in | out |', '|---|---|---|---|---|']
    for step, c in s['steps'].items():
      lines.append(f'| {step} | {c["docs_in"]} | {c["docs_out"]} | {c["tokens_in"]:,} | '
                   f'{c["tokens_out"]:,} |')
    lines.append('')
    for step, c in s['steps'].items():
      for ex in c['examples']:
        snippet = ex['text'][:120].replace('\n', ' ').replace('|', '/')
        name = f'{ex["document"]} (id {ex["id"]})' if 'id' in ex else ex['document']
        lines.append(f'- {step} removed document {name} ({ex["reason"]}): `{snippet}`')
    lines.append('')
  return '\n'.join(lines)


# ---- The output dataset ----------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class PreparedTextConfig(tfds.core.BuilderConfig):
  data: dict = dataclasses.field(default_factory=dict)   # the source (cfg.data)
  keep: dict = dataclasses.field(default_factory=dict)   # split -> path of kept indices


class PreparedText(tfds.core.GeneratorBasedBuilder):
  """The documents of a source that prepare() kept ({'text', 'index'}: the source index)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return self.dataset_info_from_configs(
        description='A cleaned text corpus (lmjax tools/prepare_data.py).',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'index': tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, path)
            for split, path in self.builder_config.keep.items()}

  def _generate_examples(self, split, path):
    source = sources.get_source(ml_collections.ConfigDict(self.builder_config.data), split)
    for i in np.load(path):
      yield int(i), {'text': source[int(i)], 'index': int(i)}


def write_dataset(cfg, name: str, keeps: dict[str, np.ndarray], out_dir: str) -> str:
  """The kept documents as a TFDS dataset (array_record) under out_dir; its directory."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, idx in keeps.items():
    if len(idx) == 0:
      continue  # TFDS cannot write an empty split
    paths[split] = os.path.join(out_dir, f'keep_{split}.npy')
    np.save(paths[split], idx)
  if not paths:
    raise DataError('every document was removed: nothing to write (see the report)')
  config = PreparedTextConfig(name=name, version='1.0.0', data=cfg.data.to_dict(),
                              keep=paths)
  builder = PreparedText(config=config, data_dir=os.path.join(out_dir, 'tfds'),
                         file_format='array_record')
  with sources._quiet_tfds():  # pylint: disable=protected-access
    builder.download_and_prepare()
  return builder.data_dir
