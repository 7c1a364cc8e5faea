"""tools/bench.py runs on CPU: full vs LoRA rows with params, optimizer state, timing."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.join(os.path.dirname(__file__), '..')
SMALL = ['model.d_model=64', 'model.n_layers=2', 'model.d_ff=128', 'data.seq_len=64',
         'train.global_batch=8', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2']


def test_bench_full_vs_lora(tmp_path, capsys):
  out = tmp_path / 'rows.jsonl'
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--steps', '2',
          '--warmup', '1', '--mode', 'both', '--json', str(out)]
  for s in SMALL:
    argv += ['--set', s]
  assert bench.main(argv) == 0
  text = capsys.readouterr().out
  assert '| device | mode | params | trainable | opt state |' in text
  assert 'LoRA vs full:' in text
  full, lora = [json.loads(line) for line in out.read_text().splitlines()]
  assert full['mode'] == 'full' and lora['mode'] == 'lora'
  assert full['device'] == f'8 x {jax.devices()[0].device_kind}'
  assert full['params'] == lora['params'] == full['trainable'] > 10 * lora['trainable']
  # Adam's two moments per trainable float32 (plus a few counters).
  for r in (full, lora):
    assert 8 * r['trainable'] <= r['opt_state_bytes'] <= 8 * r['trainable'] + 64
    assert r['tokens_per_s'] > 0 and r['step_s'] > 0 and r['compile_s'] > 0
    assert r['peak_mem_bytes'] > 0 and r['mfu'] is None  # no CPU peak given
  assert lora['peak_mem_bytes'] < full['peak_mem_bytes']


def test_bench_mfu_with_a_given_peak_and_bad_override(capsys):
  from lmjax import config as config_lib
  cfg = config_lib.load(os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                        overrides=dict(kv.split('=') and (kv.split('=')[0], int(kv.split('=')[1]))
                                       for kv in SMALL))
  row = bench.run(cfg, steps=1, warmup=1, peak_tflops=0.1)
  assert 0 < row['mfu'] < 1
  assert bench.main(['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                     '--set', 'optim.lrr=1']) == 2
  assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
