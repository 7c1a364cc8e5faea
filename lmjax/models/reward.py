"""A scalar reward head on the decoder, read at the last real token of each sequence.

A reward model is the decoder plus a linear `score` [D, 1] applied to the final normed
hidden state (Hugging Face's *ForSequenceClassification with num_labels=1: `score.weight`
[1, D], no bias). The reward of a sequence is the score of its last real token. In a
packed row (data/pipeline.py: segment ids 1, 2, ... per document, 0 for padding) each
segment is a sequence, so its reward is read at the segment's last token; padding on either
side changes nothing, because padding tokens have segment id 0 and real tokens never
attend to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_ends(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: real tokens (segment id > 0) whose next token belongs to another
  segment, or that end the row."""
  seg = segment_ids
  nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
  return (seg > 0) & (nxt != seg)


def token_scores(hidden: jax.Array, score: jax.Array) -> jax.Array:
  """float32 [B, T] scores of every position: hidden [B, T, D] @ score [D, 1]."""
  return jnp.einsum('btd,dk->btk', hidden.astype(jnp.float32),
                    score.astype(jnp.float32))[..., 0]


def segment_rewards(hidden: jax.Array, segment_ids: jax.Array, score: jax.Array,
                    max_segments: int) -> tuple[jax.Array, jax.Array]:
  """(rewards [B, S], present [B, S] bool) with S = max_segments: the score of segment
  s + 1's last token in column s of each row (0 and present False when the row has no
  such segment). Segment ids must be < S + 1; larger ones are dropped."""
  scores = token_scores(hidden, score)
  ends = segment_ends(segment_ids)
  onehot = (segment_ids[..., None] == jnp.arange(1, max_segments + 1)) & ends[..., None]
  rewards = jnp.sum(jnp.where(onehot, scores[..., None], 0.0), axis=1)
  return rewards, jnp.any(onehot, axis=1)


def last_token_rewards(hidden: jax.Array, mask: jax.Array, score: jax.Array) -> jax.Array:
  """[B] rewards of unpacked rows: the score at each row's last position with mask 1
  (left or right padding alike; Hugging Face reads the last non-padding token)."""
  t = mask.shape[1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(t), -1), axis=1)
  scores = token_scores(hidden, score)
  return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]


def init_score(rng: jax.Array, d_model: int, std: float, dtype=jnp.float32) -> jax.Array:
  """A fresh score head [D, 1], normal(0, std) as transformers initialises it."""
  return (std * jax.random.normal(rng, (d_model, 1))).astype(dtype)
