"""Direct preference optimisation (cfg.stage='dpo') on preference pairs (cfg.dpo).

Batch: B pairs as 2B rows (data/preference.py), pair i in rows 2i (chosen) and 2i + 1
(rejected), loss mask on the completion tokens; with precomputed references each row also
carries 'ref_logps'. Loss: losses.dpo of the completions' summed log-probs against a
reference (dpo.reference), averaged over the pairs of the global batch (the normaliser is
'pairs'):
    adapters_off  LoRA: the base model with the adapters off, in the same step (no copy);
    copy          a frozen copy of the starting params in the state ('ref_params'; not
                  checkpointed: rebuilt from the recorded init_from on resume);
    precomputed   the reference's log-probs computed once before training and read with
                  the data (train/ref_logps.py): no reference weights or forward pass;
    (auto: adapters_off with LoRA, else copy; dpo.reference_free: a reference of log-prob 0.)
The variants follow their papers: sigmoid (DPO) and its conservative form
(label_smoothing), robust DPO and hinge (SLiC) on summed log-probs; IPO on per-token
averaged log-probs, for its loss and its reward metrics alike (the IPO paper, and TRL 0.x;
TRL 1.16 logs IPO's rewards from summed log-probs); RPO (rpo_alpha) adds alpha x the mean
per-token NLL of each chosen completion, a per-pair term averaged over the pairs like the
loss (TRL 1.16 instead weights it by tokens over the batch).
Metrics, named as TRL's: rewards/{chosen,rejected,margins,accuracies} (accuracies a strict
'>': 0 at step 0), logps/{chosen,rejected}; eval_loss and eval/<metric> on held-out pairs.
Overlong pairs (dpo.overlong) are counted as 'dpo/dropped' and 'dpo/truncated'. Exact match
at each eval only when the pairs are the built-in task's, whose chosen answers are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax import config as config_lib
from lmjax.data import check as data_check
from lmjax.data import formats, preference
from lmjax.train import forward, losses, ref_logps
from lmjax.train.objectives import base
from lmjax.train.objectives import sft as sft_lib


def reference_mode(cfg) -> str | None:
  """The reference of cfg.dpo: 'adapters_off', 'copy' or 'precomputed' (see the module
  doc); None with dpo.reference_free."""
  if cfg.dpo.reference_free:
    return None
  mode = cfg.dpo.reference
  if mode == 'auto':
    return 'adapters_off' if cfg.lora.enabled else 'copy'
  return mode


def pair_logps(graphdef, params, batch, **kw):
  """Completion log-prob sums and token counts of a pair batch ([2B] rows -> [B] each):
  (chosen, rejected, chosen tokens, rejected tokens), one stacked forward pass."""
  lp, n = forward.row_logps(graphdef, params, batch, **kw)
  return (*losses.split_pairs(lp), *losses.split_pairs(n))


class DPO(base.Objective):
  """DPO and its variants (cfg.dpo) against a reference (see the module doc)."""

  name = 'dpo'
  rows_per_example = 2
  normaliser = 'pairs'
  needs_base = True  # the reference is the starting model (init_from)

  def __init__(self, cfg):
    super().__init__(cfg)
    self.reference = reference_mode(cfg)
    if self.reference == 'precomputed':
      self.row_keys = {'ref_logps': jnp.float32}
    self.counters = tuple(f'dpo/{k}' for k in formats.COUNTS)
    self.tables = {}  # split -> precomputed reference log-probs

  @classmethod
  def validate(cls, cfg):
    d = cfg.dpo
    sft_lib.validate_data_group(cfg, 'dpo')
    if not cfg.init_from.path:
      raise config_lib.ConfigError("stage='dpo': set init_from.path (the SFT model to align; "
                                   'it is also the reference)')
    if d.beta <= 0:
      raise config_lib.ConfigError(f'dpo.beta must be positive, got {d.beta}')
    if not 0 <= d.label_smoothing < 0.5:
      raise config_lib.ConfigError(f'dpo.label_smoothing must be in [0, 0.5), got '
                                   f'{d.label_smoothing}')
    if d.reference == 'adapters_off' and not cfg.lora.enabled:
      raise config_lib.ConfigError("dpo.reference='adapters_off' needs lora.enabled (the "
                                   'reference is the base without adapters)')

  # ---- Data and state -----------------------------------------------------------------

  def check_data(self, tokenizer, log):
    return data_check.check_stage(self.cfg, tokenizer, 'dpo', log=log)

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source
    return preference.make_pair_iterator(self.cfg, tokenizer, split, keep=keep,
                                         ref_logps=self.tables.get(split), **kw)

  def split_batch(self, host):
    return {k: host[k] for k in self.batch_keys}, sft_lib.overlong_counts(host)

  def state_entries(self, abstract_params, param_shardings):
    if self.reference != 'copy':
      return {}
    return {'ref_params': base.StateEntry(
        abstract_params, param_shardings, init=lambda params, key: jax.tree.map(jnp.copy, params),
        saved=False)}

  def prepare(self, setup, tokenizer, splits, *, workdir, base, load_base):
    if self.reference == 'precomputed':  # the reference = init_from's params
      self.tables = ref_logps.tables(self.cfg, setup, tokenizer, splits, workdir=workdir,
                                     reference=base, load_params=load_base)

  # ---- Loss ---------------------------------------------------------------------------

  def sums(self, setup):
    """(sum of per-pair losses, sums of TRL's metrics); normalised by pairs."""
    graphdef, lora, d, mode = setup.graphdef, setup.lora, self.cfg.dpo, self.reference

    def sums(weights, batch, rng):
      pc, pr, nc, nr = pair_logps(graphdef, weights['params'], batch,
                                  adapters=weights.get('adapters'), lora=lora, dropout_rng=rng)
      if mode is None:  # dpo.reference_free: a reference of log-prob 0
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
      elif mode == 'precomputed':
        rc, rr = losses.split_pairs(batch['ref_logps'])
      else:
        ref = weights['params'] if mode == 'adapters_off' else weights['ref_params']
        rc, rr, _, _ = jax.lax.stop_gradient(pair_logps(graphdef, ref, batch))
      loss, m = losses.dpo(pc, pr, rc, rr, loss_type=d.loss_type, beta=d.beta,
                           label_smoothing=d.label_smoothing, reference_free=d.reference_free,
                           chosen_tokens=nc, rejected_tokens=nr, rpo_alpha=d.rpo_alpha)
      out = {'loss': jnp.sum(loss), 'logps/chosen': jnp.sum(pc), 'logps/rejected': jnp.sum(pr)}
      out.update((k, jnp.sum(v)) for k, v in m.items())
      return jnp.sum(loss), out

    return sums

  def denominator(self, batch):
    return jnp.float32(batch['inputs'].shape[0] // 2)  # pairs in the global batch

  # ---- Eval ---------------------------------------------------------------------------

  def eval_step(self, setup):
    """(weights, batch) -> sums of the DPO loss and TRL's metrics over the batch's pairs,
    with 'pairs' (no dropout)."""
    sums = self.sums(setup)

    def step(weights, batch):
      _, aux = sums(weights, batch, None)
      return dict(aux, pairs=self.denominator(batch))

    spec = self.batch_spec(2)
    return forward.jit_eval(setup, step, forward.batch_shardings(setup.mesh, setup.rules,
                                                                 spec))

  def evaluate(self, eval_step, weights, tokenizer, mesh, process_index, process_count,
               keep=None):
    """The DPO loss and TRL's metrics over cfg.train.eval_batches batches of held-out pairs:
    eval_loss, eval_pairs, eval/rewards/accuracies, eval/rewards/margins, ..."""
    total = self.eval_outputs(eval_step, weights, tokenizer, mesh, process_index,
                              process_count, keep=keep)
    n = total.pop('pairs')
    out = {'eval_loss': total.pop('loss') / n, 'eval_pairs': n}
    out.update((f'eval/{k}', v / n) for k, v in total.items())
    return out

  def answer_examples(self, tokenizer, split):
    """The first sft.eval_examples of the built-in task's held-out pairs as questions
    (prompt, chosen answer); none for other pairs: a chosen completion is a preferred
    answer, not the only right one."""
    d, limit = self.cfg.dpo, self.cfg.sft.eval_examples
    if limit <= 0 or d.source != 'jsonl' or d.eval_path or not formats.is_builtin(d.path):
      return []
    return preference.answer_examples(self.cfg, split, limit, tokenizer)

  def exact_match(self, graphdef, params, tokenizer, mesh, examples):
    return sft_lib.chat_exact_match(self.cfg, graphdef, params, tokenizer, mesh, examples)

  def sample_prompt(self, tokenizer, text):
    return sft_lib.chat_sample_prompt(self.cfg, tokenizer, text)
