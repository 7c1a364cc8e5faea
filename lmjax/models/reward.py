"""Reading a reward model's scores at the last real token of each sequence.

A reward model is the decoder with model.head='score': a linear `score` [D, 1] on the final
normed hidden state instead of the next-token head (Hugging Face's *ForSequenceClassification
with num_labels=1: `score.weight` [1, D], no bias). `Transformer.scores` gives the score of
every position; the reward of a sequence is the score of its last real token. In a packed
row (data/pipeline.py: segment ids 1, 2, ... per document, 0 for padding) each segment is a
sequence, so its reward is read at the segment's last token. Padding on either side
changes nothing: padding tokens have segment id 0, and real tokens never attend to them.
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


def segment_rewards(scores: jax.Array, segment_ids: jax.Array, max_segments: int
                    ) -> tuple[jax.Array, jax.Array]:
  """(rewards [B, S], present [B, S] bool) with S = max_segments, from per-position scores
  [B, T]: the score of segment s + 1's last token in column s of each row (0 and present
  False when the row has no such segment). Segment ids above S are not read."""
  ends = segment_ends(segment_ids)
  onehot = (segment_ids[..., None] == jnp.arange(1, max_segments + 1)) & ends[..., None]
  rewards = jnp.sum(jnp.where(onehot, scores[..., None].astype(jnp.float32), 0.0), axis=1)
  return rewards, jnp.any(onehot, axis=1)


def last_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] rewards of unpacked rows from scores [B, T]: the score at each row's last position
  with mask 1 (left or right padding alike; Hugging Face reads the last token that is not
  padding)."""
  t = mask.shape[1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(t), -1), axis=1)
  return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
