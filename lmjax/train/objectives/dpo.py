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
(label_smoothing; with dpo.soft_labels, per pair from the data's 'label' or 'p' column:
an AI judge's probability that chosen is better), robust DPO and hinge (SLiC) on summed
log-probs; IPO on per-token
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

import jax.numpy as jnp

from lmjax import config as config_lib
from lmjax.data import formats, preference
from lmjax.train import forward, losses, ref_logps
from lmjax.train.objectives import paired


class DPO(paired.Aligned):
  """DPO and its variants (cfg.dpo) against a reference (see the module doc)."""

  name = 'dpo'
  group = 'dpo'
  normaliser = 'pairs'

  @classmethod
  def reference_mode(cls, cfg):
    """As Aligned's; None with dpo.reference_free (a reference of log-prob 0)."""
    return None if cfg.dpo.reference_free else super().reference_mode(cfg)

  @classmethod
  def validate(cls, cfg):
    super().validate(cfg)
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
      raise config_lib.ConfigError(f'dpo.label_smoothing must be in [0, 0.5), got '
                                   f'{cfg.dpo.label_smoothing}')
    if cfg.dpo.soft_labels and (cfg.dpo.loss_type != 'sigmoid' or cfg.dpo.label_smoothing):
      raise config_lib.ConfigError(
          "dpo.soft_labels sets a label smoothing per pair (1 - p): it needs "
          f"dpo.loss_type='sigmoid' and dpo.label_smoothing=0, got "
          f"{cfg.dpo.loss_type!r} and {cfg.dpo.label_smoothing}")

  def __init__(self, cfg):
    super().__init__(cfg)
    if cfg.dpo.soft_labels:  # each pair's 'label' (or 'p') column, on both rows
      self.row_keys['label'] = jnp.float32

  # ---- Data ---------------------------------------------------------------------------

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source
    return preference.make_pair_iterator(self.cfg, tokenizer, split, keep=keep,
                                         ref_logps=self.tables.get(split), **kw)

  def prepare(self, setup, tokenizer, splits, *, workdir, base, load_base):
    if self.reference == 'precomputed':  # the reference = init_from's params
      self.tables = ref_logps.tables(self.cfg, setup, tokenizer, splits, workdir=workdir,
                                     reference=base, load_params=load_base)

  # ---- Loss ---------------------------------------------------------------------------

  def sums(self, setup):
    """(sum of per-pair losses, sums of TRL's metrics); normalised by pairs."""
    graphdef, lora, d = setup.graphdef, setup.lora, self.cfg.dpo

    def sums(weights, batch, rng):
      (pc, pr, nc, nr), router = paired.row_logps(
          graphdef, weights['params'], batch, router=True, adapters=weights.get('adapters'),
          lora=lora, dropout_rng=rng)
      if self.reference is None:  # dpo.reference_free: a reference of log-prob 0
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
      else:
        rc, rr = self.reference_logps(graphdef, weights, batch)
      loss, m = losses.dpo(pc, pr, rc, rr, loss_type=d.loss_type, beta=d.beta,
                           label_smoothing=d.label_smoothing, reference_free=d.reference_free,
                           chosen_tokens=nc, rejected_tokens=nr, rpo_alpha=d.rpo_alpha,
                           labels=batch['label'][0::2] if d.soft_labels else None)
      out = {'loss': jnp.sum(loss), 'logps/chosen': jnp.sum(pc), 'logps/rejected': jnp.sum(pr)}
      out.update((k, jnp.sum(v)) for k, v in m.items())
      # An MoE policy's router losses, weighted per pair (as TRL adds router_aux_loss_coef
      # x its aux loss), and their telemetry.
      router_loss, telemetry = forward.router_sums(router, self.cfg.model.moe,
                                                   jnp.float32(pc.shape[0]))
      out.update(telemetry)
      return jnp.sum(loss) + router_loss, out

    return sums

  # ---- Eval ---------------------------------------------------------------------------

  def answer_examples(self, tokenizer, split):
    """The first sft.eval_examples of the built-in task's held-out pairs as questions
    (prompt, chosen answer); none for other pairs: a chosen completion is a preferred
    answer, not the only right one."""
    d, limit = self.cfg.dpo, self.cfg.sft.eval_examples
    if limit <= 0 or d.source != 'jsonl' or d.eval_path or not formats.is_builtin(d.path):
      return []
    return preference.answer_examples(self.cfg, split, limit, tokenizer)
