"""reference='precomputed' (dpo, kto): the reference model's log-probs, computed once
before training and stored with the data (TRL's precompute_ref_log_probs).

Each split's table is [n, 2] float32, one line per example of two rows: the completion
log-prob sums of a DPO pair's chosen and rejected rows (the default, cfg.dpo), or of a
KTO example's row and its KL row (group='kto', data/feedback.py), exactly as the pipeline
builds them (template, data.seq_len, <group>.overlong truncation); NaN for examples the
pipeline drops. The iterator attaches an example's two values as batch['ref_logps'], so
the train step runs the policy's forward pass only and holds no reference weights: full
fine-tuning without a second copy of the model.

Tables are cached in <workdir>/ref_logps/<split>.npz with a fingerprint of everything they
depend on (the reference checkpoint, model and dtype, tokenizer, template, seq_len,
overlong policy, the data's source, and what the caller adds: KTO's KL partners); a
resume reuses them, any change recomputes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np

from lmjax import sharding
from lmjax.data import preference, sources
from lmjax.train import forward


def fingerprint(cfg, reference: dict, tokenizer, split: str, n_pairs: int,
                group: str = 'dpo', extra: dict | None = None) -> str:
  """What a split's table of cfg.<group>'s data depends on, as a canonical JSON string
  (the tokenizer: its location and the digest of its files, chat template included;
  `extra`: anything else the rows depend on)."""
  d = cfg[group]
  key = {
      'reference': reference, 'model': cfg.model.to_dict(),
      'dtype': cfg.lora.base_dtype if cfg.lora.enabled else cfg.model.param_dtype,
      'tokenizer': [os.path.abspath(tokenizer.location), tokenizer.sha256()],
      'template': cfg.sft.template, 'seq_len': cfg.data.seq_len, 'overlong': d.overlong,
      'source': d.source, 'path': d.path, 'tfds_name': d.tfds_name,
      'task': [dict(d.task_sizes), d.task_seed, sources.default_data_dir(cfg.data)],
      'split': split, 'pairs': n_pairs,
  }
  if group != 'dpo' or extra:
    key.update(group=group, **(extra or {}))
  return json.dumps(key, sort_keys=True, default=str)


def make_step(setup):
  """(params, batch with 'index' [2B]) -> (index, completion log-prob sums) [2B] each,
  replicated to every process: what dpo.reference='precomputed' stores per pair.
  params: the reference's, sharded like setup's params."""
  graphdef = setup.graphdef

  def step(params, batch):
    lp, _ = forward.row_logps(graphdef, params, batch)
    return batch['index'], lp

  rows = {k: ((1, 1), None) for k in forward.TOKEN_KEYS}
  rows['index'] = ((1,), None)
  return forward.jit_eval(setup, step, forward.batch_shardings(setup.mesh, setup.rules, rows),
                          weights_sh=setup.state_shardings['params'])


def compute(cfg, setup, params, tokenizer, split: str, n_pairs: int,
            make_iterator: Callable | None = None) -> np.ndarray:
  """The [n_pairs, 2] table of `split` under `params` (the reference, sharded like setup's
  params). Every process reads its share of the split in batches of
  train.global_batch / processes pairs; all processes run the same number of batches (a
  shorter share repeats) and every process ends with the whole table. make_iterator:
  the row-pair iterator (preference.make_pair_iterator's arguments; that by default)."""
  make_iterator = make_iterator or preference.make_pair_iterator
  pi, pc = jax.process_index(), jax.process_count()
  local = cfg.train.global_batch // pc
  share = -(-n_pairs // pc)  # the largest process share
  batches = -(-share // local)
  ref_step = make_step(setup)
  table = np.full((n_pairs, 2), np.nan, np.float32)
  it = make_iterator(cfg, tokenizer, split, batch_size=local, process_index=pi,
                     process_count=pc, repeat=True, with_index=True)
  try:
    for _ in range(batches):
      host = {k: v for k, v in next(it).items() if k in forward.TOKEN_KEYS + ('index',)}
      forward.check_host_batch(cfg, host)
      index, lp = jax.device_get(ref_step(params, sharding.place_batch(host, setup.mesh,
                                                                       setup.rules)))
      table[index[0::2], 0] = lp[0::2]
      table[index[1::2], 1] = lp[1::2]
  finally:
    it.close()
  return table


def tables(cfg, setup, tokenizer, splits, *, workdir: str, reference: dict,
           load_params: Callable[[], object], group: str = 'dpo',
           count: Callable | None = None, make_iterator: Callable | None = None,
           extra: dict | None = None, unit: str = 'pairs') -> dict[str, np.ndarray]:
  """{split: table} for `splits`, from the workdir's cache or computed (then cached) with
  load_params() (called at most once: the reference's params). The data: cfg.<group>'s,
  count(cfg, split) examples read by make_iterator (default: DPO's pairs); extra: more of
  the fingerprint."""
  count = count or (lambda c, s: len(preference.get_pairs(c, s)))
  params, out = None, {}
  for split in dict.fromkeys(splits):
    n = count(cfg, split)
    key = fingerprint(cfg, reference, tokenizer, split, n, group, extra)
    path = os.path.join(workdir, 'ref_logps', f'{split}.npz')
    cached = _read(path, key)
    if cached is not None:
      out[split] = cached
      _print(f'{group}: reference log-probs of {split} ({n} {unit}) from {path}')
      continue
    if params is None:
      params = load_params()
    t0 = time.perf_counter()
    out[split] = compute(cfg, setup, params, tokenizer, split, n, make_iterator)
    if jax.process_index() == 0:
      _write(path, key, out[split])
    dropped = int(np.sum(np.isnan(out[split][:, 0])))
    _print(f'{group}: reference log-probs of {split}: {n} {unit} ({dropped} dropped as '
           f'overlong) in {time.perf_counter() - t0:.1f}s -> {path}')
  return out


def _read(path: str, key: str) -> np.ndarray | None:
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if str(f['fingerprint']) != key:
      _print(f'lmjax: {path} was computed for other data or settings; recomputing')
      return None
    return np.asarray(f['logps'], np.float32)


def _write(path: str, key: str, table: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, logps=table, fingerprint=np.array(key))
  os.replace(tmp, path)  # atomic: a crash never leaves a partial table


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
