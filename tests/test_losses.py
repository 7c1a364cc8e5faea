"""Preference losses against the published formulas, written here again in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.train import losses


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _reference(pc, pr, rc, rr, loss_type, beta, eps=0.0, nc=None, nr=None, ref_free=False):
  pc, pr, rc, rr = (np.asarray(v, np.float64) for v in (pc, pr, rc, rr))
  if loss_type == 'ipo':
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  if ref_free:
    rc, rr = 0 * rc, 0 * rr
  h = (pc - pr) - (rc - rr)
  if loss_type == 'sigmoid':    # Rafailov et al. 2023, eq. 7 (+ cDPO label smoothing)
    loss = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
  elif loss_type == 'robust':   # Chowdhury et al. 2024, robust DPO
    loss = (-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps)
  elif loss_type == 'hinge':    # SLiC (Zhao et al. 2023)
    loss = np.maximum(0.0, 1 - beta * h)
  else:                         # IPO (Azar et al. 2023), eq. 17
    loss = (h - 1 / (2 * beta)) ** 2
  return loss, beta * (pc - rc), beta * (pr - rr)


RNG = np.random.default_rng(0)
PC, PR, RC, RR = (RNG.normal(-40, 8, 16) for _ in range(4))
NC, NR = RNG.integers(3, 30, 16), RNG.integers(3, 30, 16)


@pytest.mark.parametrize('loss_type,eps,ref_free', [
    ('sigmoid', 0.0, False), ('sigmoid', 0.1, False), ('robust', 0.1, False),
    ('hinge', 0.0, False), ('ipo', 0.0, False), ('sigmoid', 0.0, True)])
@pytest.mark.parametrize('beta', [0.1, 0.5])
def test_losses_match_the_formulas(loss_type, eps, ref_free, beta):
  loss, rewards = losses.dpo(PC, PR, RC, RR, loss_type=loss_type, beta=beta,
                             label_smoothing=eps, reference_free=ref_free,
                             chosen_tokens=NC, rejected_tokens=NR)
  want, rc, rr = _reference(PC, PR, RC, RR, loss_type, beta, eps, NC, NR, ref_free)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rewards['rewards/chosen']), rc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rewards['rewards/rejected']), rr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rewards['rewards/margins']), rc - rr, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(np.asarray(rewards['rewards/accuracies']),
                                (rc > rr).astype(np.float32))


@pytest.mark.parametrize('beta', [0.1, 0.25, 1.0])
def test_step_zero_identities(beta):
  """policy == reference: sigmoid = ln 2, hinge = 1, IPO = (1/(2β))², rewards 0."""
  same = dict(policy_chosen=PC, policy_rejected=PR, ref_chosen=PC, ref_rejected=PR,
              beta=beta, chosen_tokens=NC, rejected_tokens=NR)
  for loss_type, want in (('sigmoid', math.log(2)), ('robust', math.log(2)), ('hinge', 1.0),
                          ('ipo', (1 / (2 * beta)) ** 2)):
    loss, rewards = losses.dpo(loss_type=loss_type, **same)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6)
    for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins'):
      assert not np.any(np.asarray(rewards[key]))
  loss, _ = losses.dpo(loss_type='sigmoid', label_smoothing=0.2, **same)
  np.testing.assert_allclose(np.asarray(loss), math.log(2), rtol=1e-6)


def test_gradient_flows_only_through_the_policy():
  def f(pc, rc):
    loss, rewards = losses.dpo(pc, PR, rc, RR, beta=0.1)
    return jnp.mean(loss) + 0.0 * jnp.sum(rewards['rewards/chosen'])
  gp, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(PC, jnp.float32),
                                       jnp.asarray(RC, jnp.float32))
  # d/dpc of -log σ(β h) = -β σ(-β h) / B; the reference enters with the opposite sign.
  h = (PC - PR) - (RC - RR)
  want = -0.1 / (1 + np.exp(0.1 * h)) / len(h)
  np.testing.assert_allclose(np.asarray(gp), want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gr), -want, rtol=1e-4)


def test_rpo_adds_the_chosen_per_token_nll():
  base, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, chosen_tokens=NC, rejected_tokens=NR)
  rpo, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, chosen_tokens=NC, rejected_tokens=NR,
                      rpo_alpha=0.5)
  np.testing.assert_allclose(np.asarray(rpo) - np.asarray(base), 0.5 * -PC / NC, rtol=1e-4)
  with pytest.raises(ValueError, match='rpo_alpha'):
    losses.dpo(PC, PR, RC, RR, rpo_alpha=1.0)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='loss_type must be one of'):
    losses.dpo(PC, PR, RC, RR, loss_type='kto')
  with pytest.raises(ValueError, match='beta must be positive'):
    losses.dpo(PC, PR, RC, RR, beta=0.0)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.dpo(PC, PR, RC, RR, label_smoothing=0.5)
  with pytest.raises(ValueError, match='chosen_tokens'):
    losses.dpo(PC, PR, RC, RR, loss_type='ipo')


def test_chunked_logit_stats_values_and_gradients():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.float32)

  def loss(h, w, chunk):
    lse, tl = losses.chunked_logit_stats(h, lambda x: x @ w, y, chunk)
    return losses.nll_sums(lse, tl, mask, 1e-2)[0] + losses.sequence_sums(lse, tl, mask)[0][1]

  ref = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 0)
  for chunk in (4, 8, 16):
    got = jax.value_and_grad(loss, argnums=(0, 1))(h, w, chunk)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
  with pytest.raises(ValueError, match='must divide the sequence length 16'):
    losses.chunked_logit_stats(h, lambda x: x @ w, y, 5)


# ---- KTO -------------------------------------------------------------------------------

def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _trl_kto(pc, pr, pkl, rc, rr, rkl, beta, wd, wu, loss_type):
  """TRL's KTOTrainer.kto_loss (trl 0.11-0.19 and trl.experimental.kto in 1.x), in NumPy:
  the liked and disliked rows as separate arrays, the loss their concatenation's mean."""
  kl = max(float(np.mean(pkl - rkl)), 0.0)
  cr, rj = pc - rc, pr - rr
  if loss_type == 'kto':
    cl, rl = 1 - _np_sigmoid(beta * (cr - kl)), 1 - _np_sigmoid(beta * (kl - rj))
  else:  # apo_zero_unpaired
    cl, rl = 1 - _np_sigmoid(beta * cr), _np_sigmoid(beta * rj)
  loss = np.concatenate([wd * cl, wu * rl]).mean()
  return loss, kl, beta * cr, beta * rj


@pytest.mark.parametrize('loss_type', losses.KTO_LOSSES)
@pytest.mark.parametrize('beta,wd,wu', [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.2)])
def test_kto_matches_trl(loss_type, beta, wd, wu):
  rng = np.random.default_rng(0)
  n, pad = 7, 3  # 7 real rows, 3 padding rows the loss must ignore
  label = rng.random(n + pad) < 0.6
  label[:2] = [True, False]
  valid = np.r_[np.ones(n), np.zeros(pad)]
  pol, ref = rng.normal(-20, 4, n + pad), rng.normal(-20, 4, n + pad)
  kl_pol, kl_ref = rng.normal(-25, 4, n + pad), rng.normal(-27, 4, n + pad)
  loss, stats = losses.kto(pol, ref, label, valid, kl_pol, kl_ref, valid, loss_type=loss_type,
                           beta=beta, desirable_weight=wd, undesirable_weight=wu)
  liked, disliked = label[:n], ~label[:n]
  want, kl, cr, rj = _trl_kto(pol[:n][liked], pol[:n][disliked], kl_pol[:n], ref[:n][liked],
                              ref[:n][disliked], kl_ref[:n], beta, wd, wu, loss_type)
  np.testing.assert_allclose(float(jnp.sum(loss) / valid.sum()), want, rtol=1e-5)
  assert np.all(np.asarray(loss)[n:] == 0)
  if loss_type == 'kto':
    np.testing.assert_allclose(float(stats['kl']), kl, rtol=1e-5)
  np.testing.assert_allclose(float(stats['rewards/chosen'] / stats['chosen']), cr.mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(stats['rewards/rejected'] / stats['rejected']), rj.mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(stats['logps/chosen'] / stats['chosen']),
                             pol[:n][liked].mean(), rtol=1e-5)
  assert float(stats['chosen']) == liked.sum() and float(stats['rejected']) == disliked.sum()


def test_kto_identities_at_policy_equal_reference():
  """policy == reference: every row's loss is 1/2 (default weights), z = 0, and
  d loss / d policy-logp is -β/4·λD/N for a liked row, +β/4·λU/N for a disliked one."""
  beta, wd, wu = 0.3, 1.0, 1.5
  label = np.array([1, 0, 1, 1, 0, 0], bool)
  logps = jnp.asarray(np.linspace(-30, -5, 6), jnp.float32)
  ones = np.ones(6)

  def mean_loss(pol, w_d=1.0, w_u=1.0):
    loss, stats = losses.kto(pol, logps, label, ones, logps, logps, ones, beta=beta,
                             desirable_weight=w_d, undesirable_weight=w_u)
    return jnp.sum(loss) / 6, (loss, stats)

  (total, (loss, stats)) = mean_loss(logps)
  np.testing.assert_allclose(np.asarray(loss), 0.5, rtol=1e-6)
  assert float(total) == pytest.approx(0.5) and float(stats['kl']) == 0.0
  grad = jax.grad(lambda p: mean_loss(p, wd, wu)[0])(logps)
  want = np.where(label, -beta / 4 * wd / 6, beta / 4 * wu / 6)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
  label, ones = np.array([1, 0]), np.ones(2)
  pol = jnp.array([-3.0, -4.0])
  # Mismatched rows more likely under the reference: the mean log-ratio is -2, z = 0.
  _, stats = losses.kto(pol, pol, label, ones, jnp.array([-7., -8.]), jnp.array([-5., -6.]),
                        ones)
  assert float(stats['kl']) == 0.0

  def total(kl_pol):
    loss, _ = losses.kto(pol, pol - 1.0, label, ones, kl_pol, kl_pol - 2.0, ones)
    return jnp.sum(loss)
  assert float(jnp.max(jnp.abs(jax.grad(total)(jnp.array([-6.0, -7.0]))))) == 0.0


@pytest.mark.parametrize('liked', [True, False])
def test_kto_one_sided_batches_are_finite(liked):
  n = 4
  label, ones = np.full(n, liked), np.ones(n)
  pol = jnp.linspace(-9.0, -3.0, n)
  loss, stats = losses.kto(pol, pol + 0.5, label, ones, pol, pol + 0.5, ones)
  assert np.isfinite(float(jnp.sum(loss))) and float(jnp.sum(loss)) > 0
  assert float(stats['chosen' if liked else 'rejected']) == n
  assert float(stats['rejected' if liked else 'chosen']) == 0


def test_kto_weight_balance_and_bad_arguments():
  assert losses.kto_weight_balance(30, 10, 1.0, 3.0) == pytest.approx(1.0)
  assert losses.kto_weight_balance(30, 0, 1.0, 1.0) is None
  ones = np.ones(2)
  with pytest.raises(ValueError, match='loss_type'):
    losses.kto(ones, ones, ones, ones, ones, ones, ones, loss_type='bco')
  with pytest.raises(ValueError, match='beta'):
    losses.kto(ones, ones, ones, ones, ones, ones, ones, beta=0.0)


# ---- Bradley-Terry reward loss -------------------------------------------------------

def test_bradley_terry_identities():
  r = jnp.array([0.3, -1.2, 4.0])
  loss, metrics = losses.bradley_terry(r, r)
  np.testing.assert_allclose(np.asarray(loss), math.log(2), rtol=1e-6)
  assert np.all(np.asarray(metrics['accuracy']) == 0)  # a tie scores 0
  m = jnp.array([0.5, 1.0, 2.0])
  loss, _ = losses.bradley_terry(r, r, margin=m)
  np.testing.assert_allclose(np.asarray(loss), np.log1p(np.exp(np.asarray(m))), rtol=1e-6)
  # TRL's RewardTrainer: -logsigmoid(rc - rr - margin) + c·(rc + rr)².
  rc, rr = jnp.array([1.0, -0.5, 2.0]), jnp.array([0.0, 0.5, 2.5])
  loss, metrics = losses.bradley_terry(rc, rr, margin=m, center_rewards_coefficient=0.01)
  d = np.asarray(rc - rr - m)
  want = np.log1p(np.exp(-d)) + 0.01 * np.asarray(rc + rr) ** 2
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6)
  assert np.asarray(metrics['accuracy']).tolist() == [1.0, 0.0, 0.0]
  np.testing.assert_allclose(np.asarray(metrics['margin']), np.asarray(rc - rr))


def test_bradley_terry_soft_labels():
  rc, rr = jnp.array([1.0, -0.5, 2.0, 0.0]), jnp.array([0.0, 0.5, 2.5, 0.0])
  hard, _ = losses.bradley_terry(rc, rr)
  soft, _ = losses.bradley_terry(rc, rr, label=jnp.ones(4))
  np.testing.assert_array_equal(np.asarray(hard), np.asarray(soft))
  p = np.array([0.9, 0.25, 0.5, 0.7])
  d = np.asarray(rc - rr)
  want = -(p * -np.log1p(np.exp(-d)) + (1 - p) * -np.log1p(np.exp(d)))
  np.testing.assert_allclose(np.asarray(losses.bradley_terry(rc, rr, label=p)[0]), want,
                             rtol=1e-6)
  # The minimum over Δ lies at logit(p): the gradient vanishes there.
  grad = jax.grad(lambda x: jnp.sum(losses.bradley_terry(x, jnp.zeros(4), label=p)[0]))(
      jnp.asarray(np.log(p / (1 - p)), jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)
