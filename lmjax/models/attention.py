"""Rotary embeddings and causal attention over packed sequences.

Packed rows hold several documents; `segment_ids` (0 = padding) keep each token's
attention inside its own document, and `positions` restart at 0 for each one.

Context parallelism: where the active mesh splits the 'length' axis over cp devices
(mesh.sequence), the model reorders each sequence into 2·cp chunks, device d holding
chunks d and 2·cp-1-d (`context_order`), so every device has the same share of causal
work; attention gathers the keys and values of the whole sequence on every device
(`_sharded`), and the model restores the order after the last layer.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import sharding
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


def implementation(model_cfg) -> str:
  """model.attention for this backend: 'auto' is splash on a TPU, cudnn on a GPU with
  bfloat16 compute and no attention soft-cap, else xla."""
  impl = model_cfg.get('attention', 'xla')
  if impl != 'auto':
    return impl
  backend = jax.default_backend()
  if backend == 'tpu':
    return 'splash'
  if (backend == 'gpu' and model_cfg.get('dtype') == 'bfloat16'
      and not model_cfg.get('attn_logit_softcap', 0.0)):
    return 'cudnn'
  return 'xla'


def context_shards(t: int) -> int:
  """How many devices split a sequence of t tokens: the size of the mesh axes the
  'length' rule names in the active mesh (`sharding.use_mesh`); 1 outside one."""
  ctx = sharding.active_mesh()
  if ctx is None:
    return 1
  mesh, rules = ctx
  entry = sharding.logical_to_spec(('batch', 'length'), rules, mesh=mesh)[1]  # as batches are
  cp = math.prod(mesh.shape[a] for a in sharding.axes_of(entry))
  if cp > 1 and t % (2 * cp):
    raise ConfigError(
        f'a sequence of {t} tokens does not split into 2 x {cp} equal chunks for context '
        f'parallelism (mesh.sequence): make its length (data.seq_len) a multiple of {2 * cp}')
  return cp


def load_balance_order(t: int, cp: int) -> np.ndarray:
  """order[i] = the token at position i of the reordered sequence: t tokens in 2·cp
  chunks, device d's share (positions [d·t/cp, (d+1)·t/cp)) chunks d and 2·cp-1-d."""
  c = t // (2 * cp)
  chunks = np.stack([np.arange(cp), 2 * cp - 1 - np.arange(cp)], axis=1).reshape(-1)
  return (chunks[:, None] * c + np.arange(c)).reshape(-1).astype(np.int32)


def context_order(t: int) -> np.ndarray | None:
  """The load-balanced order of a sequence of t tokens under context parallelism, else
  None (the model runs in token order)."""
  cp = context_shards(t)
  return None if cp == 1 else load_balance_order(t, cp)


def attention(q, k, v, segment_ids=None, implementation: str = 'xla', max_segments: int = 32,
              logit_cap: float = 0.0, splash_blocks=None):
  """Causal GQA attention. q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0.

  segment_ids [B, T] keep each token inside its document. 'xla' masks the scores;
  'cudnn' (GPU) runs cuDNN's fused kernel, rows of at most `max_segments` runs of equal
  segment ids (model.max_segments; 1: no packing, plain causal); 'splash' runs the
  Pallas splash kernel (blocks: `splash_blocks`, model.splash) inside shard_map.
  logit_cap > 0 soft-caps the scores (`softcap`; model.attn_logit_softcap).
  Under context parallelism (`context_shards` > 1) q, k and v come in `context_order`.
  """
  if implementation == 'splash' or context_shards(q.shape[1]) > 1:
    if implementation == 'cudnn':
      raise ConfigError("model.attention='cudnn' does not split a sequence across devices "
                        "(mesh.sequence > 1): use 'xla' or 'splash'")
    return _sharded(q, k, v, segment_ids, implementation, logit_cap, splash_blocks)
  if logit_cap:
    if implementation != 'xla':
      raise ConfigError("model.attn_logit_softcap needs model.attention=xla or splash (cuDNN's "
                        'kernel takes no soft-capping)')
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


def _sharded(q, k, v, segment_ids, implementation, logit_cap, blocks):
  """Attention inside shard_map: batch and heads split as the rules place q, the
  sequence of q split over the 'length' axes (context parallelism) with k, v and their
  segment ids gathered whole on every device. q, k, v come in `context_order`; each
  device puts the gathered keys back in token order and masks by its queries' token
  indices. implementation: 'xla' (masked scores) or 'splash' (the Pallas kernel, in
  interpret mode off TPU)."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  ctx = sharding.active_mesh()
  cp = context_shards(t)
  order = load_balance_order(t, cp)
  inverse = np.argsort(order).astype(np.int32)
  if ctx is None:
    mesh = None
    batch_e = len_e = head_e = kv_e = None
  else:
    mesh, rules = ctx
    batch_e, len_e, head_e, _ = sharding.logical_to_spec(
        ('batch', 'length', 'heads', None), rules, q.shape, mesh)
    kv_e = sharding.logical_to_spec(('batch', None, 'kv_heads', None), rules, k.shape, mesh)[2]
  if kv_e != head_e:  # kv heads split unlike q's: give every q head its own k, v
    k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
    kv_e = head_e
  len_axes = sharding.axes_of(len_e)
  head_shards = (math.prod(mesh.shape[a] for a in sharding.axes_of(head_e))
                 if mesh is not None else 1)
  kernel = None
  if implementation == 'splash':
    kernel = _splash_kernel(t, n, cp, head_shards, _splash_blocks(blocks, t // cp, t),
                            float(logit_cap), jax.default_backend() != 'tpu')

  def local(q, k, v, sq, skv, kernel):
    if cp > 1:  # the gathered keys back in token order
      k, v, skv = k[:, inverse], v[:, inverse], skv[:, inverse]
    if implementation == 'splash':
      return _splash_local(kernel, q, k, v, sq, skv)
    tl = q.shape[1]
    shard = jax.lax.axis_index(len_axes) if len_axes else 0
    q_idx = jax.lax.dynamic_slice_in_dim(jnp.asarray(order), shard * tl, tl)
    mask = (q_idx[:, None] >= jnp.arange(t)[None, :])[None] & (sq[:, :, None] == skv[:, None, :])
    if logit_cap:
      return _softcapped(q, k, v, mask[:, None], logit_cap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation='xla')

  if mesh is None:
    return local(q, k, v, seg, seg, kernel)
  q_spec, kv_spec = P(batch_e, len_e, head_e, None), P(batch_e, None, kv_e, None)
  kernel_spec = (None if kernel is None else
                 kernel.manual_sharding_spec(NamedSharding(mesh, P(head_e, len_e))))
  return jax.shard_map(local, mesh=mesh, check_vma=False,
                       in_specs=(q_spec, kv_spec, kv_spec, P(batch_e, len_e),
                                 P(batch_e, None), kernel_spec),
                       out_specs=q_spec)(q, k, v, seg, seg, kernel)


def _splash_local(kernel, q, k, v, sq, skv):
  """One device's splash attention: q [b, Tl, n, H] over k, v [b, T, kv, H] (token
  order), segment ids sq [b, Tl], skv [b, T]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  scale = 1.0 / math.sqrt(q.shape[-1])
  qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)              # [b, n, Tl, H]
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  one = lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=sk.SegmentIds(q=sq, kv=skv))
  return jnp.swapaxes(jax.vmap(one)(qh, kh, vh, sq, skv), 1, 2)


# The checkpoint name of the splash kernel's residuals (its output and log-sum-exp), which
# the remat policies that save the weight matmuls save too (models/transformer.py).
SPLASH_RESIDUALS = 'splash_residuals'

_SPLASH_FIELDS = ('block_q', 'block_kv', 'block_kv_compute', 'block_q_dkv', 'block_kv_dkv',
                  'block_kv_dkv_compute')


def _splash_blocks(blocks, q_len: int, kv_len: int) -> tuple:
  """model.splash's blocks capped at the lengths they tile (q blocks: a device's
  queries; kv blocks: the whole sequence), checked to divide them."""
  blocks = dict(blocks or {})
  if q_len % 128 or kv_len % 128:
    raise ConfigError(
        f'model.attention=splash tiles sequences in blocks of 128 tokens: the {kv_len}-token '
        f'sequence{"" if q_len == kv_len else f" ({q_len} a device under mesh.sequence)"} '
        'is not a multiple of 128; change data.seq_len (or mesh.sequence), or use xla')
  out = []
  for field in _SPLASH_FIELDS:
    length = q_len if field.startswith('block_q') else kv_len
    size = min(int(blocks.get(field, 512)), length)
    if length % size:
      raise ConfigError(f'model.splash.{field} ({size}) must divide the '
                        f'{"queries a device holds" if field.startswith("block_q") else "sequence length"}'
                        f' ({length}); set it to a divisor')
    out.append(size)
  by = dict(zip(_SPLASH_FIELDS, out))
  for outer, inner in (('block_kv', 'block_kv_compute'), ('block_kv_dkv', 'block_kv_dkv_compute')):
    if by[outer] % by[inner]:
      raise ConfigError(f'model.splash.{outer} ({by[outer]}) must be a multiple of '
                        f'model.splash.{inner} ({by[inner]})')
  return tuple(out) + (bool(blocks.get('fused_bwd', True)),)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, n_heads: int, cp: int, head_shards: int, blocks: tuple,
                   logit_cap: float, interpret: bool):
  """The splash kernel for causal attention over t tokens in `context_order` (its mask
  info split over cp sequence shards and head_shards head shards)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
  if interpret:
    _warn_once(f'model.attention=splash on {jax.default_backend()} runs the Pallas kernel '
               'in interpret mode (slow: for tests); use xla or auto off TPU')
  mask = sm.CausalMask((t, t))
  if cp > 1:  # q rows in context order: the mask function reads each row's token index
    mask.q_sequence = load_balance_order(t, cp)
  *sizes, fused = blocks
  by = dict(zip(_SPLASH_FIELDS, sizes))
  block_sizes = sk.BlockSizes(**by, use_fused_bwd_kernel=fused,
                              **({} if fused else {'block_q_dq': by['block_q_dkv'],
                                                   'block_kv_dq': by['block_kv_dkv']}))
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * n_heads), block_sizes=block_sizes,
                              head_shards=head_shards, q_seq_shards=cp,
                              attn_logits_soft_cap=logit_cap or None,
                              residual_checkpoint_name=SPLASH_RESIDUALS, interpret=interpret)
