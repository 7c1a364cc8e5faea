"""Kahneman-Tversky optimisation (cfg.stage='kto') on unpaired like/dislike feedback (cfg.kto).

Batch: B examples as 2B rows (data/feedback.py), example i in row 2i (its prompt and
completion) and its KL row in 2i + 1 (the same prompt, a fixed partner example's
completion), loss mask on the completion tokens, 'label' per row (1 liked, 0 disliked);
with precomputed references each row also carries 'ref_logps'. One forward pass over all
2B rows; r = policy - reference log-prob summed over each row's completion tokens.
Loss: losses.kto, each example's times its 'weight' (1, or |2p - 1| for a pair split by
an AI judge's soft label p: data/feedback.py), averaged over the examples of the global
batch (the normaliser is 'examples'), with the reference point z = max(0, mean r of the
batch's KL rows), no gradient. Under gradient accumulation z is the micro-batch's (as TRL
computes it per forward pass), and the logged 'kl' is the examples-weighted mean of the
micro-batches' z.
The reference (kto.reference) is any of DPO's (objectives/dpo.py):
    adapters_off  LoRA: the base model with the adapters off, in the same step;
    copy          a frozen copy of the starting params ('ref_params'; not checkpointed:
                  rebuilt from the recorded init_from on resume);
    precomputed   log-probs of both rows computed once before training (train/
                  ref_logps.py, [n_examples, 2] = example row, KL row) read with the data.
Metrics, named as TRL's: kl, rewards/{chosen,rejected,margins}, logps/{chosen,rejected}
(chosen = liked, rejected = disliked), each a mean over that label's examples of the step;
a label absent from the step logs 0, and so do the margins (chosen mean - rejected mean);
count/{chosen,rejected} are the step's examples of each label. eval_loss, eval_examples
and eval/<metric> on held-out examples. Overlong examples (kto.overlong; an example with
its KL row) are counted as 'kto/dropped' and 'kto/truncated'. Exact match at each eval only
for the built-in data, whose liked answers are exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from lmjax import config as config_lib
from lmjax.data import feedback, formats
from lmjax.train import forward, losses, ref_logps
from lmjax.train.objectives import paired

# The metric sums of a batch that are means over the liked ('chosen') or disliked
# ('rejected') examples.
_PER_LABEL = ('rewards/chosen', 'rewards/rejected', 'logps/chosen', 'logps/rejected')


def balance_warning(n_liked: int, n_disliked: int, desirable_weight: float,
                    undesirable_weight: float) -> str | None:
  """The WARNING line when λD·nD / (λU·nU) is outside [1, 4/3] (the KTO paper's advice),
  or when one label is absent; None when balanced."""
  ratio = losses.kto_weight_balance(n_liked, n_disliked, desirable_weight,
                                    undesirable_weight)
  counts = f'{n_liked} liked and {n_disliked} disliked training examples'
  if ratio is None:
    side = 'disliked' if n_liked else 'liked'
    return (f'WARNING: kto data has {counts}: no {side} examples, so that side of the '
            f'loss (and its rewards metrics) is absent' +
            ('; the reference point z is still estimated from the KL rows' if n_liked or
             n_disliked else ''))
  if 1.0 <= ratio <= 4 / 3:
    return None
  if ratio < 1:  # ratio 1: λD = λU·nU / nD, rounded up
    value = math.ceil(undesirable_weight * n_disliked / n_liked * 1000) / 1000
    fix = f'kto.desirable_weight={value:g}'
  else:  # ratio 1: λU = λD·nD / nU, rounded down
    value = math.floor(desirable_weight * n_liked / n_disliked * 1000) / 1000
    fix = f'kto.undesirable_weight={value:g}'
  return (f'WARNING: kto data has {counts}: kto.desirable_weight x liked / '
          f'(kto.undesirable_weight x disliked) = {ratio:.3f}, outside [1, 4/3] (the KTO '
          f'paper\'s advice); set e.g. {fix}')


class KTO(paired.Aligned):
  """KTO (cfg.kto) against a reference (see the module doc)."""

  name = 'kto'
  group = 'kto'
  normaliser = 'examples'

  def __init__(self, cfg):
    super().__init__(cfg)
    self.row_keys = {'label': jnp.int32, 'weight': jnp.float32,
                     **self.row_keys}  # (+ 'ref_logps': precomputed)

  @classmethod
  def validate(cls, cfg):
    super().validate(cfg)
    for key in ('desirable_weight', 'undesirable_weight'):
      if cfg.kto[key] <= 0:
        raise config_lib.ConfigError(f'kto.{key} must be positive, got {cfg.kto[key]}')

  # ---- Data and state -----------------------------------------------------------------

  def check_data(self, tokenizer, log):
    checked = super().check_data(tokenizer, log)
    train = self.cfg.data.train_split
    liked = feedback.get_examples(self.cfg, train).labels()
    keep = checked.keep.get(train)
    if keep is not None:
      liked = liked[keep]
    k = self.cfg.kto
    warning = balance_warning(int(liked.sum()), int((~liked).sum()), k.desirable_weight,
                              k.undesirable_weight)
    if warning:
      log(warning)
    return checked

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source
    return feedback.make_feedback_iterator(self.cfg, tokenizer, split, keep=keep,
                                           ref_logps=self.tables.get(split), **kw)

  def prepare(self, setup, tokenizer, splits, *, workdir, base, load_base):
    if self.reference == 'precomputed':  # the reference = init_from's params
      self.tables = ref_logps.tables(
          self.cfg, setup, tokenizer, splits, workdir=workdir, reference=base,
          load_params=load_base, group='kto',
          count=lambda cfg, split: len(feedback.get_examples(cfg, split)),
          make_iterator=feedback.make_feedback_iterator,
          extra={'kl_partners': self.cfg.seed}, unit='examples')

  # ---- Loss ---------------------------------------------------------------------------

  def sums(self, setup):
    """(sum of per-example losses, metric sums); normalised by examples."""
    graphdef, lora, k = setup.graphdef, setup.lora, self.cfg.kto

    def sums(weights, batch, rng):
      (pol, pol_kl, n, n_kl), router = paired.row_logps(
          graphdef, weights['params'], batch, router=True, adapters=weights.get('adapters'),
          lora=lora, dropout_rng=rng)
      ref, ref_kl = self.reference_logps(graphdef, weights, batch)
      liked, _ = losses.split_pairs(batch['label'])
      weight, _ = losses.split_pairs(batch['weight'])
      loss, st = losses.kto(pol, ref, liked, n > 0, pol_kl, ref_kl, n_kl > 0,
                            loss_type=k.loss_type, beta=k.beta,
                            desirable_weight=k.desirable_weight,
                            undesirable_weight=k.undesirable_weight)
      loss = loss * weight  # 1, or |2p - 1| for a pair's soft label p
      out = {'loss': jnp.sum(loss),
             'kl': st['kl'] * pol.shape[0],  # z of this (micro-)batch x its examples
             'count/chosen': st['chosen'], 'count/rejected': st['rejected']}
      out.update((key, st[key]) for key in _PER_LABEL)
      router_loss, telemetry = forward.router_sums(router, self.cfg.model.moe,
                                                   jnp.float32(pol.shape[0]))
      out.update(telemetry)  # an MoE policy's router losses, per example
      return jnp.sum(loss) + router_loss, out

    return sums

  def metrics(self, aux, denom):
    """loss and kl over the examples; rewards/logps over the examples of their label (0
    when none); rewards/margins the difference of the two means (0 unless both labels
    are present); count/* as they are."""
    out = {'loss': aux['loss'] / denom, 'kl': aux['kl'] / denom,
           'count/chosen': aux['count/chosen'], 'count/rejected': aux['count/rejected']}
    out.update((k, v / denom) for k, v in aux.items() if k.startswith('moe/'))
    for key in _PER_LABEL:
      out[key] = aux[key] / jnp.maximum(aux['count/' + key.split('/')[1]], 1.0)
    both = (aux['count/chosen'] > 0) & (aux['count/rejected'] > 0)
    out['rewards/margins'] = jnp.where(both, out['rewards/chosen'] - out['rewards/rejected'],
                                       0.0)
    return out

  # ---- Eval ---------------------------------------------------------------------------

  def answer_examples(self, tokenizer, split):
    """The first sft.eval_examples liked answers of the built-in held-out data as
    questions; none for other data: a liked completion is a good answer, not the only
    right one."""
    k, limit = self.cfg.kto, self.cfg.sft.eval_examples
    if limit <= 0 or k.source != 'jsonl' or k.eval_path or not formats.is_builtin(k.path):
      return []
    return feedback.answer_examples(self.cfg, split, limit, tokenizer)
