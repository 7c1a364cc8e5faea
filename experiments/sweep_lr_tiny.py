"""A learning-rate sweep of the tiny pretraining config, defined in Python.

  python experiments/sweep_lr_tiny.py --root=/tmp/lmjax_sweep            # grid, run here
  python experiments/sweep_lr_tiny.py --random=6 --seed=0                # log-uniform draws
  python experiments/sweep_lr_tiny.py --emit=local                       # print the commands
  python experiments/sweep_lr_tiny.py --emit=tpu --zone=us-central2-b --bucket=B
  python experiments/sweep_lr_tiny.py --smoke --root=/tmp/s              # CI: 3 x 10 steps
  python experiments/sweep_lr_tiny.py --config.train.steps=100          # every run's config

The base config is --config=FILE[:arg] (default configs/pretrain_tiny.py), with
--config.KEY=VALUE overrides applied to every run, as for `python -m lmjax.train`.

A sweep is a function returning one dict of config overrides per run (`grid` and
`random_search` below build them). Runs go one after another in this process
(lmjax.train.loop.train; a finished run is not retrained, an interrupted one resumes), or
--emit prints a command per run instead (`python -m lmjax.train ...`, or
tools/launch_tpu.py commands with one TPU VM per run). Then every run's metrics.jsonl is
collected into one table (final train loss, final and best eval loss) written to
<root>/sweep.md, and the curves into <root>/sweep.png (matplotlib).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/pretrain_tiny.py'  # relative to the repository root


def grid(**axes) -> list[dict]:
  """Every combination of the axes' values: grid(**{'optim.lr': [1e-3, 3e-3]})."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def random_search(n: int, seed: int = 0, **log_ranges) -> list[dict]:
  """n draws, each key log-uniform in its (low, high) range."""
  rng = np.random.default_rng(seed)
  return [{k: float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
           for k, (lo, hi) in log_ranges.items()} for _ in range(n)]


def lr_sweep(args) -> list[dict]:
  """This experiment: the peak learning rate (warmup + cosine) of configs/pretrain_tiny.py."""
  if args.random:
    return random_search(args.random, args.seed, **{'optim.lr': (3e-4, 1e-2)})
  return grid(**{'optim.lr': [5e-4, 1.5e-3, 5e-3]})


def run_name(overrides: dict) -> str:
  return '_'.join(f'{k.split(".")[-1]}{v:.3g}' if isinstance(v, float) else f'{k}{v}'
                  for k, v in overrides.items())


def base_overrides(smoke: bool) -> dict:
  out = {'train.progress_bar': False, 'train.sample_at_end': False}
  if smoke:
    out.update({'train.steps': 10, 'train.eval_every': 5, 'train.log_every': 5,
                'train.eval_batches': 2, 'checkpoint.every': 10})
  return out


def run_local(runs: list[dict], root: str, smoke: bool, config: str = CONFIG,
              flags: tuple = ()) -> None:
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from lmjax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  for i, overrides in enumerate(runs):
    cfg = config_lib.load(os.path.join(ROOT, config), flags=list(flags),
                          overrides={**base_overrides(smoke), **overrides})
    workdir = os.path.join(root, run_name(overrides))
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
      ckpt = Checkpointer(workdir, None, read_only=True)
      done = ckpt.latest_step() == cfg.train.steps
      ckpt.close()
      if done:
        print(f'[{i + 1}/{len(runs)}] {run_name(overrides)}: done', flush=True)
        continue
    print(f'[{i + 1}/{len(runs)}] {run_name(overrides)} -> {workdir}', flush=True)
    loop.train(cfg, workdir)


def commands(runs: list[dict], root: str, args) -> list[str]:
  out = []
  for overrides in runs:
    flags = [f'--config.{k}={v}' for k, v in {**base_overrides(args.smoke), **overrides}.items()]
    flags = [*args.flags, *flags]  # a run's own values last: they win
    name = run_name(overrides)
    if args.emit == 'tpu':
      vm = f'sweep-{name}'.replace('_', '-').replace('.', 'p').lower()
      out.append(shlex.join(['python', 'tools/launch_tpu.py', f'--name={vm}',
                             f'--zone={args.zone}', f'--accelerator={args.accelerator}',
                             f'--bucket={args.bucket}', f'--config={args.config}',
                             f'--workdir=/mnt/{args.bucket}/sweeps/{name}', *flags]))
    else:
      out.append(shlex.join(['python', '-m', 'lmjax.train', f'--config={args.config}',
                             f'--workdir={os.path.join(root, name)}', *flags]))
  return out


def collect(runs: list[dict], root: str) -> list[dict]:
  """One row per run with metrics: final train loss, final and best eval loss, curves."""
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  rows = []
  for overrides in runs:
    path = os.path.join(root, run_name(overrides), 'metrics.jsonl')
    if not os.path.exists(path):
      continue
    logged = metrics_lib.read_jsonl(path)
    train = [(r['step'], r['loss']) for r in logged if 'loss' in r]
    evals = [(r['step'], r['eval_loss']) for r in logged if 'eval_loss' in r]
    rows.append({'run': run_name(overrides), 'overrides': overrides,
                 'steps': train[-1][0] if train else 0,
                 'train_loss': train[-1][1] if train else None,
                 'eval_loss': evals[-1][1] if evals else None,
                 'best_eval_loss': min(e for _, e in evals) if evals else None,
                 'train_curve': train, 'eval_curve': evals})
  return rows


def table(rows: list[dict]) -> str:
  fmt = lambda v: '-' if v is None else f'{v:.4f}'
  keys = sorted({k for r in rows for k in r['overrides']})
  lines = ['| ' + ' | '.join(keys + ['steps', 'train loss', 'eval loss', 'best eval']) + ' |',
           '|' + '---|' * (len(keys) + 4)]
  best = min((r for r in rows if r['eval_loss'] is not None), key=lambda r: r['eval_loss'],
             default=None)
  for r in rows:
    mark = ' **best**' if r is best else ''
    lines.append('| ' + ' | '.join([f'{r["overrides"].get(k, "")}' for k in keys] + [
        str(r['steps']), fmt(r['train_loss']), fmt(r['eval_loss']) + mark,
        fmt(r['best_eval_loss'])]) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit('sweep: the plot needs matplotlib: pip install -e ".[sweep]"') from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for r in rows:
    for ax, key in zip(axes, ('train_curve', 'eval_curve')):
      if r[key]:
        ax.plot(*zip(*r[key]), marker='.' if key == 'eval_curve' else None, label=r['run'])
  for ax, title in zip(axes, ('train loss', 'eval loss')):
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--root', default='/tmp/lmjax_sweep')
  parser.add_argument('--random', type=int, default=0, help='n random draws instead of the grid')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--smoke', action='store_true', help='10-step runs (CI)')
  parser.add_argument('--emit', choices=('local', 'tpu'), default=None,
                      help='print a command per run instead of running them here')
  parser.add_argument('--zone', default='us-central2-b')
  parser.add_argument('--accelerator', default='v4-8')
  parser.add_argument('--bucket', default='my-bucket')
  parser.add_argument('--config', default=CONFIG, help='the base config (configs/*.py[:arg])')
  args, args.flags = parser.parse_known_args(argv)  # the rest: --config.KEY=VALUE
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:  # checked before any run starts
    config_lib.load(os.path.join(ROOT, args.config), flags=args.flags)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  runs = lr_sweep(args)
  if args.emit:
    print('\n'.join(commands(runs, args.root, args)))
    return 0
  os.makedirs(args.root, exist_ok=True)
  run_local(runs, args.root, args.smoke, args.config, args.flags)
  rows = collect(runs, args.root)
  write_report(args.root, 'sweep', table(rows), rows, plot)
  return 0


def write_report(root: str, stem: str, text: str, rows: list[dict], plot_fn) -> None:
  """A sweep's report: `text` printed and written to <root>/<stem>.md (ending in a
  newline), `rows` to <root>/<stem>.json, plot_fn(rows, path) drawn to <root>/<stem>.png."""
  print('\n' + text)
  with open(os.path.join(root, f'{stem}.md'), 'w', encoding='utf-8') as f:
    f.write(text if text.endswith('\n') else text + '\n')
  with open(os.path.join(root, f'{stem}.json'), 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  plot_fn(rows, os.path.join(root, f'{stem}.png'))
  print(f'plot: {os.path.join(root, stem + ".png")}')


if __name__ == '__main__':
  sys.exit(main())
