"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 by config) in Flax NNX.

RMSNorm, RoPE (theta, Llama-3 scaling), grouped-query attention, SwiGLU, optional tied
embeddings and QKV bias. Layer parameters are always stacked on a leading 'layers'
axis; `scan_layers` only chooses between `lax.scan` and an unrolled loop over them, so
checkpoints are the same either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax import sharding
from lmjax.models import attention as attn_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

REMAT_POLICIES = {
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'full': None,
}


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.n_heads


def _param(rngs, shape, axes, std, dtype):
  init = nnx.initializers.normal(std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('embed',))

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
    self.o = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), std, pd)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), out_sharding=('heads', 'head_dim'))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), out_sharding=('kv_heads', 'head_dim'))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), out_sharding=('kv_heads', 'head_dim'))

  def __call__(self, x, positions, segment_ids):
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = proj(self.q), proj(self.k), proj(self.v)
    if self.cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    k = sharding.constrain(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    inv_freq = attn_lib.rope_frequencies(head_dim(self.cfg), self.cfg.rope_theta,
                                         self.cfg.rope_scaling)
    q = attn_lib.apply_rope(q, positions, inv_freq)
    k = attn_lib.apply_rope(k, positions, inv_freq)
    out = attn_lib.attention(q, k, v, segment_ids, self.cfg.attention)
    return jnp.einsum('btnh,nhd->btd', out, self.o[...].astype(dt))


class MLP(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    pd = DTYPES[cfg.param_dtype]
    self.gate = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, pd)
    self.up = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, pd)
    self.down = _param(rngs, (f, d), ('mlp', 'embed'), cfg.init_std, pd)

  def __call__(self, x):
    dt = x.dtype
    g = x @ self.gate[...].astype(dt)
    u = x @ self.up[...].astype(dt)
    h = sharding.constrain(jax.nn.silu(g) * u, ('batch', 'length', 'mlp'))
    return h @ self.down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ('batch', 'length', 'embed'))


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
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                            cfg.init_std, pd)

  def hidden(self, tokens, positions=None, segment_ids=None):
    """Final normed hidden states [B, T, D] in the compute dtype."""
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Gather from the replicated table (one all-gather, as FSDP does for every weight):
    # a gather from a sharded table makes XLA rematerialise it and its gradient.
    table = sharding.constrain(self.embed[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(dt)
    x = sharding.constrain(x, ('batch', 'length', 'embed'))

    graphdef, layer_state = nnx.split(self.layers)

    def body(x, params):
      return nnx.merge(graphdef, params)(x, positions, segment_ids), None

    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = jax.lax.scan(body, x, layer_state)
    else:
      for i in range(cfg.n_layers):
        x, _ = body(x, jax.tree.map(lambda p: p[i], layer_state))
    return self.final_norm(x)

  def unembed(self, h):
    """Hidden [.., D] -> float32 logits [.., V]."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum('...d,dv->...v', h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    return logits

  def __call__(self, tokens, positions=None, segment_ids=None):
    logits = self.unembed(self.hidden(tokens, positions, segment_ids))
    return sharding.constrain(logits, ('batch', 'length', 'vocab'))


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

  N counts every matmul weight: the layers and the output projection (the tied
  embedding counts once, as the output projection); the input lookup is not a matmul.
  """
  h = head_dim(cfg)
  per_layer = (cfg.d_model * h * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
               + 3 * cfg.d_model * cfg.d_ff)
  n_matmul = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
  attn = 6 * cfg.n_layers * seq_len * cfg.n_heads * h
  return 6 * n_matmul + attn
