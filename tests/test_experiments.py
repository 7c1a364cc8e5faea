"""The shipped configs and the notebook example run end to end (short versions): the
smoke pretraining on the default corpus, the notebook script on its checkpoint, and the
DAPT config continuing it on the jax/flax/optax sources."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(args, cwd=ROOT, timeout=900):
  proc = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """configs/pretrain_tiny.py:smoke through the CLI, as the README runs it."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  out = _run(['-m', 'lmjax.train', '--config=configs/pretrain_tiny.py:smoke',
              f'--workdir={workdir}', '--config.train.progress_bar=False'])
  assert 'step 20: eval_loss' in out and '--- sample' in out
  return workdir


def test_notebook_example_runs(smoke_run):
  out = _run(['experiments/notebook_tiny.py', smoke_run])
  assert 'Model(' in out and 'validation: loss' in out and 'exact match' in out
  assert 'after the round trip' in out
  assert os.path.exists(os.path.join(smoke_run, 'hf_export', 'config.json'))


def test_dapt_config_continues_the_smoke_run(smoke_run, tmp_path):
  workdir = str(tmp_path / 'dapt')
  out = _run(['-m', 'lmjax.train', f'--config=configs/dapt_tiny.py:{smoke_run}',
              f'--workdir={workdir}', '--config.train.steps=6', '--config.train.eval_every=6',
              '--config.train.log_every=3', '--config.train.eval_batches=1',
              '--config.train.progress_bar=False', '--config.train.sample_at_end=False'])
  assert 'params from init_from' in out
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in rows if 'eval/domain/loss' in r]
  assert [r['step'] for r in evals] == [0, 6]
  assert all('eval/general/loss' in r for r in evals)
  train = [r for r in rows if 'loss' in r]
  assert train[-1]['tokens/domain'] > 0 and train[-1]['tokens/general'] > 0


@pytest.fixture(scope='module')
def sft_run(smoke_run, tmp_path_factory):
  """configs/sft_lora_tiny.py:smoke from the smoke run, 6 steps (its stdout, workdir)."""
  workdir = str(tmp_path_factory.mktemp('sft') / 'sft')
  out = _run(['-m', 'lmjax.train', f'--config=configs/sft_lora_tiny.py:smoke:{smoke_run}',
              f'--workdir={workdir}', '--config.train.steps=6', '--config.train.eval_every=6',
              '--config.train.log_every=3', '--config.train.eval_batches=1',
              '--config.sft.eval_examples=6', '--config.train.progress_bar=False'])
  return out, workdir


def test_sft_lora_config_and_eval_tool(sft_run):
  out, workdir = sft_run
  assert 'LoRA r=16' in out and 'train_params=embed' in out
  assert 'step 6: eval_loss' in out and 'exact_match' in out and '--- sample' in out
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in rows if 'eval/exact_match' in r]
  assert [r['step'] for r in evals] == [0, 6]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']
  out = _run(['tools/eval_sft.py', f'--workdir={workdir}', '--split=test', '--limit=12'])
  assert 'exact match on test:' in out and 'larger' in out


def test_dpo_config_runs_after_sft(sft_run, tmp_path):
  _, sft = sft_run
  workdir = str(tmp_path / 'dpo')
  out = _run(['-m', 'lmjax.train', f'--config=configs/dpo_tiny.py:smoke:{sft}',
              f'--workdir={workdir}', '--config.train.steps=4', '--config.train.eval_every=4',
              '--config.sft.eval_examples=4', '--config.train.progress_bar=False'])
  assert 'stage dpo' in out and 'rewards/accuracies' in out and '--- sample' in out
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'eval/rewards/accuracies' in r] == [0, 4]
  assert all('rewards/margins' in r for r in rows if 'loss' in r)
