"""The shipped configs and experiments run end to end (short versions): the recipe
(pretraining on the default corpus -> LoRA SFT -> DPO, the stage configs' smoke runs),
the notebook script on its pretraining checkpoint, the DAPT config continuing it on the
jax/flax/optax sources, the task-accuracy tool on its SFT run, and the AI-feedback loop
from it."""

import json
import os
import subprocess
import sys

import pytest

from lmjax.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
STAGES = ('pretrain', 'sft', 'dpo', 'kto', 'reward', 'grpo')


def _run(args, cwd=ROOT, timeout=900):
  proc = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
  """experiments/recipe_tiny.py --smoke --stages=all: the shipped stage configs chained
  (pretrain_tiny:smoke -> sft_lora_tiny:smoke -> dpo_tiny, kto_tiny, reward_tiny and
  grpo_tiny :smoke, each from the SFT run). (stdout, root)"""
  root = str(tmp_path_factory.mktemp('recipe'))
  quiet = [f'--config.{s}.train.progress_bar=False' for s in STAGES]
  out = _run(['experiments/recipe_tiny.py', '--smoke', '--stages=all', f'--root={root}',
              '--test_limit=24', '--config.sft.train.steps=10'] + quiet)
  return out, root


@pytest.fixture(scope='module')
def smoke_run(recipe):
  """The recipe's pretraining workdir (configs/pretrain_tiny.py:smoke)."""
  return os.path.join(recipe[1], 'pretrain')


def test_recipe_chains_the_stages_and_prints_their_metrics(recipe):
  out, root = recipe
  assert out.count('--- sample') == 5 and 'step 20: eval_loss' in out  # no reward sample
  assert 'LoRA r=16' in out and 'train_params=embed' in out  # the SFT config
  assert f'params from init_from {root}/pretrain' in out
  assert out.count(f'params from init_from {root}/sft') == 4
  assert all(f'stage {s}' in out for s in STAGES)
  table = out[out.index('| stage |'):].splitlines()
  assert [line.split('|')[1].strip() for line in table[2:8]] == list(STAGES)
  res = json.load(open(os.path.join(root, 'recipe.json')))
  assert [res[s]['steps'] for s in STAGES[:3]] == [20, 10, 10]
  assert res['kto']['reward_margin'] is not None and res['kto']['reward_accuracy'] is None
  assert 0 <= res['reward']['reward_accuracy'] <= 1 and 'test_exact_match' not in res['reward']
  for stage in ('pretrain', 'sft'):
    assert res[stage]['eval_loss'] < res[stage]['eval_loss_start']
  assert res['sft']['val_exact_match'] is not None and res['pretrain']['val_exact_match'] is None
  dpo_evals = [r for r in metrics_lib.read_jsonl(os.path.join(root, 'dpo', 'metrics.jsonl'))
               if 'eval_loss' in r]
  acc, n = res['dpo']['reward_accuracy'], dpo_evals[-1]['eval_pairs']
  assert acc == dpo_evals[-1]['eval/rewards/accuracies']
  assert round(acc * n) == pytest.approx(acc * n)  # a fraction of the held-out pairs
  assert all(res[s]['test_n'] == 24 for s in STAGES if s != 'reward')
  grpo = res['grpo']  # its evals score greedy held-out answers with its reward function
  assert grpo['steps'] == 6 and grpo['eval_loss'] is None
  assert 0 <= grpo['eval_reward_start'] <= 1 and 0 <= grpo['eval_reward'] <= 1
  assert 'eval reward (start -> end)' in table[0]
  # A second run finds every stage done and only measures.
  again = _run(['experiments/recipe_tiny.py', '--smoke', '--stages=all', f'--root={root}',
                '--test_limit=4', '--config.sft.train.steps=10'])
  assert again.count('(done: not retrained)') == 6 and 'compiled train step' not in again


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


def test_eval_tool_on_the_recipe_sft_run(recipe):
  out = _run(['tools/eval_sft.py', f'--workdir={recipe[1]}/sft', '--split=test', '--limit=12'])
  assert 'exact match on test:' in out and 'larger' in out


def test_ai_feedback_loop_on_the_recipe_sft_run(recipe):
  root = recipe[1]
  out = _run(['experiments/ai_feedback_tiny.py', '--smoke', f'--root={root}'])
  res = json.load(open(os.path.join(root, 'ai_feedback.json')))
  assert 0 <= res['judge_agreement_test_pairs'] <= 1
  assert res['labels']['train']['kept'] > 0 and res['labels']['train']['comparisons_per_s'] > 0
  assert {'test_exact_match_sft', 'test_exact_match_dpo'} <= set(res)
  assert 'judge agreement' in out and '| test EM sft | test EM dpo |' in out
  assert os.path.exists(os.path.join(root, 'ai_labels_full10_k2', 'train.jsonl'))


def test_lr_sweep_runs_collects_and_plots(tmp_path):
  root = str(tmp_path / 'sweep')
  out = _run(['experiments/sweep_lr_tiny.py', '--smoke', f'--root={root}'])
  assert '[3/3] lr0.005' in out and '| optim.lr | steps | train loss |' in out
  assert out.count('**best**') == 1
  rows = json.load(open(os.path.join(root, 'sweep.json')))
  assert [r['overrides']['optim.lr'] for r in rows] == [5e-4, 1.5e-3, 5e-3]
  assert all(r['steps'] == 10 and len(r['eval_curve']) == 3 for r in rows)
  assert open(os.path.join(root, 'sweep.png'), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  again = _run(['experiments/sweep_lr_tiny.py', '--smoke', f'--root={root}'])
  assert again.count(': done') == 3  # finished runs are not retrained
  emitted = _run(['experiments/sweep_lr_tiny.py', '--random=2', '--emit=local']).splitlines()
  assert len(emitted) == 2 and all('python -m lmjax.train' in e for e in emitted)
  tpu = _run(['experiments/sweep_lr_tiny.py', '--emit=tpu', '--bucket=bkt']).splitlines()
  assert len(tpu) == 3 and all('tools/launch_tpu.py' in t and '/mnt/bkt/sweeps/' in t
                               for t in tpu)
