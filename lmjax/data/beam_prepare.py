"""The analysis and grouping of tools/prepare_data.py as an Apache Beam pipeline.

  python tools/prepare_data.py --config=configs/data/prepare_stdlib.py --out=/tmp/clean \\
      --runner=DirectRunner [--direct_num_workers=2 --direct_running_mode=multi_processing]

The stages (each parallel over documents, shards or groups):

  read + analyse   (split, index range) tasks -> quality.analyze() of each document, keyed
                   by (split position, index); held-out splits first, whose n-grams become
                   a side input (evaluation text) of the other splits' analysis
  exact groups     documents that pass sanity and quality, grouped by their normalised
                   text's hash: the first of each group (in split_order, then index)
                   goes on, if it passes decontamination
  LSH buckets      those documents grouped by each MinHash band: within a bucket, every
                   pair whose signatures reach the threshold (the later document and the
                   earlier one)
  outputs          per-document verdicts (no text, no signature) and the near-duplicate
                   pairs, as JSON lines under <out>/beam/

The launching process then reads those files and makes the decisions with
quality.decide_splits() (one pass in document order over ~100 bytes per document), so the
kept documents and the report are the same as without Beam. The pairs of an LSH bucket
grow with the square of its size: exact duplicates, the usual large clusters, are removed
before the buckets are formed.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from lmjax.data import quality, sources
from lmjax.errors import UserError


class BeamError(UserError, ImportError):
  """Apache Beam is needed for --runner and is not installed."""


def _import_beam():
  try:
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise BeamError('--runner needs Apache Beam: pip install "lmjax[beam]" (or apache-beam)'
                    ) from None
  return beam


def run(cfg, evals: np.ndarray, out_dir: str, runner: str, options: list[str]
        ) -> tuple[dict[str, list[dict]], dict]:
  """Runs the pipeline; returns (each split's per-document results in index order,
  near-duplicate pairs) for quality.decide_splits()."""
  beam = _import_beam()
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  order = quality.split_order(cfg)
  work = os.path.join(out_dir, 'beam')
  os.makedirs(work, exist_ok=True)
  for old in glob.glob(os.path.join(work, '*')):
    os.remove(old)
  size = max(int(cfg.shard_size), 1)
  held, rest = [], []
  for pos, split in enumerate(order):
    n = len(sources.get_source(cfg.data, split))
    held_text = bool(cfg.decontam.enabled and cfg.decontam.held_out
                     and split in tuple(cfg.held_out))
    tasks = [(pos, split, a, min(a + size, n), held_text,
              quality.decontaminates(cfg, split)) for a in range(0, n, size)]
    (held if held_text else rest).extend(tasks)
  cfg_dict = cfg.to_dict()
  nd = cfg.near_dedup
  bands = quality.lsh_bands(nd.threshold, nd.num_perm) if nd.enabled else None
  opts = PipelineOptions([f'--runner={runner}'] + list(options))
  with beam.Pipeline(options=opts) as p:
    external = p | 'evaluation text' >> beam.Create([evals])
    held_res = (p | 'held-out tasks' >> beam.Create(held or [None])
                | 'spread held-out' >> beam.Reshuffle()
                | 'analyse held-out' >> beam.ParDo(_Analyze(cfg_dict),
                                                   beam.pvalue.AsSingleton(external)))
    held_grams = (held_res | 'their n-grams' >> beam.Map(lambda kv: kv[1].get('ngrams'))
                  | 'all n-grams' >> beam.combiners.ToList())
    evals_all = ((external, held_grams) | 'both' >> beam.Flatten()
                 | 'as one' >> beam.combiners.ToList()
                 | 'union' >> beam.Map(_union))
    rest_res = (p | 'tasks' >> beam.Create(rest or [None])
                | 'spread' >> beam.Reshuffle()
                | 'analyse' >> beam.ParDo(_Analyze(cfg_dict), beam.pvalue.AsSingleton(evals_all)))
    results = (held_res, rest_res) | 'all documents' >> beam.Flatten()
    (results | 'verdicts' >> beam.Map(_verdict)
     | 'write verdicts' >> beam.io.WriteToText(os.path.join(work, 'verdicts')))
    if nd.enabled:
      firsts = (results | 'pass sanity and quality' >> beam.FlatMap(_exact_key, cfg_dict)
                | 'exact groups' >> beam.GroupByKey()
                | 'first of each' >> beam.FlatMap(_first_of_group))
      (firsts | 'bands' >> beam.FlatMap(_bands, bands)
       | 'LSH buckets' >> beam.GroupByKey()
       | 'similar pairs' >> beam.FlatMap(_pairs, nd.threshold)
       | 'distinct' >> beam.Distinct()
       | 'write pairs' >> beam.io.WriteToText(os.path.join(work, 'pairs')))
  return _read(work, order)


def _union(parts) -> np.ndarray:
  arrays = []
  for part in parts:
    if isinstance(part, list):
      arrays.extend(a for a in part if a is not None)
    elif part is not None:
      arrays.append(part)
  return quality._distinct(np.concatenate([np.zeros(0, np.uint64)] + arrays))  # pylint: disable=protected-access


class _Analyze:
  """A DoFn (made lazily: apache_beam is imported only with --runner) analysing the
  documents of a task."""

  def __new__(cls, cfg_dict):
    beam = _import_beam()

    class Analyze(beam.DoFn):

      def setup(self):
        quality._init_worker(cfg_dict)  # pylint: disable=protected-access

      def process(self, task, evals):
        if task is None:
          return
        pos, split, start, stop, keep_ngrams, decontam = task
        w = quality._Worker  # pylint: disable=protected-access
        if split not in w.sources:
          w.sources[split] = sources.get_source(w.cfg.data, split)
        for i in range(start, stop):
          r = quality.analyze(w.sources[split][i], w.cfg, w.params,
                              evals if decontam else None, w.tokenizer, keep_ngrams)
          yield (pos, i), r

    return Analyze()


def _verdict(kv) -> str:
  (pos, i), r = kv
  out = {k: v for k, v in r.items() if k not in ('minhash', 'ngrams')}
  if 'exact' in out:
    out['exact'] = out['exact'].hex()
  return json.dumps([pos, i, out])


def _exact_key(kv, cfg_dict):
  key, r = kv
  if r.get('sanity') or r.get('quality'):
    return
  group = r['exact'] if cfg_dict['exact_dedup']['enabled'] else key
  yield group, (key, not r.get('decontam'), r['minhash'])


def _first_of_group(kv):
  _, members = kv
  key, clean, sig = min(members, key=lambda m: m[0])
  if clean:
    yield key, sig


def _bands(kv, bands):
  key, sig = kv
  for band in quality.band_keys(sig, *bands):
    yield band, (key, sig)


def _pairs(kv, threshold):
  _, members = kv
  members = sorted(members, key=lambda m: m[0])
  for j, (later, sig) in enumerate(members):
    for earlier, other in members[:j]:
      if quality.similar(other, sig, threshold):
        yield json.dumps([list(later), list(earlier)])


def _read(work: str, order: list[str]) -> tuple[dict[str, list[dict]], dict]:
  results = {split: {} for split in order}
  for path in sorted(glob.glob(os.path.join(work, 'verdicts*'))):
    with open(path, encoding='utf-8') as f:
      for line in f:
        pos, i, r = json.loads(line)
        results[order[pos]][i] = r
  results = {split: [rs[i] for i in range(len(rs))] for split, rs in results.items()}
  pairs = {}
  for path in sorted(glob.glob(os.path.join(work, 'pairs*'))):
    with open(path, encoding='utf-8') as f:
      for line in f:
        later, earlier = json.loads(line)
        pairs.setdefault(tuple(later), []).append(tuple(earlier))
  return results, pairs
