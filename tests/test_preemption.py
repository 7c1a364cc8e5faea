"""SIGTERM (what Cloud TPU VMs send before maintenance) mid-run: the loop saves a
checkpoint at the current step and exits cleanly; a new process resumes from it with the
same data stream. kill -9 in the middle of a checkpoint write: the partial checkpoint is
never taken for a complete one (Orbax's atomic commit), the last complete one restores
exactly and the run resumes from it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax.train import loop
from util import write_corpus

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {here!r})
    from util import tiny_config
    from lmjax.train import loop

    def config():
      cfg = tiny_config(vocab_size=384)
      cfg.data.update(source='local_text', text_glob={glob!r}, data_dir={data_dir!r},
                      val_fraction=0.1)
      cfg.tokenizer.update(vocab_size=384, max_sentences=20_000)
      cfg.train.update(steps=100_000, log_every=1, eval_every=0)
      cfg.checkpoint.update(every=1000, async_save=True)
      cfg.mesh.update(data=-1)
      return cfg

    if __name__ == '__main__':
      cfg = config()
      if len(sys.argv) > 2:  # checkpoint every N steps
        cfg.checkpoint.update(every=int(sys.argv[2]), keep=1000)
      out = loop.train(cfg, sys.argv[1])
      print('stopped_early', out.stopped_early, int(out.state['step']), flush=True)
''')


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path):
  glob_ = write_corpus(tmp_path / 'text', n_files=30)
  script = tmp_path / 'run.py'
  script.write_text(SCRIPT.format(here=HERE, glob=glob_, data_dir=str(tmp_path / 'tfds')))
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  proc = subprocess.Popen([sys.executable, str(script), workdir], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until a few steps ran
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        break
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  assert 'SIGTERM: saving a checkpoint' in out
  saved = int(out.strip().split('\n')[-1].split()[-1])
  assert ckpt_lib.Checkpointer(workdir, None, read_only=True).latest_step() == saved >= 3
  logged = [json.loads(l)['step'] for l in open(metrics)]
  assert logged[-1] == saved  # the step it stopped at is the one saved

  # A new process resumes at that step; its first losses equal an uninterrupted run's.
  sys.path.insert(0, str(tmp_path))
  try:
    import run as run_mod  # the script above, as a module
  finally:
    sys.path.remove(str(tmp_path))
  cfg = run_mod.config()
  cfg.train.update(progress_bar=False)  # same schedule (steps) as the killed run
  resumed = loop.train(cfg, workdir, stop_after=saved + 2)
  assert int(resumed.state['step']) == saved + 2
  straight = loop.train(cfg, str(tmp_path / 'straight'), stop_after=saved + 2)
  a = {r['step']: r['loss'] for r in resumed.history}
  b = {r['step']: r['loss'] for r in straight.history}
  for step in (saved + 1, saved + 2):
    assert a[step] == b[step], step


def test_kill_9_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
  glob_ = write_corpus(tmp_path / 'text', n_files=30)
  script = tmp_path / 'run9.py'
  script.write_text(SCRIPT.format(here=HERE, glob=glob_, data_dir=str(tmp_path / 'tfds')))
  workdir = str(tmp_path / 'run')
  ckdir = os.path.join(workdir, 'checkpoints')
  proc = subprocess.Popen([sys.executable, str(script), workdir, '1'],  # save every step
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  caught = None
  try:
    deadline = time.time() + 300
    while time.time() < deadline and caught is None:
      assert proc.poll() is None, proc.stdout.read()
      names = os.listdir(ckdir) if os.path.isdir(ckdir) else []
      done = [n for n in names if n.isdigit()]
      partial = [n for n in names if 'tmp' in n]
      if partial and len(done) >= 3:  # a write in progress, after a few complete ones
        proc.send_signal(signal.SIGKILL)
        caught = partial
  finally:
    proc.kill()
    proc.communicate()
  assert caught, 'never saw a checkpoint being written'
  ckpt = ckpt_lib.Checkpointer(workdir, None, read_only=True)
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest is not None and latest >= 3

  sys.path.insert(0, str(tmp_path))
  try:
    import run9 as run_mod  # the script above, as a module
  finally:
    sys.path.remove(str(tmp_path))
  cfg = run_mod.config()
  cfg.train.update(progress_bar=False)
  # The last complete checkpoint restores to exactly what an uninterrupted run has there,
  # and the resumed run continues like it.
  resumed = loop.train(cfg, workdir, stop_after=latest + 2)
  straight = loop.train(cfg, str(tmp_path / 'straight'), stop_after=latest + 2)
  a = {r['step']: r['loss'] for r in resumed.history}
  b = {r['step']: r['loss'] for r in straight.history}
  for step in (latest + 1, latest + 2):
    assert a[step] == b[step], step


def test_ctrl_c_saves_the_current_step_like_sigterm(tmp_path, capsys):
  """A first Ctrl-C (SIGINT) mid-run: a checkpoint of the current step, a clean return."""
  sys.path.insert(0, HERE)
  from util import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(vocab_size=384)
  cfg.data.update(source='local_text', text_glob=write_corpus(tmp_path / 'text', n_files=30),
                  data_dir=str(tmp_path / 'tfds'), val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=384, max_sentences=20_000)
  cfg.train.update(steps=100_000, log_every=1, eval_every=0)
  cfg.checkpoint.update(every=1000)
  cfg.mesh.update(data=-1)
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, 'metrics.jsonl')

  def interrupt():
    deadline = time.time() + 300
    while time.time() < deadline:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, by the loop
        return
      time.sleep(0.05)
  threading.Thread(target=interrupt, daemon=True).start()
  out = loop.train(cfg, workdir)
  assert out.stopped_early
  saved = int(out.state['step'])
  assert ckpt_lib.Checkpointer(workdir, None, read_only=True).latest_step() == saved >= 3
  assert [json.loads(l)['step'] for l in open(metrics)][-1] == saved
  printed = capsys.readouterr().out
  assert 'Ctrl-C: saving a checkpoint at the end of this step' in printed
  assert f'Ctrl-C: saving a checkpoint at step {saved} and exiting' in printed
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_stops_at_once():
  with loop._Preemption() as preempt:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    assert preempt.requested == 'Ctrl-C'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs in this (main) thread
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
