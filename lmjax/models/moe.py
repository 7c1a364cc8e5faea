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
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from lmjax import sharding
from lmjax.models import grouped_matmul as gmm_lib

# The name of the grouped matmuls' outputs, which remat policies that save the weight
# matmuls save too (models/transformer.py REMAT_POLICIES).
DOT_NAME = 'moe_ragged_dot'


class RouterStats(NamedTuple):
  """Sums over one layer's real tokens (stacked to [layers, ...] by the layer scan)."""
  assigned: jax.Array   # [E] top-k assignments to each expert (before any drop)
  processed: jax.Array  # [E] assignments each expert computed (after capacity drops)
  prob: jax.Array       # [E] router probabilities
  z: jax.Array          # [] logsumexp(router logits)^2
  entropy: jax.Array    # [] entropy of the router distribution
  tokens: jax.Array     # [] real tokens


def route(x, router, top_k: int, renormalize: bool):
  """x [..., d], router [d, E] -> (float32 logits [..., E], top-k weights [..., k] float32,
  top-k expert ids [..., k])."""
  logits = jnp.einsum('...d,de->...e', x.astype(jnp.float32), router.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = _top_k(probs, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, weights, ids


def _top_k(probs, k: int):
  """lax.top_k over the last axis; under a mesh (`sharding.use_mesh`), per device along
  the 'batch' rule's axes of the leading dim (XLA's partitioner gathers a top-k's rows)."""
  ctx = sharding.active_mesh()
  if ctx is None or probs.ndim < 2:
    return jax.lax.top_k(probs, k)
  mesh, rules = ctx
  batch = sharding.mesh_axes(mesh, rules, 'batch')
  if not batch or probs.shape[0] % math.prod(mesh.shape[a] for a in batch):
    return jax.lax.top_k(probs, k)
  spec = P(sharding.spec_entry(batch), *([None] * (probs.ndim - 1)))
  return jax.shard_map(lambda p: tuple(jax.lax.top_k(p, k)), mesh=mesh, in_specs=(spec,),
                       out_specs=(spec, spec), check_vma=False)(probs)


def router_stats(logits, ids, valid, processed=None) -> RouterStats:
  """RouterStats of logits [N, E] and choices ids [N, k] over the tokens with valid [N]
  (float); processed [E] defaults to every assignment."""
  e = logits.shape[-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(logp)
  assigned = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32) * valid[:, None, None],
                     axis=(0, 1))
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


def dropless(x, weights, ids, gate, up, down, impl: str = 'xla'):
  """Sort assignments by expert, grouped matmuls (grouped_matmul.grouped_matmul with
  `impl`: ragged_dot or Hopper kernels), unsort: x [N, d] -> [N, d]."""
  n, k = ids.shape
  e = gate.shape[0]
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = jnp.take(x, order // k, axis=0)                                   # [N*k, d]
  sizes = jnp.sum(jax.nn.one_hot(flat, e, dtype=jnp.int32), axis=0)
  dot = lambda a, w: checkpoint_name(gmm_lib.grouped_matmul(a, w, sizes, impl), DOT_NAME)
  g, u = dot(xs, gate), dot(xs, up)
  y = dot(jax.nn.silu(g) * u, down)                                       # [N*k, d]
  y = jnp.take(y, jnp.argsort(order), axis=0).reshape(n, k, -1)
  return jnp.einsum('nkd,nk->nd', y, weights.astype(y.dtype))


def dropless_sharded(x, weights, ids, gate, up, down, impl: str = 'xla'):
  """`dropless` under the mesh of an enclosing `sharding.use_mesh`: each device sorts and
  computes its own tokens (x split along the 'batch' rule's axes), with every expert's
  weights gathered to it (as FSDP gathers a dense layer's), each 'mlp' shard computing its
  slice of the hidden units (summed over them after the down projection). Without a mesh,
  or when the rows do not split evenly, plain `dropless` (sorting the global batch)."""
  ctx = sharding.active_mesh()
  if ctx is None:
    return dropless(x, weights, ids, gate, up, down, impl)
  mesh, rules = ctx
  batch = sharding.mesh_axes(mesh, rules, 'batch')
  mlp = sharding.mesh_axes(mesh, rules, 'mlp', exclude=batch)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if gate.shape[-1] % size(mlp):
    mlp = ()
  if (not batch and not mlp) or x.shape[0] % size(batch):
    return dropless(x, weights, ids, gate, up, down, impl)
  rows, hidden = P(sharding.spec_entry(batch), None), sharding.spec_entry(mlp)

  def local(x, weights, ids, gate, up, down):
    y = dropless(x, weights, ids, gate, up, down, impl)
    return jax.lax.psum(y, mlp) if mlp else y

  return jax.shard_map(
      local, mesh=mesh, in_specs=(rows, rows, rows, P(None, None, hidden),
                                  P(None, None, hidden), P(None, hidden, None)),
      out_specs=rows, check_vma=False)(x, weights, ids, gate, up, down)


def capacity(capacity_factor: float, length: int, k: int, e: int) -> int:
  """Slots per expert and row: ceil(capacity_factor * length * k / e), at most `length`
  (top-k choices are distinct, so an expert never gets more than one per token)."""
  return max(1, min(length, math.ceil(capacity_factor * length * k / e)))


def capacity_dispatch(x, weights, ids, valid, gate, up, down, capacity_factor: float,
                      experts=None, n_experts: int | None = None):
  """Capacity-limited experts per batch row: x [B, T, d] -> ([B, T, d], processed [E]).

  Assignments fill each expert's C slots in priority order (every token's first choice,
  then its second, ...; by position within a choice); those past C, and padding, are
  dropped. experts(buf [B, E, C, d], gate, up, down) -> [B, E, C, d] runs the experts
  (default: every expert here; `capacity_sharded` passes one that exchanges the buffer
  with the devices holding the other experts, and the `n_experts` of the whole model,
  default gate's count)."""
  b, t, k = ids.shape
  d = x.shape[-1]
  e_all = n_experts or gate.shape[0]
  if experts is None:
    experts = lambda buf, *w: _swiglu(buf.transpose(1, 0, 2, 3), *w).transpose(1, 0, 2, 3)
  c = capacity(capacity_factor, t, k, e_all)
  onehot = (jax.nn.one_hot(ids, e_all, dtype=jnp.int32)
            * valid[:, :, None, None].astype(jnp.int32))
  by_rank = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, e_all)        # priority order
  pos = jnp.cumsum(by_rank, axis=1) - 1
  pos = jnp.sum(pos * by_rank, axis=-1).reshape(b, k, t).transpose(0, 2, 1)  # [B, T, k]
  keep = (pos < c) & (valid[:, :, None] > 0)
  slot = jnp.where(keep, pos, c)                                          # c: dropped
  rows = jnp.arange(b)[:, None, None]
  src = jnp.broadcast_to(x[:, :, None, :], (b, t, k, d))
  buf = jnp.zeros((b, e_all, c, d), x.dtype).at[rows, ids, slot].set(src, mode='drop')
  y = experts(buf, gate, up, down)
  out = y[rows, ids, jnp.minimum(slot, c - 1)]                            # [B, T, k, d]
  w = jnp.where(keep, weights, 0.0).astype(out.dtype)
  processed = jnp.sum(jax.nn.one_hot(ids, e_all, dtype=jnp.float32)
                      * keep[..., None].astype(jnp.float32), axis=(0, 1, 2))
  return jnp.einsum('btkd,btk->btd', out, w), processed


def capacity_sharded(x, weights, ids, valid, gate, up, down, capacity_factor: float):
  """`capacity_dispatch` under the mesh of an enclosing `sharding.use_mesh`, with expert
  parallelism: each device fills the capacity buffer of its own rows (x split along the
  'batch' rule's axes), an all-to-all over the 'expert' rule's axes sends each expert's
  slots to the devices holding it (expert weights split along E there), they run it,
  and a second all-to-all brings the outputs back. Hidden units split over the 'mlp'
  rule's axes are summed after the down projection. Without a mesh, or when the shapes do
  not split evenly, plain `capacity_dispatch` (GSPMD places it)."""
  plain = lambda: capacity_dispatch(x, weights, ids, valid, gate, up, down, capacity_factor)
  ctx = sharding.active_mesh()
  if ctx is None:
    return plain()
  mesh, rules = ctx
  batch = sharding.mesh_axes(mesh, rules, 'batch')
  expert = tuple(a for a in sharding.mesh_axes(mesh, rules, 'expert') if a in batch)
  mlp = sharding.mesh_axes(mesh, rules, 'mlp', exclude=batch)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  e, f = gate.shape[0], gate.shape[-1]
  if f % size(mlp):
    mlp = ()
  if (not batch or x.shape[0] % size(batch) or e % size(expert)
      or (x.shape[0] // size(batch)) == 0):
    return plain()
  ex, hid = sharding.spec_entry(expert), sharding.spec_entry(mlp)
  rows = lambda n: P(sharding.spec_entry(batch), *([None] * (n - 1)))

  def run_experts(buf, gate, up, down):
    if expert:  # [B_local, E, C, d] -> [B_local * n, E / n, C, d]: this device's experts
      buf = jax.lax.all_to_all(buf, expert, split_axis=1, concat_axis=0, tiled=True)
    y = _swiglu(buf.transpose(1, 0, 2, 3), gate, up, down).transpose(1, 0, 2, 3)
    if mlp:
      y = jax.lax.psum(y, mlp)
    if expert:
      y = jax.lax.all_to_all(y, expert, split_axis=0, concat_axis=1, tiled=True)
    return y

  def local(x, weights, ids, valid, gate, up, down):
    y, processed = capacity_dispatch(x, weights, ids, valid, gate, up, down,
                                     capacity_factor, experts=run_experts, n_experts=e)
    return y, jax.lax.psum(processed, batch)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(rows(3), rows(3), rows(3), rows(2), P(ex, None, hid), P(ex, None, hid),
                P(ex, hid, None)),
      out_specs=(rows(3), P()), check_vma=False)(x, weights, ids, valid, gate, up, down)


# cuDNN from which XLA runs ragged_dot as cuDNN's grouped matmul on NVIDIA GPUs; before
# it, as a dense matmul over every expert with the other experts' rows zeroed.
CUDNN_GROUPED_MATMUL = (9, 22)


def _cudnn_version() -> tuple[int, int] | None:
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
    v = cuda_versions.cudnn_get_version() if cuda_versions else None
  except Exception:  # pylint: disable=broad-except  (a private API; no version: no warning)
    return None
  return None if not v else (v // 10000, v // 100 % 100)


def grouped_impl(mcfg) -> str:
  """'xla' or 'pallas': what dropless dispatch's grouped matmuls run on here
  (model.moe.grouped_matmul resolved for the model's compute dtype and sizes)."""
  m = mcfg.moe
  f = int(m.d_ff) or mcfg.d_ff
  dt = jnp.dtype(mcfg.dtype)
  x = jax.ShapeDtypeStruct((1, mcfg.d_model), dt)
  fits = [gmm_lib.pallas_fits(x, jax.ShapeDtypeStruct(s, dt))
          for s in ((int(m.experts), mcfg.d_model, f), (int(m.experts), f, mcfg.d_model))]
  if m.grouped_matmul == 'xla' or any(fits):
    return 'xla'
  return 'pallas'


def dropless_warning(mcfg, backend: str | None = None) -> str | None:
  """A one-line warning when dropless dispatch would run slowly here: on an NVIDIA GPU
  whose cuDNN is older than CUDNN_GROUPED_MATMUL, XLA pads ragged_dot to a dense matmul
  over all E experts (E times the work), unless jax's Hopper kernels run it instead
  (grouped_impl). None where it does not apply."""
  m = mcfg.moe
  if int(m.experts) <= 0 or m.dispatch != 'dropless':
    return None
  if (backend or jax.default_backend()) != 'gpu':
    return None
  if grouped_impl(mcfg) == 'pallas':
    return None
  version = _cudnn_version()
  if version is None or version >= CUDNN_GROUPED_MATMUL:
    return None
  return (f'model.moe.dispatch=dropless on a GPU with cuDNN {version[0]}.{version[1]}: XLA '
          f'runs ragged_dot as a grouped matmul only from cuDNN '
          f'{CUDNN_GROUPED_MATMUL[0]}.{CUDNN_GROUPED_MATMUL[1]}, and here as a dense '
          f'matmul over all {int(m.experts)} experts (on an H200 with cuDNN 9.19: 0.12x a '
          'dense MLP\'s throughput, capacity dispatch 0.62x); set '
          'model.moe.dispatch=capacity (tokens past capacity_factor are dropped, counted '
          'in moe/layer*/dropped), model.moe.grouped_matmul=auto on a Hopper GPU (jax\'s '
          'Pallas kernels), or use a jax built with a newer cuDNN')


# ---- Module ---------------------------------------------------------------------------

def _param(rngs, shape, axes, std, dtype):
  return nnx.Param(nnx.initializers.normal(std)(rngs.params(), shape, dtype),
                   out_sharding=axes)


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts (+ an optional shared expert); see the module docstring.

  Params: router [d, E]; gate, up [E, d, f]; down [E, f, d] (f = moe.d_ff); with
  moe.shared_d_ff > 0 a shared expert shared_{gate,up} [d, fs], shared_down [fs, d] and,
  with moe.shared_gate, its gate [d, 1]. out_std: the init std of the down projections,
  which write into the residual stream (default model.init_std; the transformer's blocks
  pass transformer.out_std).
  """

  def __init__(self, cfg, rngs: nnx.Rngs, param_dtype, out_std: float | None = None):
    m = cfg.moe
    d, e, f = cfg.d_model, int(m.experts), int(m.d_ff) or cfg.d_ff
    std, pd = cfg.init_std, param_dtype
    self.cfg = cfg
    self.router = _param(rngs, (d, e), ('embed', None), std, pd)
    self.gate = _param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), std, pd)
    self.up = _param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), std, pd)
    out = std if out_std is None else out_std
    self.down = _param(rngs, (e, f, d), ('expert', 'mlp', 'embed'), out, pd)
    fs = int(m.shared_d_ff)
    if fs:
      self.shared_gate_proj = _param(rngs, (d, fs), ('embed', 'mlp'), std, pd)
      self.shared_up = _param(rngs, (d, fs), ('embed', 'mlp'), std, pd)
      self.shared_down = _param(rngs, (fs, d), ('mlp', 'embed'), out, pd)
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
    # Routed per [B, T] (not on the flattened rows): the top-k then stays split by batch.
    logits, weights, ids = (a.reshape(b * t, -1) for a in route(
        x, self.router[...], int(m.top_k), bool(m.renormalize)))
    w = [p[...].astype(dt) for p in (self.gate, self.up, self.down)]
    processed = None
    if dispatch == 'dense':
      y = dense(flat, weights, ids, *w).reshape(b, t, d)
    elif dispatch == 'dropless':
      y = dropless_sharded(flat, weights, ids, *w, m.grouped_matmul).reshape(b, t, d)
    else:
      y, processed = capacity_sharded(x, weights.reshape(b, t, -1), ids.reshape(b, t, -1),
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


def describe(mcfg) -> str:
  """One line for logs: experts, routing, dispatch, active and total FFN weights."""
  m = mcfg.moe
  shared = f' + shared {int(m.shared_d_ff)}' if int(m.shared_d_ff) else ''
  return (f'MoE {int(m.experts)} experts x d_ff {int(m.d_ff) or mcfg.d_ff}{shared}, '
          f'top-{int(m.top_k)}, '
          f'{m.dispatch}' + (f' (capacity {float(m.capacity_factor):g})'
                             if m.dispatch == 'capacity' else '')
          + (f' ({grouped_impl(mcfg)} grouped matmul)' if m.dispatch == 'dropless' else '')
          + f', FFN {active_ffn_params(mcfg) / 1e6:.2f}M of {total_ffn_params(mcfg) / 1e6:.2f}M '
          'weights active per layer')


def _ffn_params(mcfg, experts: int) -> int:
  """Matmul weights of an MoE layer's feed-forward with `experts` experts counted: theirs,
  the shared expert's and its gate's, the router's."""
  m = mcfg.moe
  d, f = mcfg.d_model, int(m.d_ff) or mcfg.d_ff
  n = experts * 3 * d * f + d * int(m.experts)
  if int(m.shared_d_ff):
    n += 3 * d * int(m.shared_d_ff) + (d if m.shared_gate else 0)
  return n


def active_ffn_params(mcfg) -> int:
  """Matmul weights one token uses in an MoE layer's feed-forward: k experts, the shared
  expert and its gate, the router."""
  return _ffn_params(mcfg, int(mcfg.moe.top_k))


def total_ffn_params(mcfg) -> int:
  """Every matmul weight of an MoE layer's feed-forward."""
  return _ffn_params(mcfg, int(mcfg.moe.experts))
