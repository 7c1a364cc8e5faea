"""KV-cache generation: equal to the full forward pass, stop tokens, sampling, meshes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax import config as config_lib
from lmjax import generate as gen
from lmjax import sharding
from lmjax.models import transformer
from util import tiny_config

N_NEW = 10
PROMPT_LENS = (3, 9, 17, 1)  # left padding up to the 32 bucket; a one-token prompt
SAMPLING = dict(temperature=3.0, top_k=3)  # (tests share compiles where they can)


def _model(**kw):
  # init_std 0.5: logits far from uniform, so argmax is well separated (margins ~1e-2,
  # differences between cached and full forward ~1e-6).
  cfg = ml_collections.FrozenConfigDict(tiny_config(init_std=0.5, **kw).model)
  model = transformer.build(cfg)
  graphdef, state = nnx.split(model)
  return model, graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope='module')
def tiny():
  return _model()


@pytest.fixture(scope='module')
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(4, 256, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope='module')
def greedy(tiny, prompts):
  _, graphdef, params = tiny
  return gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW)


@jax.jit
def _forward(model, tokens):
  return model(tokens)


def _full_logits(model, seq, bucket=64):
  """Logits [len(seq), V] of the plain forward pass (no cache). Right padding to a fixed
  length (one compile) does not change them: attention is causal."""
  buf = np.zeros((1, bucket), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(_forward(model, jnp.asarray(buf))[0, :len(seq)])


def test_greedy_equals_argmax_of_full_forward(tiny, prompts, greedy):
  model = tiny[0]
  assert greedy.tokens.shape == (len(prompts), N_NEW)
  assert greedy.steps == N_NEW and not greedy.stopped.any()
  np.testing.assert_array_equal(greedy.lengths, N_NEW)
  for p, row in zip(prompts, greedy.tokens):
    seq = list(p)
    for _ in range(N_NEW):  # no cache: re-run the whole sequence for every token
      seq.append(int(_full_logits(model, seq)[-1].argmax()))
    assert row.tolist() == seq[len(p):]
  assert len({tuple(r) for r in greedy.tokens}) == len(prompts)  # not degenerate


@pytest.mark.parametrize('variant', [{}, dict(scan_layers=False),
                                     dict(n_kv_heads=1, qkv_bias=True, tie_embeddings=True)])
def test_prefill_and_decode_logits_match_full_forward(variant):
  model, _, _ = _model(**variant)
  rng = np.random.default_rng(1)
  lens, n_dec, p = (5, 11), 6, 16
  seqs = [rng.integers(4, 256, n + n_dec).tolist() for n in lens]
  buf = np.zeros((2, p), np.int32)
  for i, (s, n) in enumerate(zip(seqs, lens)):
    buf[i, p - n:] = s[:n]
  start = p - np.array(lens)
  kv_mask = jnp.asarray(np.arange(p + n_dec)[None] >= start[:, None])
  positions = jnp.asarray(np.maximum(np.arange(p)[None] - start[:, None], 0))
  decode = jax.jit(lambda m, *a: m.decode(*a))
  cache = model.init_cache(2, p + n_dec)
  logits, cache = decode(model, jnp.asarray(buf), positions, cache, 0, kv_mask)
  steps = []
  for j in range(n_dec):  # teacher-forced decode steps
    tok = jnp.asarray([[s[n + j]] for s, n in zip(seqs, lens)], jnp.int32)
    pos = jnp.asarray(np.array(lens)[:, None] + j)
    step_logits, cache = decode(model, tok, pos, cache, p + j, kv_mask)
    steps.append(np.asarray(step_logits[:, 0]))
  worst, scale = 0.0, 0.0
  for i, (s, n) in enumerate(zip(seqs, lens)):
    ref = _full_logits(model, s)
    got = np.concatenate([np.asarray(logits[i, p - n:]), np.stack([x[i] for x in steps])])
    worst = max(worst, float(np.max(np.abs(got - ref))))
    scale = max(scale, float(np.max(np.abs(ref))))
  # Measured: ~5e-5 with logits up to ~16 (float32 rounding grows with init_std 0.5).
  assert worst < 2e-5 * scale, (worst, scale)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_stop_tokens_end_rows_and_exit_early(tiny, prompts, greedy):
  _, graphdef, params = tiny
  ref = greedy.tokens
  stop = int(ref[0, 3])
  out = gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW, stop_tokens={stop},
                     pad_id=0)
  for row, got, n, stopped in zip(ref, out.tokens, out.lengths, out.stopped):
    hits = np.flatnonzero(row == stop)
    expect = int(hits[0]) if hits.size else N_NEW
    assert n == expect and stopped == bool(hits.size)
    assert got[:n].tolist() == row[:n].tolist()
    if stopped:
      assert got[n] == stop and np.all(got[n + 1:] == 0)
  assert out.lengths[0] == list(ref[0]).index(stop) and out.stopped[0]
  assert out.ids()[0] == ref[0, :out.lengths[0]].tolist()

  # Every row stops within 3 tokens: the loop exits early.
  stops = {int(t) for t in ref[:, 2]}
  with jax.transfer_guard('disallow'):  # no implicit host-device copies
    out = gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW, stop_tokens=stops)
  assert out.stopped.all() and np.all(out.lengths <= 2)
  assert out.steps == out.lengths.max() + 1 < N_NEW


def test_top_k_one_and_tiny_top_p_equal_greedy(tiny, prompts, greedy):
  _, graphdef, params = tiny
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW, temperature=1.0,
                       seed=3, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=str(kw))


def test_sampling_deterministic_per_seed(tiny, prompts, greedy):
  _, graphdef, params = tiny
  run = lambda seed: gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW,
                                  seed=seed, **SAMPLING).tokens
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.3
  assert np.mean(a != greedy.tokens) > 0.3


@pytest.mark.parametrize('kw', [dict(top_k=3), dict(top_p=0.5)])
def test_sampled_tokens_lie_in_the_allowed_set(tiny, prompts, greedy, kw):
  model, graphdef, params = tiny
  out = gen.generate(graphdef, params, prompts, max_new_tokens=N_NEW, seed=0,
                     **{**SAMPLING, **dict(top_k=0), **kw})
  off_argmax = 0
  for p, row in zip(prompts, out.tokens):
    logits = _full_logits(model, p + row.tolist())[len(p) - 1:-1] / SAMPLING['temperature']
    for lg, tok in zip(logits, row):
      order = np.argsort(-lg)
      if 'top_k' in kw:
        allowed = order[:kw['top_k']]
      else:
        probs = np.exp(lg - lg.max())[order]
        probs /= probs.sum()
        allowed = order[:1 + np.sum(np.cumsum(probs)[:-1] < kw['top_p'])]
      assert tok in allowed
      off_argmax += tok != order[0]
  assert off_argmax > 0  # it did sample


def test_top_p_keeps_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 2000)

  def draws(top_p, top_k=0):
    one = lambda k: gen._choose(k, logits, 1.0, top_p, top_k=top_k, greedy=False,
                                use_top_p=top_p < 1)[0][0]  # (tokens, log-probs)
    return np.bincount(np.asarray(jax.vmap(one)(keys)), minlength=4) / len(keys)

  f = draws(0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: keeps {1, 3}, renormalised to 5:3
  assert f[0] == f[2] == 0 and abs(f[1] - 0.625) < 0.05
  np.testing.assert_array_equal(draws(0.5), [0, 1, 0, 0])  # 0.5 alone reaches 0.5
  f = draws(1.0, top_k=3)
  assert f[0] == 0 and abs(f[2] - 0.15 / 0.95) < 0.04
  f = draws(1.0)
  assert abs(f[0] - 0.05) < 0.02


def test_batch_of_one_equals_batch_of_many(tiny, prompts, greedy):
  _, graphdef, params = tiny
  for i in (1, 3):
    alone = gen.generate(graphdef, params, [prompts[i]], max_new_tokens=N_NEW)
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[i])


def test_compiles_once_per_bucket(tiny):
  _, graphdef, params = tiny
  rng = np.random.default_rng(2)
  before = gen._generate._cache_size()
  for lens in [(4, 7), (16,), (2, 3, 9)]:  # batch bucket <= 4, prompt bucket 16
    for b_pad in range(4 - len(lens) + 1):
      ps = [rng.integers(4, 256, n).tolist() for n in lens + (5,) * b_pad]
      if len(ps) > 2:
        gen.generate(graphdef, params, ps, max_new_tokens=N_NEW,
                     stop_tokens=(rng.integers(256),))
  assert gen._generate._cache_size() - before == 1
  gen.generate(graphdef, params, [[5] * 17], max_new_tokens=N_NEW)  # prompt bucket 32
  assert gen._generate._cache_size() - before == 2


@pytest.mark.slow
def test_sharded_params_on_8_device_mesh_match_one_device(tiny, prompts, greedy):
  model, graphdef, params = tiny
  cfg = tiny_config(init_std=0.5)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = dict(config_lib.base_config().rules)
  _, abstract = nnx.split(nnx.eval_shape(lambda: model))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shardings = sharding.tree_shardings(specs, params, mesh, rules)
  sharded = jax.device_put(params, shardings)
  assert sharded['layers']['attn']['q'].sharding.spec != jax.sharding.PartitionSpec()
  with jax.transfer_guard('disallow'):  # no implicit host-device copies
    out = gen.generate(graphdef, sharded, prompts, max_new_tokens=N_NEW, mesh=mesh,
                       rules=rules)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  # As the train loop calls it: params on the mesh, no mesh given.
  out = gen.generate(graphdef, sharded, prompts, max_new_tokens=N_NEW)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  # As lmjax.api calls it: inside use_mesh (the same compile as mesh=, rules=).
  n_compiled = gen._generate._cache_size()
  with sharding.use_mesh(mesh, rules):
    out = gen.generate(graphdef, sharded, prompts, max_new_tokens=N_NEW)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  assert gen._generate._cache_size() == n_compiled
  kw = dict(max_new_tokens=N_NEW, seed=4, **SAMPLING)
  np.testing.assert_array_equal(
      gen.generate(graphdef, sharded, prompts, mesh=mesh, rules=rules, **kw).tokens,
      gen.generate(graphdef, params, prompts, **kw).tokens)


class _ByteTokenizer:
  """The part of lmjax.data.tokenizer.Tokenizer that generate.sample uses."""
  bos_id, eos_id, pad_id = 1, 2, 0

  @property
  def bos(self):
    return [self.bos_id]

  @property
  def stop_ids(self):
    return (self.eos_id,)

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode(errors='replace')


def test_sample_text_cut_at_eos(tiny):
  model, graphdef, params = tiny
  tok = _ByteTokenizer()
  ref = gen.generate(graphdef, params, [[1] + tok.encode('ab')], max_new_tokens=N_NEW)
  tok.eos_id = int(ref.tokens[0, 2])
  first = list(ref.tokens[0]).index(tok.eos_id)
  text = gen.sample(graphdef, params, tok, ['ab'], max_new_tokens=N_NEW, temperature=0.0)
  assert text == [tok.decode(ref.tokens[0, :first].tolist())]


def test_generate_validates_inputs(tiny):
  _, graphdef, params = tiny
  with pytest.raises(ValueError, match='at least one token'):
    gen.generate(graphdef, params, [[5], []], max_new_tokens=2)
  with pytest.raises(ValueError, match='top_p'):
    gen.generate(graphdef, params, [[5]], max_new_tokens=2, top_p=0.0)
