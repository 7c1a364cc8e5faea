"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Mixtral, Qwen2/3-MoE by
config) in Flax NNX.

RMSNorm, RoPE (theta, Llama-3 scaling), grouped-query attention, SwiGLU or a mixture of
SwiGLU experts (model.moe, models/moe.py), optional tied embeddings, QKV bias and QK-norm
(Qwen3: an RMSNorm over each head's queries and keys before RoPE). Layer parameters are
always stacked on a leading 'layers' axis; `scan_layers` only chooses between `lax.scan`
and an unrolled loop over them, so checkpoints are the same either way.

`decode` / `decode_hidden` run the same layers through a KV cache (`init_cache`) for
generation: prefill writes a prompt chunk, each decode step one token.

`hidden` / `__call__` also take LoRA adapters (see models/lora.py): each adapted
projection then computes x@W + s·dropout(x)@A@B. Without them nothing changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax import sharding
from lmjax.models import attention as attn_lib
from lmjax.models import moe as moe_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

_CP = jax.checkpoint_policies
# An MoE layer's grouped matmuls (`ragged_dot`, not a dot_general) are saved by name by
# the policies that save the weight matmuls' outputs.
# So is the splash kernel's output with its log-sum-exp ([B, N, T, H] and [B, N, T]; not
# the scores): the backward kernel needs them, and the forward kernel is not run twice.
_MOE_DOTS = _CP.save_only_these_names(moe_lib.DOT_NAME, attn_lib.SPLASH_RESIDUALS)

REMAT_POLICIES = {
    'dots': _CP.save_from_both_policies(_CP.checkpoint_dots, _MOE_DOTS),
    'dots_no_batch': _CP.save_from_both_policies(_CP.checkpoint_dots_with_no_batch_dims,
                                                 _MOE_DOTS),
    'full': None,
    # Saves the weight matmuls' outputs like 'dots_no_batch', in pinned host memory
    # instead of device memory (copied back for the backward pass).
    'offload_dots': _CP.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


def head_kind(cfg) -> str:
  """cfg.model.head: 'lm' (next-token logits) or 'score' (a scalar reward per sequence);
  'lm' for configs written before the field existed."""
  return cfg.get('head', 'lm') if hasattr(cfg, 'get') else getattr(cfg, 'head', 'lm')


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.n_heads


INITS = ('normal', 'scaled')


def out_std(cfg) -> float:
  """The init std of the projections that write into the residual stream (attention's
  output, the MLP's / experts' down projection): model.init_std, or with model.init=scaled
  init_std / sqrt(2 · n_layers) (GPT-2, GPT-NeoX and OLMo's depth scaling: each layer's
  two residual writes then add up to the variance of one)."""
  init = cfg.get('init', 'normal') if hasattr(cfg, 'get') else 'normal'
  if init == 'scaled':
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5
  return cfg.init_std


def _param(rngs, shape, axes, std, dtype):
  init = nnx.initializers.normal(std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


class LayerLora(NamedTuple):
  """One layer's LoRA adapters and how to apply them (built inside the layer loop).

  params: {'attn': {'q': {'a', 'b'}, ...}, 'mlp': {...}}, this layer's slice of the
  adapters; scale: alpha/r (or alpha/sqrt(r)); rate: dropout on the adapter input,
  applied when `rng` is not None.
  """
  params: Any
  scale: float
  rate: float
  rng: Any

  def __call__(self, x, group: str, name: str, n_in: int):
    """s·dropout(x)@A@B for projection group/name (0 if not adapted); A contracts the
    last `n_in` dims of x."""
    ad = self.params.get(group, {}).get(name)
    if ad is None:
      return 0
    dt = x.dtype
    if self.rng is not None and self.rate > 0:
      key = jax.random.fold_in(self.rng, _LORA_IDS[group, name])
      keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(dt)
    y = jnp.tensordot(x, ad['a'].astype(dt), axes=n_in)
    return self.scale * jnp.tensordot(y, ad['b'].astype(dt), axes=1)


_LORA_IDS = {k: i for i, k in enumerate(
    [('attn', n) for n in 'qkvo'] + [('mlp', n) for n in ('gate', 'up', 'down')])}


def _delta(lora, x, group, name, n_in):
  return 0 if lora is None else lora(x, group, name, n_in)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype, axis: str = 'embed'):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim(cfg)
    pd = DTYPES[cfg.param_dtype]
    std = cfg.init_std
    self.cfg = cfg
    self.q = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), std, pd)
    self.k = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.v = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.o = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), out_std(cfg), pd)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), out_sharding=('heads', 'head_dim'))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), out_sharding=('kv_heads', 'head_dim'))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), out_sharding=('kv_heads', 'head_dim'))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.norm_eps, pd, 'head_dim')
      self.k_norm = RMSNorm(h, cfg.norm_eps, pd, 'head_dim')

  def _qkv(self, x, positions, lora=None):
    """Projections with bias and RoPE: q [B, T, N, H]; k, v [B, T, K, H]."""
    dt = x.dtype
    proj = lambda w, n: (jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
                         + _delta(lora, x, 'attn', n, 1))
    q, k, v = proj(self.q, 'q'), proj(self.k, 'k'), proj(self.v, 'v')
    if self.cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    k = sharding.constrain(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    inv_freq = attn_lib.rope_frequencies(head_dim(self.cfg), self.cfg.rope_theta,
                                         self.cfg.rope_scaling)
    q = attn_lib.apply_rope(q, positions, inv_freq)
    k = attn_lib.apply_rope(k, positions, inv_freq)
    return q, k, v

  def _out(self, out, lora=None):
    return (jnp.einsum('btnh,nhd->btd', out, self.o[...].astype(out.dtype))
            + _delta(lora, out, 'attn', 'o', 2))

  def __call__(self, x, positions, segment_ids, lora=None, telemetry=False):
    """The attention output; with `telemetry`, (it, max |attention logit|)."""
    q, k, v = self._qkv(x, positions, lora)
    out = attn_lib.attention(q, k, v, segment_ids, attn_lib.implementation(self.cfg),
                             self.cfg.get('max_segments', 32),
                             self.cfg.get('attn_logit_softcap', 0.0), self.cfg.get('splash'))
    out = self._out(out, lora)
    if not telemetry:
      return out
    order = attn_lib.context_order(q.shape[1])
    if order is not None:  # the logit bound reads q and k in token order
      inverse = np.argsort(order)
      q, k = q[:, inverse], k[:, inverse]
      segment_ids = None if segment_ids is None else segment_ids[:, inverse]
    return out, attn_lib.max_abs_logit(q, k, segment_ids)

  def decode(self, x, positions, cache_k, cache_v, cache_index, kv_mask, lora=None):
    """Attention with a KV cache (one layer's slice [B, S, K, H]).

    Writes this chunk's keys and values at slots [cache_index, cache_index + T) and
    attends to the valid (`kv_mask` [B, S]) slots at or before each query's slot.
    Returns (output [B, T, D], new keys [B, T, K, H], new values [B, T, K, H]).
    """
    q, k, v = self._qkv(x, positions, lora)
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    at = (0, cache_index, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache_k, k, at)
    values = jax.lax.dynamic_update_slice(cache_v, v, at)
    out = attn_lib.cached_attention(q, keys, values, cache_index, kv_mask,
                                    self.cfg.get('attn_logit_softcap', 0.0))
    return self._out(out, lora), k, v


class MLP(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    pd = DTYPES[cfg.param_dtype]
    self.gate = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, pd)
    self.up = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, pd)
    self.down = _param(rngs, (f, d), ('mlp', 'embed'), out_std(cfg), pd)

  def __call__(self, x, lora=None):
    dt = x.dtype
    g = x @ self.gate[...].astype(dt) + _delta(lora, x, 'mlp', 'gate', 1)
    u = x @ self.up[...].astype(dt) + _delta(lora, x, 'mlp', 'up', 1)
    h = sharding.constrain(jax.nn.silu(g) * u, ('batch', 'length', 'mlp'))
    return h @ self.down[...].astype(dt) + _delta(lora, h, 'mlp', 'down', 1)


def is_moe(cfg) -> bool:
  """Whether cfg.model's feed-forward is a mixture of experts (model.moe.experts > 0)."""
  moe = cfg.get('moe') if hasattr(cfg, 'get') else getattr(cfg, 'moe', None)
  return bool(moe) and int(moe['experts']) > 0


class LayerStats(NamedTuple):
  """One layer's stability telemetry of a batch (stacked [layers] by the layer loop); no
  gradient flows through it."""
  attn_logit_max: jax.Array  # [] max |q·k / sqrt(head_dim)| over attended pairs
  resid_rms: jax.Array       # [] RMS of the residual stream after the layer (real tokens)


def residual_rms(x, segment_ids=None) -> jax.Array:
  """sqrt(mean(x^2)) over the features of the real tokens (segment id > 0) of x [B, T, D]."""
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  sq = jnp.mean(x * x, axis=-1)                                            # [B, T]
  if segment_ids is None:
    return jnp.sqrt(jnp.mean(sq))
  real = (segment_ids > 0).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(sq * real) / jnp.maximum(jnp.sum(real), 1.0))


class Block(nnx.Module):
  """Attention and a feed-forward: `mlp` (SwiGLU) or, for an MoE model, `moe`."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    if is_moe(cfg):
      self.moe = moe_lib.MoE(cfg, rngs, pd, out_std(cfg))
    else:
      self.mlp = MLP(cfg, rngs)

  def _ffn(self, x, segment_ids, lora, dispatch=None):
    """(feed-forward output, RouterStats or None)."""
    if is_moe(self.cfg):
      return self.moe(x, segment_ids, dispatch)
    return self.mlp(x, lora), None

  def __call__(self, x, positions, segment_ids, lora=None, telemetry=False):
    """(output, (this layer's RouterStats, None for a dense model; its LayerStats with
    `telemetry`, else None))."""
    a = self.attn(self.attn_norm(x), positions, segment_ids, lora, telemetry)
    a, logit_max = a if telemetry else (a, None)
    x = x + a
    y, stats = self._ffn(self.mlp_norm(x), segment_ids, lora)
    x = sharding.constrain(x + y, ('batch', 'length', 'embed'))
    layer = LayerStats(logit_max, residual_rms(x, segment_ids)) if telemetry else None
    return x, (stats, layer)

  def decode(self, x, positions, cache_k, cache_v, cache_index, kv_mask, lora=None):
    """As __call__, attending through this layer's cache; also returns the new k, v."""
    a, k, v = self.attn.decode(self.attn_norm(x), positions, cache_k, cache_v,
                               cache_index, kv_mask, lora)
    x = x + a
    # Generation never drops a token: capacity dispatch runs dropless here.
    dispatch = 'dense' if is_moe(self.cfg) and self.cfg.moe.dispatch == 'dense' \
        else 'dropless'
    y, _ = self._ffn(self.mlp_norm(x), None, lora, dispatch)
    return sharding.constrain(x + y, ('batch', 'length', 'embed')), k, v


class Transformer(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = DTYPES[cfg.param_dtype]
    self.embed = nnx.Param(
        nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model), pd),
        out_sharding=('vocab', 'embed'))

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_layers(rngs):
      return Block(cfg, rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    if head_kind(cfg) == 'score':  # a reward model: no next-token head
      self.score = _param(rngs, (cfg.d_model, 1), ('embed', None), cfg.init_std, pd)
    elif not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                            cfg.init_std, pd)

  def hidden(self, tokens, positions=None, segment_ids=None, *, adapters=None, lora=None,
             dropout_rng=None):
    """Final normed hidden states [B, T, D] in the compute dtype.

    adapters: LoRA adapters (`lora.init_adapters`; {'layers': {...}}) applied unmerged,
    with `lora` the cfg.lora group (alpha, rank scaling, dropout). Dropout on the adapter
    inputs is active only with a `dropout_rng` (none: deterministic).
    """
    return self.hidden_and_router(tokens, positions, segment_ids, adapters=adapters,
                                  lora=lora, dropout_rng=dropout_rng)[0]

  def hidden_and_router(self, tokens, positions=None, segment_ids=None, *, adapters=None,
                        lora=None, dropout_rng=None):
    """(`hidden`, the router statistics of every layer: moe.RouterStats stacked [layers,
    ...], None for a dense model), for the MoE losses and telemetry (moe.router_losses)."""
    return self.hidden_and_stats(tokens, positions, segment_ids, adapters=adapters,
                                 lora=lora, dropout_rng=dropout_rng)[:2]

  def hidden_and_stats(self, tokens, positions=None, segment_ids=None, *, adapters=None,
                       lora=None, dropout_rng=None, telemetry=False):
    """(`hidden`, the router statistics as `hidden_and_router`, the layers' LayerStats
    stacked [layers] with `telemetry`, else None)."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Context parallelism: the layers see each sequence in load-balanced order.
    order = attn_lib.context_order(tokens.shape[1])
    if order is not None:
      reorder = lambda a: sharding.constrain(jnp.take(a, order, axis=1), ('batch', 'length'))
      tokens, positions = reorder(tokens), reorder(positions)
      segment_ids = None if segment_ids is None else reorder(segment_ids)
    x = self._embed(tokens)
    graphdef, layer_state = nnx.split(self.layers)
    layer_lora = _layer_lora(adapters, lora, dropout_rng, cfg.n_layers)

    def body(x, xs):
      params, ad = xs
      return nnx.merge(graphdef, params)(x, positions, segment_ids, layer_lora(ad),
                                         telemetry)

    xs = (layer_state, _layer_inputs(adapters, dropout_rng, cfg.n_layers))
    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, stats = jax.lax.scan(body, x, xs)
    else:
      per_layer = []
      for i in range(cfg.n_layers):
        x, s = body(x, jax.tree.map(lambda p: p[i], xs))
        per_layer.append(s)
      stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    router, layers = stats
    if order is not None:
      x = sharding.constrain(jnp.take(x, np.argsort(order), axis=1), ('batch', 'length', 'embed'))
    return self.final_norm(x), router, layers

  def _embed(self, tokens):
    # Gather from the replicated table (one all-gather, as FSDP does for every weight):
    # a gather from a sharded table makes XLA rematerialise it and its gradient.
    table = sharding.constrain(self.embed[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(DTYPES[self.cfg.dtype])
    return sharding.constrain(x, ('batch', 'length', 'embed'))

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Empty KV cache {'k', 'v'}: [layers, batch, max_len, kv_heads, head_dim]."""
    return init_cache(self.cfg, batch, max_len)

  def decode_hidden(self, tokens, positions, cache, cache_index, kv_mask, *, adapters=None,
                    lora=None):
    """Final normed hidden states [B, T, D] for a chunk, reading and writing `cache`.

    The chunk's tokens [B, T] (with their RoPE `positions` [B, T]) occupy cache slots
    [cache_index, cache_index + T), the same slots in every row. A token at slot i
    attends to the slots j <= i with `kv_mask[b, j]` true ([B, S]: slots holding real
    tokens, so left padding is never attended). Same parameters and math as `hidden`
    (LoRA `adapters` unmerged, as there, without dropout); prefill is a call with T =
    prompt length, each decode step one with T = 1. Returns (hidden, new cache).
    """
    x = self._embed(tokens)
    graphdef, layer_state = nnx.split(self.layers)
    layer_lora = _layer_lora(adapters, lora, None, self.cfg.n_layers)

    def body(x, xs):
      params, ck, cv, ad = xs
      x, k, v = nnx.merge(graphdef, params).decode(x, positions, ck, cv, cache_index, kv_mask,
                                                   layer_lora(ad))
      return x, (k, v)

    xs_all = (layer_state, cache['k'], cache['v'],
              _layer_inputs(adapters, None, self.cfg.n_layers))
    if self.cfg.scan_layers:
      x, (k, v) = jax.lax.scan(body, x, xs_all)
    else:
      ks, vs = [], []
      for i in range(self.cfg.n_layers):
        xs = jax.tree.map(lambda p: p[i], xs_all)
        x, (k, v) = body(x, xs)
        ks.append(k)
        vs.append(v)
      k, v = jnp.stack(ks), jnp.stack(vs)
    at = (0, 0, cache_index, 0, 0)
    cache = {'k': _constrain_cache(jax.lax.dynamic_update_slice(cache['k'], k, at)),
             'v': _constrain_cache(jax.lax.dynamic_update_slice(cache['v'], v, at))}
    return self.final_norm(x), cache

  def decode(self, tokens, positions, cache, cache_index, kv_mask, *, adapters=None,
             lora=None):
    """(logits [B, T, V] float32, new cache); see `decode_hidden`."""
    h, cache = self.decode_hidden(tokens, positions, cache, cache_index, kv_mask,
                                  adapters=adapters, lora=lora)
    return self.unembed(h), cache

  def unembed(self, h):
    """Hidden [.., D] -> float32 logits [.., V].

    In bfloat16 the product runs as bf16 x bf16 with float32 accumulation, backward too:
    without the algorithm the gradient's products take the float32 cotangent of the
    logits as an operand, float32 matmuls (jax-ml/jax#24047; jax's own xla attention
    does the same), 12% of the 125M bench step's matmul FLOPs.
    """
    if head_kind(self.cfg) == 'score':
      raise ValueError('a reward model (model.head=score) has no next-token head: read its '
                       'scores with `scores`')
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if h.dtype == jnp.bfloat16
                 else None)
    logits = jnp.einsum('...d,dv->...v', h, w.astype(h.dtype), precision=precision,
                        preferred_element_type=jnp.float32)
    return attn_lib.softcap(logits, self.cfg.get('final_logit_softcap', 0.0))

  def scores(self, h):
    """Hidden [B, T, D] -> float32 reward-head scores [B, T] of every position
    (model.head=score); models/reward.py reads them at each sequence's last token."""
    return jnp.einsum('btd,dk->btk', h.astype(jnp.float32),
                      self.score[...].astype(jnp.float32))[..., 0]

  def __call__(self, tokens, positions=None, segment_ids=None, *, adapters=None, lora=None,
               dropout_rng=None):
    """Logits; see `hidden` for the LoRA arguments."""
    logits = self.unembed(self.hidden(tokens, positions, segment_ids, adapters=adapters,
                                      lora=lora, dropout_rng=dropout_rng))
    return sharding.constrain(logits, ('batch', 'length', 'vocab'))


def lora_scale(lora) -> float:
  """alpha / r, or alpha / sqrt(r) with rsLoRA (cfg.lora)."""
  r = lora['rank']
  return float(lora['alpha']) / (r ** 0.5 if lora['rslora'] else r)


def _layer_inputs(adapters, rng, n_layers):
  """Per-layer scanned inputs for LoRA: (adapters['layers'], one dropout key per layer)."""
  if adapters is None:
    return None
  keys = None if rng is None else jax.random.split(rng, n_layers)
  return (adapters['layers'], keys)


def _layer_lora(adapters, lora, rng, n_layers):
  """ad (one layer's `_layer_inputs` slice) -> LayerLora or None."""
  if adapters is None:
    return lambda ad: None
  if lora is None:
    raise ValueError('adapters need `lora` (the cfg.lora group: rank, alpha, rslora, dropout)')
  scale, rate = lora_scale(lora), float(lora['dropout'])
  return lambda ad: LayerLora(ad[0], scale, rate, ad[1])


CACHE_AXES = ('layers', 'batch', 'length', 'kv_heads', 'head_dim')


def _constrain_cache(x):
  return sharding.constrain(x, CACHE_AXES)


def init_cache(cfg, batch: int, max_len: int) -> dict:
  """Zero KV cache in the compute dtype, {'k', 'v'}: [layers, batch, max_len, kv_heads,
  head_dim], sharded by CACHE_AXES under `sharding.use_mesh`."""
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, head_dim(cfg))
  zeros = lambda: _constrain_cache(jnp.zeros(shape, DTYPES[cfg.dtype]))
  return {'k': zeros(), 'v': zeros()}


def build(cfg, seed: int = 0) -> Transformer:
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, nnx.Rngs(seed))


def abstract(cfg):
  """(graphdef, abstract param state with logical-axis metadata), no allocation."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return nnx.split(model)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 6·L·T·(heads·head_dim) (causal attention counted once).

  N counts every matmul weight a token uses (for an MoE model the active ones: its k
  experts, the shared expert and the router; moe.active_ffn_params): the layers and the
  output projection (the tied embedding counts once, as the output projection; a reward
  model's score head [D, 1]); the input lookup is not a matmul.
  """
  h = head_dim(cfg)
  ffn = moe_lib.active_ffn_params(cfg) if is_moe(cfg) else 3 * cfg.d_model * cfg.d_ff
  per_layer = cfg.d_model * h * (cfg.n_heads * 2 + cfg.n_kv_heads * 2) + ffn
  out = 1 if head_kind(cfg) == 'score' else cfg.vocab_size
  n_matmul = cfg.n_layers * per_layer + cfg.d_model * out
  attn = 6 * cfg.n_layers * seq_len * cfg.n_heads * h
  return 6 * n_matmul + attn
