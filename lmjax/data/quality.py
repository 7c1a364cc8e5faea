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

from lmjax import config as config_lib
from lmjax.data import corpora, sources
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.data.sources import DataError

STEPS = ('sanity', 'quality', 'exact_dedup', 'decontam', 'near_dedup')
_WORD = re.compile(r'\S+')
_END_PUNCT = tuple('.!?"\'')


def default_config() -> ml_collections.ConfigDict:
  """Every field of a preparation config, with its default."""
  cfg = ml_collections.ConfigDict()
  # The source, as in training: local_text / tfds, or a corpus of JSONL / Parquet /
  # save_to_disk shards (data.files; data.id_key names records in the report).
  cfg.data = config_lib.base_config().data
  cfg.splits = ('train', 'validation')
  # Held-out splits: deduplicated first, so a document of another split that duplicates
  # one of theirs (exactly or nearly) is removed from that split, not from them; never
  # decontaminated; with decontam.held_out, evaluation text for the other splits.
  cfg.held_out = ('validation',)
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
  # held_out: the held-out splits' documents are evaluation text too.
  cfg.decontam = dict(enabled=False, ngram=13, eval_globs='', eval_jsonl='',
                      exempt=('validation',), held_out=True)
  cfg.lock()  # a config file updates these fields; a typo in one fails
  return cfg


# ---- Per-document analysis -----------------------------------------------------------
#
# Every per-character and per-n-gram count runs in numpy over arrays built once per
# document (code points, word ids, word hashes), not in Python loops: the rules' values are
# the same as their plain-Python definitions (tests/test_quality.py checks them against
# each other), at about 20x the speed.

def normalize(text: str) -> str:
  """Lowercase, whitespace collapsed: what exact dedup hashes."""
  return ' '.join(text.lower().split())


_ALPHA, _DIGIT, _SPACE, _CONTROL = 1, 2, 4, 8


def _char_flags(c: str) -> int:
  return ((_ALPHA if c.isalpha() else 0) | (_DIGIT if c.isdigit() else 0)
          | (_SPACE if c.isspace() else 0)
          | (_CONTROL if unicodedata.category(c) == 'Cc' and c not in '\n\t\r' else 0))


_ASCII_FLAGS = np.array([_char_flags(chr(i)) for i in range(128)], np.uint8)


def char_counts(text: str) -> dict[str, int]:
  """Characters that are letters, digits, whitespace and control characters (Unicode
  categories as str.isalpha / isdigit / isspace and category Cc but newline, tab, CR)."""
  cp = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)
  flags = _ASCII_FLAGS[np.minimum(cp, 127)]
  wide = cp > 127
  if wide.any():  # the distinct non-ASCII code points, classified once each
    uniq, inverse = np.unique(cp[wide], return_inverse=True)
    flags[wide] = np.array([_char_flags(chr(c)) for c in uniq.tolist()], np.uint8)[inverse]
  return {name: int(np.count_nonzero(flags & bit)) for name, bit in
          (('alpha', _ALPHA), ('digit', _DIGIT), ('space', _SPACE), ('control', _CONTROL))}


_M1, _M2 = np.uint64(0xff51afd7ed558ccd), np.uint64(0xc4ceb9fe1a85ec53)
_MUL = np.uint64(0x9e3779b97f4a7c15)


def _fmix64(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finalizer: every input bit affects every output bit."""
  h = h ^ (h >> np.uint64(33))
  h = h * _M1
  h = h ^ (h >> np.uint64(33))
  h = h * _M2
  return h ^ (h >> np.uint64(33))


_SEED = np.uint64(0x243f6a8885a308d3)


class Words:
  """A document's normalised text (lowercase, whitespace collapsed) and its words as
  arrays: character lengths and 64-bit content hashes (the same word hashes the same in
  every document, process and run), computed over the UTF-8 bytes in numpy.

  A word's hash is the sum over its bytes of fmix64(position in the word, byte): a random
  64-bit value per (position, byte) pair, so two different words collide with
  probability ~2^-64."""

  def __init__(self, text: str):
    self.text = ' '.join(text.lower().split())
    self.utf8 = self.text.encode('utf-8', 'surrogatepass')
    b = np.frombuffer(self.utf8, np.uint8)
    if len(b) == 0:
      self.lengths = np.zeros(0, np.int64)
      self.hashes = np.zeros(0, np.uint64)
      return
    spaces = np.flatnonzero(b == 32)
    starts = np.concatenate([[0], spaces + 1])
    word = np.cumsum(b == 32)            # the word of each byte (spaces: the next word's)
    pos = np.arange(len(b)) - starts[word]
    v = _fmix64((pos.astype(np.uint64) << np.uint64(8) | b) ^ _SEED)
    v[spaces] = 0
    self.hashes = np.add.reduceat(v, starts)
    chars = (b & 0xC0) != 0x80           # a character's first byte (not a continuation)
    chars[spaces] = False
    self.lengths = np.add.reduceat(chars.astype(np.int64), starts)

  def __len__(self) -> int:
    return len(self.hashes)

  def ngram_hashes(self, n: int) -> np.ndarray:
    """64-bit hashes of the word n-grams, in order (one hash of all words if fewer than n,
    none if no words)."""
    h = self.hashes
    if len(h) == 0:
      return h
    k = min(n, len(h))
    out = h[:len(h) - k + 1].copy()
    for j in range(1, k):
      out = out * _MUL + h[j:len(h) - k + 1 + j]
    return _fmix64(out)


def _distinct(h: np.ndarray) -> np.ndarray:
  """The distinct values of a uint64 array, sorted (np.unique, without its overheads)."""
  h = np.sort(h)
  return h[np.concatenate([[True], h[1:] != h[:-1]])] if len(h) else h


def ngram_hashes(text: str, n: int) -> np.ndarray:
  """The distinct 64-bit hashes of the normalised text's word n-grams (the whole text if
  shorter), sorted."""
  return _distinct(Words(text).ngram_hashes(n))


def sanity_reasons(text: str, s, counts: dict | None = None) -> list[str]:
  counts = counts or char_counts(text)
  n = max(len(text), 1)
  out = []
  repl = text.count('\ufffd') / n
  if repl > s.max_replacement_frac:
    out.append(f'replacement_frac {repl:.4f}')
  control = counts['control'] / n
  if control > s.max_control_frac:
    out.append(f'control_frac {control:.4f}')
  alpha = counts['alpha'] / max(len(text) - counts['space'], 1)
  if alpha < s.min_alpha_frac:
    out.append(f'alpha_frac {alpha:.3f}')
  return out


def _ngram_counts(w: Words, n: int) -> np.ndarray:
  """How often each position's word n-gram occurs in the document."""
  h = w.ngram_hashes(n)
  order = np.argsort(h)
  sorted_h = h[order]
  run_start = np.flatnonzero(np.concatenate([[True], sorted_h[1:] != sorted_h[:-1]]))
  runs = np.diff(np.append(run_start, len(h)))
  counts = np.empty(len(h), np.int64)
  counts[order] = np.repeat(runs, runs)
  return counts


def _top_ngram_frac(w: Words, n: int) -> float:
  """The most frequent word n-gram's characters over all words' characters (Gopher; of
  equally frequent n-grams, the first to occur)."""
  if len(w) < n:
    return 0.0
  counts = _ngram_counts(w, n)
  start = int(np.argmax(counts))  # the first position of a most frequent n-gram
  if counts[start] < 2:
    return 0.0
  return float(counts[start] * w.lengths[start:start + n].sum()) / max(int(w.lengths.sum()),
                                                                       1)


def _dup_ngram_frac(w: Words, n: int) -> float:
  """Characters in word n-grams that occur more than once, over all characters (each
  word counted once; Gopher's duplicate n-gram fraction)."""
  if len(w) < n:
    return 0.0
  starts = np.flatnonzero(_ngram_counts(w, n) > 1)
  cover = np.zeros(len(w) + 1, np.int64)
  np.add.at(cover, starts, 1)
  np.add.at(cover, starts + n, -1)
  dup = np.cumsum(cover[:-1]) > 0
  return float(w.lengths[dup].sum()) / max(int(w.lengths.sum()), 1)


def quality_reasons(text: str, q, counts: dict | None = None,
                    words: Words | None = None) -> list[str]:
  """The quality rules `text` fails (name and value), [] when it passes."""
  counts = counts or char_counts(text)
  out = []

  def check(on, bad, what):
    if on and bad:
      out.append(what)

  n = len(words) if words is not None else len(text.split())
  check(q.min_words >= 0, n < q.min_words, f'words {n} < {q.min_words}')
  check(q.max_words >= 0, n > q.max_words, f'words {n} > {q.max_words}')
  if n:
    mean = (len(text) - counts['space']) / n  # the words' characters: all but whitespace
    check(q.min_mean_word_len >= 0, mean < q.min_mean_word_len, f'mean_word_len {mean:.2f}')
    check(q.max_mean_word_len >= 0, mean > q.max_mean_word_len, f'mean_word_len {mean:.2f}')
    symbols = text.count('#') + text.count('...') + text.count('\u2026')
    check(q.max_symbol_word_ratio >= 0, symbols / n > q.max_symbol_word_ratio,
          f'symbol_word_ratio {symbols / n:.3f}')
  digits = counts['digit'] / max(len(text), 1)
  check(q.max_digit_frac >= 0, digits > q.max_digit_frac, f'digit_frac {digits:.3f}')
  if q.max_dup_line_frac >= 0 or q.min_punct_line_frac >= 0:
    lines = [l for l in map(str.strip, text.splitlines()) if l]
    if lines and q.max_dup_line_frac >= 0:
      dup_lines = 1 - len(set(lines)) / len(lines)
      check(True, dup_lines > q.max_dup_line_frac, f'dup_line_frac {dup_lines:.3f}')
    if lines and q.min_punct_line_frac >= 0:
      punct = sum(map(_ends_in_punct, lines)) / len(lines)
      check(True, punct < q.min_punct_line_frac, f'punct_line_frac {punct:.3f}')
  if any(q[f'max_top_{k}gram_frac'] >= 0 for k in (2, 3, 4)) or q.max_dup_5gram_frac >= 0:
    words = words or Words(text)
    for k in (2, 3, 4):
      limit = q[f'max_top_{k}gram_frac']
      if limit >= 0:
        frac = _top_ngram_frac(words, k)
        check(True, frac > limit, f'top_{k}gram_frac {frac:.3f}')
    if q.max_dup_5gram_frac >= 0:
      frac = _dup_ngram_frac(words, 5)
      check(True, frac > q.max_dup_5gram_frac, f'dup_5gram_frac {frac:.3f}')
  return out


def _ends_in_punct(line: str) -> bool:
  return line.endswith(_END_PUNCT)


# ---- MinHash ------------------------------------------------------------------------
#
# A signature is, for each of num_perm seeded hash functions h(x) = (a * x + b) mod 2^64
# >> 32 (a odd: multiply-shift, Dietzfelbinger et al. 1997), the minimum of h over the
# 64-bit hashes of the document's distinct word n-grams: uint32 values, a function of the
# text and near_dedup.seed only (the same in every process, run and runner). Two
# signatures agree at a position with probability ~ the Jaccard similarity of the
# n-gram sets.

def minhash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The (a, b) of the num_perm hash functions, from the seed."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
  b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
  return a, b


_CHUNK = 1024  # shingles per step: keeps the (num_perm x chunk) products in cache


def minhash(shingles: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """The uint32 MinHash signature of a set of uint64 shingle hashes."""
  a, b = params
  sig = np.full(len(a), 0xffffffff, np.uint64)
  a, b = a[:, None], b[:, None]
  buf = np.empty((len(sig), min(_CHUNK, len(shingles))), np.uint64)
  shift = np.uint64(32)
  for s in range(0, len(shingles), _CHUNK):
    x = shingles[None, s:s + _CHUNK]
    h = buf[:, :x.shape[1]]
    np.multiply(a, x, out=h)
    np.add(h, b, out=h)
    np.right_shift(h, shift, out=h)
    np.minimum(sig, h.min(axis=1), out=sig)
  return sig.astype(np.uint32)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band) of an LSH index at `threshold`: datasketch's choice, which
  weighs false positives and negatives equally."""
  from datasketch import MinHashLSH  # pylint: disable=import-outside-toplevel
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
  """One key per band: documents sharing a key are near-duplicate candidates."""
  return [bytes([k]) + sig[k * rows:(k + 1) * rows].tobytes() for k in range(bands)]


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
  """Whether two signatures' estimated Jaccard similarity reaches the threshold."""
  return float(np.mean(a == b)) >= threshold


class _Worker:
  """Per-process state: the config, the sources, the MinHash functions, the eval n-grams."""
  cfg = None
  sources = {}
  params = None
  evals = {}
  tokenizer = None


def _init_worker(cfg_dict: dict) -> None:
  cfg = ml_collections.ConfigDict(cfg_dict)
  _Worker.cfg, _Worker.sources, _Worker.evals = cfg, {}, {}
  if cfg.near_dedup.enabled:
    _Worker.params = minhash_params(cfg.near_dedup.num_perm, cfg.near_dedup.seed)
  if cfg.tokenizer_path:
    _Worker.tokenizer = tokenizer_lib.from_path(cfg.tokenizer_path)


def analyze(text: str, cfg, params=None, eval_ngrams=None, tokenizer=None,
            keep_ngrams: bool = False) -> dict:
  """What the decisions need of one document (no text kept). `params`: minhash_params()
  (made from cfg when None); eval_ngrams: sorted uint64 n-gram hashes of evaluation text;
  keep_ngrams: also return the document's decontamination n-grams (of a held-out split,
  to decontaminate the others against)."""
  words = Words(text)
  out = {'bytes': len(text.encode('utf-8', 'surrogatepass')),
         'tokens': len(tokenizer.encode(text)) if tokenizer else len(words)}
  counts = char_counts(text) if cfg.sanity.enabled or cfg.quality.enabled else None
  if cfg.sanity.enabled:
    out['sanity'] = sanity_reasons(text, cfg.sanity, counts)
  if cfg.quality.enabled:
    out['quality'] = quality_reasons(text, cfg.quality, counts, words)
  if cfg.exact_dedup.enabled:
    out['exact'] = hashlib.sha1(words.utf8).digest()
  if cfg.decontam.enabled and (keep_ngrams or (eval_ngrams is not None and len(eval_ngrams))):
    grams = _distinct(words.ngram_hashes(cfg.decontam.ngram))
    if keep_ngrams:
      out['ngrams'] = grams
    if eval_ngrams is not None and len(eval_ngrams):
      hits = np.count_nonzero(np.isin(grams, eval_ngrams, assume_unique=True))
      out['decontam'] = [f'{hits} shared {cfg.decontam.ngram}-grams'] if hits else []
  if cfg.near_dedup.enabled:
    if params is None:
      params = minhash_params(cfg.near_dedup.num_perm, cfg.near_dedup.seed)
    shingles = words.ngram_hashes(cfg.near_dedup.ngram)
    out['minhash'] = minhash(_distinct(shingles), params)
  return out


def _analyze_shard(task: tuple) -> list[dict]:
  """analyze() of documents [start, stop) of a split; the evaluation n-grams are read from
  an .npy file (once per process), so tasks stay small."""
  w = _Worker
  split, start, stop, evals_path, keep_ngrams = task
  if split not in w.sources:
    w.sources[split] = sources.get_source(w.cfg.data, split)
  if evals_path and evals_path not in w.evals:
    w.evals[evals_path] = np.load(evals_path, mmap_mode='r')
  evals = w.evals.get(evals_path)
  return [analyze(w.sources[split][i], w.cfg, w.params, evals, w.tokenizer, keep_ngrams)
          for i in range(start, stop)]


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
  cross_split: int = 0  # removed as a duplicate of another split's document
  removed: list = dataclasses.field(default_factory=list)        # (index, reason, ref)
  cross_removed: list = dataclasses.field(default_factory=list)  # the same, cross-split


def split_order(cfg) -> list[str]:
  """cfg.splits, the held-out ones (cfg.held_out) first: the dedups keep the first
  document of each group in this order, so a held-out document wins over its copies in
  the other splits."""
  held = [s for s in cfg.splits if s in tuple(cfg.held_out)]
  return held + [s for s in cfg.splits if s not in held]


def decide_splits(results: dict[str, list[dict]], cfg, near_pairs: dict | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, StepCount]]]:
  """Keep masks and per-step counts of each split: the steps in STEPS order, each on the
  documents the previous ones kept; the dedups run over all splits together (in
  split_order), keeping the first document of each group.

  near_pairs: {(split position, index): [(split position, index) of an earlier document
  that shares an LSH band and reaches the threshold], ...} over the documents that reach
  near_dedup, as the Beam pipeline finds them; None to find them here (an LSH index of the
  kept documents, queried in order). Both give the same decisions."""
  order = [s for s in split_order(cfg) if s in results]
  keep = {s: np.ones(len(results[s]), bool) for s in order}
  counts = {s: {} for s in order}
  nd = cfg.near_dedup
  if nd.enabled:
    bands, rows = lsh_bands(nd.threshold, nd.num_perm)
  for step in STEPS:
    if not cfg[step].enabled:
      continue
    seen, buckets = {}, collections.defaultdict(list)
    for pos, split in enumerate(order):
      rs = results[split]
      if step == 'decontam' and not any('decontam' in r for r in rs):
        continue
      c = counts[split][step] = StepCount()
      for i, r in enumerate(rs):
        if not keep[split][i]:
          continue
        c.docs_in += 1
        c.tokens_in += r['tokens']
        reason = ref = None
        if step in ('sanity', 'quality', 'decontam'):
          reason = '; '.join(r.get(step, [])) or None
        elif step == 'exact_dedup':
          first = seen.setdefault(r['exact'], (pos, i))
          if first != (pos, i):
            reason, ref = 'duplicate of', first
        elif near_pairs is not None:
          hits = [(p, j) for p, j in near_pairs.get((pos, i), ()) if keep[order[p]][j]]
          if hits:
            reason, ref = 'near duplicate of', min(hits)
        else:  # query the LSH buckets of the kept documents so far, then index this one
          sig = r['minhash']
          keys = band_keys(sig, bands, rows)
          cands = {d for key in keys for d in buckets.get(key, ())}
          # candidates confirmed by their estimated Jaccard (banding alone also returns
          # some pairs below the threshold)
          hits = [(p, j) for p, j in cands
                  if similar(results[order[p]][j]['minhash'], sig, nd.threshold)]
          if hits:
            reason, ref = 'near duplicate of', min(hits)
          else:
            for key in keys:
              buckets[key].append((pos, i))
        if reason:
          keep[split][i] = False
          if ref is not None:
            ref = (order[ref[0]], int(ref[1]))
            other = '' if ref[0] == split else f'{ref[0]} '
            reason = f'{reason} {other}document {ref[1]}'
          if len(c.removed) < cfg.examples:
            c.removed.append((i, reason, ref))
          if ref is not None and ref[0] != split:
            c.cross_split += 1
            if len(c.cross_removed) < cfg.examples:
              c.cross_removed.append((i, reason, ref))
        else:
          c.docs_out += 1
          c.tokens_out += r['tokens']
  return keep, counts


def decide(results: list[dict], cfg) -> tuple[np.ndarray, dict[str, StepCount]]:
  """decide_splits() of one split's results."""
  keep, counts = decide_splits({'train': results}, _one_split(cfg))
  return keep['train'], counts['train']


def _one_split(cfg):
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.splits, cfg.held_out = ('train',), ()
  return cfg


def _shards(n: int, size: int) -> list[tuple[int, int]]:
  return [(s, min(s + size, n)) for s in range(0, n, size)]


class _Pool:
  """cfg.workers processes (spawned: no forked JAX / TFDS state), or this process when
  cfg.workers <= 0, mapping _analyze_shard over tasks in order."""

  def __init__(self, cfg):
    self.pool = None
    if cfg.workers > 0:
      ctx = multiprocessing.get_context('spawn')
      self.pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.to_dict(),))
    else:
      _init_worker(cfg.to_dict())

  def map(self, tasks):
    if self.pool is None:
      return [r for t in tasks for r in _analyze_shard(t)]
    return [r for part in self.pool.imap(_analyze_shard, tasks) for r in part]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.pool is not None:
      self.pool.terminate()


def analyze_split(cfg, split: str, evals_path: str = '', keep_ngrams: bool = False,
                  pool: _Pool | None = None) -> list[dict]:
  """analyze() of every document of `split`, in order (cfg.workers processes, each
  reading its shards of the source itself: only the small results travel)."""
  n = len(sources.get_source(cfg.data, split))
  tasks = [(split, a, b, evals_path, keep_ngrams)
           for a, b in _shards(n, max(int(cfg.shard_size), 1))]
  if pool is not None:
    return pool.map(tasks)
  with _Pool(cfg) as p:
    return p.map(tasks)


def eval_ngrams(cfg) -> np.ndarray:
  """The sorted distinct n-gram hashes of the evaluation texts cfg.decontam names."""
  if not cfg.decontam.enabled:
    return np.zeros(0, np.uint64)
  texts = eval_texts(cfg.decontam)
  if not texts and not (cfg.decontam.held_out and any(s in tuple(cfg.held_out)
                                                      for s in cfg.splits)):
    raise DataError('decontam.enabled but decontam.eval_globs / eval_jsonl name no text')
  return np.unique(np.concatenate([np.zeros(0, np.uint64)] +
                                  [ngram_hashes(t, cfg.decontam.ngram) for t in texts]))


def decontaminates(cfg, split: str) -> bool:
  """Whether `split` is decontaminated (not exempt, not held out)."""
  return split not in tuple(cfg.decontam.exempt) and split not in tuple(cfg.held_out)


def prepare(cfg, out_dir: str, runner: str = '', beam_options: list | tuple = ()) -> dict:
  """Cleans every split of cfg.data into a TFDS dataset under out_dir; returns the report
  (also written to out_dir/report.json and report.md). runner: an Apache Beam runner
  ('DirectRunner', 'DataflowRunner', ...) to analyse and group with, beam_options its
  pipeline options (--project=..., ...); '' analyses with cfg.workers local processes."""
  t0 = time.perf_counter()
  name = cfg.name or _default_name(cfg)
  os.makedirs(out_dir, exist_ok=True)
  evals = eval_ngrams(cfg)
  ts = time.perf_counter()
  near_pairs = None
  if runner:
    from lmjax.data import beam_prepare  # pylint: disable=import-outside-toplevel
    results, near_pairs = beam_prepare.run(cfg, evals, out_dir, runner, list(beam_options))
  else:
    results = analyze_local(cfg, evals, out_dir)
  analysis_s = time.perf_counter() - ts
  keep, counts = decide_splits(results, cfg, near_pairs)
  report = build_report(cfg, name, results, keep, counts, analysis_s, runner)
  report['tfds_dir'] = write_dataset(cfg, name, {s: np.flatnonzero(keep[s])
                                                 for s in cfg.splits}, out_dir)
  report['total_s'] = time.perf_counter() - t0
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2, default=str)
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(summary(report))
  return report


def analyze_local(cfg, evals: np.ndarray, out_dir: str) -> dict[str, list[dict]]:
  """analyze() of every split's documents with cfg.workers local processes: held-out
  splits first (their n-grams join the evaluation text with decontam.held_out)."""
  results = {}
  with _Pool(cfg) as pool:
    for split in split_order(cfg):
      held_text = bool(cfg.decontam.enabled and cfg.decontam.held_out
                       and split in tuple(cfg.held_out))
      path = ''
      if decontaminates(cfg, split) and len(evals):
        path = os.path.join(out_dir, f'eval_ngrams_{len(evals)}.npy')
        np.save(path, evals)
      results[split] = analyze_split(cfg, split, path, held_text, pool)
      if held_text:  # a held-out split's text: evaluation text for the other splits
        evals = np.union1d(evals, np.concatenate(
            [np.zeros(0, np.uint64)] + [r.pop('ngrams') for r in results[split]]))
  for name in os.listdir(out_dir):
    if name.startswith('eval_ngrams_'):
      os.remove(os.path.join(out_dir, name))
  return results


def build_report(cfg, name, results, keep, counts, analysis_s, runner='') -> dict:
  """The report of a run: documents and tokens in/out per split and step, examples."""
  report = {'name': name, 'source': None, 'splits': {}, 'config': cfg.to_dict(),
            'unit': 'tokens' if cfg.tokenizer_path else 'words',
            'runner': runner or f'{cfg.workers} local processes', 'analysis_s': analysis_s}
  total_bytes = sum(r['bytes'] for rs in results.values() for r in rs)
  report['mb_per_s'] = total_bytes / 1e6 / max(analysis_s, 1e-9)
  for split in cfg.splits:
    rs, k = results[split], keep[split]
    source = sources.get_source(cfg.data, split)
    report['source'] = source.name.rsplit('[', 1)[0]
    report['splits'][split] = {
        'documents_in': len(rs), 'documents_out': int(k.sum()),
        'tokens_in': sum(r['tokens'] for r in rs),
        'tokens_out': sum(r['tokens'] for r, kk in zip(rs, k) if kk),
        'bytes_in': sum(r['bytes'] for r in rs),
        'steps': {step: {**{f: v for f, v in dataclasses.asdict(c).items()
                            if f not in ('removed', 'cross_removed')},
                         'examples': [_example(cfg.data, split, *e) for e in c.removed],
                         'cross_split_examples': [_example(cfg.data, split, *e)
                                                  for e in c.cross_removed]}
                  for step, c in counts[split].items()}}
  return report


def _example(d, split: str, index: int, reason: str, ref) -> dict:
  """A removed document for the report: its index, reason, text; with data.id_key its id
  and the id of the document the reason names (a duplicate's first)."""
  source = sources.get_source(d, split)
  out = {'document': int(index), 'reason': reason, 'text': source[int(index)][:300]}
  if ref is not None:
    out['of'] = {'split': ref[0], 'document': ref[1]}
  if d.get('id_key') and hasattr(source, 'record_id'):
    out['id'] = source.record_id(int(index))
    if ref is not None:
      ref_source = source if ref[0] == split else sources.get_source(d, ref[0])
      out['reason'] += f' (id {ref_source.record_id(ref[1])})'
      out['of']['id'] = ref_source.record_id(ref[1])
  return out


def _default_name(cfg) -> str:
  d = cfg.data
  if d.source == 'local_text':
    base = sources.dataset_name(d.text_glob, d.val_fraction)
  elif d.source == 'tfds':
    base = re.sub(r'[^a-z0-9_]+', '_', d.tfds_name.lower())
  else:
    base = corpora.dataset_name(d)
  return base + '_clean'


def summary(report: dict) -> str:
  unit = report['unit']
  lines = [f'# {report["name"]}: cleaned {report["source"]}', '',
           f'Output (TFDS, array_record): `{report.get("tfds_dir")}`; train with '
           f"`--config.data.source=tfds --config.data.tfds_name={report.get('tfds_dir')}`.", '']
  n_docs = sum(s['documents_in'] for s in report['splits'].values())
  lines += [f'Analysis ({report["runner"]}) {report["analysis_s"]:.1f} s: '
            f'{n_docs / max(report["analysis_s"], 1e-9):,.0f} documents/s, '
            f'{report["mb_per_s"]:.2f} MB/s.', '']
  for split, s in report['splits'].items():
    lines += [f'## {split}: {s["documents_in"]} -> {s["documents_out"]} documents, '
              f'{s["tokens_in"]:,} -> {s["tokens_out"]:,} {unit}', '',
              f'| step | documents in | out | {unit} in | out | of another split\'s |',
              '|---|---|---|---|---|---|']
    for step, c in s['steps'].items():
      lines.append(f'| {step} | {c["docs_in"]} | {c["docs_out"]} | {c["tokens_in"]:,} | '
                   f'{c["tokens_out"]:,} | {c["cross_split"]} |')
    lines.append('')
    for step, c in s['steps'].items():
      shown = {ex['document'] for ex in c['examples']}
      for ex in c['examples'] + [e for e in c['cross_split_examples']
                                 if e['document'] not in shown]:
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
