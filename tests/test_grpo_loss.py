"""The online-RL losses of lmjax.train.losses (group_advantages, sampling_stats, grpo_sums,
grpo_loss for every loss type in GRPO_LOSSES) against TRL's GRPOTrainer formulas (TRL 0.2x,
`_compute_loss` and its advantage computation), written here again, independently, in
float64 NumPy: group-normalised advantages (std with ddof 1, + 1e-4), the clipped
importance ratio, the k3 KL estimate, the four aggregations (grpo, bnpo, dr_grpo, dapo) and
the logged metrics (kl, clip ratios, entropy); then identities that hold whatever the data
(zero-std groups give no gradient, a clipped token gives no gradient, k3 and its gradient
vanish at the reference, μ = 1 gives a zero loss with a nonzero gradient), and the sampler's
log-probs (temperature, top-k, top-p, the target always kept) against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.train import losses

EPS = 1e-4          # TRL adds it to the std before dividing
R, T = 6, 7         # completions, completion tokens
MAX_LEN = 8         # max_completion_length (>= T: not every batch reaches it)
LENGTHS = (7, 3, 1, 5, 7, 2)


# ---- The NumPy reference (TRL's GRPOTrainer) ------------------------------------------

def ref_advantages(rewards, group_size, scale):
  r = np.asarray(rewards, np.float64)
  g = r.reshape(-1, group_size)
  mean = g.mean(axis=1, keepdims=True)
  std = g.std(axis=1, ddof=1, keepdims=True)       # torch.std: unbiased
  if scale == 'group':
    a = (g - mean) / (std + EPS)
  elif scale == 'batch':
    a = (g - mean) / (r.std(ddof=1) + EPS)
  else:
    a = g - mean
  zero_std = np.repeat(np.all(g == g[:, :1], axis=1), group_size)
  return a.reshape(-1), zero_std


def ref_grpo(logps, old, adv, mask, *, loss_type, eps_low, eps_high, beta=0.0, ref=None,
             max_len=MAX_LEN, entropy=None):
  logps, old, adv, mask = (np.asarray(v, np.float64) for v in (logps, old, adv, mask))
  a = adv[:, None]
  coef_1 = np.exp(logps - old)
  coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
  per_token = -np.minimum(coef_1 * a, coef_2 * a)
  if beta != 0.0:
    d = np.asarray(ref, np.float64) - logps
    kl = np.exp(d) - d - 1
    per_token = per_token + beta * kl
  if loss_type == 'grpo':
    loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
  elif loss_type == 'bnpo':
    loss = (per_token * mask).sum() / max(mask.sum(), 1.0)
  elif loss_type == 'dr_grpo':
    loss = (per_token * mask).sum() / (per_token.shape[0] * max_len)
  else:  # dapo: one process, no gradient accumulation
    loss = (per_token * mask).sum() / mask.sum()

  def mean(x):
    return (np.asarray(x, np.float64) * mask).sum() / mask.sum()
  low = (coef_1 < 1 - eps_low) & (a < 0)
  high = (coef_1 > 1 + eps_high) & (a > 0)
  metrics = {'clip_ratio/low_mean': mean(low), 'clip_ratio/high_mean': mean(high),
             'clip_ratio/region_mean': mean(low | high)}
  if beta != 0.0:
    metrics['kl'] = mean(kl)
  if entropy is not None:
    metrics['entropy'] = mean(entropy)
  return loss, metrics


def ref_sampling(logits, targets, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  v = x.shape[-1]
  flat, tgt = x.reshape(-1, v), np.asarray(targets).reshape(-1)
  logp, ent = np.zeros(len(flat)), np.zeros(len(flat))
  for i, (row, t) in enumerate(zip(flat, tgt)):
    order = np.argsort(-row)
    cand = order[:top_k] if top_k else order
    p = np.exp(row[cand] - row[cand].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = cand[(before < top_p) | (np.arange(len(cand)) == 0)]
    keep = np.union1d(keep, [t])
    z = row[keep].max() + np.log(np.exp(row[keep] - row[keep].max()).sum())
    logp[i] = row[t] - z
    q = np.exp(row[keep] - z)
    ent[i] = -(q * np.log(q)).sum()
  return logp.reshape(targets.shape), ent.reshape(targets.shape)


# ---- Data -----------------------------------------------------------------------------

def make_batch(seed=0, group_size=2):
  """float32 arrays: logps in [-3, -0.1], old = logps + N(0, 0.3) (ratios clipped both
  ways), ref = logps + N(0, 0.5), ragged mask (one row of length 1), group advantages."""
  rng = np.random.default_rng(seed)
  logps = rng.uniform(-3.0, -0.1, (R, T)).astype(np.float32)
  old = (logps + rng.normal(0, 0.3, (R, T))).astype(np.float32)
  ref = (logps + rng.normal(0, 0.5, (R, T))).astype(np.float32)
  mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
  rewards = rng.normal(0, 1, R)
  adv = ref_advantages(rewards, group_size, 'group')[0].astype(np.float32)
  entropy = rng.uniform(0.0, 3.0, (R, T)).astype(np.float32)
  return dict(logps=logps, old=old, ref=ref, mask=mask, adv=adv, entropy=entropy)


def close(actual, expected, tol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize('group_size', [2, 3])
def test_batch_clips_both_ways(group_size):
  """The data of the comparisons below reach every branch, for every ε they use: tokens
  clipped low with A < 0 and high with A > 0, and unclipped ones."""
  b = make_batch(seed=group_size, group_size=group_size)
  ratio = np.exp(b['logps'].astype(np.float64) - b['old'])
  a = b['adv'][:, None]
  m = b['mask'] > 0
  assert np.sum(m & (ratio < 0.8) & (a < 0)) >= 2
  assert np.sum(m & (ratio > 1.3) & (a > 0)) >= 2
  assert np.sum(m & (ratio > 0.9) & (ratio < 1.1)) >= 2


# ---- 1. the loss and metrics for every loss type ---------------------------------------

@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
@pytest.mark.parametrize('beta', [0.0, 0.04])
@pytest.mark.parametrize('eps', [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
@pytest.mark.parametrize('group_size', [2, 3])
def test_grpo_loss_matches_trl(loss_type, beta, eps, group_size):
  b = make_batch(seed=group_size, group_size=group_size)
  kw = dict(loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], beta=beta,
            ref_logps=jnp.asarray(b['ref']), max_completion_length=MAX_LEN,
            entropy=jnp.asarray(b['entropy']))
  args = [jnp.asarray(b[k]) for k in ('logps', 'old', 'adv', 'mask')]
  loss, metrics = losses.grpo_loss(*args, **kw)
  want, want_metrics = ref_grpo(b['logps'], b['old'], b['adv'], b['mask'], loss_type=loss_type,
                                eps_low=eps[0], eps_high=eps[1], beta=beta, ref=b['ref'],
                                entropy=b['entropy'])
  assert loss.dtype == jnp.float32
  close(loss, want)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    close(metrics[k], v)

  total, sums, normaliser = losses.grpo_sums(*args, **kw)
  n_tokens = float(sum(LENGTHS))
  expected_norm = {'grpo': R, 'bnpo': 1.0, 'dr_grpo': R * MAX_LEN, 'dapo': n_tokens}[loss_type]
  assert float(normaliser) == expected_norm
  assert float(sums['completion_tokens']) == n_tokens
  close(total / normaliser, want)
  for k, v in want_metrics.items():
    close(sums[k] / n_tokens, v)


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
def test_micro_batch_sums_add_up(loss_type):
  """Two micro-batches (rows 0-1 and 2-5, jitted): their sums over the sum of their
  normalisers equal the whole batch's loss for grpo, dr_grpo and dapo; for bnpo (a token
  mean per micro-batch) the mean of the micro-batches' token means, as TRL's gradient
  accumulation averages them."""
  b = make_batch(seed=2)
  kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
            max_completion_length=MAX_LEN)
  sums = jax.jit(lambda *a: losses.grpo_sums(*a[:4], ref_logps=a[4], **kw))
  keys = ('logps', 'old', 'adv', 'mask', 'ref')
  parts = [sums(*(jnp.asarray(b[k][sl]) for k in keys)) for sl in (slice(0, 2), slice(2, R))]
  total = sum(float(p[0]) for p in parts) / sum(float(p[2]) for p in parts)
  ref_kw = dict(loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=0.04)
  if loss_type == 'bnpo':
    want = np.mean([ref_grpo(*(b[k][sl] for k in ('logps', 'old', 'adv', 'mask')),
                             ref=b['ref'][sl], **ref_kw)[0]
                    for sl in (slice(0, 2), slice(2, R))])
  else:
    want = ref_grpo(b['logps'], b['old'], b['adv'], b['mask'], ref=b['ref'], **ref_kw)[0]
  close(total, want)
  kl = sum(float(p[1]['kl']) for p in parts) / sum(float(p[1]['completion_tokens'])
                                                   for p in parts)
  close(kl, ref_grpo(b['logps'], b['old'], b['adv'], b['mask'], ref=b['ref'], **ref_kw)[1]['kl'])


def test_grpo_loss_rejects_unknown_type():
  b = make_batch()
  with pytest.raises(ValueError, match='loss_type'):
    losses.grpo_loss(*[jnp.asarray(b[k]) for k in ('logps', 'old', 'adv', 'mask')],
                     loss_type='ppo')


# ---- 2. advantages ---------------------------------------------------------------------

@pytest.mark.parametrize('scale', losses.SCALE_REWARDS)
@pytest.mark.parametrize('group_size', [2, 3])
def test_group_advantages_match_trl(scale, group_size):
  rng = np.random.default_rng(10 + group_size)
  rewards = rng.normal(0.5, 2.0, 4 * group_size)
  rewards[group_size:2 * group_size] = 1.25            # the second group: all equal
  adv, zero_std = losses.group_advantages(rewards, group_size, scale)
  want, want_zero = ref_advantages(rewards, group_size, scale)
  np.testing.assert_allclose(adv, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(zero_std, want_zero)
  assert zero_std.tolist() == [False] * group_size + [True] * group_size + \
      [False] * (2 * group_size)
  assert np.all(adv[group_size:2 * group_size] == 0.0)


def test_group_advantages_concrete():
  """Hand-computed values: rewards (1, 2, 6) have mean 3 and std √7 (ddof 1)."""
  adv, _ = losses.group_advantages([1.0, 2.0, 6.0], 3, 'group')
  np.testing.assert_allclose(adv, np.array([-2.0, -1.0, 3.0]) / (np.sqrt(7.0) + 1e-4),
                             rtol=1e-12)
  adv, _ = losses.group_advantages([1.0, 2.0, 6.0, 0.0, 0.0, 0.0], 3, 'batch')
  batch_std = np.sqrt(np.sum((np.array([1, 2, 6, 0, 0, 0]) - 1.5) ** 2) / 5)
  np.testing.assert_allclose(adv, np.array([-2.0, -1.0, 3.0, 0, 0, 0]) / (batch_std + 1e-4),
                             rtol=1e-12)
  adv, _ = losses.group_advantages([1.0, 2.0, 6.0], 3, 'none')
  np.testing.assert_allclose(adv, [-2.0, -1.0, 3.0], rtol=1e-12)
  with pytest.raises(ValueError, match='scale_rewards'):
    losses.group_advantages([1.0, 2.0], 2, 'rank')
  with pytest.raises(ValueError, match='groups of 4'):
    losses.group_advantages([1.0, 2.0, 3.0], 4)


# ---- 3. identities ---------------------------------------------------------------------

def _loss_fn(b, adv, **kw):
  old, mask = jnp.asarray(b['old']), jnp.asarray(b['mask'])
  return lambda lp: losses.grpo_loss(lp, old, jnp.asarray(adv), mask, **kw)[0]


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
def test_zero_std_group_gives_no_loss_and_no_gradient(loss_type):
  b = make_batch()
  rewards = np.array([0.3, 0.3, 1.0, -1.0, 2.0, 0.5])  # the first group: all equal
  adv, zero_std = losses.group_advantages(rewards, 2)
  assert zero_std.tolist() == [True, True, False, False, False, False]
  assert adv[0] == 0.0 and adv[1] == 0.0
  kw = dict(loss_type=loss_type, max_completion_length=MAX_LEN)
  grad = jax.grad(_loss_fn(b, adv.astype(np.float32), **kw))(jnp.asarray(b['logps']))
  assert np.all(np.asarray(grad)[:2] == 0.0)
  assert np.any(np.asarray(grad)[2:] != 0.0)
  # every group's rewards equal: no loss, no gradient at all
  adv, zero_std = losses.group_advantages(np.repeat([0.3, 1.0, -2.0], 2), 2)
  assert zero_std.all() and np.all(adv == 0.0)
  f = _loss_fn(b, adv.astype(np.float32), **kw)
  lp = jnp.asarray(b['logps'])
  assert float(f(lp)) == 0.0
  assert np.all(np.asarray(jax.grad(f)(lp)) == 0.0)


def test_two_completions_advantages():
  """G = 2, rewards (1, 0): std 1/√2 (ddof 1), A = ±0.5 / (1/√2 + 1e-4)."""
  adv, zero_std = losses.group_advantages([1.0, 0.0, 0.0, 1.0], 2)
  want = 0.5 / (0.70710678 + 1e-4)
  assert abs(want - 0.70700680) < 1e-6
  np.testing.assert_allclose(adv, [want, -want, -want, want], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.abs(adv), 0.7071, rtol=0, atol=2e-4)
  assert adv[0] > 0 > adv[1] and adv[2] < 0 < adv[3]
  assert not zero_std.any()


def _per_token_losses(logps, old, adv, ref, **kw):
  """Each token's loss alone (a [1, 1] batch per token)."""
  def one(lp, o, a, r):
    return losses.grpo_loss(lp[None, None], o[None, None], a[None], jnp.ones((1, 1)),
                            ref_logps=r[None, None], **kw)[0]
  return jax.vmap(one)(*(jnp.asarray(v).reshape(-1) for v in (logps, old, adv, ref)))


def test_k3_is_nonnegative_and_matches():
  b = make_batch(seed=5)
  lp, ref = b['logps'], b['ref']
  k3 = np.asarray(_per_token_losses(lp, lp, np.zeros(lp.shape, np.float32), ref, beta=1.0))
  d = ref.astype(np.float64) - lp
  want = (np.exp(d) - d - 1).reshape(-1)
  assert np.all(k3 >= 0.0)
  np.testing.assert_allclose(k3, want, rtol=1e-6, atol=1e-6)
  assert want.max() > 0.1                           # the differences are not all tiny


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
def test_kl_vanishes_at_reference(loss_type):
  """ref_logps == logps, advantages 0, β = 1: only the KL term; it and its gradient are 0."""
  b = make_batch()
  lp, mask = jnp.asarray(b['logps']), jnp.asarray(b['mask'])
  zeros = jnp.zeros(R)

  def f(x):
    return losses.grpo_loss(x, jnp.asarray(b['old']), zeros, mask, loss_type=loss_type,
                            beta=1.0, ref_logps=lp, max_completion_length=MAX_LEN)
  loss, metrics = f(lp)
  assert abs(float(metrics['kl'])) <= 1e-7 and abs(float(loss)) <= 1e-7
  grad = np.asarray(jax.grad(lambda x: f(x)[0])(lp))
  assert np.max(np.abs(grad)) <= 1e-7
  # away from the reference the same KL term has a gradient (the check above is not vacuous)
  grad = np.asarray(jax.grad(lambda x: f(x)[0])(lp + 0.5 * mask))
  assert np.max(np.abs(grad)) > 1e-3


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
@pytest.mark.parametrize('eps', [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_tokens_have_no_gradient(loss_type, eps):
  """One token a row: (A > 0, ρ > 1 + ε_high) and (A < 0, ρ < 1 - ε_low) are clipped, so
  their gradient is exactly 0; (A > 0, ρ < 1 - ε_low) and (A < 0, ρ > 1 + ε_high) are on
  the unclipped side of the min: gradient -ρ·A / (the aggregation's normaliser)."""
  ratio = np.array([1.5, 0.5, 0.5, 1.5, 1.05], np.float64)
  adv = np.array([1.0, -1.0, 1.0, -1.0, 0.7], np.float32)
  lp = np.full((5, 1), -1.0, np.float32)
  old = (lp - np.log(ratio)[:, None]).astype(np.float32)
  mask = np.ones((5, 1), np.float32)

  def f(x):
    return losses.grpo_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                            loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1],
                            max_completion_length=MAX_LEN)[0]
  grad = np.asarray(jax.grad(f)(jnp.asarray(lp)))[:, 0]
  assert grad[0] == 0.0 and grad[1] == 0.0
  norm = {'grpo': 5, 'bnpo': 5, 'dr_grpo': 5 * MAX_LEN, 'dapo': 5}[loss_type]
  rho = np.exp(lp[:, 0].astype(np.float64) - old[:, 0])
  np.testing.assert_allclose(grad[2:], -rho[2:] * adv[2:] / norm, rtol=1e-6)
  assert np.all(grad[2:] != 0.0)
  _, metrics = losses.grpo_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv),
                                jnp.asarray(mask), epsilon_low=eps[0], epsilon_high=eps[1])
  close(metrics['clip_ratio/high_mean'], 1 / 5)
  close(metrics['clip_ratio/low_mean'], 1 / 5)
  close(metrics['clip_ratio/region_mean'], 2 / 5)


@pytest.mark.parametrize('loss_type', losses.GRPO_LOSSES)
@pytest.mark.parametrize('group_size', [2, 3])
def test_single_update_zero_loss_nonzero_gradient(loss_type, group_size):
  """μ = 1 (old_logps == logps): every ρ is 1, the loss is the mean of -A, 0 when each
  group's advantages sum to 0 and a group's completions have equal lengths; its gradient
  (-A·∇logp over the normaliser) is not 0."""
  b = make_batch(seed=7, group_size=group_size)
  lengths = np.repeat(np.array([7, 1, 4])[:R // group_size], group_size)
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  lp = jnp.asarray(b['logps'])
  adv = b['adv']
  assert np.all(np.abs(adv.reshape(-1, group_size).sum(1)) < 1e-6)

  def f(x):
    return losses.grpo_loss(x, lp, jnp.asarray(adv), jnp.asarray(mask), loss_type=loss_type,
                            max_completion_length=MAX_LEN)[0]
  assert abs(float(f(lp))) <= 1e-7
  grad = np.asarray(jax.grad(f)(lp))
  assert np.max(np.abs(grad)) > 1e-3
  n = {'grpo': R * lengths[:, None], 'bnpo': mask.sum(), 'dr_grpo': R * MAX_LEN,
       'dapo': mask.sum()}[loss_type]
  np.testing.assert_allclose(grad, -adv[:, None].astype(np.float64) * mask / n, rtol=1e-6,
                             atol=1e-7)


# ---- 4. the sampler's log-probs --------------------------------------------------------

def _logits(seed=3):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(0, 2.0, (2, 5, 32))).astype(np.float32)
  targets = rng.integers(0, 32, (2, 5))
  return logits, targets


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 8, 0.9), (1.0, 3, 0.5)])
def test_sampling_stats_match_reference(temperature, top_k, top_p):
  logits, targets = _logits()
  logp, ent = losses.sampling_stats(jnp.asarray(logits), jnp.asarray(targets),
                                    temperature=temperature, top_k=top_k, top_p=top_p)
  want_logp, want_ent = ref_sampling(logits, targets, temperature, top_k, top_p)
  assert logp.shape == ent.shape == (2, 5)
  np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=0, atol=1e-5)
  if (temperature, top_k, top_p) == (1.0, 0, 1.0):
    plain = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    plain = np.take_along_axis(np.asarray(plain), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), plain, rtol=0, atol=1e-5)
  else:  # the restriction changed something (the cases are not all the plain softmax)
    full, _ = ref_sampling(logits, targets, temperature, 0, 1.0)
    assert np.max(np.abs(want_logp - full)) > 1e-3


def test_sampling_stats_target_outside_kept_set():
  """The least likely token as the target with top-k 3 / top-p 0.5: it is added to the
  kept set, so its log-prob is finite, log softmax over the kept tokens and it."""
  logits, _ = _logits(seed=4)
  targets = np.argmin(logits, axis=-1)
  for top_k, top_p in [(3, 1.0), (0, 0.5), (4, 0.6)]:
    logp, ent = losses.sampling_stats(jnp.asarray(logits), jnp.asarray(targets),
                                      temperature=0.8, top_k=top_k, top_p=top_p)
    want_logp, want_ent = ref_sampling(logits, targets, 0.8, top_k, top_p)
    assert np.all(np.isfinite(np.asarray(logp)))
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=0, atol=1e-5)
  # by hand, one position with top-k 3: the set is the 3 largest and the target
  x = logits[0, 0].astype(np.float64) / 0.8
  kept = np.union1d(np.argsort(-x)[:3], [targets[0, 0]])
  assert len(kept) == 4
  by_hand = x[targets[0, 0]] - np.log(np.exp(x[kept]).sum())
  logp, _ = losses.sampling_stats(jnp.asarray(logits), jnp.asarray(targets),
                                  temperature=0.8, top_k=3)
  np.testing.assert_allclose(float(logp[0, 0]), by_hand, atol=1e-5)


def test_sampling_stats_gradient_through_kept_set():
  """The gradient of the target's log-prob w.r.t. the logits is (onehot - p) / T on the
  kept set and 0 outside it."""
  logits, targets = _logits(seed=6)
  temperature, top_k = 0.7, 5

  def f(x):
    return losses.sampling_stats(x, jnp.asarray(targets), temperature=temperature,
                                 top_k=top_k)[0][0, 0]
  grad = np.asarray(jax.grad(f)(jnp.asarray(logits)))[0, 0]
  x = logits[0, 0].astype(np.float64) / temperature
  t = targets[0, 0]
  kept = np.union1d(np.argsort(-x)[:top_k], [t])
  p = np.zeros(32)
  p[kept] = np.exp(x[kept] - x[kept].max())
  p /= p.sum()
  want = (np.eye(32)[t] - p) / temperature
  np.testing.assert_allclose(grad, want, rtol=0, atol=1e-5)
  assert np.all(grad[np.setdiff1d(np.arange(32), kept)] == 0.0)


def test_a_kl_term_without_reference_log_probs_is_an_error():
  lp = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='beta > 0 needs ref_logps'):
    losses.grpo_sums(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), beta=0.1)
