"""Loss spikes: what the train loop does about a step's loss, decided in one place.

The loop hands every step's loss (and gradient norm, and train.skip_bad_steps' counts) to
`SpikeMonitor.observe`, in the order the steps ran. The values are fetched from the device
in groups, at the steps that log, evaluate or checkpoint, so the host never waits on a
single step otherwise; a checkpoint is saved only after every step before it was judged.

A step is
  - skipped: train.skip_bad_steps applied no update (judged by the step itself, on its
    gradient norm): ok, unless more than train.max_skips_in_a_row came in a row (stop);
  - a spike: its loss or gradient norm is non-finite or, with train.loss_spike.factor > 0,
    its loss exceeds factor x the mean loss of the previous train.loss_spike.window steps
    (judged once 10 of them are in): train.on_spike says stop or rewind;
  - ok otherwise.
It also keeps the spike score (OLMo 2): the fraction of the steps since this start of the
run whose loss lay more than 7 standard deviations above the mean of the previous 1000
(judged once 20 are in), a measure that never acts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCORE_SIGMAS = 7.0
SCORE_WINDOW = 1000
SCORE_MIN = 20    # previous steps before the score judges one
FACTOR_MIN = 10   # previous steps before loss_spike.factor judges one


@dataclasses.dataclass(frozen=True)
class Verdict:
  action: str   # 'ok', 'stop' or 'rewind'
  reason: str = ''


OK = Verdict('ok')


class SpikeMonitor:
  """Judges each step's loss (see the module docstring) and keeps the spike score."""

  def __init__(self, train_cfg):
    self.on_spike = train_cfg.on_spike
    self.factor = float(train_cfg.loss_spike.factor)
    self.window = int(train_cfg.loss_spike.window)
    self.max_skips = int(train_cfg.max_skips_in_a_row)
    self.steps: list[int] = []      # the judged, accepted steps, in order
    self.losses: list[float] = []   # their losses
    self.flagged: list[bool] = []   # whether the spike score counts each

  def observe(self, step: int, values: dict) -> Verdict:
    """The verdict on the step that ended at `step` (1-based, as logged) with `values`:
    'loss' and 'grad_norm', and with train.skip_bad_steps 'skipped' and
    'skipped_in_a_row'."""
    in_a_row = int(values.get('skipped_in_a_row', 0))
    if in_a_row > self.max_skips:
      return Verdict('stop', f'{in_a_row} steps in a row skipped (train.skip_bad_steps; the '
                             f'last: loss {values["loss"]}, grad norm {values["grad_norm"]})')
    if bool(values.get('skipped', False)):
      return OK
    loss, norm = float(values['loss']), float(values['grad_norm'])
    if not (math.isfinite(loss) and math.isfinite(norm)):
      return Verdict(self.on_spike, f'non-finite loss {loss} / grad norm {norm}')
    prev = self.losses[-self.window:]
    if self.factor and len(prev) >= min(FACTOR_MIN, self.window):
      mean = float(np.mean(prev))
      if mean > 0 and loss > self.factor * mean:
        return Verdict(self.on_spike, f'loss {loss:.4g} above train.loss_spike.factor '
                                      f'{self.factor:g} x the mean of the previous '
                                      f'{len(prev)} steps ({mean:.4g})')
    recent = self.losses[-SCORE_WINDOW:]
    flag = False
    if len(recent) >= SCORE_MIN:
      flag = loss > float(np.mean(recent)) + SCORE_SIGMAS * float(np.std(recent))
    self.steps.append(step)
    self.losses.append(loss)
    self.flagged.append(flag)
    return OK

  def spike_score(self) -> float:
    """The fraction of the accepted steps the 7-sigma test flagged (0 before any)."""
    return float(np.mean(self.flagged)) if self.flagged else 0.0

  def rewound(self, step: int) -> None:
    """Forgets the steps after `step` (a rewind restored the state of `step`)."""
    keep = int(np.searchsorted(np.asarray(self.steps), step, side='right'))
    del self.steps[keep:], self.losses[keep:], self.flagged[keep:]
