"""tools/launch_tpu.py builds the gcloud commands (tested with --dry-run: nothing runs)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['tools/launch_tpu.py', '--name=pod', '--zone=us-central2-b', '--accelerator=v4-32',
        '--dry-run']


def _run(*args):
  return subprocess.run([sys.executable, *BASE, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_dry_run_prints_create_install_run():
  out = _run('--config=configs/pretrain_tiny.py', '--workdir=/mnt/bkt/runs/a', '--bucket=bkt',
             '--project=proj', '--config.train.steps=500', '--config.optim.lr=3e-4')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert [l.split(']')[0][1:] for l in lines] == ['create', 'install', 'install', 'install',
                                                  'run']
  assert lines[0] == ('[create] gcloud compute tpus tpu-vm create pod --zone=us-central2-b '
                      '--project=proj --accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
  assert 'git -C . archive --format=tar.gz' in lines[1] and '--worker=all' in lines[2]
  assert 'pip install -q -e ~/lmjax' in lines[3] and 'gcsfuse --implicit-dirs' in lines[3]
  assert '/mnt/bkt' in lines[3] and '--worker=all' in lines[3]
  run = lines[4]
  assert '--worker=all' in run and 'nohup python -m lmjax.train --config=configs/pretrain_tiny.py' in run
  assert '--workdir=/mnt/bkt/runs/a' in run and '--config.train.steps=500' in run
  assert '--config.optim.lr=3e-4' in run and '> ~/lmjax_train.log' in run


def test_queued_spot_and_delete():
  out = _run('--queued', '--spot', '--steps=create,logs,delete')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert 'queued-resources create pod-qr --zone=us-central2-b --node-id=pod' in lines[0]
  assert lines[0].endswith('--spot') and 'queued-resources describe pod-qr' in lines[1]
  assert '--worker=0' in lines[2] and 'tail -n 50 ~/lmjax_train.log' in lines[2]
  assert 'queued-resources delete pod-qr' in lines[3]


def test_bad_arguments_are_refused_before_any_command():
  out = _run('--workdir=/w', '--config.optim.lrr=1')
  assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
  assert out.stdout == ''
  out = _run('--steps=create,run')
  assert out.returncode == 2 and '--workdir is required' in out.stderr
  out = _run('--steps=boot')
  assert out.returncode == 2 and "unknown ['boot']" in out.stderr
