"""What an objective is: everything that differs between pretraining, SFT, DPO and the
objectives to come (KTO, reward models), behind one interface the loop, the step and the
state use without asking which objective runs.

An objective owns:
  - its config checks (`validate`, a classmethod: config.validate calls it, no devices);
  - its data: the batch stream (`iterator`), how many rows one train.global_batch unit is
    (`rows_per_example`: 2 for a pair), the per-row and per-token arrays its device batch
    adds to the token arrays (`row_keys`, e.g. 'ref_logps' or a 'label'; `token_keys`),
    the data check before compiling (`check_data`), its host-side counters (`counters`,
    `split_batch`) and, for an online objective, the rows it samples from the policy
    before each step (`rollout`: GRPO's completions);
  - its extra state (`state_entries`): frozen entries such as DPO's reference copy, or
    trainable ones such as an extra head, next to the model's params;
  - anything computed once before training (`prepare`: DPO's precomputed references);
  - its loss (`sums`: loss sums and metric sums of a batch; `updates_per_step` optimizer
    updates on each batch) and normaliser
    (`denominator`, logged as `normaliser`: loss tokens or pairs), how metric sums of
    micro-batches combine (`reducers`: a sum by default, or a min / max) and the logged
    metrics they give (`metrics`: each sum over the normaliser by default, or, e.g.,
    over the count of one label's rows);
  - its eval (`eval_step`, `evaluate`: the eval summary and metric names), exact-match
    questions from its own eval data (`answer_examples`, `exact_match`) and the prompt of
    the sample at the end of a run (`sample_prompt`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import evaluate as evaluate_lib
from lmjax.data import check as data_check
from lmjax.data import pipeline
from lmjax.train import forward


@dataclasses.dataclass(frozen=True)
class StateEntry:
  """An entry of the train state an objective adds next to 'params' (and 'adapters').

  abstract: its ShapeDtypeStructs; shardings: their shardings (a matching pytree).
  init: (starting params, key) -> its value, jittable: what a fresh run (and, for an entry
  that is not saved, a resumed one: from the run's base params) starts it with.
  trainable: the optimizer updates it with the model's trainable entry (a reward head).
  saved: checkpoints hold it; else it is rebuilt from the base params on resume (a frozen
  reference copy, which equals the starting params).
  """
  abstract: Any
  shardings: Any
  init: Callable[[Any, jax.Array], Any]
  trainable: bool = False
  saved: bool = True


def reference_copy(abstract_params, param_shardings) -> dict[str, StateEntry]:
  """{'ref_params': a frozen copy of the starting params}, not checkpointed (rebuilt from
  the run's base on resume): the reference of an objective that aligns against the model
  it starts from, for full fine-tuning."""
  return {'ref_params': StateEntry(
      abstract_params, param_shardings, init=lambda params, key: jax.tree.map(jnp.copy, params),
      saved=False)}


class Objective:
  """The pretraining objective's defaults; subclasses override what differs."""

  name = ''                   # the cfg.stage value that selects it
  rows_per_example = 1        # rows of a batch per train.global_batch unit
  normaliser = 'loss_tokens'  # the logged denominator's name
  needs_base = False          # its state depends on the run's base model (init_from)
  updates_per_step = 1        # optimizer updates per train step on the step's batch
  forward_telemetry = False   # sums(setup, telemetry=True) adds the forward pass's
                              # stability statistics (train.telemetry)

  def __init__(self, cfg):
    self.cfg = cfg
    self.row_keys: dict[str, Any] = {}   # per-row arrays of the device batch: dtype
    self.token_keys: dict[str, Any] = {}  # per-token ([rows, seq_len]) ones: dtype
    self.counters: tuple[str, ...] = ()  # metric names of split_batch's counts

  # ---- Config -------------------------------------------------------------------------

  @classmethod
  def validate(cls, cfg) -> None:
    """Cross-field checks of the objective's config group (ConfigError)."""

  # ---- Data ---------------------------------------------------------------------------

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The arrays of a device batch."""
    return forward.TOKEN_KEYS + tuple(self.row_keys) + tuple(self.token_keys)

  def batch_spec(self, rows: int) -> dict:
    """{key: (shape, dtype)} of a global batch of `rows` rows."""
    seq, out = self.cfg.data.seq_len, {}
    for k in forward.TOKEN_KEYS:
      out[k] = ((rows, seq), jnp.float32 if k == 'loss_mask' else jnp.int32)
    out.update((k, ((rows,), dtype)) for k, dtype in self.row_keys.items())
    out.update((k, ((rows, seq), dtype)) for k, dtype in self.token_keys.items())
    return out

  def check_data(self, tokenizer, log):
    """The data check before compiling (data/check.py): degenerate records dropped or
    refused, whether there is an eval split. Pretraining checks nothing."""
    del tokenizer, log
    return data_check.StageCheck({})

  def iterator(self, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
               process_count: int = 1, seed: int | None = None, repeat: bool = True,
               source: str | None = None, keep=None):
    """A grain iterator of host batches of this process's share of one data shard
    (`keep`: the data check's record indices of the split, None = all)."""
    raise NotImplementedError

  def data_iterator(self, tokenizer, split: str, *, batch_size: int, process_index: int = 0,
                    process_count: int = 1, seed: int | None = None, repeat: bool = True,
                    source: str | None = None, keep: dict | None = None):
    """The batches of `split`: this process's share of cfg.data.shards data shards
    (pipeline.shard_iterator) of `iterator`'s stream. keep: {split: record indices}."""
    kept = (keep or {}).get(split)

    def make(**shard):
      return self.iterator(tokenizer, split, seed=seed, repeat=repeat, source=source,
                           keep=kept, **shard)

    return pipeline.shard_iterator(make, self.cfg.data.shards, batch_size=batch_size,
                                   process_index=process_index, process_count=process_count)

  def rollout(self, setup, tokenizer, state, host: dict, step: int,
              more: Callable[[], dict] | None = None) -> tuple[dict, dict]:
    """(the host batch to train on, metrics of making it) from the batch the data
    iterator read: an online objective samples its rows from the policy in `state` (at
    train step `step`), reading further batches with more() if it needs them; an offline
    one trains on the batch as read."""
    del setup, tokenizer, state, step, more
    return host, {}

  def split_batch(self, host: dict) -> tuple[dict, np.ndarray]:
    """(the device batch's arrays, this batch's counts for `counters`) of a host batch."""
    return {k: host[k] for k in self.batch_keys}, np.zeros(0, np.int64)

  # ---- State --------------------------------------------------------------------------

  def state_entries(self, abstract_params, param_shardings) -> dict[str, StateEntry]:
    """The state entries the objective adds (by name), given the params' ShapeDtypeStructs
    and shardings as the state holds them."""
    del abstract_params, param_shardings
    return {}

  def prepare(self, setup, tokenizer, splits, *, workdir: str, base: dict | None,
              load_base: Callable[[], Any]) -> None:
    """Work done once before training, e.g. tables read with the data. base: the run's
    init_from record; load_base() loads its params (call it at most once)."""

  # ---- Loss ---------------------------------------------------------------------------

  def sums(self, setup) -> Callable:
    """fn(weights, batch, dropout_rng) -> (loss sum, {metric: sum}): the loss is
    sum / denominator(batch), and so is each logged metric."""
    raise NotImplementedError

  def denominator(self, batch) -> jax.Array:
    """What the sums are divided by over the global batch: its loss tokens (at least 1)."""
    return jnp.maximum(forward.token_count(batch), 1.0)

  # How a metric of `sums` combines over micro-batches (and eval batches): by key, 'min'
  # or 'max' (e.g. the lowest reward of the batch); every other key is a sum.
  reducers: dict[str, str] = {}

  def init_aux(self, aux):
    """The identity of `combine` for metrics shaped as `aux` (ShapeDtypeStructs)."""
    fill = {'min': jnp.inf, 'max': -jnp.inf}
    return {k: jnp.full(a.shape, fill.get(self.reducers.get(k), 0), a.dtype)
            for k, a in aux.items()}

  def combine(self, a: dict, b: dict) -> dict:
    """Two micro-batches' metrics as one's: summed, or min / max (`reducers`)."""
    ops = {'min': jnp.minimum, 'max': jnp.maximum}
    return {k: ops.get(self.reducers.get(k), jnp.add)(a[k], b[k]) for k in a}

  def metrics(self, aux: dict, denom) -> dict:
    """The logged train metrics of a step's combined sums: each sum divided by the
    normaliser, a min / max as it is."""
    return {k: v if k in self.reducers else v / denom for k, v in aux.items()}

  # ---- Eval ---------------------------------------------------------------------------

  def eval_step(self, setup) -> Callable:
    """(weights, batch) -> what `evaluate` sums over batches."""
    raise NotImplementedError

  def eval_outputs(self, eval_step, weights, tokenizer, mesh, process_index: int,
                   process_count: int, source: str | None = None, keep=None):
    """eval_step's outputs summed (on the host, float64; a min / max for `reducers`' keys
    of a dict output) over exactly
    cfg.train.eval_batches batches of the eval split, read in order and repeated when this
    process's share holds fewer (every process runs the same number of eval steps: each
    is a collective, uneven counts would hang a multi-host run)."""
    cfg = self.cfg
    it = self.data_iterator(tokenizer, cfg.data.eval_split,
                            batch_size=cfg.train.global_batch // process_count,
                            process_index=process_index, process_count=process_count,
                            repeat=True, source=source, keep=keep)
    try:
      batches = (self.split_batch(b)[0] for b in itertools.islice(it, cfg.train.eval_batches))
      total, _ = evaluate_lib.sum_outputs(eval_step, weights, batches, cfg, mesh,
                                          reducers=self.reducers)
    finally:
      it.close()  # stops its prefetch thread
    return total

  def evaluate(self, eval_step, weights, tokenizer, mesh, process_index: int,
               process_count: int, keep=None) -> dict:
    """The eval summary: {'eval_loss', ...} over cfg.train.eval_batches batches."""
    raise NotImplementedError

  def answer_examples(self, tokenizer, split: str) -> list[dict]:
    """[{'prompt', 'answer', 'task'}] from the objective's own data for greedy exact
    match at each eval; [] when its data has no exact answers (or its config asks for
    none)."""
    del tokenizer, split
    return []

  def exact_match(self, graphdef, params, tokenizer, mesh, examples) -> dict:
    """evaluate.exact_match of greedy answers to `examples` with `params`."""
    raise NotImplementedError

  def sample_prompt(self, tokenizer, text: str):
    """(the prompt as shown, what generate.sample takes) of the sample at the end."""
    del tokenizer
    return text, text


def loss_summary(nll: float, tokens: float) -> dict:
  """{'eval_loss', 'eval_ppl', 'eval_tokens'} of summed next-token losses."""
  return {'eval_loss': nll / tokens, 'eval_ppl': math.exp(min(nll / tokens, 50.0)),
          'eval_tokens': tokens}
