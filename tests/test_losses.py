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
