"""Losses. Each returns sums over loss tokens, so callers can average over the
tokens of the whole global batch (also across gradient-accumulation micro-batches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token(logits: jax.Array, targets: jax.Array, mask: jax.Array,
               z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy on float32 logits [B, T, V].

  Returns (nll_sum, z_loss_sum): the sums over positions where mask is 1.
  z-loss is coef * logsumexp(logits)^2 (PaLM), which keeps the softmax normaliser near 1.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jnp.sum((lse - target_logit) * mask)
  z = z_loss * jnp.sum(jnp.square(lse) * mask) if z_loss else jnp.zeros((), jnp.float32)
  return nll, z
