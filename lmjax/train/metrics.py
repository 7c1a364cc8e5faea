"""Metric writers (JSONL, TensorBoard and, optionally, Weights & Biases), the peak-FLOPs
table behind MFU, and a count of a traced step's matmuls by operand dtype."""

from __future__ import annotations

import json
import os
import secrets
import string
import time

import jax

from lmjax.config import ConfigError

# Dense bf16 peak FLOP/s per device (datasheets). Keyed by substrings of device_kind.
PEAK_FLOPS = (
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('TPU v6', 918e12),     # Trillium (v6e)
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5e', 197e12),
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
)


def peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device, or None where unknown (CPU): MFU is then not reported."""
  kind = (device or jax.devices()[0]).device_kind
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


# <workdir>/WANDB_ID_FILE holds the id of the run's Weights & Biases run, so that every
# start of the run in this workdir logs to the same one.
WANDB_ID_FILE = 'wandb_run_id'
WANDB_INSTALL = 'pip install -e ".[wandb]"'


def wandb_enabled(wb) -> bool:
  """Whether the config group cfg.train.wandb asks for a Weights & Biases run."""
  return bool(wb.project) and wb.mode != 'disabled'


def check_wandb(wb) -> None:
  """A ConfigError, before anything expensive, when cfg.train.wandb (`wb`) asks for
  Weights & Biases and wandb is not installed."""
  if not wandb_enabled(wb):
    return
  try:
    import wandb  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise ConfigError(f'train.wandb.project={wb.project!r} asks for Weights & Biases, but '
                      f'wandb is not installed: {WANDB_INSTALL} (or pip install wandb), or '
                      "set train.wandb.project=''") from None


class _Wandb:
  """A Weights & Biases run for a workdir: the config as wandb's config, scalars by step.
  The first start of the run picks an id and keeps it in <workdir>/WANDB_ID_FILE; later
  starts (resumes) continue that run (resume='allow'). Its files go to $WANDB_DIR, else
  the workdir."""

  def __init__(self, wb, workdir: str, config: dict | None):
    import wandb  # pylint: disable=import-outside-toplevel
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    run_id = None
    if os.path.exists(id_path):
      with open(id_path, encoding='utf-8') as f:
        run_id = f.read().strip() or None
    new = run_id is None
    if new:  # wandb's id alphabet; not the `random` module, which a caller may have seeded
      run_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    kwargs = dict(project=wb.project, entity=wb.entity or None,
                  name=wb.name or os.path.basename(os.path.abspath(workdir)),
                  tags=[t.strip() for t in wb.tags.split(',') if t.strip()] or None,
                  config=config, id=run_id, resume='allow')
    if wb.mode:  # '': wandb's own default ($WANDB_MODE, else online)
      kwargs['mode'] = wb.mode
    if not os.environ.get('WANDB_DIR'):
      kwargs['dir'] = workdir
    try:
      self.run = wandb.init(**kwargs)
    except wandb.errors.Error as e:  # e.g. online without an API key
      raise ConfigError(f'train.wandb: wandb.init failed ({e}); run wandb login, or set '
                        "train.wandb.mode='offline' (sync later with wandb sync)") from None
    if new:
      with open(id_path, 'w', encoding='utf-8') as f:
        f.write(run_id + '\n')

  def log(self, step: int, scalars: dict) -> None:
    self.run.log(scalars, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricWriter:
  """Appends {'step', 'time', **metrics} lines to <workdir>/metrics.jsonl and writes
  TensorBoard scalars to <workdir>/tb and, when `wandb` (the cfg.train.wandb group) names a
  project, the same scalars at the same steps to a Weights & Biases run with `config` (a
  dict) as its config. Only process 0 writes. A resumed run first writes
  {'step': S, 'time', 'resumed_from': S}: the lines after S before it belong to steps the
  run does again (read_jsonl drops them; wandb, whose steps only grow, keeps the values
  first logged up to its last step). A rewind (train.on_spike=rewind) writes such a marker
  too, with the rewind's record."""

  def __init__(self, workdir: str, tensorboard: bool = True, wandb=None,
               config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = None
    self._tb = None
    self._wandb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, 'a', encoding='utf-8')
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      if wandb is not None and wandb_enabled(wandb):
        check_wandb(wandb)
        self._wandb = _Wandb(wandb, workdir, config)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
    self._file.write(json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n')
    self._file.flush()
    scalars = {k: v for k, v in clean.items() if v is not None}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(int(step), scalars)

  def resumed(self, step: int, **extra) -> None:
    """Marks that the run continues from its checkpoint at `step` (`extra`: more entries
    of the marker line)."""
    if self.enabled:
      self._file.write(json.dumps({'step': int(step), 'time': time.time(),
                                   'resumed_from': int(step), **extra}) + '\n')
      self._file.flush()

  def rewound(self, step: int, record: dict) -> None:
    """Marks a rewind to the checkpoint of `step` (train.on_spike=rewind; `record`: the
    spike's step, why, and the data batches skipped): as a resume marker, so read_jsonl
    drops the abandoned steps after `step`, with the record."""
    self.resumed(step, rewind=record)

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def matmuls(closed_jaxpr) -> list[tuple]:
  """Every dot_general of a jaxpr, nested jaxprs included (scan bodies counted `length`
  times; remat, pjit, custom_vjp): (lhs aval, rhs aval, precision, FLOPs) each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top
  found = []

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        (contract, _), _ = eqn.params['dimension_numbers']
        k = int(np.prod([lhs.shape[i] for i in contract]))
        flops = 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k * times
        found.append((lhs, rhs, eqn.params.get('precision'), flops))
      inner = times * (eqn.params['length'] if eqn.primitive.name == 'scan' else 1)
      for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else (v,):
          if isinstance(sub, jcore.ClosedJaxpr):
            walk(sub.jaxpr, inner)
          elif isinstance(sub, jcore.Jaxpr):
            walk(sub, inner)

  walk(closed_jaxpr.jaxpr, 1)
  return found


def read_jsonl(path: str, raw: bool = False) -> list[dict]:
  """The records of a metrics.jsonl, as the run's final history: at each resume marker
  ({'resumed_from': S}) the records of steps after S written before it are dropped (the
  resumed run did those steps again), and of two records of one step and kind (train
  metrics, or eval metrics) the last is kept. Markers stay in the list. raw=True: every
  line as written."""
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if raw:
    return rows
  kind = lambda r: ('resume' if 'resumed_from' in r
                    else 'eval' if any(k.startswith('eval') for k in r) else 'train')
  out: list = []    # records in order; None where a later one replaced it
  where: dict = {}  # (step, kind) -> index in out
  for r in rows:
    if 'resumed_from' in r:  # a timeline's steps only grow: drop its tail after S
      while out and (out[-1] is None or out[-1]['step'] > r['resumed_from']):
        dropped = out.pop()
        if dropped is not None:
          del where[(dropped['step'], kind(dropped))]
    key = (r['step'], kind(r))
    if key in where:
      out[where[key]] = None
    where[key] = len(out)
    out.append(r)
  return [r for r in out if r is not None]
