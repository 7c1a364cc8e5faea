"""The GRPO loss (train/losses.py) against an independent NumPy reference of TRL's
GRPOTrainer formulas (TRL 0.2x `_compute_loss` and advantage computation), and its
identities.

Reference, per completion token: ρ = exp(logp - old), l = -min(ρA, clip(ρ, 1 - ε_low,
1 + ε_high)A) + β·(exp(ref - logp) - (ref - logp) - 1); aggregated as grpo (per-sequence
token mean, averaged), bnpo (token mean of the batch), dr_grpo (sum / (rows x
max_completion_length)), dapo (token mean of the global batch: one process, no
accumulation, so equal to bnpo here). Advantages: (r - group mean) / (std + 1e-4), std
ddof 1 (torch.std).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.train import losses

R, T, L = 6, 7, 7  # rows (3 prompts x G 2), tokens, max completion length


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  logps = rng.uniform(-3, -0.1, (R, T))
  old = logps + rng.normal(0, 0.5, (R, T))  # ratios on both sides of the clip range
  ref = logps + rng.normal(0, 0.2, (R, T))
  adv = rng.normal(0, 1, R)
  lengths = np.array([7, 1, 4, 6, 3, 5])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
  entropy = rng.uniform(0, 2, (R, T))
  return logps, old, ref, adv, mask, entropy


def reference_loss(logps, old, adv, mask, *, loss_type, eps_low, eps_high, beta=0.0,
                   ref=None, entropy=None):
  coef_1 = np.exp(logps - old)
  coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
  a = adv[:, None]
  per_token = -np.minimum(coef_1 * a, coef_2 * a)
  metrics = {}
  tokens = mask.sum()
  if beta:
    kl = np.exp(ref - logps) - (ref - logps) - 1
    per_token = per_token + beta * kl
    metrics['kl'] = (kl * mask).sum() / tokens
  if loss_type == 'grpo':
    loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
  elif loss_type in ('bnpo', 'dapo'):
    loss = (per_token * mask).sum() / max(tokens, 1)
  else:
    loss = (per_token * mask).sum() / (per_token.shape[0] * L)
  low = (coef_1 < 1 - eps_low) & (a < 0)
  high = (coef_1 > 1 + eps_high) & (a > 0)
  metrics['clip_ratio/low_mean'] = (low * mask).sum() / tokens
  metrics['clip_ratio/high_mean'] = (high * mask).sum() / tokens
  metrics['clip_ratio/region_mean'] = ((low | high) * mask).sum() / tokens
  if entropy is not None:
    metrics['entropy'] = (entropy * mask).sum() / tokens
  return loss, metrics


def reference_advantages(rewards, g, scale):
  r = np.asarray(rewards, np.float64).reshape(-1, g)
  adv = (r - r.mean(1, keepdims=True)).reshape(-1)
  if scale == 'group':
    adv = adv / np.repeat(r.std(1, ddof=1) + 1e-4, g)
  elif scale == 'batch':
    adv = adv / (r.reshape(-1).std(ddof=1) + 1e-4)
  return adv


def _ours(logps, old, adv, mask, **kw):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  for k in ('ref_logps', 'entropy'):
    kw[k] = f32(kw.get(k))
  loss, m = losses.grpo_loss(f32(logps), f32(old), f32(adv), f32(mask),
                             max_completion_length=L, **kw)
  return float(loss), {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
@pytest.mark.parametrize('beta', [0.0, 0.04])
@pytest.mark.parametrize('eps', [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_metrics_match_trl(loss_type, beta, eps):
  logps, old, ref, adv, mask, entropy = _tensors()
  want, want_m = reference_loss(logps, old, adv, mask, loss_type=loss_type, eps_low=eps[0],
                                eps_high=eps[1], beta=beta, ref=ref, entropy=entropy)
  got, got_m = _ours(logps, old, adv, mask, loss_type=loss_type, epsilon_low=eps[0],
                     epsilon_high=eps[1], beta=beta, ref_logps=ref, entropy=entropy)
  assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
  assert set(got_m) == set(want_m)
  for k in want_m:
    assert got_m[k] == pytest.approx(want_m[k], rel=1e-6, abs=1e-6), k
  assert want_m['clip_ratio/low_mean'] > 0 and want_m['clip_ratio/high_mean'] > 0


def test_normalisers_make_sums_over_micro_batches_exact():
  """grpo_sums' (sum, normaliser): sums of two halves over the whole batch's normaliser
  give the whole batch's loss (except bnpo, which is per micro-batch by definition)."""
  logps, old, _, adv, mask, _ = _tensors(1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  expected = {'grpo': R, 'bnpo': 1, 'dr_grpo': R * L, 'dapo': mask.sum()}
  for loss_type in losses.GRPO_LOSSES:
    kw = dict(loss_type=loss_type, max_completion_length=L)
    whole, _, n = losses.grpo_sums(f32(logps), f32(old), f32(adv), f32(mask), **kw)
    assert float(n) == expected[loss_type]
    if loss_type == 'bnpo':
      continue
    halves = sum(float(losses.grpo_sums(f32(logps[s]), f32(old[s]), f32(adv[s]),
                                        f32(mask[s]), **kw)[0])
                 for s in (slice(0, 3), slice(3, 6)))
    assert halves == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.parametrize('scale', losses.SCALE_REWARDS)
def test_advantages_match_trl(scale):
  rewards = [1.0, 0.0, 0.5, 0.5, 2.0, -1.0, 0.3, 0.9]
  adv, zero = losses.group_advantages(rewards, 2, scale)
  np.testing.assert_allclose(adv, reference_advantages(rewards, 2, scale), rtol=1e-12)
  assert zero.tolist() == [False, False, True, True, False, False, False, False]
  adv4, zero4 = losses.group_advantages(rewards, 4, scale)
  np.testing.assert_allclose(adv4, reference_advantages(rewards, 4, scale), rtol=1e-12)
  assert not zero4.any()


def test_two_completions_get_plus_minus_0_7071():
  adv, _ = losses.group_advantages([1.0, 0.0], 2)
  np.testing.assert_allclose(adv, [0.5 / (np.sqrt(0.5) + 1e-4), -0.5 / (np.sqrt(0.5) + 1e-4)],
                             rtol=1e-12)
  assert abs(adv[0] - 0.7071) < 2e-4 and adv[1] == -adv[0]


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
def test_equal_rewards_give_zero_advantage_loss_and_gradient(loss_type):
  adv, zero = losses.group_advantages([0.5] * 6, 2)
  assert zero.all() and np.all(adv == 0)
  logps, old, _, _, mask, _ = _tensors(2)

  def loss(lp):
    return losses.grpo_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                            jnp.asarray(mask, jnp.float32), loss_type=loss_type,
                            max_completion_length=L)[0]
  value, grad = jax.value_and_grad(loss)(jnp.asarray(logps, jnp.float32))
  assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_k3_is_nonnegative_and_zero_with_its_gradient_at_the_reference():
  logps, _, ref, _, mask, _ = _tensors(3)
  d = ref - logps
  assert np.all(np.exp(d) - d - 1 >= 0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  zeros = jnp.zeros(R, jnp.float32)

  def kl_loss(lp, r):
    return losses.grpo_loss(lp, jax.lax.stop_gradient(lp), zeros, f32(mask), beta=1.0,
                            ref_logps=r, max_completion_length=L)

  (value, m), grad = jax.value_and_grad(kl_loss, has_aux=True)(f32(logps), f32(logps))
  assert abs(float(value)) < 1e-7 and m['kl'] == 0.0
  assert np.max(np.abs(np.asarray(grad))) < 1e-7
  (_, m), grad = jax.value_and_grad(kl_loss, has_aux=True)(f32(logps), f32(ref))
  assert float(m['kl']) > 0 and np.max(np.abs(np.asarray(grad))) > 1e-3


def test_clipped_tokens_get_no_gradient():
  """One token per row: (A, ρ) = (+1, 1.5) and (-1, 0.5) are clipped (zero gradient);
  (+1, 0.5) and (-1, 1.5) are on the unclipped side (gradient -A/1 per token)."""
  adv = jnp.asarray([1.0, -1.0, 1.0, -1.0])
  old = jnp.log(jnp.asarray([[1 / 1.5], [1 / 0.5], [1 / 0.5], [1 / 1.5]]))
  mask = jnp.ones((4, 1))

  def loss(lp):
    return losses.grpo_loss(lp, old, adv, mask, loss_type='dapo', epsilon_low=0.2,
                            epsilon_high=0.2)[0]
  grad = np.asarray(jax.grad(loss)(jnp.zeros((4, 1))))[:, 0]
  assert grad[0] == 0.0 and grad[1] == 0.0
  np.testing.assert_allclose(grad[2:], [-1.0 * 0.5 / 4, 1.0 * 1.5 / 4], rtol=1e-6)


def test_one_update_a_rollout_has_zero_loss_but_a_gradient():
  """μ = 1: old = logp (ratios 1), advantages summing to 0 per group, loss_type grpo: the
  loss is 0, the gradient (-A/n per token) is not (the behaviour TRL users ask about)."""
  logps, _, _, _, mask, _ = _tensors(4)
  adv, _ = losses.group_advantages([1.0, 0.0, 0.2, 0.9, 0.4, 0.4], 2)
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def loss(lp):
    return losses.grpo_loss(lp, jax.lax.stop_gradient(lp), f32(adv), f32(mask),
                            loss_type='grpo', max_completion_length=L)[0]
  value, grad = jax.value_and_grad(loss)(f32(logps))
  assert abs(float(value)) < 1e-7
  want = -adv[:, None] * mask / mask.sum(-1, keepdims=True) / R
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)
  assert np.abs(want).max() > 0.1


def _reference_sampling(logits, targets, temperature, top_k, top_p):
  x = logits.astype(np.float64) / temperature
  logp_out, ent_out = np.zeros(targets.shape), np.zeros(targets.shape)
  for idx in np.ndindex(targets.shape):
    row = x[idx]
    order = np.argsort(-row)
    k = top_k or len(row)
    keep = np.zeros(len(row), bool)
    top = order[:k]
    p = np.exp(row[top] - row[top].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep[top[before < top_p] if top_p < 1 else top] = True
    keep[top[0]] = True
    keep[targets[idx]] = True
    z = np.where(keep, row, -np.inf)
    lp = z - np.log(np.sum(np.exp(z[keep] - z[keep].max()))) - z[keep].max()
    logp_out[idx] = lp[targets[idx]]
    q = np.exp(lp[keep])
    ent_out[idx] = -np.sum(q * lp[keep])
  return logp_out, ent_out


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (0.7, 5, 1.0),
                                                       (1.3, 0, 0.8), (0.9, 8, 0.9)])
def test_sampling_stats_match_the_truncated_distribution(temperature, top_k, top_p):
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 2, (2, 5, 32)).astype(np.float32)
  targets = rng.integers(0, 32, (2, 5))
  targets[0, 0] = int(np.argmin(logits[0, 0]))  # outside any truncated set: added to it
  got_lp, got_ent = losses.sampling_stats(jnp.asarray(logits), jnp.asarray(targets),
                                          temperature=temperature, top_k=top_k, top_p=top_p)
  want_lp, want_ent = _reference_sampling(logits, targets, temperature, top_k, top_p)
  np.testing.assert_allclose(np.asarray(got_lp), want_lp, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_ent), want_ent, atol=1e-5)
  if top_k == 0 and top_p == 1.0:
    plain = jax.nn.log_softmax(jnp.asarray(logits) / temperature)
    np.testing.assert_allclose(np.asarray(got_lp), np.take_along_axis(
        np.asarray(plain), targets[..., None], -1)[..., 0], atol=1e-6)
