"""Evaluation: perplexity over a dataset split, and a task-accuracy harness.

    ppl = evaluate.perplexity(graphdef, params, cfg, tok, split='validation', mesh=mesh)
    acc = evaluate.exact_match(model.generate, [{'prompt': '2+2=', 'answer': '4'}, ...])

`perplexity` reads the split once, in order (no shuffling), packed exactly as training
packs it, and averages the next-token loss over every loss token it saw; the last partial
batch is dropped (grain's drop_remainder), which the returned token count shows.
`exact_match` is the harness SFT and DPO reuse: prompt -> greedy answer -> compare.
"""

from __future__ import annotations

import contextlib
import copy
import math
from functools import partial
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.data import pipeline
from lmjax.train import forward


@partial(jax.jit, static_argnames=('graphdef',))
def _nll_sums(graphdef, params, batch):
  nll, _ = forward.loss_sums(graphdef, params, batch, 0.0)
  return nll, jnp.sum(batch['loss_mask'])


def perplexity(graphdef, params, cfg, tokenizer, split: str | None = None, *,
               mesh=None, batch_size: int | None = None, max_batches: int | None = None,
               data: Mapping | None = None) -> dict:
  """Mean next-token loss and perplexity of `split` (default cfg.data.eval_split).

  data: overrides for cfg.data (e.g. {'text_glob': ..., 'source': 'tfds', 'tfds_name':
  ...}) to score another corpus with the same model and tokenizer.
  Returns {'loss', 'ppl', 'tokens', 'batches'}.
  """
  cfg = copy.deepcopy(cfg)
  if data:
    with cfg.data.unlocked():
      cfg.data.update(dict(data))
  split = split or cfg.data.eval_split
  batch_size = batch_size or cfg.train.global_batch
  mesh = mesh or sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  rules = dict(cfg.rules)
  dp = sharding.data_parallel_size(mesh, rules)
  if batch_size % dp:
    raise ValueError(f'batch_size {batch_size} is not divisible by the data-parallel '
                     f'size {dp} of mesh {dict(mesh.shape)}')
  pc = jax.process_count()
  it = pipeline.make_lm_iterator(cfg, tokenizer, split, batch_size=batch_size // pc,
                                 process_index=jax.process_index(), process_count=pc,
                                 repeat=False)
  try:
    with sharding.use_mesh(mesh, rules):
      sums, n = sum_outputs(lambda p, b: _nll_sums(graphdef, p, b), params, it, cfg, mesh,
                            limit=max_batches)
  finally:
    if hasattr(it, 'close'):
      it.close()
  total, count = sums if n else (0.0, 0.0)
  if count == 0:
    raise ValueError(f'split {split!r} gave no full batch of {batch_size} x '
                     f'{cfg.data.seq_len} tokens to evaluate')
  loss = total / count
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)), 'tokens': count, 'batches': n}


def sum_outputs(step, weights, batches: Iterable[dict], cfg, mesh, *,
                limit: int | None = None, reducers: Mapping[str, str] | None = None):
  """(the sums of step(weights, batch)'s outputs over `batches` (host batches, at most
  `limit`), as a pytree of float64 host floats, and the number of batches run): what a
  loss or metric averaged over a whole eval set needs (reducers: {key: 'min' | 'max'} of
  a dict output, combined so instead of summed). Each batch is checked
  (forward.check_host_batch) and placed on `mesh`, split over its data-parallel axes."""
  outs = []
  for host in batches:
    if limit is not None and len(outs) >= limit:
      break
    forward.check_host_batch(cfg, host)
    outs.append(step(weights, sharding.place_batch(host, mesh, cfg.rules)))
  if not outs:
    return None, 0
  outs = jax.device_get(outs)
  total = jax.tree.map(lambda *xs: float(np.sum(np.asarray(xs, np.float64))), *outs)
  for key, how in (reducers or {}).items():  # a dict output's min / max keys
    if isinstance(total, dict) and key in total:
      total[key] = float({'min': np.min, 'max': np.max}[how]([o[key] for o in outs]))
  return total, len(outs)


def normalize_answer(text: str) -> str:
  """The first line, stripped: a model that keeps going after the answer still counts."""
  return text.strip().split('\n', 1)[0].strip()


def exact_match(generate: Callable[[list[str]], list[str]],
                examples: Iterable[Mapping[str, str]], *, batch_size: int = 32,
                normalize: Callable[[str], str] = normalize_answer,
                keep: int = 5) -> dict:
  """Task accuracy: `generate(prompts) -> completions` (greedy, by the caller), each
  compared with its example's 'answer' after `normalize`.

  Returns {'accuracy', 'correct', 'n', 'samples': the first `keep` (prompt, answer,
  output, ok) tuples, 'by_task': {task: accuracy} when examples carry a 'task'}.
  """
  examples = list(examples)
  if not examples:
    raise ValueError('exact_match needs at least one example')
  for i, ex in enumerate(examples):
    if 'prompt' not in ex or 'answer' not in ex:
      raise ValueError(f'example {i} needs "prompt" and "answer" fields, has {sorted(ex)}')
  correct, samples, tasks = 0, [], {}
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    outputs = generate([ex['prompt'] for ex in chunk])
    if len(outputs) != len(chunk):
      raise ValueError(f'generate returned {len(outputs)} completions for {len(chunk)} prompts')
    for ex, out in zip(chunk, outputs):
      ok = normalize(out) == normalize(ex['answer'])
      correct += ok
      if ex.get('task'):
        tasks.setdefault(ex['task'], []).append(ok)
      if len(samples) < keep:
        samples.append((ex['prompt'], ex['answer'], out, bool(ok)))
  return {'accuracy': correct / len(examples), 'correct': correct, 'n': len(examples),
          'samples': samples, 'by_task': {t: float(np.mean(v)) for t, v in sorted(tasks.items())}}


def token_logprobs(graphdef, params, sequences: Sequence[Sequence[int]], *,
                   mesh=None, rules=None, pad_to: int = 64) -> list[np.ndarray]:
  """log p(token_t | tokens_<t) for t >= 1 of each sequence (float32 numpy, length n-1).

  Sequences are right-padded to a multiple of `pad_to` and scored in one batch; padding
  never changes the result (causal attention, padding after the real tokens).
  """
  if not sequences:
    return []
  lp, lengths = _padded_call(_logprobs, graphdef, params, sequences, mesh, rules, pad_to,
                             'token_logprobs')
  return [lp[i, :n - 1] for i, n in enumerate(lengths)]


def token_logits(graphdef, params, sequences: Sequence[Sequence[int]], *,
                 mesh=None, rules=None, pad_to: int = 64) -> list[np.ndarray]:
  """The model's output logits [n, vocab] (float32 numpy) at every position of each
  sequence (padded and batched as token_logprobs)."""
  if not sequences:
    return []
  out, lengths = _padded_call(_logits, graphdef, params, sequences, mesh, rules, pad_to,
                              'token_logits')
  return [out[i, :n] for i, n in enumerate(lengths)]


def sequence_rewards(graphdef, params, sequences: Sequence[Sequence[int]], *,
                     mesh=None, rules=None, pad_to: int = 64) -> np.ndarray:
  """A reward model's (model.head=score) reward of each sequence, float32 [n]: its score
  at the sequence's last token (right padding: causal attention never sees it)."""
  if not sequences:
    return np.zeros((0,), np.float32)
  out, lengths = _padded_call(_scores, graphdef, params, sequences, mesh, rules, pad_to,
                              'rewards')
  return np.asarray([out[i, n - 1] for i, n in enumerate(lengths)], np.float32)


def _padded_call(fn, graphdef, params, sequences, mesh, rules, pad_to, name):
  """fn(graphdef, params, tokens) on the sequences right-padded to a multiple of pad_to."""
  lengths = [len(s) for s in sequences]
  if min(lengths) < 1:
    raise ValueError(f'{name}: an empty sequence has nothing to score')
  t = -(-max(lengths) // pad_to) * pad_to
  buf = np.zeros((len(sequences), t), np.int32)
  for i, s in enumerate(sequences):
    buf[i, :len(s)] = s
  ctx = (sharding.use_mesh(mesh, rules) if mesh is not None and rules is not None
         else contextlib.nullcontext())
  with ctx:
    return np.asarray(fn(graphdef, params, jnp.asarray(buf))), lengths


@partial(jax.jit, static_argnames=('graphdef',))
def _logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens).astype(jnp.float32)


@partial(jax.jit, static_argnames=('graphdef',))
def _scores(graphdef, params, tokens):
  model = nnx.merge(graphdef, params)
  return model.scores(model.hidden(tokens))


@partial(jax.jit, static_argnames=('graphdef',))
def _logprobs(graphdef, params, tokens):
  logits = nnx.merge(graphdef, params)(tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]



def choice_logprobs(graphdef, params, sequences: Sequence[Sequence[int]],
                    choices: Sequence[Sequence[int]], *, mesh=None, rules=None,
                    batch_size: int = 32, pad_to: int = 64) -> np.ndarray:
  """log p(choice | sequence) for the next token after each sequence, float32 [n, k]:
  the model's full-vocabulary log-softmax at the sequence's last position, read at its k
  candidate ids (choices[i]). One forward pass per sequence, no generation: what a
  multiple-choice judge needs.

  Sequences are right-padded to a multiple of pad_to (one compilation per length bucket)
  and run batch_size at a time (rounded up to a multiple of the mesh's data-parallel
  size), each batch split along the 'batch' rule of `mesh` / `rules` (cfg.rules), with
  the hidden states projected to the vocabulary at the last position only. Results are
  replicated, so every process of a multi-host run may call this with the same inputs.
  """
  n = len(sequences)
  choices = np.asarray(choices, np.int32).reshape(n, -1)
  if n == 0:
    return np.zeros((0, choices.shape[1]), np.float32)
  lengths = np.asarray([len(s) for s in sequences], np.int32)
  if lengths.min() < 1:
    raise ValueError('choice_logprobs: an empty sequence has no next-token distribution')
  if mesh is None:
    mesh, rules = sharding.current() or (None, rules)
  dp = sharding.data_parallel_size(mesh, rules) if mesh is not None and rules else 1
  bs = -(-max(1, min(batch_size, n)) // dp) * dp
  out = np.zeros((n, choices.shape[1]), np.float32)
  order = np.argsort(lengths, kind='stable')  # similar lengths batched together
  for start in range(0, n, bs):
    idx = order[start:start + bs]
    t = -(-int(lengths[idx].max()) // pad_to) * pad_to
    tokens = np.zeros((bs, t), np.int32)
    last = np.zeros((bs,), np.int32)
    ch = np.zeros((bs, choices.shape[1]), np.int32)
    for r, i in enumerate(idx):
      tokens[r, :lengths[i]] = sequences[i]
      last[r] = lengths[i] - 1
      ch[r] = choices[i]
    args = sharding.put_along_batch((tokens, last, ch), mesh, rules)
    got = np.asarray(jax.device_get(_choice_logprobs(
        graphdef, params, *args, mesh_rules=sharding.mesh_rules_key(mesh, rules))))
    out[idx] = got[:len(idx)]
  return out


@partial(jax.jit, static_argnames=('graphdef', 'mesh_rules'))
def _choice_logprobs(graphdef, params, tokens, last, choices, *, mesh_rules):
  mesh, rules = mesh_rules if mesh_rules else (None, None)
  with sharding.use_mesh(mesh, dict(rules) if rules else None):
    model = nnx.merge(graphdef, params)
    h = model.hidden(tokens)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(model.unembed(h_last), axis=-1)
    out = jnp.take_along_axis(logp, choices, axis=1)
  if mesh is not None:  # replicated results: every process can read them
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
  return out
