"""Plots a mixture-of-experts run's router telemetry from its metrics.jsonl.

  python tools/plot_moe.py --workdir=/tmp/lmjax_moe_tiny --out=moe_load.png
      [--label=NAME] [--compare=OTHER_WORKDIR --compare_label=NAME]

Left: each expert's load over training (its share of the computed assignments, averaged
over layers, 1 = balanced: 'moe/expert<j>/load'). Right: each layer's busiest expert
('moe/layer<i>/load_max', E/k = every token sent to the same k experts), for the run and,
with --compare, another run (dashed). Needs matplotlib (pip install -e ".[sweep]").
Bad input: one line, `error: <reason>`, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

from lmjax import cli
from lmjax.errors import UserError


class PlotError(UserError, ValueError):
  """A workdir without MoE telemetry; the message names it."""


def read_telemetry(workdir: str) -> list[dict]:
  """The train rows of <workdir>/metrics.jsonl that carry router telemetry."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise PlotError(f'{path} does not exist (not a training run\'s workdir?)')
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if 'moe/balance_loss' in r]
  if not rows:
    raise PlotError(f'{path} has no MoE telemetry (moe/...): the run\'s model has no experts')
  return rows


def _series(rows, prefix: str, suffix: str) -> dict[int, list[float]]:
  keys = sorted({k for r in rows for k in r if k.startswith(prefix) and k.endswith(suffix)},
                key=lambda k: int(k[len(prefix):-len(suffix)]))
  return {int(k[len(prefix):-len(suffix)]): [r[k] for r in rows] for k in keys}


def plot(runs: list[tuple[str, list[dict]]], out: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
  label, rows = runs[0]
  steps = [r['step'] for r in rows]
  for j, load in _series(rows, 'moe/expert', '/load').items():
    left.plot(steps, load, label=f'expert {j}')
  left.axhline(1.0, color='gray', lw=0.8, ls=':')
  left.set(title=f'{label}: load per expert (mean over layers)', xlabel='step',
           ylabel='share of assignments / balanced share')
  left.legend(fontsize=7, ncol=2)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for n, (name, rows) in enumerate(runs):
    steps = [r['step'] for r in rows]
    for i, load in _series(rows, 'moe/layer', '/load_max').items():
      right.plot(steps, load, color=colors[i % len(colors)], ls='-' if n == 0 else '--',
                 label=f'{name} layer {i}')
  right.axhline(1.0, color='gray', lw=0.8, ls=':')
  right.set(title='busiest expert per layer', xlabel='step',
            ylabel='load_max (1 = balanced)')
  right.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  return out


@cli.main
def main(argv) -> int:
  return cli.plot_runs(argv, __doc__, read_telemetry, plot,
                       compare_help="another MoE run's workdir")


if __name__ == '__main__':
  sys.exit(main())
