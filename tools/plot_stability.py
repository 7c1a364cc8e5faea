"""Plots a run's training-stability telemetry, layer by layer, from its metrics.jsonl.

  python tools/plot_stability.py --workdir=/tmp/lmjax_tiny --out=stability.png
      [--label=NAME] [--compare=OTHER_WORKDIR --compare_label=NAME]

The run must have trained with --config.train.telemetry=True. Six panels against step,
the first four on log scales: each layer's max |attention logit| (q.k/sqrt(d) before any
soft-cap: 'stability/layer<i>/attn_logit_max'), the residual stream's RMS after each
layer ('.../resid_rms'), each layer's gradient and update norms ('.../grad_norm',
'.../update_norm'); then the train loss (with the final spike score: the fraction of
steps whose loss lay > 7 sigma above the rolling mean) and log Z of the output logits
(mean and max over loss tokens: what z-loss pulls to 0). With --compare, another run's
curves are drawn dashed in the same colours. Needs matplotlib (pip install -e ".[sweep]").
Bad input: one line, `error: <reason>`, exit code 2.
"""

from __future__ import annotations

import os
import re
import sys

from lmjax import cli
from lmjax.errors import UserError

PREFIX = 'stability/'
# (per-layer metric, panel title): log scale, as growth shows over orders of magnitude
LAYER_PANELS = (('attn_logit_max', 'max |attention logit| per layer'),
                ('resid_rms', 'residual RMS after each layer'),
                ('grad_norm', 'gradient norm per layer'),
                ('update_norm', 'update norm per layer'))
_LAYER_KEY = re.compile(r'stability/layer(\d+)/(\w+)$')


class PlotError(UserError, ValueError):
  """A workdir without stability telemetry; the message names it."""


def read_telemetry(workdir: str) -> list[dict]:
  """The train rows of <workdir>/metrics.jsonl (its final history: metrics.read_jsonl)
  that carry stability telemetry, in step order."""
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise PlotError(f'{path} does not exist (not a training run\'s workdir?)')
  rows = [r for r in metrics_lib.read_jsonl(path) if any(k.startswith(PREFIX) for k in r)]
  if not rows:
    raise PlotError(f'{path} has no stability telemetry ({PREFIX}...): run with '
                    '--config.train.telemetry=True')
  return rows


def layer_series(rows: list[dict], metric: str) -> dict[int, list[float]]:
  """{layer: [value per row]} of 'stability/layer<i>/<metric>' (NaN where a row lacks it)."""
  layers = sorted({int(m.group(1)) for r in rows for k in r
                   if (m := _LAYER_KEY.match(k)) and m.group(2) == metric})
  return {i: [r.get(f'{PREFIX}layer{i}/{metric}', float('nan')) for r in rows]
          for i in layers}


def _column(rows: list[dict], key: str) -> list[float]:
  return [r.get(key, float('nan')) for r in rows]


def plot(runs: list[tuple[str, list[dict]]], out: str) -> str:
  """Draws `runs` ([(label, rows)], the first solid, the others dashed) into `out`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  panels = list(axes.flat)
  n_layers = max(len(layer_series(rows, m)) for _, rows in runs for m, _ in LAYER_PANELS)
  cmap = plt.get_cmap('viridis')
  color = lambda i: cmap(i / max(n_layers - 1, 1) * 0.9)  # layer 0 dark, the last light
  for n, (name, rows) in enumerate(runs):
    steps = [r['step'] for r in rows]
    ls = '-' if n == 0 else '--'
    for ax, (metric, _) in zip(panels, LAYER_PANELS):
      for i, values in layer_series(rows, metric).items():
        labelled = n_layers <= 8 or i in (0, n_layers - 1)  # a long legend helps no one
        ax.plot(steps, values, color=color(i), ls=ls,
                label=f'{name} layer {i}' if labelled else None)
    spike = next((r[f'{PREFIX}spike_score'] for r in reversed(rows)
                  if f'{PREFIX}spike_score' in r), None)
    panels[4].plot(steps, _column(rows, 'loss'), color=f'C{n}', ls=ls,
                   label=name + ('' if spike is None else f' (spike score {spike:.3g})'))
    panels[5].plot(steps, _column(rows, f'{PREFIX}logz_mean'), color=f'C{n}', ls=ls,
                   label=f'{name} mean')
    panels[5].plot(steps, _column(rows, f'{PREFIX}logz_max'), color=f'C{n}', ls=ls,
                   alpha=0.5, label=f'{name} max')
  for ax, (_, title) in zip(panels, LAYER_PANELS):
    ax.set(title=title, xlabel='step', yscale='log')
  panels[4].set(title='train loss', xlabel='step', ylabel='loss')
  panels[5].axhline(0.0, color='gray', lw=0.8, ls=':')
  panels[5].set(title='log Z of the output logits (loss tokens)', xlabel='step')
  for ax in panels:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, ncol=2 if len(runs) > 1 else 1)
  fig.suptitle(' vs '.join(f'{name} ({"solid" if n == 0 else "dashed"})'
                          for n, (name, _) in enumerate(runs)) if len(runs) > 1 else runs[0][0])
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


@cli.main
def main(argv) -> int:
  return cli.plot_runs(argv, __doc__, read_telemetry, plot)


if __name__ == '__main__':
  sys.exit(main())
