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


BUILTINS: dict[str, Callable] = {'exact_match': exact_match, 'format': format_reward}


def load(spec: str, reward_model: str = '') -> Callable:
  """The reward function `spec` names: 'module.path:function', a built-in's name, or
  'reward_model' (a RewardModel of the path `reward_model`, grpo.reward_model)."""
  spec = spec.strip()
  if spec in BUILTINS:
    return BUILTINS[spec]
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
  known = ', '.join(BUILTINS) + ', reward_model'
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
               reward_model: str = ''):
    specs = list(specs)
    if not specs:
      raise RewardError(f"{FIELD} is empty: name at least one reward function (e.g. "
                        "'exact_match')")
    self.specs = [s if isinstance(s, str) else getattr(s, '__name__', repr(s)) for s in specs]
    self.fns = [load(s, reward_model) if isinstance(s, str) else s for s in specs]
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
      raise RewardError(f'grpo.reward_weights has {len(weights)} weights for {len(specs)} '
                        f'reward functions ({FIELD}); give one per function, or none')
    if not all(math.isfinite(w) for w in weights):
      raise RewardError(f'grpo.reward_weights must be finite numbers, got {weights}')
    self.weights = np.asarray(weights, np.float64)
    names, seen = [], {}
    for spec, fn in zip(self.specs, self.fns):
      base = (spec if spec in BUILTINS or spec == 'reward_model'
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
