"""Experiment tracking: what produced a run (lmjax/provenance.py: checkpoint meta and
run.json) and the optional Weights & Biases writer (train.wandb), run offline for real: no
login, no network, its files under tmp_path."""

import json
import os
import platform
import struct
import subprocess
import sys

import jax
import pytest

import lmjax
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import provenance
from lmjax.errors import UserError
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from util import pretrain_cfg, write_corpus

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


def test_wandb_not_installed_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` fails
  cfg = pretrain_cfg(tmp_path)  # no corpus: the check comes before any data is read
  cfg.train.wandb.project = 'my-project'
  with pytest.raises(config_lib.ConfigError) as e:
    loop.train(cfg, str(tmp_path / 'run'))
  assert isinstance(e.value, UserError)
  msg = str(e.value)
  assert '\n' not in msg
  assert "train.wandb.project='my-project'" in msg and 'wandb is not installed' in msg
  assert 'pip install -e ".[wandb]"' in msg
  assert not os.path.exists(tmp_path / 'tfds')
  # Off (no project, or mode 'disabled'): wandb is never imported.
  metrics_lib.check_wandb(config_lib.base_config().train.wandb)
  cfg.train.wandb.mode = 'disabled'
  metrics_lib.check_wandb(cfg.train.wandb)


def test_wandb_init_failure_is_one_clear_line(tmp_path, monkeypatch):
  wandb = pytest.importorskip('wandb')

  def no_login(**kwargs):  # what wandb.init raises online without an API key
    assert kwargs['id'] and kwargs['resume'] == 'allow' and kwargs['mode'] == 'online'
    raise wandb.errors.UsageError('No API key configured. Use `wandb login` to log in.')
  monkeypatch.setattr(wandb, 'init', no_login)
  wb = config_lib.base_config().train.wandb
  wb.update(project='p', mode='online')
  with pytest.raises(config_lib.ConfigError, match=r"^train\.wandb: wandb\.init failed \(No API "
                     r"key configured\..*\); run wandb login, or set train\.wandb\.mode='offline'"):
    metrics_lib.MetricWriter(str(tmp_path), tensorboard=False, wandb=wb, config={})
  assert not os.path.exists(tmp_path / metrics_lib.WANDB_ID_FILE)


def _wandb_records(path):
  """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 32 KiB
  blocks of chunks with a 7-byte header, after a 7-byte ':W&B' file header)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, block, chunk = 7, 32768, b''
  while pos + 7 <= len(data):
    left = block - pos % block
    _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if left < 7 or (kind == 0 and n == 0):  # block trailer / padding
      pos += left
      continue
    chunk += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):  # a full record, or the last chunk of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      chunk = b''
      yield record


def _read_offline_run(path):
  run, config, rows = None, {}, {}
  for r in _wandb_records(path):
    kind = r.WhichOneof('record_type')
    if kind == 'run':
      run = r.run
      config.update((i.key, json.loads(i.value_json)) for i in r.run.config.update)
    elif kind == 'config':
      config.update((i.key, json.loads(i.value_json)) for i in r.config.update)
    elif kind == 'history':
      row = {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json)
             for i in r.history.item}
      rows[row['_step']] = {k: v for k, v in row.items() if not k.startswith('_')}
  return run, config, rows


@pytest.mark.slow
def test_wandb_offline_logs_the_scalars_and_a_resume_continues_the_run(tmp_path, monkeypatch):
  wandb = pytest.importorskip('wandb')
  for key, value in {'WANDB_MODE': 'offline', 'WANDB_DIR': tmp_path / 'wandb',
                     'WANDB_CONFIG_DIR': tmp_path / 'wandb_config',
                     'WANDB_CACHE_DIR': tmp_path / 'wandb_cache',
                     'WANDB_DATA_DIR': tmp_path / 'wandb_data', 'WANDB_SILENT': 'true',
                     'WANDB_ERROR_REPORTING': 'false', 'WANDB_CONSOLE': 'off',
                     'WANDB_X_DISABLE_STATS': 'true'}.items():
    monkeypatch.setenv(key, str(value))
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  (tmp_path / 'wandb').mkdir()
  write_corpus(tmp_path / 'text', n_files=40)
  cfg = pretrain_cfg(tmp_path)
  cfg.train.wandb.update(project='lmjax-tests', mode='offline', tags='tiny, test')
  workdir = str(tmp_path / 'run')
  try:
    first = loop.train(cfg, workdir, stop_after=2)
    assert first.stopped_early
    run_id = open(os.path.join(workdir, metrics_lib.WANDB_ID_FILE)).read().strip()
    loop.train(cfg, workdir)  # resumes at step 2
  finally:
    wandb.teardown()  # stops wandb's service process

  # Two offline runs (one per start) with the same id: `wandb sync` makes them one run.
  runs = sorted(os.path.join(root, f) for root, _, files in os.walk(tmp_path / 'wandb')
                for f in files if f.endswith('.wandb'))
  assert len(runs) == 2 and all('offline-run-' in p for p in runs), runs
  logged = {}
  for path in runs:
    run, config, rows = _read_offline_run(path)
    assert (run.run_id, run.project, run.display_name) == (run_id, 'lmjax-tests', 'run')
    assert list(run.tags) == ['tiny', 'test']
    assert config['train']['steps'] == 3 and config['model']['vocab_size'] == 384
    assert config['train']['wandb']['project'] == 'lmjax-tests'
    logged.update(rows)

  # The same scalars at the same steps as metrics.jsonl (and TensorBoard: both skip None).
  jsonl = {r['step']: {k: v for k, v in r.items() if k not in ('step', 'time') and v is not None}
           for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if 'loss' in r}
  assert sorted(jsonl) == [1, 2, 3] and 'grad_norm' in jsonl[1]
  assert logged == jsonl

  # Provenance: in every checkpoint's meta and once per start in run.json.
  ckpt = ckpt_lib.Checkpointer(workdir, None, read_only=True)
  for step in ckpt.all_steps():
    meta = ckpt.read_meta(step)['provenance']
    assert meta['lmjax'] == lmjax.__version__ and meta['devices']['count'] == 8
    assert meta['packages'] == provenance.package_versions()
  starts = provenance.read_starts(workdir)
  assert [s['step'] for s in starts] == [0, 2]
  assert starts[1]['provenance']['packages'] == provenance.package_versions()
