"""Online RL with group-relative advantages (cfg.stage='grpo'): GRPO (DeepSeekMath) and its
DAPO and Dr. GRPO variants, as TRL's GRPOTrainer computes them (cfg.grpo).

Each train step is one round:
  1. rollout (on the host, before the step): the step's train.global_batch prompts, each
     sampled grpo.num_generations (G) times on the training mesh from the arrays being
     trained, no copy made (generate.generate with a KV cache; LoRA adapters applied
     unmerged, as in training), up to grpo.max_completion_length tokens or
     the stop token (EOS, the chat template's end of turn). The sampler returns each
     token's log-prob under the distribution it drew from (temperature, top-k, top-p,
     renormalised). Draws depend on (seed, step) only, so a resumed run samples what the
     interrupted one would have.
  2. score: the reward functions (lmjax/rewards.py; grpo.reward_funcs, reward_weights) on
     the decoded completions, cut at the template's end-of-turn marker (as messages for a
     prompt given as messages, as TRL does); advantages are
     group-normalised (losses.group_advantages, grpo.scale_rewards).
  With grpo.dynamic_sampling (DAPO), groups whose rewards are all equal (no advantage,
  no gradient) are replaced by groups of further prompts, sampled in up to
  grpo.max_resample more rounds; the logged rewards are the first round's, unfiltered.
  3. update: grpo.num_iterations (μ) optimizer updates on the round's completions, each
     over the whole batch (train.grad_accum micro-batches), against the sampler's
     log-probs as the old policy's. The trainer's log-probs are taken under the same
     truncated distribution (losses.sampling_stats), so at the first update every ratio
     is 1 up to float rounding (no sampler/trainer mismatch); the loss, by
     grpo.loss_type, is losses.grpo_sums', plus grpo.beta x the k3 KL to the reference
     (the starting model: LoRA's base with the adapters off, or a frozen copy).
With μ = 1 the loss value is 0 up to rounding at every step (ratios are 1 and each
group's advantages sum to 0) while its gradient is not: watch the reward, not the loss.

One step's batch is global_batch x G rows, a prompt's G completions consecutive (on one
device). The learning-rate schedule counts rounds (train.steps); the μ updates of a round
share its learning rate.

Metrics, named as TRL's: reward, reward_std, rewards/<fn>/mean and /std,
frac_reward_zero_std, kl (beta > 0), entropy, clip_ratio/{low,high,region}_mean,
completions/{mean,min,max}_length, completions/clipped_ratio (no stop token within
max_completion_length), plus rollout_tokens_per_s and the time of each part of the step:
time/generate_s, time/score_s and time/update_s (step_s less those), and with dynamic
sampling dynamic_sampling/rounds and /filled_groups (groups of equal rewards kept when the
rounds ran out). At each eval: greedy
completions of the first sft.eval_examples held-out prompts, scored (eval/reward,
eval/rewards/<fn>/mean), and exact match where the prompts carry an 'answer' column.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lmjax import config as config_lib
from lmjax import generate
from lmjax.data import check as data_check
from lmjax.data import formats, prompts
from lmjax.train import forward, losses
from lmjax.train.objectives import base
from lmjax.train.objectives import sft as sft_lib

NORMALISERS = {'grpo': 'completions', 'bnpo': 'micro_batches',
               'dr_grpo': 'completion_slots', 'dapo': 'completion_tokens'}


def split_list(text: str) -> list[str]:
  return [p.strip() for p in text.split(',') if p.strip()]


def reward_functions(cfg):
  """cfg.grpo's reward functions (rewards.RewardFunctions), loaded: RewardError naming the
  field if one does not load."""
  from lmjax import rewards as rewards_lib  # pylint: disable=import-outside-toplevel
  g = cfg.grpo
  weights = split_list(g.reward_weights)
  try:
    weights = [float(w) for w in weights] if weights else None
  except ValueError:
    raise config_lib.ConfigError(f'grpo.reward_weights must be comma-separated numbers, got '
                                 f'{g.reward_weights!r}') from None
  judge = {'path': g.judge, 'constitution': g.constitution, 'principles': g.judge_principles}
  return rewards_lib.RewardFunctions(split_list(g.reward_funcs), weights, g.reward_model,
                                     judge)


class GRPO(base.Objective):
  """Online RL over prompts (cfg.grpo): see the module doc."""

  name = 'grpo'

  def __init__(self, cfg):
    super().__init__(cfg)
    g = cfg.grpo
    self.rows_per_example = g.num_generations
    self.updates_per_step = g.num_iterations
    self.normaliser = NORMALISERS[g.loss_type]
    self.reference = self.reference_mode(cfg)
    self.needs_base = self.reference is not None
    self.row_keys['advantages'] = jnp.float32
    self.token_keys = {'old_logps': jnp.float32}
    self.counters = ('grpo/dropped',)
    self._records, self._prompt_ids, self._setup = {}, {}, None
    self._rewards = None

  @classmethod
  def reference_mode(cls, cfg) -> str | None:
    """The KL's reference: None without a KL term (grpo.beta 0), else grpo.reference
    resolved ('auto': adapters_off with LoRA, else copy)."""
    g = cfg.grpo
    if g.beta == 0:
      return None
    if g.reference == 'auto':
      return 'adapters_off' if cfg.lora.enabled else 'copy'
    return g.reference

  @classmethod
  def validate(cls, cfg):
    g = cfg.grpo
    sft_lib.validate_data_group(cfg, 'grpo')
    err = config_lib.ConfigError
    if g.num_generations < 2:
      raise err(f'grpo.num_generations must be >= 2 (advantages compare completions of a '
                f'prompt), got {g.num_generations}')
    if not 1 <= g.max_completion_length < cfg.data.seq_len:
      raise err(f'grpo.max_completion_length ({g.max_completion_length}) must be in [1, '
                f'data.seq_len={cfg.data.seq_len}): the prompt needs room too')
    if g.temperature <= 0:
      raise err(f'grpo.temperature must be positive (sampling), got {g.temperature}')
    if g.top_k < 0 or not 0 < g.top_p <= 1:
      raise err(f'grpo.top_k must be >= 0 and grpo.top_p in (0, 1], got {g.top_k}, {g.top_p}')
    if not 0 <= g.epsilon_low < 1 or g.epsilon_high < 0:
      raise err(f'grpo.epsilon_low must be in [0, 1) and grpo.epsilon_high >= 0, got '
                f'{g.epsilon_low}, {g.epsilon_high}')
    if g.beta < 0:
      raise err(f'grpo.beta must be >= 0, got {g.beta}')
    if g.num_iterations < 1:
      raise err(f'grpo.num_iterations must be >= 1, got {g.num_iterations}')
    if g.reference == 'adapters_off' and not cfg.lora.enabled:
      raise err("grpo.reference='adapters_off' needs lora.enabled (the reference is the "
                'base without adapters)')
    if g.beta > 0 and not cfg.init_from.path:
      raise err('grpo.beta > 0 needs init_from.path: the KL reference is the model the run '
                'starts from')
    reward_functions(cfg)  # names that do not load fail here, before anything runs

  # ---- Data ---------------------------------------------------------------------------

  def check_data(self, tokenizer, log):
    return data_check.check_stage(self.cfg, tokenizer, 'grpo', log=log)

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source
    return prompts.make_prompt_iterator(self.cfg, tokenizer, split, keep=keep, **kw)

  def records(self, split: str) -> prompts.Prompts:
    if split not in self._records:
      self._records[split] = prompts.get_prompts(self.cfg, split)
    return self._records[split]

  def prompt_ids(self, tokenizer, split: str, index: int) -> list[int]:
    key = (split, int(index))
    if key not in self._prompt_ids:
      template = formats.resolve_template(self.cfg.sft.template, tokenizer)
      self._prompt_ids[key] = prompts.encode_prompt(self.records(split)[index][0], tokenizer,
                                                    template)
    return self._prompt_ids[key]

  @property
  def rewards(self):
    if self._rewards is None:
      from lmjax import rewards as rewards_lib  # pylint: disable=import-outside-toplevel
      self._rewards = reward_functions(self.cfg)
      for fn in self._rewards.fns:  # a reward model: on the run's devices, as its mesh
        if isinstance(fn, rewards_lib.RewardModel):
          fn.mesh, fn.seq_len = dict(self.cfg.mesh), self.cfg.data.seq_len
    return self._rewards

  def split_batch(self, host):
    return ({k: host[k] for k in self.batch_keys},
            np.asarray([int(np.sum(host['dropped']))], np.int64))

  # ---- Rollout ------------------------------------------------------------------------

  def completions(self, setup, tokenizer, weights, split: str, indices, *, seed: int,
                  greedy: bool = False):
    """G sampled (or one greedy) completions of each prompt `indices` of `split` from
    `weights` (the arrays being trained; LoRA adapters applied unmerged, so no copy of the
    weights is made): the GenerateOutput, the prompts' ids, and the completions' text cut
    at the template's end-of-turn marker."""
    g = self.cfg.grpo
    n = 1 if greedy else g.num_generations
    ids = [self.prompt_ids(tokenizer, split, i) for i in indices]
    rows = [p for p in ids for _ in range(n)]
    adapters = weights.get('adapters')
    out = generate.generate(
        setup.graphdef, weights['params'], rows, max_new_tokens=g.max_completion_length,
        adapters=adapters, lora=None if adapters is None else dict(setup.lora),
        temperature=0.0 if greedy else g.temperature, top_k=g.top_k, top_p=g.top_p,
        stop_tokens=tokenizer.stop_ids, seed=seed, pad_id=getattr(tokenizer, 'pad_id', 0),
        mesh=setup.mesh, rules=setup.rules)
    cut = formats.end_cutter(self.cfg.sft.template, tokenizer)
    texts = [cut(tokenizer.decode(c)) for c in out.ids()]
    return out, rows, texts

  def score(self, split: str, indices, texts, out, n: int):
    """The reward functions on completions (n per prompt `indices`), passed as TRL passes
    them: for a prompt given as messages, the prompt's turns and the completion as
    [{'role': 'assistant', 'content': text}]; for a string prompt, both as strings."""
    records = self.records(split)
    prompts_, completions = [], []
    for i, text in zip((i for i in indices for _ in range(n)), texts):
      turns, _, conversational = records[i]
      prompts_.append(turns if conversational else turns[-1]['content'])
      completions.append([{'role': 'assistant', 'content': text}] if conversational else text)
    columns = {k: [v for v in vs for _ in range(n)]
               for k, vs in records.columns(indices).items()}
    return self.rewards(prompts_, completions, out.ids(), **columns)

  def rollout(self, setup, tokenizer, state, host, step, more=None):
    """The step's rows: this process's prompts (host['index']) sampled G times from the
    policy in `state`, scored, with advantages and the sampler's log-probs (module doc).
    With grpo.dynamic_sampling, groups whose rewards are all equal are replaced by those
    of further prompts (more(): the next batch), at most grpo.max_resample rounds."""
    cfg, g = self.cfg, self.cfg.grpo
    pc, pi, n = jax.process_count(), jax.process_index(), g.num_generations
    split = cfg.data.train_split
    timing = {'generate': 0.0, 'score': 0.0}

    def sample(h, k):
      """One round on the global batch (the same on every process): (prompt ids per
      completion, GenerateOutput, Scores)."""
      local = np.asarray(h['index'])
      every = (np.asarray(multihost_utils.process_allgather(local)).reshape(-1) if pc > 1
               else local)
      seed = int(np.random.SeedSequence([cfg.seed, 4, int(step), k]).generate_state(1)[0])
      t0 = time.perf_counter()
      out, rows, texts = self.completions(setup, tokenizer, state, split, every, seed=seed)
      t1 = time.perf_counter()
      scores = self.score(split, every, texts, out, n)
      timing['generate'] += t1 - t0
      timing['score'] += time.perf_counter() - t1
      return rows, out, scores

    rounds = [sample(host, 0)]
    groups = len(rounds[0][0]) // n  # prompts of the global batch
    zero = lambda r: np.ptp(r[2].total.reshape(-1, n), axis=1) == 0  # [groups]
    chosen = [(0, j) for j in range(groups)]
    dropped = int(np.sum(host['dropped']))
    filled = 0
    if g.dynamic_sampling:
      chosen = [(0, j) for j in np.flatnonzero(~zero(rounds[0]))]
      while len(chosen) < groups and len(rounds) <= g.max_resample and more is not None:
        h = more()
        dropped += int(np.sum(h['dropped']))
        rounds.append(sample(h, len(rounds)))
        chosen += [(len(rounds) - 1, j) for j in np.flatnonzero(~zero(rounds[-1]))]
      if len(chosen) < groups:  # out of rounds: fill with groups that teach nothing
        rest = [(k, j) for k, r in enumerate(rounds) for j in np.flatnonzero(zero(r))]
        filled = groups - len(chosen)
        chosen += rest[:filled]
      chosen = chosen[:groups]

    pick = lambda k, j: slice(j * n, (j + 1) * n)
    prompt_ids = [p for k, j in chosen for p in rounds[k][0][pick(k, j)]]
    tokens = np.concatenate([rounds[k][1].tokens[pick(k, j)] for k, j in chosen])
    logprobs = np.concatenate([rounds[k][1].logprobs[pick(k, j)] for k, j in chosen])
    n_tok = np.concatenate([(rounds[k][1].lengths + rounds[k][1].stopped)[pick(k, j)]
                            for k, j in chosen])
    total = np.concatenate([rounds[k][2].total[pick(k, j)] for k, j in chosen])
    adv, _ = losses.group_advantages(total, n, g.scale_rewards)

    first_out, first_scores = rounds[0][1], rounds[0][2]  # the policy as sampled, unfiltered
    first_tok = first_out.lengths + first_out.stopped
    metrics = dict(first_scores.metrics())
    metrics.update({
        'frac_reward_zero_std': float(np.mean(zero(rounds[0]))),
        'completions/mean_length': float(np.mean(first_tok)),
        'completions/min_length': float(np.min(first_tok)),
        'completions/max_length': float(np.max(first_tok)),
        'completions/clipped_ratio': float(np.mean(~first_out.stopped)),
        'time/generate_s': timing['generate'], 'time/score_s': timing['score'],
        'rollout_tokens_per_s': float(sum(np.sum(r[1].lengths + r[1].stopped)
                                          for r in rounds)) / max(timing['generate'], 1e-9)})
    if g.dynamic_sampling:
      metrics['dynamic_sampling/rounds'] = float(len(rounds))
      metrics['dynamic_sampling/filled_groups'] = float(filled)
    share = slice(pi * len(prompt_ids) // pc, (pi + 1) * len(prompt_ids) // pc)
    batch = self.rows(prompt_ids[share], tokens[share], n_tok[share], logprobs[share],
                      adv[share])
    batch['dropped'] = np.asarray([dropped], np.int32)
    return batch, metrics

  def rows(self, prompt_ids, tokens, n_tok, logprobs, advantages) -> dict:
    """Token rows [R, seq_len] of prompt + completion (its first n_tok tokens), loss mask
    and the sampler's log-probs on the completion's targets, and the rows' advantages."""
    seq = self.cfg.data.seq_len
    r = len(prompt_ids)
    out = {k: np.zeros((r, seq), np.int32) for k in ('inputs', 'targets', 'segment_ids')}
    out['positions'] = np.broadcast_to(np.arange(seq, dtype=np.int32), (r, seq)).copy()
    out['loss_mask'] = np.zeros((r, seq), np.float32)
    out['old_logps'] = np.zeros((r, seq), np.float32)
    for i, (p, c, n) in enumerate(zip(prompt_ids, tokens, n_tok)):
      full = np.concatenate([np.asarray(p, np.int32), np.asarray(c[:n], np.int32)])
      m = len(full) - 1
      out['inputs'][i, :m], out['targets'][i, :m] = full[:-1], full[1:]
      out['segment_ids'][i, :m] = 1
      out['loss_mask'][i, len(p) - 1:m] = 1.0
      out['old_logps'][i, len(p) - 1:m] = logprobs[i, :n]
    out['advantages'] = np.asarray(advantages, np.float32)
    return out

  # ---- State --------------------------------------------------------------------------

  def state_entries(self, abstract_params, param_shardings):
    if self.reference != 'copy':
      return {}
    return base.reference_copy(abstract_params, param_shardings)

  # ---- Loss ---------------------------------------------------------------------------

  def sampling(self) -> dict:
    g = self.cfg.grpo
    return dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)

  def sums(self, setup):
    graphdef, lora, g = setup.graphdef, setup.lora, self.cfg.grpo

    def sums(weights, batch, rng):
      logps, entropy = forward.sampling_logps(graphdef, weights['params'], batch,
                                              self.sampling(), adapters=weights.get('adapters'),
                                              lora=lora, dropout_rng=rng)
      ref = None
      if self.reference is not None:
        params = weights['params'] if self.reference == 'adapters_off' else weights['ref_params']
        ref = jax.lax.stop_gradient(
            forward.sampling_logps(graphdef, params, batch, self.sampling())[0])
      total, m, _ = losses.grpo_sums(
          logps, batch['old_logps'], batch['advantages'], batch['loss_mask'],
          loss_type=g.loss_type, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
          beta=g.beta, ref_logps=ref, max_completion_length=g.max_completion_length,
          entropy=entropy)
      return total, dict(m, loss=total)

    return sums

  def denominator(self, batch):
    g, rows = self.cfg.grpo, jnp.float32(batch['inputs'].shape[0])
    if g.loss_type == 'grpo':
      return rows
    if g.loss_type == 'bnpo':  # each micro-batch's token mean, averaged
      return jnp.float32(self.cfg.train.grad_accum)
    if g.loss_type == 'dr_grpo':
      return rows * g.max_completion_length
    return jnp.maximum(forward.token_count(batch), 1.0)

  def metrics(self, aux, denom):
    """loss over the normaliser; the token statistics over the completion tokens."""
    aux = dict(aux)
    tokens = jnp.maximum(aux.pop('completion_tokens'), 1.0)
    out = {k: v / tokens for k, v in aux.items() if k != 'loss'}
    out['loss'] = aux['loss'] / denom
    return out

  # ---- Eval ---------------------------------------------------------------------------

  def eval_step(self, setup):
    self._setup = setup
    return None

  def evaluate(self, eval_step, weights, tokenizer, mesh, process_index, process_count,
               keep=None):
    """Greedy completions of the first sft.eval_examples held-out prompts (or
    train.global_batch when that is 0), scored by the reward functions."""
    del eval_step, mesh, process_index, process_count
    cfg, setup = self.cfg, self._setup
    split = cfg.data.eval_split
    records = self.records(split)
    kept = (keep or {}).get(split)
    order = np.arange(len(records)) if kept is None else np.asarray(kept)
    n = min(len(order), cfg.sft.eval_examples or cfg.train.global_batch)
    indices = order[:n]
    out, _, texts = self.completions(setup, tokenizer, weights, split, indices, seed=0,
                                     greedy=True)
    scores = self.score(split, indices, texts, out, 1)
    m = scores.metrics()
    m.pop('reward_std', None)
    result = {f'eval/{k}': v for k, v in m.items() if not k.endswith('/std')}
    result['eval/completions/mean_length'] = float(np.mean(out.lengths + out.stopped))
    return result

  def answer_examples(self, tokenizer, split):
    """The first sft.eval_examples prompts of `split` with an 'answer' column."""
    limit = self.cfg.sft.eval_examples
    if limit <= 0 or not formats.has_split(self.cfg, split, 'grpo'):
      return []
    records = self.records(split)
    out = []
    for i in range(len(records)):
      turns, columns, _ = records[i]
      if columns.get('answer') is None:
        continue
      prompt = formats.render_prompt(turns + [{'role': 'assistant', 'content': ''}],
                                     self.cfg.sft.template, tokenizer)
      out.append({'prompt': prompt, 'answer': str(columns['answer']),
                  'task': str(columns.get('task', ''))})
      if len(out) == limit:
        break
    return out

  def exact_match(self, graphdef, params, tokenizer, mesh, examples):
    return sft_lib.chat_exact_match(self.cfg, graphdef, params, tokenizer, mesh, examples)

  def sample_prompt(self, tokenizer, text):
    return sft_lib.chat_sample_prompt(self.cfg, tokenizer, text)
