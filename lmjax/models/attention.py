"""Rotary embeddings and causal attention over packed sequences.

Packed rows hold several documents; `segment_ids` (0 = padding) keep each token's
attention inside its own document, and `positions` restart at 0 for each one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """Inverse frequencies, with Llama-3 scaling when scaling.type == 'llama3'."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is not None and scaling.get('type', 'none') == 'llama3':
    factor = scaling['factor']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_len']
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """x: [B, T, N, H]; positions: [B, T]. Half-split convention (as Hugging Face Llama)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def segment_mask(segment_ids: jax.Array | None) -> jax.Array | None:
  """[B, T] -> [B, 1, T, T] boolean: same (non-padding) document."""
  if segment_ids is None:
    return None
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return same[:, None, :, :]


def attention(q, k, v, segment_ids=None, implementation: str = 'xla'):
  """Causal GQA attention. q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0."""
  impl = None if implementation == 'xla' else implementation
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError("model.attention='cudnn' needs a GPU; use 'xla' on "
                     f'{jax.default_backend()}')
  return jax.nn.dot_product_attention(
      q, k, v, mask=segment_mask(segment_ids), is_causal=True,
      implementation='xla' if impl is None else impl)


def cached_attention(q, k, v, cache_index, kv_mask):
  """GQA attention of a chunk of queries over a KV cache (always the xla path).

  q: [B, T, N, H], the queries at cache slots cache_index + [0, T); k, v: [B, S, K, H]
  (the chunk already written); kv_mask: [B, S] bool, slots holding real tokens. Query t
  attends to slot j iff kv_mask[b, j] and j <= cache_index + t.
  """
  t, s = q.shape[1], k.shape[1]
  q_slot = cache_index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= q_slot[:, None]                # [T, S]
  mask = causal[None, None] & kv_mask[:, None, None, :]             # [B, 1, T, S]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
