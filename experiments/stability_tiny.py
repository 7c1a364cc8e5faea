"""Training stability of the tiny model: learning rate x {baseline, z-loss, QK-norm, both}.

  python experiments/stability_tiny.py --root=/tmp/lmjax_stability      # ~11 min, 2-core CPU
  python experiments/stability_tiny.py --smoke --root=/tmp/s   # CI: 2 LRs x 2 variants, ~35 s
  python experiments/stability_tiny.py --lrs=0.01,0.3,1 --variants=baseline,qk_norm_z_loss
  python experiments/stability_tiny.py --root=/tmp/lmjax_stability_d256 \\
      --config.model.d_model=256 --config.model.n_layers=8 --config.model.d_ff=768
  python tools/plot_stability.py --workdir=/tmp/lmjax_stability/baseline_lr0.3 \\
      --compare=/tmp/lmjax_stability/qk_norm_z_loss_lr0.3 --out=/tmp/baseline_vs_both.png

After Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities": at a high enough learning rate the attention logits of a model without
QK-norm grow until attention collapses onto single tokens and the loss diverges or ends
worse, and the output logits drift (log Z away from 0) without z-loss; QK-norm
(model.qk_norm) and z-loss (train.z_loss=1e-4) together keep the final loss close to the
best over a wide range of learning rates. This sweep checks that claim on the tiny model
(configs/pretrain_tiny.py, 1.3M parameters, best learning rate ~1.5e-3): every variant at
every learning rate of --lrs (default 1e-3 .. 3e-1, a decade and more above the best), in
short runs (150 steps of 8 x 128 tokens, 15 warmup steps: SHORT below) with the stability
telemetry on (train.telemetry). Weight decay is independent of the learning rate, as in
the paper: each run's optim.weight_decay is --wd / lr, so that AdamW (which multiplies
the decay by the learning rate) shrinks the weights by the same --wd per step at every
learning rate.

Runs go one after another in this process (named <variant>_lr<lr> under --root); a
finished run is not retrained, nor is one that diverged (its <workdir>/diverged.json holds
why). A run diverged when training stopped on a non-finite loss, or when its final loss is
above --diverged_above (default ln(vocab size): no better than a uniform guess). Then
every run's metrics.jsonl is collected into <root>/stability.md (tables, rows: learning
rate, columns: variants, of the final eval loss with its distance from the sweep's best,
the final train loss and the max attention logit of the run), <root>/stability.json, and
<root>/stability.png (final loss and max attention logit against the learning rate, one
line per variant). tools/plot_stability.py draws one run's telemetry layer by layer.

What it measured, at two model sizes: docs/benchmarks.md (Training stability).

The base config is --config=FILE[:arg] (default configs/pretrain_tiny.py); --config.KEY=VALUE
flags apply to every run after the sweep's own values (so --config.train.steps=300 or a
bigger model: --config.model.d_model=256 --config.model.n_layers=8 ...), as for
`python -m lmjax.train`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import recipe_tiny  # experiments/: finished(), a run's final checkpoint
from sweep_lr_tiny import grid, write_report  # experiments/: the axes' product; the report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/pretrain_tiny.py'  # relative to the repository root

# name: (label, overrides), in the tables' column order.
VARIANTS = {
    'baseline': ('baseline', {}),
    'z_loss': ('+z-loss', {'train.z_loss': 1e-4}),
    'qk_norm': ('+QK-norm', {'model.qk_norm': True}),
    'qk_norm_z_loss': ('+QK-norm +z-loss', {'model.qk_norm': True, 'train.z_loss': 1e-4}),
}
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SMOKE_LRS = (1e-2, 1.0)
SMOKE_VARIANTS = ('baseline', 'qk_norm_z_loss')
WD = 1e-4  # independent weight decay per step (the paper's default)
TAIL = 3   # the final train loss: the mean of the last TAIL logged losses

_QUIET = {'train.progress_bar': False, 'train.sample_at_end': False, 'train.telemetry': True}
# The short runs of the sweep: ~28 s each on a 2-core CPU (eval at step 0 and at the end).
SHORT = {'train.steps': 150, 'train.global_batch': 8, 'data.seq_len': 128,
         'optim.warmup_steps': 15, 'train.log_every': 10, 'train.eval_every': 150,
         'train.eval_batches': 8, 'checkpoint.every': 150}
SMOKE = {'train.steps': 4, 'train.global_batch': 8, 'data.seq_len': 32,
         'optim.warmup_steps': 1, 'train.log_every': 2, 'train.eval_every': 4,
         'train.eval_batches': 1, 'checkpoint.every': 4}


def sweep(lrs, variants) -> list[dict]:
  """One dict per run: {'optim.lr': lr, 'variant': name}, every variant at every lr."""
  return grid(**{'optim.lr': list(lrs), 'variant': list(variants)})


def run_name(run: dict) -> str:
  return f'{run["variant"]}_lr{run["optim.lr"]:.3g}'


def overrides(run: dict, smoke: bool, wd: float) -> dict:
  """The config overrides of one run: the short (or smoke) schedule, its variant, its
  learning rate and the weight decay that makes --wd independent of it."""
  out = {**_QUIET, **(SMOKE if smoke else SHORT), **VARIANTS[run['variant']][1],
         'optim.lr': run['optim.lr']}
  if wd > 0:
    out['optim.weight_decay'] = wd / run['optim.lr']
  return out


def load_config(run: dict, args):
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load(os.path.join(ROOT, args.config), flags=list(args.flags),
                         overrides=overrides(run, args.smoke, args.wd))


def _done(workdir: str, steps: int) -> bool:
  """The run trained all its steps (final checkpoint), or diverged before."""
  if os.path.exists(os.path.join(workdir, 'diverged.json')):
    return True
  return (os.path.isdir(os.path.join(workdir, 'checkpoints'))
          and recipe_tiny.finished(workdir, steps))


def run_local(runs: list[dict], args) -> None:
  """Trains every run not done yet; a run stopped by a non-finite loss (TrainingError)
  is recorded in <workdir>/diverged.json and the sweep goes on."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  for i, run in enumerate(runs):
    cfg = load_config(run, args)
    workdir = os.path.join(args.root, run_name(run))
    head = f'[{i + 1}/{len(runs)}] {run_name(run)}'
    if _done(workdir, cfg.train.steps):
      print(f'{head}: done', flush=True)
      continue
    print(f'{head} -> {workdir}', flush=True)
    try:
      loop.train(cfg, workdir)
    except loop.TrainingError as e:
      match = re.search(r'at step (\d+)', str(e))
      record = {'step': int(match.group(1)) if match else None, 'error': str(e)}
      with open(os.path.join(workdir, 'diverged.json'), 'w', encoding='utf-8') as f:
        json.dump(record, f)
      print(f'{head}: diverged: {e}', flush=True)


def _finite(values) -> list[float]:
  return [v for v in values if v is not None and math.isfinite(v)]


def collect(runs: list[dict], args) -> list[dict]:
  """One row per run that has a metrics.jsonl: its final losses, the max attention logit
  and log Z over the run, its spike score, whether and why it diverged."""
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  rows = []
  for run in runs:
    workdir = os.path.join(args.root, run_name(run))
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      continue
    cfg = load_config(run, args)
    logged = metrics_lib.read_jsonl(path)
    train = [(r['step'], r['loss']) for r in logged if 'loss' in r]
    evals = [(r['step'], r['eval_loss']) for r in logged if 'eval_loss' in r]
    stopped = None
    if os.path.exists(os.path.join(workdir, 'diverged.json')):
      with open(os.path.join(workdir, 'diverged.json'), encoding='utf-8') as f:
        stopped = json.load(f)
    tail = [loss for _, loss in train[-TAIL:]]
    final_eval = evals[-1][1] if evals and evals[-1][0] == cfg.train.steps else None
    row = {'run': run_name(run), 'lr': run['optim.lr'], 'variant': run['variant'],
           'steps': train[-1][0] if train else 0,
           'train_loss': sum(tail) / len(tail) if tail and stopped is None else None,
           'eval_loss': final_eval, 'init_eval_loss': evals[0][1] if evals else None,
           'train_curve': train, 'eval_curve': evals}
    for key, name in (('stability/attn_logit_max', 'max_attn_logit'),
                      ('stability/logz_max', 'max_logz')):
      values = _finite(r.get(key) for r in logged)
      row[name] = max(values) if values else None
    row['spike_score'] = next((r['stability/spike_score'] for r in reversed(logged)
                               if 'stability/spike_score' in r), None)
    threshold = (args.diverged_above if args.diverged_above is not None
                 else math.log(cfg.model.vocab_size))
    row['loss'] = row['eval_loss'] if row['eval_loss'] is not None else row['train_loss']
    row['stopped_at'] = stopped['step'] if stopped else None
    if stopped is not None:
      row['diverged'] = f'stopped at step {stopped["step"]}: {stopped["error"].split(";")[0]}'
    elif row['loss'] is None or not math.isfinite(row['loss']):
      row['diverged'] = f'final loss {row["loss"]}'
    elif row['loss'] > threshold:
      row['diverged'] = f'final loss {row["loss"]:.3f} > {threshold:.3f}'
    else:
      row['diverged'] = None
    row['diverged_above'] = threshold
    rows.append(row)
  best = min((r['loss'] for r in rows if not r['diverged']), default=None)
  for r in rows:
    r['vs_best'] = (r['loss'] / best - 1 if best and not r['diverged'] else None)
  return rows


def _cell(row, key, gap=False) -> str:
  if row is None:
    return '-'
  if row['diverged'] and key != 'max_attn_logit':
    return 'diverged' + ('' if row['stopped_at'] is None else f' (step {row["stopped_at"]})')
  v = row[key]
  if v is None:
    return '-'
  if key == 'max_attn_logit':
    return f'{v:.1f}'
  text = f'{v:.3f}'
  if gap and row['vs_best'] is not None:
    text += ' **best**' if row['vs_best'] == 0 else f' (+{100 * row["vs_best"]:.1f}%)'
  return text


def table(rows: list[dict], key: str, gap: bool = False) -> str:
  """A markdown table of rows[key]: one line per learning rate, one column per variant."""
  variants = [v for v in VARIANTS if any(r['variant'] == v for r in rows)]
  by = {(r['lr'], r['variant']): r for r in rows}
  lines = ['| lr | ' + ' | '.join(VARIANTS[v][0] for v in variants) + ' |',
           '|---|' + '---|' * len(variants)]
  for lr in sorted({r['lr'] for r in rows}):
    lines.append(f'| {lr:.3g} | ' + ' | '.join(_cell(by.get((lr, v)), key, gap)
                                               for v in variants) + ' |')
  return '\n'.join(lines)


def summary(rows: list[dict]) -> str:
  """What the top learning rate did to each variant, against the sweep's best loss."""
  if not rows:
    return 'no runs'
  top = max(r['lr'] for r in rows)
  ok = [r for r in rows if not r['diverged']]
  best = min(ok, key=lambda r: r['loss'], default=None)
  parts = []
  for r in sorted((r for r in rows if r['lr'] == top), key=lambda r: list(VARIANTS).index(
      r['variant'])):
    label = VARIANTS[r['variant']][0]
    parts.append(f'{label} diverged ({r["diverged"]})' if r['diverged'] else
                 f'{label} {r["loss"]:.3f} (+{100 * r["vs_best"]:.1f}%)')
  head = (f'best: {best["loss"]:.3f} ({VARIANTS[best["variant"]][0]}, lr {best["lr"]:.3g})'
          if best else 'every run diverged')
  return f'{head}; at the top lr {top:.3g}: ' + ', '.join(parts) + '.'


def report(rows: list[dict], cfg, args) -> str:
  """<root>/stability.md: the setup, the summary and the three tables."""
  steps, batch, seq = cfg.train.steps, cfg.train.global_batch, cfg.data.seq_len
  m = cfg.model
  setup = (f'{args.config}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, '
           f'vocab {m.vocab_size}; {steps} steps of {batch} x {seq} tokens, '
           f'{cfg.optim.warmup_steps} warmup steps, cosine to {cfg.optim.min_lr_ratio} x lr; '
           + (f'independent weight decay {args.wd:g} per step' if args.wd > 0 else
              f'weight decay {cfg.optim.weight_decay:g} x lr') +
           (f'; flags: {" ".join(args.flags)}' if args.flags else ''))
  threshold = rows[0]['diverged_above'] if rows else float('nan')
  return '\n'.join([
      '# Stability sweep: learning rate x {baseline, z-loss, QK-norm, both}', '', setup, '',
      summary(rows), '',
      '## Final eval loss (held-out batches; +x%: above the sweep\'s best)', '',
      'Diverged: a non-finite loss stopped the run, or the final loss is above '
      f'{threshold:.3f}.', '', table(rows, 'eval_loss', gap=True), '',
      f'## Final train loss (mean of the last {TAIL} logged)', '',
      table(rows, 'train_loss'), '',
      '## Max attention logit (max |q.k|/sqrt(d) over layers and logged steps)', '',
      table(rows, 'max_attn_logit'), ''])


def plot(rows: list[dict], path: str) -> None:
  """Final loss and max attention logit against the learning rate, a line per variant."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit('stability: the plot needs matplotlib: pip install -e ".[sweep]"') from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  threshold = rows[0]['diverged_above'] if rows else None
  for n, (name, (label, _)) in enumerate(VARIANTS.items()):
    mine = sorted((r for r in rows if r['variant'] == name), key=lambda r: r['lr'])
    if not mine:
      continue
    color = f'C{n}'
    lrs = [r['lr'] for r in mine]
    # a diverged run is drawn at the divergence line, as an x
    losses = [threshold if r['diverged'] else r['loss'] for r in mine]
    left.plot(lrs, losses, color=color, marker='o', label=label)
    bad = [(r['lr'], threshold) for r in mine if r['diverged']]
    if bad:
      left.plot(*zip(*bad), color=color, marker='x', ms=10, ls='none')
    logits = [(r['lr'], r['max_attn_logit']) for r in mine if r['max_attn_logit'] is not None]
    if logits:
      right.plot(*zip(*logits), color=color, marker='o', label=label)
  if threshold is not None:
    left.axhline(threshold, color='gray', lw=0.8, ls=':', label='diverged (x)')
  left.set(xscale='log', xlabel='peak learning rate', ylabel='final loss (eval)',
           title='final loss')
  right.set(xscale='log', yscale='log', xlabel='peak learning rate',
            ylabel='max |attention logit|', title='max attention logit over the run')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line: args.lrs and args.variants as lists, args.flags the --config.KEY=VALUE
  ones; bad values (a base config that does not load among them) exit with code 2."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--root', default='/tmp/lmjax_stability')
  parser.add_argument('--lrs', default=None,
                      help=f'peak learning rates, comma-separated (default {LRS}; '
                      f'--smoke: {SMOKE_LRS})')
  parser.add_argument('--variants', default=None,
                      help='comma-separated, of: ' + ', '.join(VARIANTS) + ' (default all; '
                      f'--smoke: {",".join(SMOKE_VARIANTS)})')
  parser.add_argument('--wd', type=float, default=WD,
                      help='independent weight decay per step (optim.weight_decay = wd / lr);'
                      ' 0: the config\'s own optim.weight_decay')
  parser.add_argument('--diverged_above', type=float, default=None,
                      help='a final loss above this is a divergence (default ln(vocab size))')
  parser.add_argument('--smoke', action='store_true', help='4-step runs of 2 LRs x 2 variants (CI)')
  parser.add_argument('--config', default=CONFIG, help='the base config (configs/*.py[:arg])')
  args, args.flags = parser.parse_known_args(argv)  # the rest: --config.KEY=VALUE
  try:
    args.lrs = [float(x) for x in args.lrs.split(',')] if args.lrs else list(
        SMOKE_LRS if args.smoke else LRS)
  except ValueError:
    parser.error(f'--lrs: not a comma-separated list of numbers: {args.lrs!r}')
  if not args.lrs or any(lr <= 0 for lr in args.lrs):
    parser.error('--lrs: learning rates must be positive')
  if args.variants is None:
    args.variants = ','.join(SMOKE_VARIANTS if args.smoke else VARIANTS)
  args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown or not args.variants:
    parser.error(f'--variants: unknown {unknown}; choose from {", ".join(VARIANTS)}')
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:  # checked before any run starts
    load_config(sweep(args.lrs, args.variants)[0], args)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  runs = sweep(args.lrs, args.variants)
  os.makedirs(args.root, exist_ok=True)
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    # XLA's persistent cache: the runs of one variant share their compiled init (the
    # train step, whose learning rate is a constant, is compiled per run): ~4 s a run.
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_compilation_cache_dir', os.path.join(args.root, '.jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  run_local(runs, args)
  rows = collect(runs, args)
  write_report(args.root, 'stability', report(rows, load_config(runs[0], args), args), rows,
               plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
