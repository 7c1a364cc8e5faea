"""Reward models (cfg.stage='reward'): a Bradley-Terry loss on preference pairs (cfg.reward).

The model is the decoder with model.head='score' (models/reward.py): a linear score [D, 1]
on the final normed hidden state, read at each sequence's last real token. Starting from a
language model (init_from: an lmjax pretraining or SFT workdir, a LoRA one merged, or a
Hugging Face *ForCausalLM), the body is the source's and the score head is fresh
(lmjax/weights.py); from a *ForSequenceClassification model, its own. Full fine-tuning, or
LoRA with the score head trained fully (lora.train_params must match 'score', as PEFT's
modules_to_save holds `score` for sequence classification).

Batch: B pairs as 2B rows (data/preference.py, as DPO's), pair i in rows 2i (chosen) and
2i + 1 (rejected), one sequence per row; each row also carries the pair's 'margin' and
'label' (the share of judges preferring chosen; 1 = a hard label). Loss: losses.
bradley_terry of the pair's rewards, averaged over the pairs of the global batch (the
normaliser is 'pairs'), plus reward.center_rewards_coefficient x (r_c + r_r)^2.
Metrics, named as TRL's RewardTrainer logs them: accuracy (r_chosen > r_rejected, strict:
a tie counts 0), margin (r_chosen - r_rejected), mean_reward (of both rows), min_reward and
max_reward (over every row of the step's batch, also under gradient accumulation), loss;
on held-out pairs eval_loss, eval_pairs and eval/<metric>. Overlong pairs (reward.overlong,
default 'drop': a truncated response would be scored at a token it does not end with) are
counted as 'reward/dropped' and 'reward/truncated'.

A reward model has no next-token head: no exact match at eval, and no sample at the end of
the run (train.sample_at_end must be False).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lmjax import config as config_lib
from lmjax.data import preference
from lmjax.models import lora as lora_lib
from lmjax.models import reward as reward_lib
from lmjax.models import transformer
from lmjax.train import losses
from lmjax.train.objectives import paired
from lmjax.train.objectives import sft as sft_lib

GROUP = 'reward'


def pair_rewards(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None):
  """The reward of every row of a pair batch [2B] (float32): the score of its last real
  token (segment id > 0), one forward pass for all rows."""
  model = nnx.merge(graphdef, lora_lib.effective_params(params, adapters))
  h = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'],
                   adapters=adapters, lora=lora, dropout_rng=dropout_rng)
  return reward_lib.last_token_rewards(model.scores(h), batch['segment_ids'] > 0)


class Reward(paired.Paired):
  """A Bradley-Terry reward model on preference pairs (see the module doc)."""

  name = 'reward'
  group = GROUP
  normaliser = 'pairs'
  reducers = {'min_reward': 'min', 'max_reward': 'max'}

  def __init__(self, cfg):
    super().__init__(cfg)
    self.row_keys = {k: jnp.float32 for k in preference.GROUP_COLUMNS[GROUP]}

  @classmethod
  def validate(cls, cfg):
    sft_lib.validate_data_group(cfg, GROUP)
    if transformer.head_kind(cfg.model) != 'score':
      raise config_lib.ConfigError(
          f"stage='reward' trains a reward model: set model.head='score' (got "
          f'{transformer.head_kind(cfg.model)!r}); a language model in init_from gets a '
          'fresh score head')
    if cfg.train.sample_at_end:
      raise config_lib.ConfigError(
          "stage='reward': a reward model cannot sample text (it has no next-token head); "
          'set train.sample_at_end=False')
    if cfg.reward.center_rewards_coefficient < 0:
      raise config_lib.ConfigError('reward.center_rewards_coefficient must be >= 0, got '
                                   f'{cfg.reward.center_rewards_coefficient}')
    if cfg.lora.enabled:
      try:
        trained = lora_lib.full_params(cfg)
      except lora_lib.LoraError as e:
        raise config_lib.ConfigError(str(e)) from None
      if 'score' not in trained:
        raise config_lib.ConfigError(
            f'stage=\'reward\' with LoRA: the score head is new and must train, but '
            f'lora.train_params={cfg.lora.train_params!r} does not match it; add it, e.g. '
            "lora.train_params='score' (or 'embed|score')")

  # ---- Data ---------------------------------------------------------------------------

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source  # validate: no named sources
    return preference.make_pair_iterator(self.cfg, tokenizer, split, keep=keep, group=GROUP,
                                         **kw)

  # ---- Loss ---------------------------------------------------------------------------

  def sums(self, setup):
    """(sum of per-pair losses, sums of TRL's metrics and the batch's min / max reward);
    normalised by pairs."""
    graphdef, lora = setup.graphdef, setup.lora
    coef = self.cfg.reward.center_rewards_coefficient

    def sums(weights, batch, rng):
      r = pair_rewards(graphdef, weights['params'], batch, adapters=weights.get('adapters'),
                       lora=lora, dropout_rng=rng)
      rc, rr = losses.split_pairs(r)
      loss, m = losses.bradley_terry(rc, rr, margin=batch['margin'][0::2],
                                     label=batch['label'][0::2],
                                     center_rewards_coefficient=coef)
      out = {'loss': jnp.sum(loss), 'accuracy': jnp.sum(m['accuracy']),
             'margin': jnp.sum(m['margin']), 'mean_reward': jnp.sum(rc + rr) / 2,
             'min_reward': jnp.min(r), 'max_reward': jnp.max(r)}
      return jnp.sum(loss), out

    return sums

  # ---- Eval: Paired's (eval_loss, eval_pairs, eval/<metric> on held-out pairs) ---------
