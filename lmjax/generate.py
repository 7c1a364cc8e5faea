"""Sampling from a model.

This is the simple sampler used for the sample printed after training: every new token
re-runs the forward pass over a fixed [B, prompt + new] buffer (exact, O(n^2)); fine for
short samples from small models. Prompts of different lengths sit left-aligned, each row
advancing from its own length.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_k'))
def _sample(graphdef, params, buf, lengths, key, *, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, params)
  rows = jnp.arange(buf.shape[0])

  def body(i, carry):
    buf, key = carry
    cur = lengths + i
    logits = model(buf)[rows, cur - 1].astype(jnp.float32)
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    key, sub = jax.random.split(key)
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6))
    tok = jnp.where(temperature > 0, sampled, greedy).astype(buf.dtype)
    return buf.at[rows, cur].set(tok), key

  buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, key))
  return buf


def sample(graphdef, params, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0,
           add_bos: bool = True) -> list[str]:
  """Continues each prompt; returns the generated text (prompt excluded), cut at EOS."""
  encoded = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p) for p in prompts]
  lengths = np.array([len(e) for e in encoded], np.int32)
  buf = np.zeros((len(prompts), int(lengths.max()) + max_new_tokens), np.int32)
  for i, e in enumerate(encoded):
    buf[i, :len(e)] = e
  out = np.asarray(_sample(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths),
                           jax.random.key(seed), max_new_tokens=max_new_tokens,
                           temperature=float(temperature), top_k=int(top_k)))
  texts = []
  for i, n in enumerate(lengths):
    new = out[i, n:n + max_new_tokens].tolist()
    if tokenizer.eos_id in new:
      new = new[:new.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(new))
  return texts
