"""Experiment tracking: what produced a run (lmjax/provenance.py: checkpoint meta and
run.json)."""

import json
import os
import platform
import subprocess

import jax

import lmjax
from lmjax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args, cwd):
  return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=cwd,
                        capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_has_versions_git_and_devices():
  p = provenance.collect()
  json.dumps(p)  # JSON-safe: it goes into checkpoint meta and run.json
  assert p['lmjax'] == lmjax.__version__
  assert p['python'] == platform.python_version()
  assert set(p['packages']) == set(provenance.PACKAGES)
  assert p['packages']['jax'] == jax.__version__
  assert p['packages']['numpy'] and p['packages']['orbax-checkpoint']
  assert p['devices'] == {'kind': jax.devices()[0].device_kind, 'count': 8,
                          'platform': 'cpu', 'processes': 1}
  assert provenance.collect(jax.devices()[:2])['devices']['count'] == 2
  try:
    head = _git('rev-parse', 'HEAD', cwd=ROOT)
  except (OSError, subprocess.CalledProcessError):
    head = None  # tests run from an export, not a checkout
  if head is None:
    assert p['git'] is None
  else:
    assert p['git']['commit'] == head and isinstance(p['git']['dirty'], bool)


def test_git_state_of_a_checkout_and_none_otherwise(tmp_path, monkeypatch):
  repo = tmp_path / 'repo'
  (repo / 'lmjax').mkdir(parents=True)
  (repo / 'lmjax' / '__init__.py').write_text('x = 1\n')
  _git('init', '-q', cwd=repo)
  _git('add', '.', cwd=repo)
  _git('commit', '-q', '-m', 'c', cwd=repo)
  pkg = str(repo / 'lmjax')
  assert provenance.git_state(pkg) == {'commit': _git('rev-parse', 'HEAD', cwd=repo),
                                       'dirty': False}
  (repo / 'notes.txt').write_text('untracked files do not count\n')
  assert provenance.git_state(pkg)['dirty'] is False
  (repo / 'lmjax' / '__init__.py').write_text('x = 2\n')
  assert provenance.git_state(pkg)['dirty'] is True

  # The package inside another repository (e.g. a virtualenv in a project), or in none.
  nested = repo / 'venv' / 'site-packages' / 'lmjax'
  nested.mkdir(parents=True)
  assert provenance.git_state(str(nested)) is None
  plain = tmp_path / 'plain' / 'lmjax'
  plain.mkdir(parents=True)
  assert provenance.git_state(str(plain)) is None

  # No git, or git too slow: None, never an error.
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  assert provenance.git_state(pkg) is None
  monkeypatch.undo()

  def slow(*args, **kwargs):
    raise subprocess.TimeoutExpired(args[0], provenance.GIT_TIMEOUT_S)
  monkeypatch.setattr(provenance.subprocess, 'run', slow)
  assert provenance.git_state(pkg) is None
  assert provenance.collect()['git'] is None


def test_run_json_lists_every_start(tmp_path):
  assert provenance.read_starts(str(tmp_path)) == []
  provenance.record_start(str(tmp_path), {'lmjax': 'a'}, 0)
  provenance.record_start(str(tmp_path), {'lmjax': 'b'}, 20)
  starts = provenance.read_starts(str(tmp_path))
  assert [(s['step'], s['provenance']) for s in starts] == [(0, {'lmjax': 'a'}),
                                                             (20, {'lmjax': 'b'})]
  assert sorted(os.listdir(tmp_path)) == ['run.json']
