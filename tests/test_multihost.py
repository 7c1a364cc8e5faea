"""Multi-host on one machine: 2 processes x 4 CPU devices (jax.distributed on localhost,
gloo collectives) train as 1 process x 8 devices does, write checkpoints jointly and
resume from them."""

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lmjax.data import tokenizer as tokenizer_lib
from lmjax.train import metrics as metrics_lib
from util import write_corpus

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {here!r})
    from util import tiny_config

    def config(shards=0, **distributed):
      cfg = tiny_config(vocab_size=384)
      cfg.data.update(source='local_text', text_glob={glob!r}, data_dir={data_dir!r},
                      val_fraction=0.1, shards=shards)
      cfg.tokenizer.update(vocab_size=384, max_sentences=20_000)
      cfg.train.update(steps=10, log_every=1, eval_every=5, eval_batches=2)
      cfg.checkpoint.update(every=5, async_save=True)
      cfg.mesh.update(data=2, fsdp=4, tensor=1)
      cfg.distributed.update(**distributed)
      return cfg

    if __name__ == '__main__':
      _, devices, workdir, stop_after, pid, port = sys.argv
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=' + devices
      os.environ['JAX_PLATFORMS'] = 'cpu'
      from lmjax.train import loop  # jax starts here, with the flags above
      if pid == '-':  # one process, 8 devices, the 2-process run's data shards
        cfg = config(shards=2)
      else:
        cfg = config(coordinator_address='localhost:' + port, num_processes=2,
                     process_id=int(pid), timeout_s=120)
      out = loop.train(cfg, workdir, stop_after=int(stop_after) or None)
      import jax
      print('process', jax.process_index(), 'of', jax.process_count(), 'devices',
            len(jax.devices()), 'local', len(jax.local_devices()), 'step',
            int(out.state['step']), flush=True)
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(script, workdir, stop_after):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), '4', workdir, str(stop_after),
                             str(pid), port], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return ({r['step']: r['loss'] for r in rows if 'loss' in r},
          {r['step']: r['eval_loss'] for r in rows if 'eval_loss' in r})


def _script(tmp_path, source, name):
  """(the run script `source` written as <tmp_path>/<name>.py, a module name no other test
  imports; its config()), with the dataset and tokenizer built once, before the processes
  share them."""
  glob_ = write_corpus(tmp_path / 'text', n_files=40)
  script = tmp_path / f'{name}.py'
  script.write_text(source.format(here=HERE, glob=glob_, data_dir=str(tmp_path / 'tfds')))
  sys.path.insert(0, str(tmp_path))
  try:
    run_mod = importlib.import_module(name)  # the script as a module (its main part not run)
  finally:
    sys.path.remove(str(tmp_path))
  tokenizer_lib.load_tokenizer(run_mod.config())
  return script, run_mod.config


def test_two_processes_match_one_process_and_resume(tmp_path):
  script, _ = _script(tmp_path, SCRIPT, 'mh_run')

  single = str(tmp_path / 'single')
  out = subprocess.run([sys.executable, str(script), '8', single, '0', '-', '0'],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert 'process 0 of 1 devices 8 local 8 step 10' in out.stdout

  multi = str(tmp_path / 'multi')
  outs = _launch(script, multi, stop_after=5)  # stops at step 5: a joint checkpoint
  for pid, o in enumerate(outs):
    assert f'process {pid} of 2 devices 8 local 4 step 5' in o
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['5']
  outs = _launch(script, multi, stop_after=0)  # resumes at 5, runs to 10
  assert 'resumed from step 5' in outs[0] and 'step 10' in outs[1]

  (train1, eval1), (train2, eval2) = _losses(single), _losses(multi)
  assert sorted(train2) == list(range(1, 11)) and sorted(eval2) == [0, 5, 10]
  assert train2 == pytest.approx(train1, rel=1e-5)
  assert eval2 == pytest.approx(eval1, rel=1e-5)
  assert train1[10] < train1[1]


def test_distributed_settings_from_config_and_environment(monkeypatch):
  from lmjax import config as config_lib
  from lmjax import distributed
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, '_tpu_vm', lambda: False)
  cfg = config_lib.base_config()
  assert distributed.settings(cfg) is None  # one process
  cfg.distributed.update(coordinator_address='10.0.0.2:1234', num_processes=4, process_id=0)
  assert distributed.settings(cfg) == {'coordinator_address': '10.0.0.2:1234',
                                       'num_processes': 4, 'process_id': 0}
  cfg = config_lib.base_config()
  monkeypatch.setenv('LMJAX_COORDINATOR_ADDRESS', 'host0:99')
  monkeypatch.setenv('LMJAX_NUM_PROCESSES', '2')
  with pytest.raises(config_lib.ConfigError, match=r'distributed.process_id \(or '
                     r'\$LMJAX_PROCESS_ID\)'):
    distributed.settings(cfg)
  monkeypatch.setenv('LMJAX_PROCESS_ID', '1')
  assert distributed.settings(cfg)['process_id'] == 1
  cfg.distributed.process_id = 5
  with pytest.raises(config_lib.ConfigError, match=r'process_id 5 is not in \[0, 2\)'):
    distributed.settings(cfg)
  cfg.distributed.mode = 'off'
  assert distributed.settings(cfg) is None
  cfg = config_lib.base_config()
  for var in distributed.ENV.values():
    monkeypatch.delenv(var)
  monkeypatch.setattr(distributed, '_tpu_vm', lambda: True)
  assert distributed.settings(cfg) == {}  # JAX's own cluster detection
  cfg.distributed.mode = 'manual'
  with pytest.raises(config_lib.ConfigError, match='needs distributed.coordinator_address'):
    distributed.settings(cfg)


def test_auto_detected_start_failure_falls_back_to_one_process(monkeypatch, capsys):
  from lmjax import config as config_lib
  from lmjax import distributed
  import jax

  def fail(**kwargs):
    raise RuntimeError('jax.distributed.initialize() must be called before any JAX '
                       'computations are executed.')
  monkeypatch.setattr(jax.distributed, 'initialize', fail)
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)  # no gloo switch here
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(distributed, '_tpu_vm', lambda: True)
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  cfg = config_lib.base_config()
  assert distributed.initialize(cfg) is False
  assert 'running as a single process' in capsys.readouterr().out
  cfg.distributed.update(coordinator_address='localhost:1', num_processes=2, process_id=0)
  with pytest.raises(RuntimeError, match='must be called before'):
    distributed.initialize(cfg)


GRPO_SCRIPT = SCRIPT.replace('''  cfg.distributed.update(**distributed)
  return cfg''', '''  cfg.distributed.update(**distributed)
  cfg.stage = 'grpo'  # online RL from the random init: prompts of the built-in task
  cfg.grpo.update(path='builtin:synthetic', num_generations=2, max_completion_length=6,
                  reward_funcs='exact_match,format', reward_weights='1,0.5')
  cfg.sft.update(task_sizes=dict(train=64, validation=8, test=8), template='plain')
  cfg.data.seq_len = 48
  cfg.train.update(steps=4, eval_every=0, global_batch=8)
  cfg.checkpoint.update(every=2)
  return cfg''')
assert GRPO_SCRIPT != SCRIPT


def test_grpo_on_two_processes_samples_and_trains_as_one_process(tmp_path):
  """GRPO's rollouts on 2 processes x 4 devices: every process generates the global batch
  (its prompts gathered), trains on its share, and resumes: as 1 process x 8 devices."""
  script, config = _script(tmp_path, GRPO_SCRIPT, 'mh_grpo')
  from lmjax.data import sft_task  # pylint: disable=import-outside-toplevel
  sft_task.ensure(config())  # the prompts once, before the processes share them
  single = str(tmp_path / 'single')
  out = subprocess.run([sys.executable, str(script), '8', single, '0', '-', '0'],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  multi = str(tmp_path / 'multi')
  _launch(script, multi, stop_after=2)
  outs = _launch(script, multi, stop_after=0)
  assert 'resumed from step 2' in outs[0]
  rows = lambda w: {r['step']: r for r in metrics_lib.read_jsonl(
      os.path.join(w, 'metrics.jsonl')) if 'loss' in r}
  one, two = rows(single), rows(multi)
  assert sorted(two) == [1, 2, 3, 4]
  for step in one:
    assert two[step]['completions/mean_length'] == one[step]['completions/mean_length']
    assert two[step]['reward'] == pytest.approx(one[step]['reward'], abs=1e-9)
    assert two[step]['loss'] == pytest.approx(one[step]['loss'], rel=1e-4, abs=1e-6)
