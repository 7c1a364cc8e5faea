"""The stability tooling: tools/plot_stability.py on a synthetic metrics.jsonl (fast, no
training), and experiments/stability_tiny.py's smoke sweep (slow)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import plot_stability  # noqa: E402  pylint: disable=wrong-import-position

PNG = b'\x89PNG\r\n\x1a\n'


def write_metrics(workdir, n_layers=3, steps=(10, 20, 30, 40), telemetry=True,
                  resume_at=None, growth=1.0):
  """A metrics.jsonl as a run with train.telemetry=True writes it: a step-0 eval row,
  one train row per logged step, a final eval row; with resume_at, the rows after that
  step are written twice around a resume marker (read_jsonl keeps the second)."""
  os.makedirs(workdir, exist_ok=True)

  def train_row(step, redo=0.0):
    row = {'step': step, 'time': 1e9 + step, 'loss': 8.0 - 0.05 * step + redo,
           'grad_norm': 1.0, 'lr': 1e-3}
    if telemetry:
      for i in range(n_layers):
        row.update({f'stability/layer{i}/attn_logit_max': (2.0 + i) * growth * step / 10,
                    f'stability/layer{i}/resid_rms': 1.0 + 0.1 * i * step,
                    f'stability/layer{i}/grad_norm': 0.5 / (1 + i) / step,
                    f'stability/layer{i}/update_norm': 1e-3 * (1 + i)})
      row.update({'stability/attn_logit_max': (1.0 + n_layers) * growth * step / 10,
                  'stability/logz_mean': 0.1 * step, 'stability/logz_max': 0.2 * step,
                  'stability/spike_score': 0.0})
    return row

  rows = [{'step': 0, 'time': 1e9, 'eval_loss': 8.3}]
  for s in steps:
    rows.append(train_row(s, redo=1.0 if resume_at is not None and s > resume_at else 0.0))
  if resume_at is not None:
    rows.append({'step': resume_at, 'time': 2e9, 'resumed_from': resume_at})
    rows += [train_row(s) for s in steps if s > resume_at]
  rows.append({'step': steps[-1], 'time': 3e9, 'eval_loss': 6.5})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  return str(workdir)


def test_read_telemetry_keeps_the_final_history_and_the_series_are_per_layer(tmp_path):
  run = write_metrics(tmp_path / 'run', n_layers=12, resume_at=20)
  rows = plot_stability.read_telemetry(run)
  assert [r['step'] for r in rows] == [10, 20, 30, 40]  # no eval rows, the redone ones once
  assert rows[-1]['loss'] == pytest.approx(6.0)          # the resumed timeline's value
  series = plot_stability.layer_series(rows, 'attn_logit_max')
  assert list(series) == list(range(12))                 # numeric order: 10 after 9
  assert series[11] == pytest.approx([13.0, 26.0, 39.0, 52.0])


def test_plot_writes_the_png_with_and_without_a_comparison(tmp_path, capsys):
  run = write_metrics(tmp_path / 'baseline')
  other = write_metrics(tmp_path / 'qk_norm', growth=0.2)
  png = tmp_path / 'stability.png'
  assert plot_stability.main(['--workdir', run, '--out', str(png)]) == 0
  assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000
  assert capsys.readouterr().out.strip() == str(png)
  both = tmp_path / 'both.png'
  assert plot_stability.main(['--workdir', run, '--out', str(both), '--compare', other,
                              '--compare_label', 'QK-norm']) == 0
  assert both.read_bytes()[:8] == PNG and both.stat().st_size > png.stat().st_size
  many = write_metrics(tmp_path / 'deep', n_layers=24)  # a legend of the ends only
  assert plot_stability.main(['--workdir', many, '--out', str(tmp_path / 'deep.png')]) == 0


def test_a_run_without_telemetry_is_one_line_that_names_the_flag(tmp_path, capsys):
  plain = write_metrics(tmp_path / 'plain', telemetry=False)
  png = tmp_path / 'x.png'
  assert plot_stability.main(['--workdir', plain, '--out', str(png)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ')
  assert 'no stability telemetry' in err and '--config.train.telemetry=True' in err
  assert not png.exists()
  assert plot_stability.main(['--workdir', str(tmp_path / 'nothing'), '--out', str(png)]) == 2
  assert 'metrics.jsonl does not exist' in capsys.readouterr().err
  # --compare is read before anything is drawn
  run = write_metrics(tmp_path / 'run')
  assert plot_stability.main(['--workdir', run, '--out', str(png), '--compare', plain]) == 2
  assert 'telemetry' in capsys.readouterr().err and not png.exists()


# ---- experiments/stability_tiny.py ---------------------------------------------------

def _harness():
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import stability_tiny  # pylint: disable=import-outside-toplevel
  return stability_tiny


def test_the_sweep_tables_and_plots_runs_it_did_not_train(tmp_path):
  """collect / report / plot on synthetic workdirs (the smoke's schedule: 4 steps): a
  finished run, one above the divergence line, one a non-finite loss stopped."""
  st = _harness()
  args = st.parse_args(['--smoke', f'--root={tmp_path}'])
  runs = st.sweep([1e-2, 1.0], ['baseline', 'qk_norm_z_loss'])
  assert [st.run_name(r) for r in runs] == ['baseline_lr0.01', 'qk_norm_z_loss_lr0.01',
                                            'baseline_lr1', 'qk_norm_z_loss_lr1']
  write_metrics(tmp_path / 'baseline_lr0.01', steps=(2, 4))            # eval 6.5
  write_metrics(tmp_path / 'qk_norm_z_loss_lr0.01', steps=(2, 4), growth=0.1)
  path = tmp_path / 'qk_norm_z_loss_lr0.01' / 'metrics.jsonl'
  path.write_text(path.read_text().replace('"eval_loss": 6.5', '"eval_loss": 6.63'))
  write_metrics(tmp_path / 'qk_norm_z_loss_lr1', steps=(2, 4))
  path = tmp_path / 'qk_norm_z_loss_lr1' / 'metrics.jsonl'
  path.write_text(path.read_text().replace('"eval_loss": 6.5', '"eval_loss": 45.8'))
  write_metrics(tmp_path / 'baseline_lr1', steps=(2,), growth=100.0)
  (tmp_path / 'baseline_lr1' / 'diverged.json').write_text(json.dumps(
      {'step': 3, 'error': 'non-finite loss nan at step 3; last checkpoint: step None'}))
  rows = {r['run']: r for r in st.collect(runs, args)}
  assert len(rows) == 4
  good, both, stopped, high = (rows[n] for n in ('baseline_lr0.01', 'qk_norm_z_loss_lr0.01',
                                                 'baseline_lr1', 'qk_norm_z_loss_lr1'))
  assert good['eval_loss'] == 6.5 and good['vs_best'] == 0 and not good['diverged']
  assert good['train_loss'] == pytest.approx(8.0 - 0.05 * 3)  # the mean of the last ones
  assert good['max_attn_logit'] == pytest.approx(1.6) and good['max_logz'] == 0.8
  assert both['vs_best'] == pytest.approx(0.02)
  assert stopped['diverged'] == 'stopped at step 3: non-finite loss nan at step 3'
  assert stopped['loss'] is None and stopped['max_attn_logit'] == pytest.approx(80.0)
  assert high['diverged'] == f'final loss 45.800 > {math.log(4096):.3f}'
  text = st.report(list(rows.values()), st.load_config(runs[0], args), args)
  assert 'at the top lr 1: baseline diverged (stopped at step 3' in text
  assert 'best: 6.500 (baseline, lr 0.01)' in text
  assert '| 0.01 | 6.500 **best** | 6.630 (+2.0%) |' in text
  assert '| 1 | diverged (step 3) | diverged |' in text
  assert '| 1 | 80.0 | 1.6 |' in text  # max attention logits: also of diverged runs
  png = tmp_path / 'stability.png'
  st.plot(list(rows.values()), str(png))
  assert png.read_bytes()[:8] == PNG


def test_bad_arguments_exit_with_2_before_any_run(tmp_path):
  proc = subprocess.run([sys.executable, 'experiments/stability_tiny.py', '--variants=nope',
                         f'--root={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
  proc = subprocess.run([sys.executable, 'experiments/stability_tiny.py',
                         '--config.model.nope=1', f'--root={tmp_path}'], cwd=ROOT,
                        capture_output=True, text=True)
  assert proc.returncode == 2 and 'model.nope' in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_sweep_trains_tabulates_and_resumes(tmp_path):
  """--smoke: 2 learning rates x 2 variants (baseline, both) x 4 steps, every run in the table with
  numbers; at lr 1 QK-norm keeps the attention logits orders of magnitude smaller."""
  st = _harness()
  root = tmp_path / 'stability'
  cmd = [sys.executable, 'experiments/stability_tiny.py', '--smoke', f'--root={root}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.load(open(root / 'stability.json'))
  assert sorted((r['lr'], r['variant']) for r in rows) == sorted(
      (lr, v) for lr in st.SMOKE_LRS for v in st.SMOKE_VARIANTS)
  for r in rows:
    assert r['steps'] == 4 and r['max_attn_logit'] > 0 and r['max_logz'] is not None
    assert r['spike_score'] is not None
  low = {r['variant']: r for r in rows if r['lr'] == 1e-2}
  assert not any(r['diverged'] for r in low.values())
  assert all(r['eval_loss'] < r['init_eval_loss'] and r['train_loss'] > 0
             for r in low.values())
  high = {r['variant']: r for r in rows if r['lr'] == 1.0}
  assert high['qk_norm_z_loss']['max_attn_logit'] < high['baseline']['max_attn_logit'] / 10
  text = (root / 'stability.md').read_text()
  assert text == proc.stdout[proc.stdout.index('# Stability sweep'):].split('\nplot: ')[0]
  header = '| lr | baseline | +QK-norm +z-loss |'
  assert text.count(header) == 3
  for line in text.splitlines():
    if line.startswith('| 0.01 |') or line.startswith('| 1 |'):
      cells = [c.strip() for c in line.strip('|').split('|')][1:]
      assert len(cells) == 2
      assert all(c.startswith('diverged') or float(c.split()[0]) > 0 for c in cells), line
  assert (root / 'stability.png').read_bytes()[:8] == PNG
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count(': done') == 4
  assert 'compiled train step' not in again.stdout
  assert again.stdout[again.stdout.index('# Stability sweep'):] == proc.stdout[
      proc.stdout.index('# Stability sweep'):]
