"""Pretraining (cfg.stage='pretrain'): next-token prediction on documents.

Batch: packed documents (data/pipeline.py), [rows, seq_len] token arrays; loss: the mean
next-token loss over every loss token of the global batch (+ train.z_loss, + an MoE
model's router losses); logged as 'loss', 'z_loss', 'loss_tokens' and, for an MoE model,
the router telemetry 'moe/...' (models/moe.py). Eval: 'eval_loss' / 'eval_ppl' / 'eval_tokens' on the
eval split (a mixture: the tokens of all its sources' eval batches pooled) and
'eval/<name>/loss' for every data.mixture and data.eval_sources entry. With a mixture each
logged step also counts the tokens each source contributed since the last log
('tokens/<name>').
"""

from __future__ import annotations

import numpy as np

from lmjax import config as config_lib
from lmjax.data import pipeline
from lmjax.data.sources import DataError
from lmjax.train import forward
from lmjax.train.objectives import base


class LM(base.Objective):
  """Next-token loss over documents (and, as SFT's parent, over any token batch)."""

  name = 'pretrain'
  forward_telemetry = True

  def __init__(self, cfg):
    super().__init__(cfg)
    self.mixture = list(config_lib.mixture_sources(cfg.data))  # rows tag tokens 1..len
    self.counters = tuple(f'tokens/{name}' for name in self.mixture)
    if cfg.train.telemetry:  # the forward pass's stability statistics: maxima combine so
      self.reducers = forward.telemetry_reducers(cfg.model.n_layers)

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del keep  # documents are not checked record by record
    return pipeline.make_lm_iterator(self.cfg, tokenizer, split, source=source, **kw)

  def split_batch(self, host):
    batch, counts = super().split_batch(host)
    n = len(self.mixture)
    if n and pipeline.SOURCE in host:  # each source's tokens, counted here; not sent to device
      counts = np.bincount(host[pipeline.SOURCE].ravel(), minlength=n + 1)[1:n + 1]
    elif n:  # one named source's eval batches: no tags
      counts = np.zeros(n, np.int64)
    return batch, counts

  def sums(self, setup, telemetry=False):
    """(nll + z sums (+ an MoE model's router losses), {'loss', 'z_loss'} sums and the
    router telemetry (with `telemetry`, the stability statistics too), forward.lm_sums);
    normalised by loss tokens."""
    graphdef, lora, z_coef = setup.graphdef, setup.lora, self.cfg.train.z_loss

    def sums(weights, batch, rng):
      return forward.lm_sums(graphdef, weights['params'], batch, z_coef, self.cfg.model.moe,
                             adapters=weights.get('adapters'), lora=lora, dropout_rng=rng,
                             telemetry=telemetry)

    return sums

  def eval_step(self, setup):
    """(weights, batch) -> (nll sum, loss tokens)."""
    graphdef, lora = setup.graphdef, setup.lora

    def step(weights, batch):
      nll, _ = forward.loss_sums(graphdef, weights['params'], batch, 0.0,
                                 adapters=weights.get('adapters'), lora=lora)
      return nll, forward.token_count(batch)

    spec = self.batch_spec(1)
    return forward.jit_eval(setup, step, forward.batch_shardings(setup.mesh, setup.rules,
                                                                 spec))

  def evaluate(self, eval_step, weights, tokenizer, mesh, process_index, process_count,
               keep=None):
    """Mean next-token loss over exactly cfg.train.eval_batches batches of each eval set:
    the training data's eval split ('eval_loss'; with a mixture, the tokens of all its
    sources' eval batches pooled) and each named source ('eval/<name>/loss'). A split
    shorter than that is repeated (a small one then counts some documents twice)."""
    cfg = self.cfg

    def run(source):
      nll, n = self.eval_outputs(eval_step, weights, tokenizer, mesh, process_index,
                                 process_count, source=source, keep=keep)
      if n == 0:
        raise DataError(f'eval split {cfg.data.eval_split!r} ({source or "data"}) has no '
                        'loss tokens')
      return nll, n

    named = {name: run(name) for name in config_lib.eval_sources(cfg.data)}
    if self.mixture:
      nll, n = np.sum([named[name] for name in self.mixture], axis=0).tolist()
    else:
      nll, n = run(None)
    out = base.loss_summary(nll, n)
    out.update((f'eval/{name}/loss', a / b) for name, (a, b) in named.items())
    return out
