"""Mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE by config).

A router (a [d, E] matmul in float32, softmax, then top-k; the k weights renormalised to
sum to 1 when model.moe.renormalize, as Mixtral and Qwen3-MoE do) sends each token to k
of E SwiGLU experts; the output is the weighted sum of their outputs, plus an optional
shared expert that sees every token (Qwen2-MoE: gated by sigmoid(x @ shared_gate)).

Three ways to run the experts (model.moe.dispatch), equal wherever nothing is dropped:
  dropless  sort the token-expert assignments by expert, run each expert's matmuls as one
            grouped matmul over its contiguous rows (`jax.lax.ragged_dot`), unsort. Every
            assignment is computed; FLOPs are those of the k active experts.
  capacity  each expert takes at most C = ceil(capacity_factor * T * k / E) assignments of
            a row (top-1 choices first, then by position); the rest are dropped (their
            expert output is 0, the residual carries the token) and counted. Fixed
            shapes [B, E, C, d]: what GShard-style expert parallelism shards along E.
  dense     every expert runs on every token, masked by the top-k weights: E/k times the
            FLOPs; the reference the other two are tested against.

Router losses (the loss takes them through `router_losses`):
  load balancing  Switch Transformer's eq. 4-6 over the top-k assignments, E * sum_e f_e
                  p_e, with f_e the fraction of assignments to expert e and p_e its mean
                  router probability over the real tokens; k at uniform routing.
                  moe.balance='layer' (default): that of each layer, averaged over layers.
                  'pooled': f and p over every layer's tokens pooled, Hugging Face's
                  `load_balancing_loss_func` exactly; a layer that overloads one expert
                  and a layer that overloads another then cancel out, and the loss can sit
                  at its minimum while every layer is imbalanced.
  router z-loss   ST-MoE's mean over tokens (and layers) of logsumexp(router logits)^2.
Padding tokens (segment id 0) are routed like any token but count in no statistic and
take no capacity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax import sharding

DISPATCHES = ('dropless', 'capacity', 'dense')


class RouterStats(NamedTuple):
  """Sums over one layer's real tokens (stacked to [layers, ...] by the layer scan)."""
  assigned: jax.Array   # [E] top-k assignments to each expert (before any drop)
  processed: jax.Array  # [E] assignments each expert computed (after capacity drops)
  prob: jax.Array       # [E] router probabilities
  z: jax.Array          # [] logsumexp(router logits)^2
  entropy: jax.Array    # [] entropy of the router distribution
  tokens: jax.Array     # [] real tokens


def route(x, router, top_k: int, renormalize: bool):
  """x [N, d], router [d, E] -> (float32 logits [N, E], top-k weights [N, k] float32,
  top-k expert ids [N, k])."""
  logits = jnp.einsum('nd,de->ne', x.astype(jnp.float32), router.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, weights, ids


def router_stats(logits, ids, valid, processed=None) -> RouterStats:
  """RouterStats of logits [N, E] and choices ids [N, k] over the tokens with valid [N]
  (float); processed [E] defaults to every assignment."""
  e = logits.shape[-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(logp)
  assigned = jnp.zeros((e,), jnp.float32).at[ids].add(
      jnp.broadcast_to(valid[:, None], ids.shape))
  lse = jax.nn.logsumexp(logits, axis=-1)
  return RouterStats(
      assigned=assigned,
      processed=assigned if processed is None else processed,
      prob=jnp.sum(probs * valid[:, None], axis=0),
      z=jnp.sum(valid * lse * lse),
      entropy=jnp.sum(valid * -jnp.sum(probs * logp, axis=-1)),
      tokens=jnp.sum(valid))


def load_balancing_loss(stats: RouterStats, balance: str = 'pooled') -> jax.Array:
  """The load-balancing loss of layer-stacked stats (unweighted), k at uniform routing.

  'pooled': Hugging Face's `load_balancing_loss_func`, E * sum_e f_e p_e over every
  layer's tokens pooled. 'layer': that of each layer, averaged over layers."""
  if balance == 'layer':
    n = jnp.maximum(stats.tokens, 1.0)[:, None]
    f, p = stats.assigned / n, stats.prob / n                         # [L, E]
    return f.shape[-1] * jnp.mean(jnp.sum(f * p, axis=-1))
  n = jnp.maximum(jnp.sum(stats.tokens), 1.0)
  f = jnp.sum(stats.assigned, axis=0) / n
  p = jnp.sum(stats.prob, axis=0) / n
  return f.shape[-1] * jnp.sum(f * p)


def router_z_loss(stats: RouterStats) -> jax.Array:
  """ST-MoE's router z-loss (unweighted): mean over layers and tokens of lse^2."""
  return jnp.sum(stats.z) / jnp.maximum(jnp.sum(stats.tokens), 1.0)


def router_losses(stats: RouterStats, moe_cfg) -> tuple[jax.Array, dict]:
  """(aux_loss_coef * balance + z_loss_coef * z, per-step telemetry) of layer-stacked stats.

  Telemetry: 'moe/balance_loss', 'moe/router_z_loss' (unweighted); per layer i
  'moe/layer{i}/load_max' (the busiest expert's computed assignments over the balanced
  share T*k/E: 1 = balanced), 'moe/layer{i}/load_mean' (the mean over experts, 1 minus the
  dropped fraction), 'moe/layer{i}/dropped', 'moe/layer{i}/entropy' (nats; ln E = uniform)
  and 'moe/layer{i}/z_loss'; per expert j 'moe/expert{j}/load' (its share over layers,
  1 = balanced).
  """
  balance = load_balancing_loss(stats, moe_cfg['balance'])
  z = router_z_loss(stats)
  loss = float(moe_cfg['aux_loss']) * balance + float(moe_cfg['z_loss']) * z
  k, e = int(moe_cfg['top_k']), stats.assigned.shape[-1]
  tokens = jnp.maximum(stats.tokens, 1.0)                       # [L]
  share = stats.processed / (tokens[:, None] * k / e)          # [L, E]
  dropped = 1.0 - (jnp.sum(stats.processed, -1)
                   / jnp.maximum(jnp.sum(stats.assigned, -1), 1.0))
  out = {'moe/balance_loss': balance, 'moe/router_z_loss': z}
  for i in range(stats.tokens.shape[0]):
    out.update({f'moe/layer{i}/load_max': jnp.max(share[i]),
                f'moe/layer{i}/load_mean': jnp.mean(share[i]),
                f'moe/layer{i}/dropped': dropped[i],
                f'moe/layer{i}/entropy': stats.entropy[i] / tokens[i],
                f'moe/layer{i}/z_loss': stats.z[i] / tokens[i]})
  load = jnp.mean(share, axis=0)
  out.update((f'moe/expert{j}/load', load[j]) for j in range(e))
  return loss, out


# ---- Dispatch -------------------------------------------------------------------------

def _swiglu(x, gate, up, down):
  """Per-expert SwiGLU: x [E, ..., d] with weights [E, d, f], [E, f, d]."""
  g = jnp.einsum('e...d,edf->e...f', x, gate)
  u = jnp.einsum('e...d,edf->e...f', x, up)
  return jnp.einsum('e...f,efd->e...d', jax.nn.silu(g) * u, down)


def dense(x, weights, ids, gate, up, down):
  """Every expert on every token, combined with the top-k weights: x [N, d] -> [N, d]."""
  e = gate.shape[0]
  combine = jnp.einsum('nke,nk->ne', jax.nn.one_hot(ids, e, dtype=jnp.float32), weights)
  y = _swiglu(jnp.broadcast_to(x, (e,) + x.shape), gate, up, down)        # [E, N, d]
  return jnp.einsum('end,ne->nd', y, combine.astype(y.dtype))


def dropless(x, weights, ids, gate, up, down):
  """Sort assignments by expert, grouped matmuls (`ragged_dot`), unsort: x [N, d] -> [N, d]."""
  n, k = ids.shape
  e = gate.shape[0]
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = jnp.take(x, order // k, axis=0)                                   # [N*k, d]
  sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
  g = jax.lax.ragged_dot(xs, gate, sizes)
  u = jax.lax.ragged_dot(xs, up, sizes)
  y = jax.lax.ragged_dot(jax.nn.silu(g) * u, down, sizes)                # [N*k, d]
  y = jnp.take(y, jnp.argsort(order), axis=0).reshape(n, k, -1)
  return jnp.einsum('nkd,nk->nd', y, weights.astype(y.dtype))


def capacity(capacity_factor: float, length: int, k: int, e: int) -> int:
  """Slots per expert and row: ceil(capacity_factor * length * k / e), at most `length`
  (top-k choices are distinct, so an expert never gets more than one per token)."""
  return max(1, min(length, math.ceil(capacity_factor * length * k / e)))


def capacity_dispatch(x, weights, ids, valid, gate, up, down, capacity_factor: float):
  """Capacity-limited experts per batch row: x [B, T, d] -> ([B, T, d], processed [E]).

  Assignments fill each expert's C slots in priority order (every token's first choice,
  then its second, ...; by position within a choice); those past C, and padding, are
  dropped. The buffer [B, E, C, d] is sharded along 'expert' for expert parallelism."""
  b, t, k = ids.shape
  e, d = gate.shape[0], x.shape[-1]
  c = capacity(capacity_factor, t, k, e)
  onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32) * valid[:, :, None, None].astype(jnp.int32)
  by_rank = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, e)            # priority order
  pos = jnp.cumsum(by_rank, axis=1) - 1
  pos = jnp.sum(pos * by_rank, axis=-1).reshape(b, k, t).transpose(0, 2, 1)  # [B, T, k]
  keep = (pos < c) & (valid[:, :, None] > 0)
  slot = jnp.where(keep, pos, c)                                          # c: dropped
  rows = jnp.arange(b)[:, None, None]
  src = jnp.broadcast_to(x[:, :, None, :], (b, t, k, d))
  buf = jnp.zeros((b, e, c, d), x.dtype).at[rows, ids, slot].set(src, mode='drop')
  buf = sharding.constrain(buf, ('batch', 'expert', None, 'embed'))
  y = _swiglu(buf.transpose(1, 0, 2, 3), gate, up, down).transpose(1, 0, 2, 3)
  y = sharding.constrain(y, ('batch', 'expert', None, 'embed'))
  out = y[rows, ids, jnp.minimum(slot, c - 1)]                            # [B, T, k, d]
  w = jnp.where(keep, weights, 0.0).astype(out.dtype)
  processed = jnp.zeros((e,), jnp.float32).at[ids].add(keep.astype(jnp.float32))
  return jnp.einsum('btkd,btk->btd', out, w), processed


# ---- Module ---------------------------------------------------------------------------

def _param(rngs, shape, axes, std, dtype):
  return nnx.Param(nnx.initializers.normal(std)(rngs.params(), shape, dtype),
                   out_sharding=axes)


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts (+ an optional shared expert); see the module docstring.

  Params: router [d, E]; gate, up [E, d, f]; down [E, f, d] (f = moe.d_ff); with
  moe.shared_d_ff > 0 a shared expert shared_{gate,up} [d, fs], shared_down [fs, d] and,
  with moe.shared_gate, its gate [d, 1].
  """

  def __init__(self, cfg, rngs: nnx.Rngs, param_dtype):
    m = cfg.moe
    d, e, f = cfg.d_model, int(m.experts), int(m.d_ff) or cfg.d_ff
    std, pd = cfg.init_std, param_dtype
    self.cfg = cfg
    self.router = _param(rngs, (d, e), ('embed', None), std, pd)
    self.gate = _param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), std, pd)
    self.up = _param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), std, pd)
    self.down = _param(rngs, (e, f, d), ('expert', 'mlp', 'embed'), std, pd)
    fs = int(m.shared_d_ff)
    if fs:
      self.shared_gate_proj = _param(rngs, (d, fs), ('embed', 'mlp'), std, pd)
      self.shared_up = _param(rngs, (d, fs), ('embed', 'mlp'), std, pd)
      self.shared_down = _param(rngs, (fs, d), ('mlp', 'embed'), std, pd)
      if m.shared_gate:
        self.shared_gate = _param(rngs, (d, 1), ('embed', None), std, pd)

  def __call__(self, x, segment_ids=None, dispatch: str | None = None):
    """x [B, T, d] -> (output [B, T, d], RouterStats). dispatch overrides moe.dispatch
    (generation runs 'dropless': it never drops a token)."""
    m = self.cfg.moe
    dispatch = dispatch or m.dispatch
    b, t, d = x.shape
    dt = x.dtype
    valid = (jnp.ones((b, t), jnp.float32) if segment_ids is None
             else (segment_ids != 0).astype(jnp.float32))
    flat = x.reshape(b * t, d)
    logits, weights, ids = route(flat, self.router[...], int(m.top_k), bool(m.renormalize))
    w = [p[...].astype(dt) for p in (self.gate, self.up, self.down)]
    processed = None
    if dispatch == 'dense':
      y = dense(flat, weights, ids, *w).reshape(b, t, d)
    elif dispatch == 'dropless':
      y = dropless(flat, weights, ids, *w).reshape(b, t, d)
    else:
      y, processed = capacity_dispatch(x, weights.reshape(b, t, -1), ids.reshape(b, t, -1),
                                       valid, *w, float(m.capacity_factor))
    if int(m.shared_d_ff):
      g = x @ self.shared_gate_proj[...].astype(dt)
      u = x @ self.shared_up[...].astype(dt)
      h = sharding.constrain(jax.nn.silu(g) * u, ('batch', 'length', 'mlp'))
      s = h @ self.shared_down[...].astype(dt)
      if m.shared_gate:
        s = s * jax.nn.sigmoid(x @ self.shared_gate[...].astype(dt))
      y = y + s
    stats = router_stats(logits, ids, valid.reshape(-1), processed)
    return y.astype(dt), stats


def active_ffn_params(mcfg) -> int:
  """Matmul weights one token uses in an MoE layer's feed-forward: k experts, the shared
  expert and its gate, the router."""
  m = mcfg.moe
  d, f = mcfg.d_model, int(m.d_ff) or mcfg.d_ff
  n = int(m.top_k) * 3 * d * f + d * int(m.experts)
  if int(m.shared_d_ff):
    n += 3 * d * int(m.shared_d_ff) + (d if m.shared_gate else 0)
  return n


def total_ffn_params(mcfg) -> int:
  """Every matmul weight of an MoE layer's feed-forward."""
  m = mcfg.moe
  d, f = mcfg.d_model, int(m.d_ff) or mcfg.d_ff
  n = int(m.experts) * 3 * d * f + d * int(m.experts)
  if int(m.shared_d_ff):
    n += 3 * d * int(m.shared_d_ff) + (d if m.shared_gate else 0)
  return n
