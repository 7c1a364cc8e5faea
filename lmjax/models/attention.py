"""Rotary embeddings and causal attention over packed sequences.

Packed rows hold several documents; `segment_ids` (0 = padding) keep each token's
attention inside its own document, and `positions` restart at 0 for each one.
"""

from __future__ import annotations

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import ConfigError


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


def segment_runs(segment_ids: jax.Array, max_segments: int):
  """cuDNN's packed-sequence description of rows of segment ids.

  Every maximal run of equal ids in a row is one segment (a run of padding too, so each
  token lies in exactly one segment and is computed). Returns (offsets [B, M + 1]: each
  segment's first position, then -1; lengths [B, M]: its length, then -1; n_runs [B]),
  M = max_segments. Runs past the M-th are left out: a row with n_runs > M is not
  described (`attention` poisons it with NaN; the train loop refuses such a batch first).
  """
  b, t = segment_ids.shape
  m = max_segments
  starts = jnp.concatenate([jnp.ones((b, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1                  # [B, T]
  n_runs = run[:, -1] + 1
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  at = jnp.where(starts, run, m + 1)                                      # m + 1: dropped
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, at].set(pos, mode='drop')
  lengths = jnp.zeros((b, m), jnp.int32).at[rows, run].add(1, mode='drop')
  lengths = jnp.where(jnp.arange(m) < n_runs[:, None], lengths, -1)
  return offsets, lengths, n_runs


def count_runs(segment_ids, xp=jnp):
  """Runs of equal ids per row ([B, T] -> [B]), what `segment_runs` counts; xp=np on host."""
  return 1 + xp.sum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)


def check_segments(segment_ids, max_segments: int) -> None:
  """Host check of a batch for the cuDNN path: every row within model.max_segments."""
  n = count_runs(np.asarray(segment_ids), np)
  worst = int(n.max(initial=0))
  if worst > max_segments:
    raise ConfigError(
        f'a batch row holds {worst} segments (documents and padding runs) but '
        f"model.max_segments is {max_segments}: cuDNN's packed attention takes a static "
        'bound; raise model.max_segments (or use model.attention=xla)')


# cuDNN mask for packed rows: causal inside each segment described by offsets/lengths.
PACKED_MASK = 'PADDING_CAUSAL'


def _cudnn_attention(q, k, v, segment_ids, max_segments: int):
  """cuDNN fused (flash) attention, causal. Rows of one document: jax's public API (no
  mask: cuDNN's causal kernel). Packed documents: cuDNN's segment offsets, through jax's
  fused_attention_stablehlo API (private: jax.nn.dot_product_attention would turn a
  segment mask into a [B, 1, T, T] bias and compute its gradient; that is the fallback,
  with a warning, for a jax whose private API lacks the offsets). tests/test_gpu.py pins
  both paths against the xla one."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  if segment_ids is None or max_segments == 1:  # one run a row (checked below): plain causal
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       implementation='cudnn')
    if segment_ids is None:
      return out
    n_runs = count_runs(segment_ids)
  else:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
    if not _has_segment_offsets(cudnn.dot_product_attention):
      _warn_once('this jax\'s cuDNN attention API takes no segment offsets: packed rows '
                 'run with a [B, 1, T, T] mask (slower); model.max_segments=1 (one '
                 'document a row) keeps the plain causal kernel')
      return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids),
                                          scale=scale, is_causal=True,
                                          implementation='cudnn')
    offsets, lengths, n_runs = segment_runs(segment_ids, max_segments)
    out = cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
        kv_offsets=offsets, scale=scale, mask_type=getattr(cudnn.MaskType, PACKED_MASK))
  # A row with more runs than described would silently attend across documents: NaN.
  bad = (n_runs > max_segments)[:, None, None, None]
  return jnp.where(bad, jnp.asarray(jnp.nan, out.dtype), out)


def _has_segment_offsets(fn) -> bool:
  params = inspect.signature(fn).parameters
  return all(p in params for p in ('q_seqlen', 'kv_seqlen', 'q_offsets', 'kv_offsets',
                                   'mask_type'))


_WARNED = set()


def _warn_once(msg: str) -> None:
  if msg not in _WARNED:
    _WARNED.add(msg)
    warnings.warn(msg, stacklevel=3)


def softcap(x, cap: float):
  """Gemma 2's logit soft-capping, cap·tanh(x / cap) (cap 0: x as it is)."""
  return x if not cap else cap * jnp.tanh(x / cap)


def _softcapped(q, k, v, mask, cap: float):
  """GQA attention with soft-capped scores (float32 scores and softmax): q [B, T, N, H],
  k, v [B, S, K, H], mask [B, 1, T, S] (True: attend)."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  scores = jnp.einsum('btkgh,bskh->bkgts', qg, k,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  scores = softcap(scores, cap)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bkgts,bskh->btkgh', probs, v).reshape(b, t, n, h)


def max_abs_logit(q, k, segment_ids=None, block_elems: int = 2**24) -> jax.Array:
  """max |q·k / sqrt(H)| over the (query, key) pairs causal attention attends (same
  document, key at or before the query): the attention logit growth that precedes
  instability (Wortsman et al. 2023). q: [B, T, N, H]; k: [B, T, K, H]. No gradient.

  Computed a block of queries at a time (at most `block_elems` float32 scores a block,
  64 MiB by default), so the [B, N, T, T] scores never exist at once.
  """
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  b, t, n, h = q.shape
  kv = k.shape[2]
  tq = _block(t, max(block_elems // (b * n * t), 1))
  nb = t // tq
  qb = jnp.swapaxes(q.reshape(b, nb, tq, kv, n // kv, h), 0, 1)     # [nb, B, tq, K, G, H]
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  seg_b = jnp.swapaxes(seg.reshape(b, nb, tq), 0, 1)                  # [nb, B, tq]
  rows = jnp.arange(t).reshape(nb, tq)
  scale = 1.0 / math.sqrt(h)

  def one(m, xs):
    qc, sq, pos = xs
    s = jnp.einsum('btkgh,bskh->bkgts', qc, k, preferred_element_type=jnp.float32) * scale
    ok = (pos[:, None] >= jnp.arange(t)[None, :])[None]                 # [1, tq, T]
    ok = ok & (sq[:, :, None] == seg[:, None, :]) & (sq[:, :, None] > 0)  # [B, tq, T]
    return jnp.maximum(m, jnp.max(jnp.where(ok[:, None, None], jnp.abs(s), 0.0))), None

  m, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (qb, seg_b, rows))
  return m


def _block(t: int, at_most: int) -> int:
  """The largest divisor of t that is at most `at_most` (at least 1)."""
  for d in range(min(t, at_most), 0, -1):
    if t % d == 0:
      return d
  return 1


def attention(q, k, v, segment_ids=None, implementation: str = 'xla', max_segments: int = 32,
              logit_cap: float = 0.0):
  """Causal GQA attention. q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0.

  segment_ids [B, T] keep each token inside its document. 'xla' masks the scores;
  'cudnn' (GPU) runs cuDNN's fused kernel, rows of at most `max_segments` runs of equal
  segment ids (model.max_segments; 1: no packing, plain causal). logit_cap > 0
  soft-caps the scores (`softcap`; model.attn_logit_softcap, xla only).
  """
  if logit_cap:
    if implementation != 'xla':
      raise ConfigError('model.attn_logit_softcap needs model.attention=xla (the fused '
                        'kernels take no soft-capping)')
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None, None]
    seg = segment_mask(segment_ids)
    return _softcapped(q, k, v, mask if seg is None else mask & seg, logit_cap)
  if implementation == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise ConfigError("model.attention='cudnn' needs a GPU; use 'xla' on "
                        f'{jax.default_backend()}')
    return _cudnn_attention(q, k, v, segment_ids, max_segments)
  return jax.nn.dot_product_attention(
      q, k, v, mask=segment_mask(segment_ids), is_causal=True, implementation='xla')


def cached_attention(q, k, v, cache_index, kv_mask, logit_cap: float = 0.0):
  """GQA attention of a chunk of queries over a KV cache (always the xla path).

  q: [B, T, N, H], the queries at cache slots cache_index + [0, T); k, v: [B, S, K, H]
  (the chunk already written); kv_mask: [B, S] bool, slots holding real tokens. Query t
  attends to slot j iff kv_mask[b, j] and j <= cache_index + t. logit_cap: as `attention`.
  """
  t, s = q.shape[1], k.shape[1]
  q_slot = cache_index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= q_slot[:, None]                # [T, S]
  mask = causal[None, None] & kv_mask[:, None, None, :]             # [B, 1, T, S]
  if logit_cap:
    return _softcapped(q, k, v, mask, logit_cap)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
