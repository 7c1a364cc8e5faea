"""Reward functions for online RL (stage='grpo'), with TRL's GRPOTrainer signature.

A reward function scores a batch of completions:

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

prompts and completions as TRL passes them: for a prompt given as messages, the prompt's
turns (a list of {'role', 'content'}) and the completion as [{'role': 'assistant',
'content': text}]; for a string prompt, both as strings. The text is cut at the chat
template's end of turn (`completion_text` gives it in either form); completion_ids:
the generated token ids (stop token excluded); columns: the prompt records' other fields,
one entry per completion (e.g. answer=[...], task=[...]); accept **kwargs for the rest.
Return one reward per completion: a number (a bool counts as 0/1), or None to abstain on
that completion (TRL's convention: it is skipped, never a NaN).

In a config, grpo.reward_funcs names them, comma-separated: 'my_pkg.rewards:my_reward'
(importable from the run's Python path), or a built-in:
    exact_match   1.0 when the completion's first line, stripped, equals the record's
                  'answer' column (also stripped), else 0.0 (None where the answer is None)
    format        1.0 when the completion is one non-empty line of at most 32 characters
                  (surrounding whitespace ignored), else 0.0: the shape of the built-in
                  task's answers
    reward_model  the score of the reward model at grpo.reward_model (RewardModel: an
                  lmjax stage='reward' workdir or a Hugging Face
                  *ForSequenceClassification directory), on the run's devices
    judge         an AI judge's verdict (JudgeReward): each completion's mean probability
                  of beating the other completions of its prompt under the principles of
                  grpo.constitution, by the language model grpo.judge (lmjax/ai_feedback.py)
grpo.reward_weights weights them ('' = 1.0 each). A completion's reward is the weighted
sum of the functions that scored it (TRL's nansum; 0.0 when none did, counted).

    fns = RewardFunctions(['exact_match', 'format'], [1.0, 0.2])
    scores = fns(prompts, completions, completion_ids, answer=answers)
    scores.total, scores.per_function, scores.metrics()
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Callable, Sequence

import numpy as np

from lmjax.errors import UserError

FIELD = 'grpo.reward_funcs'
FORMAT_MAX_CHARS = 32


class RewardError(UserError, ValueError):
  """A reward function that cannot be loaded or returned something unusable."""


def completion_text(completion) -> str:
  """A completion's text, whether it came as a string or as [{'role': 'assistant',
  'content': text}] (a conversational prompt's)."""
  if isinstance(completion, str):
    return completion
  return completion[-1]['content']


def _first_line(text: str) -> str:
  return text.strip().split('\n', 1)[0].strip()


def exact_match(prompts, completions, completion_ids, answer=None, **kwargs):
  """1.0 where the completion's first line, stripped, equals the 'answer' column."""
  del prompts, completion_ids, kwargs
  if answer is None:
    raise RewardError(f"{FIELD}: the exact_match reward needs an 'answer' column in the "
                      'prompt records')
  return [None if a is None else float(_first_line(completion_text(c)) == str(a).strip())
          for c, a in zip(completions, answer)]


def format_reward(prompts, completions, completion_ids, **kwargs):
  """1.0 where the completion is one non-empty line of at most 32 characters."""
  del prompts, completion_ids, kwargs
  return [float(bool(t) and '\n' not in t and len(t) <= FORMAT_MAX_CHARS)
          for t in (completion_text(c).strip() for c in completions)]


class RewardModel:
  """A reward model's score of each completion (the built-in 'reward_model'): a model
  trained with stage='reward' (an lmjax workdir) or a Hugging Face
  *ForSequenceClassification directory, loaded with lmjax.load on first use, onto this
  process's devices sharded by `mesh` (a cfg.mesh dict; default lmjax.load's). Each
  completion is scored as the conversation prompt + assistant completion, rendered with
  the reward model's own chat template, as its training rendered pairs."""

  __name__ = 'reward_model'

  def __init__(self, path: str, mesh: dict | None = None, seq_len: int | None = None):
    self.path, self.mesh, self.seq_len, self._model = path, mesh, seq_len, None

  @property
  def model(self):
    if self._model is None:
      import lmjax  # pylint: disable=import-outside-toplevel
      self._model = lmjax.load(self.path, mesh=self.mesh, seq_len=self.seq_len)
      from lmjax.models import transformer  # pylint: disable=import-outside-toplevel
      if transformer.head_kind(self._model.config.model) != 'score':
        raise RewardError(f'grpo.reward_model {self.path} is a language model, not a '
                          "reward model: train one with stage='reward' or give a "
                          '*ForSequenceClassification directory')
    return self._model

  def __call__(self, prompts, completions, completion_ids, **kwargs):
    del completion_ids, kwargs
    turns = lambda p: [{'role': 'user', 'content': p}] if isinstance(p, str) else list(p)
    convs = [turns(p) + [{'role': 'assistant', 'content': completion_text(c)}]
             for p, c in zip(prompts, completions)]
    return self.model.reward(convs)


class JudgeReward:
  """An AI judge's reward (the built-in 'judge'): each completion's mean probability of
  beating the other completions of its prompt (consecutive completions of the same prompt
  form a group, as GRPO samples them), by ai_feedback.Judge under the constitution's
  preference principles: every pair of a group once, both orderings (position bias
  cancels), K principles drawn per pair (grpo.judge_principles) from a seed fixed by the
  pair's prompt and texts, so the same completions get the same reward. The judge (an
  lmjax workdir or a Hugging Face directory with a language-model head) is loaded with
  lmjax.load on first use onto this process's devices: it scores on the training mesh,
  one forward pass per ordering, no generation. A group of one gets 0.5."""

  __name__ = 'judge'

  def __init__(self, path: str, constitution: str, principles: int = 1,
               mesh: dict | None = None):
    from lmjax import ai_feedback  # pylint: disable=import-outside-toplevel
    self.path, self.mesh, self.k = path, mesh, principles
    self.constitution = ai_feedback.Constitution.load(constitution)
    self.constitution.judge_principles()  # fails now if none has a preference question
    self._judge = None

  @property
  def judge(self):
    if self._judge is None:
      import lmjax  # pylint: disable=import-outside-toplevel
      from lmjax import ai_feedback  # pylint: disable=import-outside-toplevel
      from lmjax.models import transformer  # pylint: disable=import-outside-toplevel
      model = lmjax.load(self.path, mesh=self.mesh)
      if transformer.head_kind(model.config.model) != 'lm':
        raise RewardError(f'grpo.judge {self.path} has a score head (a reward model): a '
                          "judge answers '(A)' or '(B)' with a language-model head; use "
                          "reward_funcs='reward_model' for a reward model")
      self._judge = ai_feedback.Judge(model, self.constitution,
                                      principles_per_comparison=self.k)
    return self._judge

  def __call__(self, prompts, completions, completion_ids, **kwargs):
    del completion_ids, kwargs
    import hashlib  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel
    texts = [completion_text(c) for c in completions]
    key = lambda p: json.dumps(p, sort_keys=True)
    groups, start = [], 0
    for i in range(1, len(prompts) + 1):
      if i == len(prompts) or key(prompts[i]) != key(prompts[start]):
        groups.append(range(start, i))
        start = i
    pairs = [(i, j) for g in groups for n, i in enumerate(g) for j in list(g)[n + 1:]]
    rewards = np.full(len(texts), 0.5)
    if not pairs:
      return rewards.tolist()
    judge = self.judge
    seeds = [int(hashlib.sha256(f'{key(prompts[i])}\0{texts[i]}\0{texts[j]}'.encode())
                 .hexdigest()[:8], 16) for i, j in pairs]
    principles = np.concatenate([judge.draw_principles(1, s) for s in seeds])
    res = judge.compare([prompts[i] for i, _ in pairs], [texts[i] for i, _ in pairs],
                        [texts[j] for _, j in pairs], principles=principles)
    wins, games = np.zeros(len(texts)), np.zeros(len(texts))
    for (i, j), p in zip(pairs, res.p):
      wins[i] += p
      wins[j] += 1.0 - p
      games[i] += 1
      games[j] += 1
    played = games > 0
    rewards[played] = wins[played] / games[played]
    return rewards.tolist()


BUILTINS: dict[str, Callable] = {'exact_match': exact_match, 'format': format_reward}


def load(spec: str, reward_model: str = '', judge: dict | None = None) -> Callable:
  """The reward function `spec` names: 'module.path:function', a built-in's name,
  'reward_model' (a RewardModel of the path `reward_model`, grpo.reward_model) or 'judge'
  (a JudgeReward; `judge`: {'path', 'constitution', 'principles'}, grpo.judge,
  grpo.constitution, grpo.judge_principles)."""
  spec = spec.strip()
  if spec in BUILTINS:
    return BUILTINS[spec]
  if spec == 'judge':
    import os  # pylint: disable=import-outside-toplevel
    judge = judge or {}
    if not judge.get('path') or not judge.get('constitution'):
      raise RewardError(f"{FIELD} names 'judge' but grpo.judge or grpo.constitution is "
                        'unset: set grpo.judge to a language model (an lmjax workdir or a '
                        'Hugging Face directory) and grpo.constitution to a constitution '
                        'JSON file (e.g. configs/constitution_tiny.json)')
    if not os.path.isdir(os.path.expanduser(judge['path'])):
      raise RewardError(f'grpo.judge {judge["path"]} is not a directory (an lmjax workdir '
                        'or a Hugging Face model directory)')
    return JudgeReward(os.path.expanduser(judge['path']), judge['constitution'],
                       int(judge.get('principles', 1)))
  if spec == 'reward_model':
    import os  # pylint: disable=import-outside-toplevel
    if not reward_model:
      raise RewardError(f"{FIELD} names 'reward_model' but grpo.reward_model is unset: set "
                        'it to a reward model (an lmjax workdir or a Hugging Face '
                        '*ForSequenceClassification directory)')
    if not os.path.isdir(os.path.expanduser(reward_model)):
      raise RewardError(f'grpo.reward_model {reward_model} is not a directory (an lmjax '
                        'workdir or a Hugging Face model directory)')
    return RewardModel(os.path.expanduser(reward_model))
  known = ', '.join(BUILTINS) + ', reward_model, judge'
  if ':' not in spec:
    raise RewardError(f'{FIELD}: {spec!r} is neither a built-in ({known}) nor '
                      "'module.path:function'")
  module_name, attr = spec.split(':', 1)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    parts = module_name.split('.')
    if e.name not in {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)}:
      raise  # an import inside the user's module failed: its own traceback
    raise RewardError(f'{FIELD}: {spec!r}: module {module_name!r} not found; name an '
                      f'importable module:function or a built-in ({known})') from None
  fn = module
  for part in attr.split('.'):
    if not hasattr(fn, part):
      raise RewardError(f'{FIELD}: {spec!r}: {module_name!r} has no {attr!r}')
    fn = getattr(fn, part)
  if not callable(fn):
    raise RewardError(f'{FIELD}: {spec!r} is a {type(fn).__name__}, not a function')
  return fn


@dataclasses.dataclass(frozen=True)
class Scores:
  """Rewards of N completions by F functions.

  per_function: [N, F] float64, NaN where a function returned None; total: [N] float64,
  the weighted sum over the functions that scored each completion (0.0 where none did);
  all_none: the completions no function scored.
  """
  names: tuple[str, ...]
  per_function: np.ndarray
  total: np.ndarray
  all_none: int

  def metrics(self) -> dict[str, float]:
    """TRL's names: 'reward' and 'reward_std' (of total; the std with ddof 1, as
    torch.std, 0.0 for one completion), 'rewards/<name>/mean' and '/std' (over the
    completions the function scored; a function that scored none is left out)."""
    t = self.total
    out = {'reward': float(np.mean(t)),
           'reward_std': float(np.std(t, ddof=1)) if len(t) > 1 else 0.0}
    for j, name in enumerate(self.names):
      v = self.per_function[:, j]
      v = v[~np.isnan(v)]
      if v.size:
        out[f'rewards/{name}/mean'] = float(np.mean(v))
        out[f'rewards/{name}/std'] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return out


class RewardFunctions:
  """Several reward functions with weights, called as one (see the module doc)."""

  def __init__(self, specs: Sequence[str | Callable], weights: Sequence[float] | None = None,
               reward_model: str = '', judge: dict | None = None):
    specs = list(specs)
    if not specs:
      raise RewardError(f"{FIELD} is empty: name at least one reward function (e.g. "
                        "'exact_match')")
    self.specs = [s if isinstance(s, str) else getattr(s, '__name__', repr(s)) for s in specs]
    self.fns = [load(s, reward_model, judge) if isinstance(s, str) else s for s in specs]
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
      raise RewardError(f'grpo.reward_weights has {len(weights)} weights for {len(specs)} '
                        f'reward functions ({FIELD}); give one per function, or none')
    if not all(math.isfinite(w) for w in weights):
      raise RewardError(f'grpo.reward_weights must be finite numbers, got {weights}')
    self.weights = np.asarray(weights, np.float64)
    names, seen = [], {}
    for spec, fn in zip(self.specs, self.fns):
      base = (spec if spec in BUILTINS or spec in ('reward_model', 'judge')
              else getattr(fn, '__name__', spec.split(':')[-1]))
      seen[base] = seen.get(base, 0) + 1
      names.append(base if seen[base] == 1 else f'{base}_{seen[base]}')
    self.names = tuple(names)

  def __call__(self, prompts, completions, completion_ids, **columns) -> Scores:
    n = len(completions)
    per = np.full((n, len(self.fns)), np.nan)
    for j, (spec, fn) in enumerate(zip(self.specs, self.fns)):
      got = fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
               **columns)
      if not isinstance(got, (list, tuple, np.ndarray)) or len(got) != n:
        size = len(got) if hasattr(got, '__len__') else type(got).__name__
        raise RewardError(f'{FIELD}: {spec!r} returned {size} rewards for {n} completions')
      for i, r in enumerate(got):
        if r is None:
          continue
        if isinstance(r, (bool, np.bool_)):
          r = float(r)
        if isinstance(r, str) or not isinstance(r, (int, float, np.integer, np.floating)):
          raise RewardError(f'{FIELD}: {spec!r} returned {r!r} at completion {i}; return '
                            'numbers, or None to skip a completion')
        if not math.isfinite(float(r)):
          raise RewardError(f'{FIELD}: {spec!r} returned a non-finite reward {r} at '
                            f'completion {i}; return None to skip a completion')
        per[i, j] = float(r)
    scored = ~np.isnan(per)
    total = np.where(scored, per * self.weights, 0.0).sum(axis=1)
    return Scores(self.names, per, total, int(np.sum(~scored.any(axis=1))))
