"""The README's opening commands are the ones CI runs, and its configs exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _opening_commands():
  text = (ROOT / 'README.md').read_text()
  block = re.search(r'```bash\n(.*?)```', text, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
  text = (ROOT / 'README.md').read_text()
  assert text.index('```bash') < text.index('##'), 'the commands come first'
  main, tests = _opening_commands()
  assert main.startswith('pip install -e . && python -m lmjax.train --config=configs/')
  assert 'pytest' in tests
  assert tests in (ROOT / '.ci' / 'run').read_text()


def test_readme_configs_exist():
  text = (ROOT / 'README.md').read_text()
  for path in set(re.findall(r'--config=(configs/[\w/]+\.py)', text)):
    assert (ROOT / path).exists(), path
