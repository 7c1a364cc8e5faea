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


@pytest.mark.slow
def test_bench_full_vs_lora(tmp_path, capsys):
  out = tmp_path / 'rows.jsonl'
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--steps', '2',
          '--warmup', '1', '--mode', 'both', '--json', str(out)]
  argv += [f'--config.{s}' for s in SMALL]
  assert bench.main(argv) == 0
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


def test_bench_times_the_telemetry(tmp_path, capsys):
  out = tmp_path / 'rows.jsonl'
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--steps', '1',
          '--warmup', '1', '--telemetry', '--json', str(out)]
  assert bench.main(argv + [f'--config.{s}' for s in SMALL]) == 0
  off, on = [json.loads(line) for line in out.read_text().splitlines()]
  assert (off['mode'], on['mode']) == ('full', 'full+telemetry')
  assert on['step_s'] > 0 and off['step_s'] > 0
  assert 'full lm: telemetry costs ' in capsys.readouterr().out


@pytest.mark.slow
def test_bench_mfu_with_a_given_peak_and_bad_override(capsys):
  from lmjax import config as config_lib
  cfg = config_lib.load(os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                        overrides=dict(kv.split('=') and (kv.split('=')[0], int(kv.split('=')[1]))
                                       for kv in SMALL))
  row = bench.run(cfg, steps=1, warmup=1, peak_tflops=0.1)
  assert 0 < row['mfu'] < 1
  assert bench.main(['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                     '--config.optim.lrr=1']) == 2
  assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_dpo_step_against_the_lm_step(tmp_path, capsys):
  """DPO rows: twice the rows of the LM step; the reference per mode (LoRA: adapters off,
  full: a frozen copy, counted in memory; precomputed: read from the batch)."""
  out = tmp_path / 'rows.jsonl'
  common = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--steps', '1',
            '--warmup', '1'] + [f'--config.{s}' for s in SMALL]
  assert bench.main(common + ['--mode', 'both', '--objective', 'both', '--json', str(out)]) == 0
  rows = {(r['mode'], r['objective']): r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {('full', 'lm'), ('lora', 'lm'), ('full', 'dpo (copy)'),
                       ('lora', 'dpo (adapters_off)')}
  assert rows['full', 'dpo (copy)']['batch'] == 2 * rows['full', 'lm']['batch']
  for r in rows.values():
    assert r['loss'] > 0 and r['step_s'] > 0
  pre = tmp_path / 'pre.jsonl'
  assert bench.main(common + ['--mode', 'full', '--objective', 'dpo', '--json', str(pre),
                              '--config.dpo.reference=precomputed']) == 0
  (row,) = map(json.loads, pre.read_text().splitlines())
  assert row['objective'] == 'dpo (precomputed)'
  # No reference copy: the step's arguments hold one set of params fewer.
  assert row['peak_mem_bytes'] < rows['full', 'dpo (copy)']['peak_mem_bytes']


@pytest.mark.slow
def test_bench_kto_step_on_the_dpo_tokens(tmp_path, capsys):
  """--objective=all: a KTO row (B examples + their KL rows) on the same rows as the DPO
  row (B pairs), a GRPO row (G completions of B prompts, and its rollout rate), and the
  ratio lines."""
  out = tmp_path / 'rows.jsonl'
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--steps', '1',
          '--warmup', '1', '--mode', 'lora', '--objective', 'all', '--json', str(out)]
  assert bench.main(argv + [f'--config.{s}' for s in SMALL]) == 0
  rows = {r['objective']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {'lm', 'dpo (adapters_off)', 'kto (adapters_off)', 'grpo'}
  kto, dpo = rows['kto (adapters_off)'], rows['dpo (adapters_off)']
  assert kto['batch'] == dpo['batch'] == 2 * rows['lm']['batch'] and kto['loss'] > 0
  grpo = rows['grpo']  # G = 4 completions of each prompt, and the rollout's rate
  assert grpo['batch'] == 4 * rows['lm']['batch'] and grpo['rollout_tokens_per_s'] > 0
  printed = capsys.readouterr().out
  assert 'lora: KTO vs DPO step: ' in printed and 'lora: GRPO update vs LM step: ' in printed
  assert 'lora: GRPO rollout: ' in printed


@pytest.mark.parametrize('name,params', [('llama_125m', 125.8e6), ('llama_1b', 1107.4e6),
                                         ('moe_1b', 1015.2e6)])
def test_bench_configs_load_and_size(name, params):
  """The GPU benchmark configs: their model sizes; ':cpu' swaps cuDNN for xla."""
  from lmjax import config as config_lib
  from lmjax import sharding
  from lmjax.train import state as state_lib
  path = os.path.join(ROOT, 'configs', 'bench', f'{name}.py')
  assert config_lib.load(path).model.attention == 'cudnn'
  cfg = config_lib.load(path + ':cpu')
  assert cfg.model.attention == 'xla' and cfg.data.seq_len == 2048
  assert cfg.model.dtype == 'bfloat16' and cfg.model.param_dtype == 'float32'
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))  # abstract: no memory
  assert setup.n_params == pytest.approx(params, rel=1e-3)


@pytest.mark.slow
def test_bench_suite_cases_and_driver(tmp_path, capsys):
  """tools/bench_suite.py (the prepared GPU check): every case's config, full size and
  smoke, is valid; a smoke run of three cases writes their rows, the table and the target
  lines; a failing case is recorded and the rest still run."""
  import bench_suite  # pylint: disable=import-outside-toplevel
  names = [c.name for c in bench_suite.SUITES['gpu']]
  assert len(set(names)) == len(names) and not any(',' in n for n in names)  # --only splits on ','
  for case in bench_suite.SUITES['gpu']:
    for smoke in (False, True):
      cfg, _ = bench_suite.case_config(case, smoke)
      assert cfg.model.attention == ('xla' if smoke or 'xla' in case.name else 'cudnn')
  out, md = tmp_path / 'rows.jsonl', tmp_path / 'table.md'
  argv = ['--smoke', '--only', '125m,1b lora,1b lora dpo', '--json', str(out), '--md', str(md)]
  assert bench_suite.main(argv) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['case'] for r in rows] == ['125m', '1b lora', '1b lora dpo']
  assert all(r['status'] == 'ok' and r['tokens_per_s'] > 0 for r in rows)
  assert rows[2]['objective'] == 'dpo (adapters_off)' and rows[2]['batch'] == 2 * rows[1]['batch']
  checks = {label: value for label, value, _, _ in
            bench_suite.targets({r['case']: r for r in rows})}
  assert checks['125m MFU'] is None  # no peak FLOP/s for a CPU: not measured
  assert checks['1b MFU'] is None and checks['1b LoRA / full tokens/s'] is None  # not run
  assert checks['1b LoRA DPO / SFT time per token'] == pytest.approx(
      rows[1]['tokens_per_s'] / rows[2]['tokens_per_s'])
  assert all(r['case'] in md.read_text() for r in rows)  # the table was written
  assert bench_suite.main(['--smoke', '--only', 'nope']) == 2
  capsys.readouterr()
  assert bench_suite.main(['--smoke', '--only', '125m,1b', '--budget_s', '0',
                           '--json', str(tmp_path / 'b.jsonl')]) == 1  # nothing measured
  rows = [json.loads(x) for x in (tmp_path / 'b.jsonl').read_text().splitlines()]
  assert [r['status'] for r in rows] == ['skipped', 'skipped']


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
  """tools/gpu_check.sh, the one-command GPU check, on CPU: environment, the (skipped)
  GPU tests, a smoke bench case; the files it leaves under $OUT."""
  import subprocess  # pylint: disable=import-outside-toplevel
  env = {**os.environ, 'OUT': str(tmp_path), 'JAX_PLATFORMS': 'cpu', 'WHEELS': '/nonexistent',
         'BENCH_BUDGET': '60', 'BENCH_ARGS': '--smoke --only=125m',
         'MOE_ARGS': ('--config=configs/bench/moe_1b.py:cpu --steps=1 --warmup=1 '
                      '--config.model.d_model=64 --config.model.moe.d_ff=64 '
                      '--config.data.seq_len=64 --config.train.global_batch=4')}
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'gpu_check.sh')], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'tests/test_gpu.py exit 0' in proc.stdout and 'skipped' in proc.stdout
  assert 'moe rows exit 0' in proc.stdout and 'vs the dense MLP' in proc.stdout
  assert 'bench_suite exit 0' in proc.stdout and '- 125m MFU: not measured' in proc.stdout
  assert {'env.txt', 'test_gpu.log', 'moe.log', 'moe_rows.jsonl', 'bench.log', 'bench.err',
          'rows.jsonl', 'table.md'} <= set(
      os.listdir(tmp_path))
  assert 'jax ' in (tmp_path / 'env.txt').read_text()
  (row,) = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
  assert row['case'] == '125m' and row['status'] == 'ok'


def test_bench_suite_tpu_cases_pair_splash_with_xla():
  """The tpu suite (tools/tpu_check.sh): the 125M and 1B bench configs, splash and xla
  attention set explicitly, at seq 2048 and 8192, 65,536 tokens a step; every full-size
  config valid and its batch split over a 4-chip and an 8-chip host; smoke runs xla at
  the tiny shapes; the splash / xla lines and the MFU targets read the pairs' rows."""
  import bench_suite  # pylint: disable=import-outside-toplevel
  from lmjax import sharding
  from lmjax.train import loop
  cases = bench_suite.SUITES['tpu']
  names = [c.name for c in cases]
  assert len(set(names)) == len(names) and not any(',' in n for n in names)
  assert names == [f'{m} seq {t} {a}' for t in (2048, 8192) for m in ('125m', '1b')
                   for a in ('splash', 'xla')]
  for case in cases:
    _, _, seq, attention = case.name.split()
    cfg, _ = bench_suite.case_config(case, smoke=False)
    assert (cfg.model.attention, cfg.data.seq_len) == (attention, int(seq))
    assert cfg.train.global_batch * cfg.data.seq_len == 65536
    for chips in (4, 8):  # v4-8 / v5p-8, v5e-8 / v6e-8
      loop.check_batch(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:chips]))
    if seq == '8192':
      assert cfg.model.remat == 'dots_no_batch'  # xla's f32 scores are never saved
    smoke, _ = bench_suite.case_config(case, smoke=True)
    assert (smoke.model.attention, smoke.data.seq_len, smoke.model.d_model) == ('xla', 64, 64)
  rows = {'125m seq 2048 splash': {'status': 'ok', 'tokens_per_s': 300.0, 'mfu': 0.5},
          '125m seq 2048 xla': {'status': 'ok', 'tokens_per_s': 200.0, 'mfu': 0.3},
          '1b seq 8192 splash': {'status': 'ok', 'tokens_per_s': 10.0, 'mfu': 0.2},
          '1b seq 8192 xla': {'status': 'failed', 'error': 'RESOURCE_EXHAUSTED'}}
  assert bench_suite.comparisons(rows, 'tpu') == [
      ('125m seq 2048: splash / xla tokens/s', 1.5), ('1b seq 2048: splash / xla tokens/s', None),
      ('125m seq 8192: splash / xla tokens/s', None), ('1b seq 8192: splash / xla tokens/s', None)]
  assert bench_suite.comparisons(rows) == []  # the gpu suite has no pairs
  assert [(label, value) for label, value, _, _ in bench_suite.targets(rows, 'tpu')] == [
      ('125m MFU (splash, seq 2048)', 0.5), ('1b MFU (splash, seq 2048)', None)]


@pytest.mark.slow
def test_tpu_check_script_runs_end_to_end_on_cpu(tmp_path):
  """tools/tpu_check.sh, the one-command TPU check, on CPU (JAX_PLATFORMS=cpu): the
  environment, the kernel tests' step (here a stand-in test file: tests/test_splash.py on
  CPU runs the kernel interpreted), a smoke (config, seq) pair of the tpu suite with
  BENCH_ONLY's spaced names; the lines it prints last and the files it leaves under $OUT."""
  import subprocess  # pylint: disable=import-outside-toplevel
  stand_in = tmp_path / 'tests' / 'test_platform.py'
  stand_in.parent.mkdir()
  stand_in.write_text('import os\nimport jax\n\n\ndef test_platform():\n'
                      "  assert jax.devices()[0].platform == os.environ['JAX_PLATFORMS']\n")
  out = tmp_path / 'out'
  env = {**os.environ, 'OUT': str(out), 'JAX_PLATFORMS': 'cpu', 'WHEELS': '/nonexistent',
         'TPU_TESTS': str(stand_in), 'BENCH_BUDGET': '60', 'BENCH_ARGS': '--smoke',
         'BENCH_ONLY': '1b seq 8192 splash,1b seq 8192 xla'}
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'tpu_check.sh')], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f'{stand_in} exit 0: 1 passed' in proc.stdout
  assert 'bench_suite exit 0' in proc.stdout
  tail = proc.stdout.splitlines()[-9:]
  assert tail[0].startswith('| 1b seq 8192 xla | ') and tail[1] == ''  # the table ends
  assert tail[2] == '- 125m seq 2048: splash / xla tokens/s: not measured'
  assert tail[5].startswith('- 1b seq 8192: splash / xla tokens/s: ') and tail[5].endswith('x')
  assert tail[6:] == ['- 125m MFU (splash, seq 2048): not measured (target >= 40.0%)',
                      '- 1b MFU (splash, seq 2048): not measured (target >= 55.0%)',
                      'bench_suite exit 0']
  assert {'env.txt', 'test_splash.log', 'bench.log', 'bench.err', 'rows.jsonl',
          'table.md'} <= set(os.listdir(out))
  env_txt = (out / 'env.txt').read_text()
  assert 'jax ' in env_txt and "device_kind 'cpu'" in env_txt and 'JAX_PLATFORMS=cpu' in env_txt
  rows = [json.loads(line) for line in (out / 'rows.jsonl').read_text().splitlines()]
  assert [(r['case'], r['status'], r['suite']) for r in rows] == [
      ('1b seq 8192 splash', 'ok', 'tpu'), ('1b seq 8192 xla', 'ok', 'tpu')]
  assert all(r['overrides']['model.attention'] == 'xla' for r in rows)  # smoke: no splash


def test_bench_matmul_count_matches_the_formula(capsys):
  """--matmuls: a float32 step without remat does 6N + xla attention's full T x T (both
  halves, 12·L·T·heads·head_dim per token: the formula's causal 6 plus 6) in matmuls, all
  float32; in bfloat16, no float32 operand runs at the default precision."""
  from lmjax import config as config_lib
  from lmjax.models import transformer
  small = dict((kv.split('=')[0], int(kv.split('=')[1])) for kv in SMALL)
  cfg = config_lib.load(os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                        overrides={**small, 'model.dtype': 'float32', 'model.remat': 'none',
                                   'lora.enabled': False})
  m = cfg.model
  got = bench.matmul_shares(cfg)
  extra = 6 * m.n_layers * cfg.data.seq_len * m.n_heads * transformer.head_dim(m)
  assert got['formula_flops_per_token'] == transformer.flops_per_token(m, cfg.data.seq_len)
  assert got['matmul_flops_per_token'] == pytest.approx(got['formula_flops_per_token'] + extra,
                                                        rel=1e-9)
  assert got['shares'] == {'float32 x float32 (default)': 1.0}
  bf16 = config_lib.load(os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                         overrides={**small, 'model.dtype': 'bfloat16', 'lora.enabled': False})
  for mode in ('full', 'lora'):
    shares = bench.matmul_shares(bf16, mode=mode)['shares']
    assert sum(shares.values()) == pytest.approx(1.0)
    # every matmul takes bf16 x bf16 products: bf16 operands, or the explicit preset
    assert all(k.startswith('bfloat16 x bfloat16') or k.endswith('(BF16_BF16_F32)')
               for k in shares), (mode, shares)
  argv = ['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'), '--matmuls',
          '--mode', 'both', '--config.model.dtype=bfloat16']
  assert bench.main(argv + [f'--config.{s}' for s in SMALL]) == 0  # the CLI runs


def test_bench_moe_rows(tmp_path, capsys):
  """--moe_rows: the MoE feed-forward alone, dropless and dense dispatch, and a dense MLP
  of hidden size top_k x moe.d_ff, timed and credited with the same active FLOPs."""
  from lmjax import config as config_lib
  from lmjax.models import moe as moe_lib
  out = tmp_path / 'rows.jsonl'
  small = {'model.d_model': 32, 'model.moe.d_ff': 32, 'data.seq_len': 32,
           'train.global_batch': 2}
  path = os.path.join(ROOT, 'configs', 'pretrain_moe_tiny.py')
  argv = ['--config', path, '--moe_rows', '--steps', '1', '--warmup', '1', '--json', str(out)]
  assert bench.main(argv + [f'--config.{k}={v}' for k, v in small.items()]) == 0
  rows = {r['row']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {'moe dropless', 'moe capacity', 'moe dense', 'mlp'}
  m = config_lib.load(path, overrides=small).model
  active = moe_lib.active_ffn_params(m)
  assert active == 2 * 3 * 32 * 32 + 32 * 8  # k experts' SwiGLU + the router
  for r in rows.values():
    assert r['tokens_per_s'] > 0 and r['step_s'] > 0 and r['tokens_per_s'] == pytest.approx(
        2 * 32 / r['step_s'])
    assert r['flops_per_token'] == 6 * active  # every row credited with the same work
    assert r['tflops'] == pytest.approx(6 * active * r['tokens_per_s'] / 1e12)
    assert r['of_peak'] is None and r['overrides'] == small  # no CPU peak given
  assert rows['mlp']['d_ff'] == 2 * 32 and rows['moe dense']['d_ff'] == 32
  assert rows['moe dropless']['work'] == 1.0
  assert rows['moe dense']['work'] == pytest.approx(moe_lib.total_ffn_params(m) / active)
  assert rows['mlp']['work'] == pytest.approx(3 * 32 * 64 / active)
  printed = capsys.readouterr().out
  assert '| moe dropless | 1 x ' in printed and 'TFLOP/s (active) vs the dense MLP: ' in printed
  assert bench.main(['--config', os.path.join(ROOT, 'configs', 'pretrain_tiny.py'),
                     '--moe_rows']) == 2  # a dense model has no MoE block
  assert 'needs an MoE config' in capsys.readouterr().err


def test_bench_moe_1b_flops_count_active_experts():
  """configs/bench/moe_1b.py: ~1B params, of which the MFU formula's N counts only the
  top-k experts; both checked against a count from the config's fields."""
  from lmjax import config as config_lib
  from lmjax import sharding
  from lmjax.models import transformer
  from lmjax.train import state as state_lib
  cfg = config_lib.load(os.path.join(ROOT, 'configs', 'bench', 'moe_1b.py:cpu'))
  m, t = cfg.model, cfg.data.seq_len
  assert (m.moe.experts, m.moe.top_k, m.moe.dispatch) == (8, 2, 'dropless')
  assert m.remat == 'dots_no_batch' and m.moe.shared_d_ff == 0 and not m.tie_embeddings
  d, hd, e, k, f = m.d_model, transformer.head_dim(m), m.moe.experts, m.moe.top_k, m.moe.d_ff
  attn = d * hd * (2 * m.n_heads + 2 * m.n_kv_heads)
  router = d * e
  n_active = m.n_layers * (attn + k * 3 * d * f + router) + d * m.vocab_size  # + lm_head
  n_total = m.n_layers * (attn + e * 3 * d * f + router) + d * m.vocab_size
  assert transformer.flops_per_token(m, t) == (
      6 * n_active + 6 * m.n_layers * t * m.n_heads * hd)
  assert n_active < n_total / 3
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))  # abstract: no memory
  norms = (2 * m.n_layers + 1) * d
  assert setup.n_params == n_total + m.vocab_size * d + norms  # + the input embedding
  assert setup.n_params == pytest.approx(1015.2e6, rel=1e-4)  # the docstring's figures
  assert n_active == pytest.approx(302.1e6, rel=1e-4)
  assert n_active + m.vocab_size * d + norms == pytest.approx(335.7e6, rel=1e-4)
