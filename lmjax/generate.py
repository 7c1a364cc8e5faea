"""Sampling from a model with a KV cache.

`generate` takes and returns token ids (it adds no BOS). Prompts of different lengths
are right-aligned in a [B, P] buffer (left padding); each row's RoPE positions start at
0 at its first real token, so they equal the unpadded ones, and padded slots are never
attended. One jitted function prefills the cache with every prompt in one forward pass,
then decodes one token per step in a `lax.while_loop` that exits as soon as every row
has produced a stop token (or after max_new_tokens). It is compiled once per (batch
bucket, prompt bucket, max_new_tokens, top_k, greedy or not, top-p or not); batch and
prompt length are rounded up to powers of two to limit recompiles.

Sampling, per step: logits / temperature, then top-k, then top-p (the smallest set of
tokens, most likely first, whose probability sums to >= top_p; the top token is always
kept), then a draw (`sampling_logits`); each drawn token's log-prob under that truncated,
renormalised distribution comes back with it (what online RL's importance ratios need,
recomputed by the trainer with the same function). temperature 0 is greedy (argmax). Draws depend only on (seed, step,
batch bucket), so a seed reproduces its samples.

`sample` is the text-in, text-out wrapper the train loop prints a sample with.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import sharding

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """What `generate` returns (numpy, one row per prompt).

  tokens: [B, max_new_tokens] int32, the generated ids. A row that stopped holds its
    stop token at index lengths[b] and pad_id after it.
  lengths: [B] int32, tokens generated before the stop token (the stop token excluded).
  stopped: [B] bool, whether the row ended on a stop token.
  steps: tokens decoded per row before the loop ended (< max_new_tokens if every row
    stopped early).
  logprobs: [B, max_new_tokens] float32, each generated token's log-prob under the
    distribution it was drawn from (after temperature, top-k and top-p, renormalised:
    `sampling_logits`), the stop token's included; 0 after it, and everywhere when greedy.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  steps: int
  logprobs: np.ndarray | None = None

  def ids(self) -> list[list[int]]:
    """Each row's generated ids, without the stop token."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def sampling_logits(logits, temperature, top_p, *, top_k: int, use_top_p: bool, keep=None):
  """The logits of the distribution a draw is made from: logits / temperature, and -inf
  outside the kept set: top-k, then top-p (the smallest prefix of the top-k tokens, most
  likely first, whose renormalised probability sums to >= top_p; the top token is always
  kept). float32 [..., V]. keep: token ids [...] kept in any case (a trainer recomputing a
  sampled token's log-prob after the policy moved: the token stays in the support).

  The sampler draws from these logits and a trainer recomputes log-probs with this same
  function, so the two agree (log_softmax of the result at the drawn token)."""
  x = logits.astype(jnp.float32) / temperature
  v = x.shape[-1]
  k = min(top_k or (v if use_top_p else 0), v)
  if not k:
    return x
  vals = jax.lax.top_k(x, k)[0]  # sorted, most likely first
  if use_top_p:
    probs = jax.nn.softmax(vals, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # a prefix
  else:
    n_kept = jnp.full(x.shape[:-1], k)
  threshold = jnp.take_along_axis(vals, (n_kept - 1)[..., None], axis=-1)
  kept = x >= threshold
  if keep is not None:
    kept |= jnp.arange(v) == keep[..., None]
  return jnp.where(kept, x, -jnp.inf)


def _choose(key, logits, temperature, top_p, *, top_k: int, greedy: bool, use_top_p: bool):
  """logits [B, V] float32 -> (token ids [B] int32, their log-probs [B] under the
  distribution drawn from: `sampling_logits`; 0 for greedy)."""
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, jnp.zeros(tok.shape, jnp.float32)
  x = sampling_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
  tok = jax.random.categorical(key, x).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], axis=-1)[:, 0]
  return tok, logp


def _decode_loop(model, prompts, lengths, live, stop_ids, key, temperature, top_p, pad_id,
                 *, max_new_tokens, choose, adapters=None, lora=None):
  b, p = prompts.shape
  n = max_new_tokens
  start = p - lengths                                        # first real slot of each row
  kv_mask = jnp.arange(p + n - 1)[None, :] >= start[:, None]  # [B, S]
  positions = jnp.maximum(jnp.arange(p)[None, :] - start[:, None], 0)

  cache = model.init_cache(b, p + n - 1)
  h, cache = model.decode_hidden(prompts, positions, cache, 0, kv_mask, adapters=adapters,
                                 lora=lora)
  logits = model.unembed(h[:, -1])

  def emit(i, picked, out, logps, n_gen, stopped, done):
    tok, logp = picked
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    logps = jax.lax.dynamic_update_slice(logps, jnp.where(done, 0.0, logp)[:, None], (0, i))
    hit = ~done & jnp.isin(tok, stop_ids)
    n_gen = n_gen + (~done & ~hit)
    return tok, out, logps, n_gen, stopped | hit, done | hit

  pick = lambda i, logits: choose(jax.random.fold_in(key, i), logits, temperature, top_p)
  out = jnp.full((b, n), pad_id, jnp.int32)
  logps = jnp.zeros((b, n), jnp.float32)
  zeros = jnp.zeros((b,), jnp.int32)
  carry = (jnp.int32(1), *emit(0, pick(0, logits), out, logps, zeros, zeros > 0, ~live), cache)

  def cond(carry):
    i, done = carry[0], carry[6]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, tok, out, logps, n_gen, stopped, done, cache = carry
    # Token i-1 sits at slot p + i - 1 with position lengths + i - 1.
    logits, cache = model.decode(tok[:, None], (lengths + i - 1)[:, None], cache,
                                 p + i - 1, kv_mask, adapters=adapters, lora=lora)
    return (i + 1, *emit(i, pick(i, logits[:, 0]), out, logps, n_gen, stopped, done), cache)

  i, _, out, logps, n_gen, stopped, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, logps, n_gen, stopped, i


@partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_k', 'greedy',
                                   'use_top_p', 'mesh_rules', 'lora'))
def _generate(graphdef, params, adapters, prompts, lengths, live, stop_ids, seed, temperature,
              top_p, pad_id, *, max_new_tokens, top_k, greedy, use_top_p, mesh_rules, lora):
  is_key = jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
  key = seed if is_key else jax.random.key(seed)
  mesh, rules = mesh_rules if mesh_rules else (None, None)
  with _constraints(mesh, rules):
    choose = partial(_choose, top_k=top_k, greedy=greedy, use_top_p=use_top_p)
    if adapters is not None:  # trained base leaves (lora.train_params) in place
      from lmjax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
      params = lora_lib.effective_params(params, adapters)
    outs = _decode_loop(nnx.merge(graphdef, params), prompts, lengths, live, stop_ids, key,
                        temperature, top_p, pad_id, max_new_tokens=max_new_tokens,
                        choose=choose, adapters=adapters, lora=dict(lora) if lora else None)
  if mesh is not None:  # replicated results: every process can read them
    outs = jax.lax.with_sharding_constraint(outs, NamedSharding(mesh, P()))
  return outs


def _constraints(mesh, rules):
  """Activation constraints while tracing: exactly (mesh, rules), or none without rules
  (an enclosing `sharding.use_mesh` must not leak into a trace cached without it)."""
  return sharding.use_mesh(mesh, rules)


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def generate(graphdef, params, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), seed: int | jax.Array = 0, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None,
             rules: Mapping[str, Any] | None = None, adapters=None,
             lora: Mapping[str, Any] | None = None) -> GenerateOutput:
  """Continues each prompt (a list of token ids, BOS included if wanted) by up to
  max_new_tokens tokens; a row ends at its first token in `stop_tokens`.

  params: the model's parameters (a pure dict or nnx.State), on one device or sharded on
  a mesh. With `mesh` and `rules` (cfg.rules; by default those of an enclosing
  `sharding.use_mesh`), prompts are split along the 'batch' rule and activations and the
  KV cache are constrained by the rules; with params sharded on a mesh and neither, that
  mesh is used with replicated inputs and XLA's sharding propagation.
  Results come back replicated, so every process of a multi-host run may call this with
  the same prompts. adapters: LoRA adapters (lora.init_adapters' tree, e.g. a run's
  state['adapters']) applied unmerged on top of `params`, with `lora` the cfg.lora group
  (rank, alpha, rslora): samples from base + adapters without a merged copy of the weights. seed: an int or a jax.random key. Host-to-device copies are explicit
  (clean under jax.transfer_guard('disallow')).
  """
  prompts = [list(map(int, t)) for t in prompt_tokens]
  if not prompts:
    raise ValueError('generate: no prompts')
  if any(len(t) == 0 for t in prompts):
    raise ValueError('generate: every prompt needs at least one token (add a BOS)')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f'generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got '
                     f'{temperature}, {top_k}, {top_p}')

  if mesh is None:  # an enclosing sharding.use_mesh(mesh, rules)
    mesh, rules = sharding.current() or (None, rules)
  b = len(prompts)
  dp = sharding.data_parallel_size(mesh, rules) if mesh is not None and rules else 1
  bb = -(-_next_pow2(b) // dp) * dp
  p = max(_next_pow2(max(len(t) for t in prompts)), MIN_PROMPT_BUCKET)
  buf = np.full((bb, p), pad_id, np.int32)
  for i, t in enumerate(prompts):
    buf[i, p - len(t):] = t
  lengths = np.array([len(t) for t in prompts] + [1] * (bb - b), np.int32)
  live = np.arange(bb) < b  # rows past b only fill the bucket; they start done
  stops = sorted({int(s) for s in stop_tokens if s is not None and s >= 0})
  stop_ids = np.full(-(-max(len(stops), 1) // 8) * 8, -1, np.int32)
  stop_ids[:len(stops)] = stops
  if isinstance(seed, (int, np.integer)):
    seed = np.uint32(int(seed) % 2**32)  # the key is made on device: jax.random.key(seed)

  if mesh is None:  # params sharded on a mesh: run there, inputs and outputs replicated
    sh = getattr(jax.tree.leaves(params)[0], 'sharding', None)
    mesh = sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None
  batched = (buf, lengths, live)
  scalars = (stop_ids, seed, np.float32(max(temperature, 1e-6)), np.float32(top_p),
             np.int32(pad_id))
  batched = sharding.put_along_batch(batched, mesh, rules)
  scalars = (jax.device_put(scalars) if mesh is None  # explicit: transfer-guard clean
             else jax.device_put(scalars, NamedSharding(mesh, P())))
  mesh_rules = sharding.mesh_rules_key(mesh, rules)
  greedy = temperature == 0
  if adapters is not None and lora is None:
    raise ValueError('generate: adapters need `lora` (the cfg.lora group: rank, alpha, rslora)')
  lora_key = None if adapters is None else tuple(
      (k, lora[k]) for k in ('rank', 'alpha', 'rslora')) + (('dropout', 0.0),)
  out, logps, n_gen, stopped, steps = jax.device_get(_generate(
      graphdef, params, adapters, *batched, *scalars, max_new_tokens=int(max_new_tokens),
      top_k=0 if greedy else int(top_k), greedy=greedy,
      use_top_p=not greedy and top_p < 1.0, mesh_rules=mesh_rules, lora=lora_key))
  return GenerateOutput(tokens=np.asarray(out)[:b], lengths=np.asarray(n_gen)[:b],
                        stopped=np.asarray(stopped)[:b], steps=int(steps),
                        logprobs=np.asarray(logps)[:b])


def sample(graphdef, params, tokenizer, prompts: list, *, max_new_tokens: int = 64,
           temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0,
           add_bos: bool = True, mesh=None, rules=None) -> list[str]:
  """Continues each prompt (a string, encoded after the tokenizer's BOS when add_bos, or
  a list of token ids); returns the generated text (prompt excluded), cut at the
  tokenizer's first stop token (EOS, or a chat template's end of turn)."""
  encoded = [list(p) if not isinstance(p, str) else
             (list(tokenizer.bos) if add_bos else []) + tokenizer.encode(p) for p in prompts]
  out = generate(graphdef, params, encoded, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_tokens=tokenizer.stop_ids, seed=seed,
                 pad_id=getattr(tokenizer, 'pad_id', 0), mesh=mesh, rules=rules)
  return [tokenizer.decode(ids) for ids in out.ids()]
