"""The reward head reads each sequence's last real token: packed and unpacked batches,
left and right padding give the same rewards."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmjax.models import reward, transformer
from util import tiny_config


def _model():
  cfg = tiny_config()
  cfg.model.update(head='score', init_std=0.1)
  model = transformer.build(ml_collections.FrozenConfigDict(cfg.model))
  scores = lambda *args: model.scores(model.hidden(*args))
  return model, scores


def test_segment_ends():
  seg = jnp.array([[1, 1, 2, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 2, 3, 3, 4, 4, 4]])
  assert np.asarray(reward.segment_ends(seg)).astype(int).tolist() == [
      [0, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 1, 0, 0, 1]]


def test_packed_unpacked_left_and_right_padding_give_the_same_rewards():
  model, scores = _model()
  rng = np.random.default_rng(0)
  lengths, t = [5, 9, 3], 20
  docs = [rng.integers(4, 250, n).astype(np.int32) for n in lengths]
  alone = []
  for d in docs:
    s = scores(jnp.asarray(d[None]))
    alone.append(float(reward.last_token_rewards(s, jnp.ones((1, len(d))))[0]))
  # One packed row with trailing padding.
  toks = np.zeros((1, t), np.int32)
  seg, pos = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
  at = 0
  for i, d in enumerate(docs):
    toks[0, at:at + len(d)], seg[0, at:at + len(d)] = d, i + 1
    pos[0, at:at + len(d)] = np.arange(len(d))
    at += len(d)
  s = scores(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg))
  packed, present = reward.segment_rewards(s, jnp.asarray(seg), max_segments=4)
  assert np.asarray(present).tolist() == [[True, True, True, False]]
  np.testing.assert_allclose(np.asarray(packed)[0, :3], alone, atol=1e-6)
  # One document per row, right- and left-padded (padding: segment 0, token 0).
  for side in ('right', 'left'):
    toks, mask = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
    pos = np.zeros((3, t), np.int32)
    for i, d in enumerate(docs):
      sl = slice(0, len(d)) if side == 'right' else slice(t - len(d), t)
      toks[i, sl], mask[i, sl], pos[i, sl] = d, 1, np.arange(len(d))
    s = scores(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(mask))
    got = reward.last_token_rewards(s, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), alone, atol=1e-6, err_msg=side)
    seg_r, _ = reward.segment_rewards(s, jnp.asarray(mask), max_segments=1)
    np.testing.assert_allclose(np.asarray(seg_r)[:, 0], alone, atol=1e-6, err_msg=side)
  # The last token matters: reading one position early gives another reward.
  early = reward.last_token_rewards(scores(jnp.asarray(docs[1][None])),
                                    jnp.asarray([[1] * 8 + [0]]))
  assert abs(float(early[0]) - alone[1]) > 1e-3


def test_score_head_has_no_next_token_head():
  model, _ = _model()
  assert not hasattr(model, 'lm_head') and model.score.shape == (64, 1)
  with pytest.raises(ValueError, match='no next-token head'):
    model(jnp.zeros((1, 4), jnp.int32))
