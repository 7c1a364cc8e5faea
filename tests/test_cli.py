"""Bad input on the command line: `python -m lmjax.train` and the tools print lmjax's own
errors as one line, `error: <message>`, and exit with code 2; --verbose or LMJAX_VERBOSE=1
adds the traceback; any other exception (a bug) keeps its traceback. Every subprocess here
fails before anything compiles."""

import os
import subprocess
import sys

import pytest

from lmjax import cli, errors
from lmjax import config as config_lib
from lmjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/pretrain_tiny.py'


def _run(*args, verbose_env=False, timeout=120):
  """`python *args` from the repository root, with this checkout's lmjax on the path."""
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env.update(JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p))
  if verbose_env:
    env[cli.VERBOSE_ENV] = '1'
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _one_line(res) -> str:
  """The single line a bad-input run printed on stderr (exit code 2, no traceback)."""
  assert res.returncode == 2, res.stderr[-3000:]
  assert 'Traceback' not in res.stderr, res.stderr[-3000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('command', [
    ['-m', 'lmjax.train', '--workdir={w}'],
    ['tools/convert_hf.py', 'import', '--hf_dir={w}', '--workdir={w}'],
    ['tools/pretokenize.py'],
    ['tools/train_tokenizer.py'],
    ['tools/bench.py'],
    ['tools/prepare_data.py', '--out={w}'],
    ['tools/launch_tpu.py', '--name=n', '--zone=z', '--workdir={w}', '--dry-run'],
], ids=lambda c: c[-1 if c[0] == '-m' else 0].split('/')[-1])
def test_missing_config_file_is_one_line(command, tmp_path):
  work = tmp_path / 'w'
  res = _run(*[a.format(w=work) for a in command], '--config=nope.py')
  assert _one_line(res) == 'error: config file not found: nope.py'
  assert res.stdout == '' and not work.exists()


def test_config_file_that_raises_is_named_first(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(arg=None)\n  return None\n')
  res = _run('-m', 'lmjax.train', f'--config={bad}', f'--workdir={tmp_path / "w"}')
  assert _one_line(res) == (f'error: config file {bad}, line 1: loading it raised '
                            "SyntaxError: expected ':'")
  bad.write_text('from lmjax import config\n\n\ndef get_config(arg=None):\n'
                 '  cfg = config.base_config()\n  cfg.train.steps = STEPS\n  return cfg\n')
  res = _run('tools/bench.py', f'--config={bad}:x', '--verbose')
  assert res.returncode == 2
  # The user's own code: --verbose shows where in it, below the file named first.
  assert res.stderr.strip().splitlines()[-1] == (
      f"error: config file {bad}, line 6: get_config('x') raised NameError: name 'STEPS' is "
      'not defined')
  assert 'Traceback' in res.stderr and f'File "{bad}", line 6, in get_config' in res.stderr
  # In Python the cause is kept: the config file's own traceback.
  with pytest.raises(config_lib.ConfigError, match=r'bad.py, line 6: get_config\(None\)') as e:
    config_lib.load(str(bad))
  assert isinstance(e.value.__cause__, NameError)
  res = _run('-m', 'lmjax.train', f'--config={TINY}:nope', f'--workdir={tmp_path / "w"}')
  assert _one_line(res).startswith(f"error: config file {TINY}, line ")
  assert "get_config('nope') raised ValueError: pretrain_tiny: unknown config arg" in res.stderr


def test_flag_errors_are_one_line(tmp_path):
  work = tmp_path / 'w'
  res = _run('-m', 'lmjax.train', f'--config={TINY}', f'--workdir={work}',
             '--config.optim.lr=abc')
  assert "could not convert string to float: 'abc'" in _one_line(res)
  res = _run('-m', 'lmjax.train', f'--config={TINY}')
  assert 'Flag --workdir must have a value' in _one_line(res)
  res = _run('-m', 'lmjax.train', f'--config={TINY}', f'--workdir={work}', 'extra')
  assert "unexpected arguments: ['extra']" in _one_line(res)
  assert not work.exists()


def test_data_error_from_training_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  args = ['-m', 'lmjax.train', f'--config={TINY}', f'--workdir={tmp_path / "w"}',
          '--config.data.text_glob=/nonexistent/*.txt',
          f'--config.data.data_dir={tmp_path / "data"}']
  res = _run(*args)
  assert res.returncode == 2, res.stderr[-3000:]
  assert 'Traceback' not in res.stderr
  message = "error: data.text_glob '/nonexistent/*.txt' matches no files"
  assert res.stderr.strip().splitlines()[-1] == message
  res = _run(*args, '--verbose')
  assert res.returncode == 2
  assert 'Traceback (most recent call last)' in res.stderr
  assert 'lmjax.data.sources.DataError' in res.stderr
  assert res.stderr.strip().splitlines()[-1] == message


def test_verbose_environment_variable(tmp_path):
  res = _run('tools/pretokenize.py', '--config=nope.py', verbose_env=True)
  assert res.returncode == 2
  assert 'Traceback' in res.stderr and 'ConfigError' in res.stderr
  assert res.stderr.strip().splitlines()[-1] == 'error: config file not found: nope.py'


def test_a_bug_keeps_its_traceback(tmp_path):
  """Any exception that is not lmjax's own bad-input error is a bug: full traceback."""
  code = ('import sys\n'
          'from lmjax.train import __main__ as m, loop\n'
          'def train(cfg, workdir):\n'
          '  raise KeyError("a bug")\n'
          'loop.train = train\n'
          f'sys.argv = ["lmjax.train", "--config={TINY}", "--workdir={tmp_path / "w"}"]\n'
          'm.run()\n')
  res = _run('-c', code)
  assert res.returncode == 1
  assert 'Traceback (most recent call last)' in res.stderr
  assert res.stderr.strip().splitlines()[-1] == "KeyError: 'a bug'"
  assert 'error:' not in res.stderr


def test_cli_main_in_process(capsys, monkeypatch):
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)

  @cli.main
  def main(argv):
    if argv == ['data']:
      raise sources.DataError('data.text_glob matches no files')
    if argv == ['missing']:
      raise errors.NotFoundError('tokenizer.path: no tokenizer at /x')
    if argv == ['bug']:
      raise ZeroDivisionError('a bug')
    if argv == ['ctrl-c']:
      raise KeyboardInterrupt
    return 0

  assert main([]) == 0
  assert main(['data']) == 2
  assert capsys.readouterr().err == 'error: data.text_glob matches no files\n'
  assert main(['missing']) == 2
  assert capsys.readouterr().err == 'error: tokenizer.path: no tokenizer at /x\n'
  with pytest.raises(ZeroDivisionError):
    main(['bug'])
  assert main(['ctrl-c']) == 130  # a Ctrl-C that stops at once: one line
  assert capsys.readouterr().err.startswith('interrupted (Ctrl-C): stopped at once')
  monkeypatch.setenv(cli.VERBOSE_ENV, '1')
  assert main(['data']) == 2
  err = capsys.readouterr().err
  assert err.startswith('Traceback') and err.endswith('error: data.text_glob matches no files\n')
  # Every lmjax error class is a UserError and keeps its builtin base.
  from lmjax import checkpoint, hf, sharding
  from lmjax.data import tokenizer
  from lmjax.models import lora
  from lmjax.train import loop
  for cls, base in ((config_lib.ConfigError, ValueError), (sources.DataError, ValueError),
                    (hf.HFError, ValueError), (lora.LoraError, ValueError),
                    (sharding.ShardingError, ValueError), (tokenizer.TokenizerError, ValueError),
                    (checkpoint.CheckpointError, RuntimeError), (loop.TrainingError, RuntimeError),
                    (errors.NotFoundError, FileNotFoundError),
                    (errors.ExistsError, FileExistsError)):
    assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls
