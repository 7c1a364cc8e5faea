"""Reward functions for GRPO (lmjax/rewards.py): loading by name, weights, None skipped,
the built-ins, and clear errors for what cannot be used."""

import numpy as np
import pytest

from lmjax import rewards
from lmjax.rewards import RewardError, RewardFunctions

PROMPTS = [[{'role': 'user', 'content': f'q{i}'}] for i in range(4)]
IDS = [[1, 2], [3], [4, 5, 6], []]


def _module(tmp_path, monkeypatch, name, source):
  (tmp_path / f'{name}.py').write_text(source, encoding='utf-8')
  monkeypatch.syspath_prepend(str(tmp_path))


def test_load_builtins_and_module_functions(tmp_path, monkeypatch):
  assert rewards.load('exact_match') is rewards.exact_match
  assert rewards.load(' format ') is rewards.format_reward
  _module(tmp_path, monkeypatch, 'my_rewards', 'class K:\n  @staticmethod\n'
          '  def f(prompts, completions, completion_ids, **kw):\n'
          '    return [1.0] * len(completions)\n'
          'def g(prompts, completions, completion_ids, **kw):\n'
          '  return [float(len(i)) for i in completion_ids]\n'
          'VALUE = 3\n')
  assert rewards.load('my_rewards:g')(PROMPTS, ['a'] * 4, IDS) == [2.0, 1.0, 3.0, 0.0]
  assert rewards.load('my_rewards:K.f')(PROMPTS, ['a'] * 4, IDS) == [1.0] * 4
  for spec, message in [
      ('exactmatch', "'exactmatch' is neither a built-in"),
      ('nope_module:f', "module 'nope_module' not found"),
      ('my_rewards:missing', "'my_rewards' has no 'missing'"),
      ('my_rewards:VALUE', 'is a int, not a function')]:
    with pytest.raises(RewardError, match=f'^grpo.reward_funcs: .*{message}'):
      rewards.load(spec)


def test_an_import_error_inside_a_users_module_keeps_its_traceback(tmp_path, monkeypatch):
  _module(tmp_path, monkeypatch, 'broken_rewards', 'import not_installed_dep\n')
  with pytest.raises(ModuleNotFoundError, match='not_installed_dep') as e:
    rewards.load('broken_rewards:f')
  assert not isinstance(e.value, RewardError)


def test_weights_combine_and_none_is_skipped():
  def a(prompts, completions, completion_ids, **kw):
    return [1.0, None, 0.5, None]

  def b(prompts, completions, completion_ids, **kw):
    return [np.float32(2.0), np.bool_(True), None, None]

  fns = RewardFunctions([a, b], [1.0, 0.5])
  s = fns(PROMPTS, ['x'] * 4, IDS)
  assert fns.names == ('a', 'b')
  np.testing.assert_array_equal(s.total, [2.0, 0.5, 0.5, 0.0])
  assert np.isnan(s.per_function[1, 0]) and np.isnan(s.per_function[3]).all()
  assert s.all_none == 1
  m = s.metrics()
  assert m['rewards/a/mean'] == 0.75 and m['rewards/b/mean'] == 1.5
  assert m['reward'] == pytest.approx(0.75)
  assert m['reward_std'] == pytest.approx(np.std([2.0, 0.5, 0.5, 0.0], ddof=1))
  assert all(np.isfinite(v) for v in m.values())

  def never(prompts, completions, completion_ids, **kw):
    return [None] * len(completions)
  m = RewardFunctions([never, a])(PROMPTS, ['x'] * 4, IDS).metrics()
  assert 'rewards/never/mean' not in m and m['reward'] == pytest.approx(1.5 / 4)


def test_names_are_deduplicated_and_weights_checked():
  fns = RewardFunctions(['exact_match', 'format', 'exact_match'])
  assert fns.names == ('exact_match', 'format', 'exact_match_2')
  with pytest.raises(RewardError, match='grpo.reward_weights has 1 weights for 2'):
    RewardFunctions(['exact_match', 'format'], [1.0])
  with pytest.raises(RewardError, match='finite'):
    RewardFunctions(['format'], [float('nan')])
  with pytest.raises(RewardError, match='grpo.reward_funcs is empty'):
    RewardFunctions([])


def test_builtins():
  completions = ['8', ' 8 \nmore', '9', 'CAT', 'tac extra', '']
  answers = ['8', '8', '8', 'CAT', 'tac', None]
  got = rewards.exact_match(None, completions, None, answer=answers)
  assert got == [1.0, 1.0, 0.0, 1.0, 0.0, None]
  with pytest.raises(RewardError, match="needs an 'answer' column"):
    rewards.exact_match(None, completions, None)
  fmt = rewards.format_reward(None, ['8', '  CAT  ', 'a\nb', '', ' ', 'x' * 33, 'x' * 32],
                              None)
  assert fmt == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
  s = RewardFunctions(['exact_match', 'format'], [1.0, 0.5])(
      PROMPTS[:3], ['8', '9\n', 'x' * 40], IDS[:3], answer=['8', '8', None])
  np.testing.assert_array_equal(s.total, [1.5, 0.5, 0.0])


@pytest.mark.parametrize('returned, message', [
    ([1.0, 2.0], 'returned 2 rewards for 3 completions'),
    (5.0, 'returned float rewards for 3 completions'),
    ([1.0, 'high', 0.0], "returned 'high' at completion 1"),
    ([1.0, float('nan'), 0.0], 'returned a non-finite reward nan at completion 1'),
    ([1.0, float('inf'), 0.0], 'returned a non-finite reward inf'),
])
def test_bad_returns_name_the_function(returned, message):
  def scorer(prompts, completions, completion_ids, **kw):
    return returned
  with pytest.raises(RewardError, match=f"grpo.reward_funcs: 'scorer' {message}"):
    RewardFunctions([scorer])(PROMPTS[:3], ['a', 'b', 'c'], IDS[:3])


def test_builtins_take_conversational_completions_as_trl_passes_them():
  """A prompt given as messages: completions arrive as [{'role': 'assistant', ...}]."""
  msgs = lambda t: [{'role': 'assistant', 'content': t}]
  got = rewards.exact_match(PROMPTS[:3], [msgs('8'), msgs(' 8\nmore'), msgs('9')], None,
                            answer=['8', '8', '8'])
  assert got == [1.0, 1.0, 0.0]
  assert rewards.format_reward(None, [msgs('CAT'), msgs('a\nb')], None) == [1.0, 0.0]
  assert rewards.completion_text(msgs('x')) == 'x' and rewards.completion_text('y') == 'y'
