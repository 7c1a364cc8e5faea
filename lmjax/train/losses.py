"""Losses. Each returns sums over loss tokens, so callers can average over the
tokens of the whole global batch (also across gradient-accumulation micro-batches)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def logit_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(logsumexp, target logit) per position, float32 [..., T], of logits [..., T, V]:
  everything the token losses need (log p(target) = target logit - logsumexp)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def chunked_logit_stats(hidden: jax.Array, unembed: Callable[[jax.Array], jax.Array],
                        targets: jax.Array, chunk: int = 0, stats=logit_stats) -> tuple:
  """stats(unembed(hidden), targets) ([B, T, D] -> [B, T, V] -> a tuple of [B, T]; default
  logit_stats) computed `chunk` positions at a time (chunk 0 or >= T: at once). Each
  chunk's logits are rematerialised in the backward pass (jax.checkpoint inside a scan),
  so float32 logits for the whole batch never exist: peak logits memory is B x chunk x V
  instead of B x T x V."""
  b, t = targets.shape
  if not chunk or chunk >= t:
    return stats(unembed(hidden), targets)
  if t % chunk:
    raise ValueError(f'model.loss_chunk={chunk} must divide the sequence length {t}')
  n = t // chunk
  split = lambda x: jnp.swapaxes(x.reshape((b, n, chunk) + x.shape[2:]), 0, 1)
  chunk_stats = jax.checkpoint(lambda h, y: stats(unembed(h), y))
  _, out = jax.lax.scan(lambda c, xs: (c, chunk_stats(*xs)), None,
                        (split(hidden), split(targets)))
  join = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, t)
  return tuple(join(x) for x in out)


def nll_sums(lse: jax.Array, target_logit: jax.Array, mask: jax.Array,
             z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(nll_sum, z_loss_sum) over positions where mask is 1, from logit_stats."""
  mask = mask.astype(jnp.float32)
  nll = jnp.sum((lse - target_logit) * mask)
  z = z_loss * jnp.sum(jnp.square(lse) * mask) if z_loss else jnp.zeros((), jnp.float32)
  return nll, z


def next_token(logits: jax.Array, targets: jax.Array, mask: jax.Array,
               z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy on float32 logits [B, T, V].

  Returns (nll_sum, z_loss_sum): the sums over positions where mask is 1.
  z-loss is coef * logsumexp(logits)^2 (PaLM), which keeps the softmax normaliser near 1.
  """
  return nll_sums(*logit_stats(logits, targets), mask, z_loss)


# ---- Preference optimisation (DPO and variants) --------------------------------------

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge', 'robust')


def dpo(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
        ref_rejected: jax.Array, *, loss_type: str = 'sigmoid', beta: float = 0.1,
        label_smoothing: float = 0.0, reference_free: bool = False,
        chosen_tokens: jax.Array | None = None,
        rejected_tokens: jax.Array | None = None,
        rpo_alpha: float = 0.0, labels: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Per-pair preference losses [B] and their rewards, as the papers define them (DPO, IPO,
  RPO, ...; where TRL 1.16 differs, for IPO's reward metrics and RPO's weighting, see
  train/objectives/dpo.py).

  Inputs are [B] sequence log-probs summed over completion tokens (policy and reference;
  the reference's are ignored with reference_free, i.e. a reference of log-prob 0). With
  h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected):
    sigmoid  -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)            (DPO; ε > 0: conservative DPO)
    robust   (-(1 - ε)·log σ(β·h) + ε·log σ(-β·h)) / (1 - 2ε) (robust DPO, unbiased under
                                                             label noise ε)
    hinge    max(0, 1 - β·h)                                 (SLiC)
    ipo      (h - 1/(2β))²  on per-token averaged log-probs: pass chosen_tokens and
             rejected_tokens (completion token counts) and sums are divided by them.
  labels (sigmoid only; label_smoothing must be 0): per-pair soft labels p in [0, 1], the
  probability that chosen is the better answer (e.g. an AI judge's), as a per-pair
  smoothing ε = 1 - p:  -p·log σ(β·h) - (1 - p)·log σ(-β·h). p = 1 is DPO; a constant
  p = 1 - ε is conservative DPO with label_smoothing ε; the loss is least at β·h =
  logit(p) (p = 0.5: at h = 0, no preference).
  rpo_alpha > 0 adds α times the chosen completion's mean per-token negative log-likelihood
  (RPO, Pang et al. 2024; TRL's rpo_alpha), which keeps DPO from lowering the chosen
  answers' likelihood along with the rejected ones'; it needs chosen_tokens.
  Rewards (no gradient): β·(policy - reference) of chosen and rejected, on the same
  log-probs the loss used. With policy == reference: sigmoid = ln 2, hinge = 1,
  IPO = (1/(2β))², every reward 0.
  """
  if loss_type not in DPO_LOSSES:
    raise ValueError(f'dpo loss_type must be one of {DPO_LOSSES}, got {loss_type!r}')
  if beta <= 0:
    raise ValueError(f'dpo beta must be positive, got {beta}')
  eps = float(label_smoothing)
  if not 0.0 <= eps < 0.5:
    raise ValueError(f'dpo label_smoothing must be in [0, 0.5), got {eps}')
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc, pr, rc, rr = map(f32, (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
  if rpo_alpha and chosen_tokens is None:
    raise ValueError('rpo_alpha averages the chosen NLL per token: pass chosen_tokens')
  nll_chosen = -pc / jnp.maximum(f32(chosen_tokens), 1.0) if rpo_alpha else 0.0
  if loss_type == 'ipo':
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError('the ipo loss averages log-probs per token: pass chosen_tokens and '
                       'rejected_tokens')
    nc, nr = jnp.maximum(f32(chosen_tokens), 1.0), jnp.maximum(f32(rejected_tokens), 1.0)
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  if reference_free:
    rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
  h = (pc - pr) - (rc - rr)
  if labels is not None:
    if loss_type != 'sigmoid' or eps:
      raise ValueError('per-pair soft labels are for the sigmoid loss without '
                       'label_smoothing (they set a smoothing per pair)')
    eps = 1.0 - f32(labels)
  if loss_type == 'sigmoid':
    loss = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == 'robust':
    loss = ((-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h))
            / (1 - 2 * eps))
  elif loss_type == 'hinge':
    loss = jax.nn.relu(1.0 - beta * h)
  else:  # ipo
    loss = jnp.square(h - 1.0 / (2.0 * beta))
  if rpo_alpha:
    loss = loss + rpo_alpha * nll_chosen
  chosen_r = jax.lax.stop_gradient(beta * (pc - rc))
  rejected_r = jax.lax.stop_gradient(beta * (pr - rr))
  rewards = {'rewards/chosen': chosen_r, 'rewards/rejected': rejected_r,
             'rewards/margins': chosen_r - rejected_r,
             'rewards/accuracies': (chosen_r > rejected_r).astype(jnp.float32)}
  return loss, rewards


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """Per-row sums of log p(target) over mask positions, and the mask counts: ([N], [N])
  float32 from logits [N, T, V]. Padding (mask 0) adds nothing, so a row's sum does not
  depend on how far it is padded."""
  return sequence_sums(*logit_stats(logits, targets), mask)


def sequence_sums(lse: jax.Array, target_logit: jax.Array, mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """sequence_logprobs from logit_stats."""
  mask = mask.astype(jnp.float32)
  return jnp.sum((target_logit - lse) * mask, axis=-1), jnp.sum(mask, axis=-1)


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows 2i (chosen) and 2i + 1 (rejected) of a pair batch (data/preference.py)."""
  return x[0::2], x[1::2]


# ---- Unpaired feedback (KTO) ---------------------------------------------------------

KTO_LOSSES = ('kto', 'apo_zero_unpaired')


def kto(policy_logps: jax.Array, ref_logps: jax.Array, desirable: jax.Array,
        valid: jax.Array, kl_policy_logps: jax.Array, kl_ref_logps: jax.Array,
        kl_valid: jax.Array, *, loss_type: str = 'kto', beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0
        ) -> tuple[jax.Array, dict]:
  """Per-row KTO losses [N] (0 on rows with valid 0) and the batch's statistics.

  Inputs are [N] float32 sequence log-probs summed over completion tokens: the batch's
  rows (desirable 1 = liked, 0 = disliked) and, for the KL estimate, the same prompts
  with mismatched completions (kl_*; kl_valid marks real ones). With r = policy - ref:
    kto                z = max(0, mean of the mismatched rows' r), no gradient (the KTO
                       paper's reference point, as TRL's KTOTrainer estimates it);
                       liked λD·(1 - σ(β(r - z))), disliked λU·(1 - σ(β(z - r)))
    apo_zero_unpaired  liked λD·(1 - σ(βr)), disliked λU·σ(βr) (APO-zero, no z)
  The mean over the valid rows of the global batch is TRL's loss (TRL gathers each
  device's KL mean and averages them: the same number when devices hold equal shares).
  With policy == reference the kto loss of every row is λ/2, and its gradient wrt r is
  -β/4·λD for a liked row and +β/4·λU for a disliked one.

  Statistics (no gradient): 'kl' (z, clamped at 0 as TRL reports it; 0 for
  apo_zero_unpaired) and, so that micro-batches and devices add up, per label the row
  counts ('chosen', 'rejected') and the sums of the rewards β·r and of the policy
  log-probs ('rewards/chosen', 'logps/chosen', ...).
  """
  if loss_type not in KTO_LOSSES:
    raise ValueError(f'kto loss_type must be one of {KTO_LOSSES}, got {loss_type!r}')
  if beta <= 0:
    raise ValueError(f'kto beta must be positive, got {beta}')
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pol, ref, valid = f32(policy_logps), f32(ref_logps), f32(valid)
  liked = f32(desirable) * valid
  disliked = (1.0 - f32(desirable)) * valid
  r = pol - ref
  kl_valid = f32(kl_valid)
  kl_ratio = jax.lax.stop_gradient(f32(kl_policy_logps) - f32(kl_ref_logps))
  z = jnp.maximum(jnp.sum(kl_ratio * kl_valid) / jnp.maximum(jnp.sum(kl_valid), 1.0), 0.0)
  if loss_type == 'kto':
    liked_loss = 1.0 - jax.nn.sigmoid(beta * (r - z))
    disliked_loss = 1.0 - jax.nn.sigmoid(beta * (z - r))
  else:
    liked_loss = 1.0 - jax.nn.sigmoid(beta * r)
    disliked_loss = jax.nn.sigmoid(beta * r)
  loss = (desirable_weight * liked * liked_loss
          + undesirable_weight * disliked * disliked_loss)
  reward = jax.lax.stop_gradient(beta * r)
  pol = jax.lax.stop_gradient(pol)
  stats = {'kl': z if loss_type == 'kto' else jnp.zeros((), jnp.float32),
           'chosen': jnp.sum(liked), 'rejected': jnp.sum(disliked),
           'rewards/chosen': jnp.sum(reward * liked),
           'rewards/rejected': jnp.sum(reward * disliked),
           'logps/chosen': jnp.sum(pol * liked), 'logps/rejected': jnp.sum(pol * disliked)}
  return loss, stats


def kto_weight_balance(n_desirable: int, n_undesirable: int, desirable_weight: float,
                       undesirable_weight: float) -> float | None:
  """λD·nD / (λU·nU), the ratio the KTO paper recommends keeping in [1, 4/3]; None
  when a side has no examples."""
  if not n_desirable or not n_undesirable:
    return None
  return desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


# ---- Reward models (Bradley-Terry) ---------------------------------------------------

def bradley_terry(reward_chosen: jax.Array, reward_rejected: jax.Array, *,
                  margin: jax.Array | None = None, label: jax.Array | None = None,
                  center_rewards_coefficient: float = 0.0) -> tuple[jax.Array, dict]:
  """Per-pair reward-model losses [P] and metrics, from scalar rewards [P] of each pair.

  With Δ = r_chosen - r_rejected - margin (margin: an optional per-pair column, 0 without):
    hard labels   -log σ(Δ)                                (TRL's RewardTrainer)
    soft labels   -[p·log σ(Δ) + (1 - p)·log σ(-Δ)]        (label p in [0, 1]: the share of
                  judges preferring chosen; p = 1 is exactly the hard loss, and the
                  minimum over Δ lies at Δ = logit(p))
  plus center_rewards_coefficient·(r_chosen + r_rejected)² (TRL: keeps rewards centred
  on 0). Equal rewards give ln 2; with a margin m and equal rewards, softplus(m).
  Metrics per pair (no gradient), averaged by the caller with TRL's names: 'accuracy'
  (r_chosen > r_rejected strictly: a tie scores 0) and 'margin' (r_chosen - r_rejected);
  'min_reward' / 'max_reward' / 'mean_reward' are over both rewards of the batch.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  rc, rr = f32(reward_chosen), f32(reward_rejected)
  delta = rc - rr - (f32(margin) if margin is not None else 0.0)
  if label is None:
    loss = -jax.nn.log_sigmoid(delta)
  else:
    p = f32(label)
    loss = -(p * jax.nn.log_sigmoid(delta) + (1.0 - p) * jax.nn.log_sigmoid(-delta))
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * jnp.square(rc + rr)
  rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
  metrics = {'accuracy': (rc > rr).astype(jnp.float32), 'margin': rc - rr}
  return loss, metrics


# ---- Online RL (GRPO and its variants) -----------------------------------------------

GRPO_LOSSES = ('grpo', 'bnpo', 'dr_grpo', 'dapo')
SCALE_REWARDS = ('group', 'batch', 'none')
ADVANTAGE_EPS = 1e-4  # added to the std before dividing (TRL's)


def group_advantages(rewards, group_size: int, scale: str = 'group'):
  """Group-normalised advantages of rewards [N·G] (numpy, on the host: rewards come from
  Python), each prompt's G completions consecutive: A = (r - mean of its group) / (std +
  1e-4), the std of its group ('group'), of the whole batch ('batch'), or no division
  ('none'). The std is the unbiased one (ddof 1, torch.std's, as TRL computes it), so G = 2
  with different rewards gives A = ±1/√2 ≈ ±0.7071. Returns (advantages float64 [N·G],
  zero_std bool [N·G]: the completion's group has rewards all equal, so A = 0)."""
  if scale not in SCALE_REWARDS:
    raise ValueError(f'scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}')
  r = np.asarray(rewards, np.float64)
  if r.ndim != 1 or r.size % group_size:
    raise ValueError(f'{r.shape} rewards do not split into groups of {group_size}')
  g = r.reshape(-1, group_size)
  group_std = g.std(axis=1, ddof=1) if group_size > 1 else np.zeros(len(g))
  adv = (g - g.mean(axis=1, keepdims=True)).reshape(-1)
  zero_std = np.repeat(np.isclose(group_std, 0.0), group_size)
  if scale == 'group':
    adv = adv / np.repeat(group_std + ADVANTAGE_EPS, group_size)
  elif scale == 'batch':
    adv = adv / ((r.std(ddof=1) if r.size > 1 else 0.0) + ADVANTAGE_EPS)
  return adv, zero_std


def sampling_stats(logits: jax.Array, targets: jax.Array, *, temperature: float,
                   top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(log-prob of each target, entropy) [..., T] float32 under the distribution a sampler
  with these settings draws from (generate.sampling_logits: logits / temperature, top-k
  and top-p, renormalised; the target always in the support): what online RL's ratios
  and KL need to equal the sampler's own log-probs. The kept set is a constant of the
  gradient (it depends on the logits only through a comparison)."""
  from lmjax import generate  # pylint: disable=import-outside-toplevel
  x = generate.sampling_logits(logits, temperature, top_p, top_k=top_k,
                               use_top_p=top_p < 1.0, keep=targets)
  logp = jax.nn.log_softmax(x, axis=-1)
  target = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  p = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  return target, jax.lax.stop_gradient(entropy)


def grpo_sums(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, loss_type: str = 'grpo', epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logps: jax.Array | None = None, max_completion_length: int = 1,
              entropy: jax.Array | None = None) -> tuple[jax.Array, dict, jax.Array]:
  """The GRPO loss of completion tokens, as TRL's GRPOTrainer computes it (TRL 0.2x):

    ρ = exp(logp - old_logp)                                (per token)
    l = -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) + β·k3,
    k3 = exp(ref - logp) - (ref - logp) - 1  (>= 0; 0 with its gradient where π = π_ref)

  logps, old_logps, ref_logps [R, T] (the completion tokens' log-probs under the policy,
  the policy that sampled them, the reference), advantages [R], mask [R, T] (1 on
  completion tokens, their stop token included). Aggregation, by loss_type, as
  (sum, normaliser) so that sums of micro-batches over a global normaliser are exact:
    grpo     each completion's token mean, averaged over completions:
             (Σ_i Σ_t l·m / max(n_i, 1), rows)
    bnpo     the token mean of the batch given (one micro-batch): (Σ l·m / max(Σ m, 1), 1)
    dr_grpo  (Σ l·m, rows · max_completion_length)  (Dr. GRPO: no length bias)
    dapo     (Σ l·m, Σ m)  (the token mean over the global batch)
  With old_logps equal to logps (one update per rollout, μ = 1) every ρ is 1, so the
  loss is the mean of -A, which is 0 where each group's advantages sum to 0, while its
  gradient, -A·∇logp, is not.

  Returns (loss sum, metric sums over the mask's tokens: 'kl' (k3, with a reference),
  'clip_ratio/low_mean' (ρ < 1 - ε_low with A < 0), 'clip_ratio/high_mean' (ρ > 1 +
  ε_high with A > 0), 'clip_ratio/region_mean' (either), 'entropy' (if given),
  'completion_tokens'; normaliser)."""
  if loss_type not in GRPO_LOSSES:
    raise ValueError(f'loss_type must be one of {GRPO_LOSSES}, got {loss_type!r}')
  if beta and ref_logps is None:
    raise ValueError('grpo_sums: beta > 0 needs ref_logps (the KL term\'s reference)')
  mask = mask.astype(jnp.float32)
  adv = advantages.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logps - old_logps)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  metrics = {}
  if beta:
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1.0
    per_token = per_token + beta * kl
    metrics['kl'] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
  ratio = jax.lax.stop_gradient(ratio)
  low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
  high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
  metrics.update({'clip_ratio/low_mean': jnp.sum(low * mask),
                  'clip_ratio/high_mean': jnp.sum(high * mask),
                  'clip_ratio/region_mean': jnp.sum(jnp.maximum(low, high) * mask),
                  'completion_tokens': jnp.sum(mask)})
  if entropy is not None:
    metrics['entropy'] = jnp.sum(entropy * mask)
  rows = jnp.float32(logps.shape[0])
  if loss_type == 'grpo':
    n = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.sum(jnp.sum(per_token * mask, axis=-1) / n), metrics, rows
  total = jnp.sum(per_token * mask)
  if loss_type == 'bnpo':
    return total / jnp.maximum(jnp.sum(mask), 1.0), metrics, jnp.float32(1.0)
  if loss_type == 'dr_grpo':
    return total, metrics, rows * max_completion_length
  return total, metrics, jnp.sum(mask)


def grpo_loss(logps, old_logps, advantages, mask, **kw) -> tuple[jax.Array, dict]:
  """grpo_sums over one batch as TRL logs it: (loss, each metric as a mean over the
  batch's completion tokens)."""
  total, m, normaliser = grpo_sums(logps, old_logps, advantages, mask, **kw)
  n = jnp.maximum(m.pop('completion_tokens'), 1.0)
  return total / normaliser, {k: v / n for k, v in m.items()}
