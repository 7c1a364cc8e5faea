"""The training loop shared by every objective. Reads top to bottom in named sections:
setup -> data -> state (resume, start from init_from, or init) -> compile ->
train (log, eval, checkpoint) -> sample.

What differs between pretraining, SFT and DPO is the objective's (train/objectives,
chosen by cfg.stage): its batches, loss and normaliser, extra state (DPO's reference),
eval summary, exact-match questions and host-side counters. The loop asks none of them
which objective runs. Each trains every weight or, with cfg.lora.enabled, LoRA adapters on
the frozen init_from model (adapter-only checkpoints whose meta points to that base).

Every step's loss is judged (train/spikes.py: fine, stop, or rewind to the last checkpoint
before a spike and skip the batches after it, train.on_spike) at the steps that log,
evaluate or checkpoint, before they do. With train.telemetry the steps that log run a
second compiled step that also returns the stability statistics.

Continued pretraining: with cfg.init_from.path set and no checkpoint in the workdir yet,
the params come from that run (resharded onto this mesh), with a fresh optimizer at step 0
and, unless tokenizer.path is set, that run's tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import distributed, generate, provenance, sharding, weights
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import UserError
from lmjax.models import lora as lora_lib
from lmjax.models import moe as moe_lib
from lmjax.models import transformer
from lmjax.train import compat, objectives
from lmjax.train import metrics as metrics_lib
from lmjax.train import spikes as spikes_lib
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib

log = logging.getLogger('lmjax')

class TrainingError(UserError, RuntimeError):
  pass


@dataclasses.dataclass
class Result:
  state: dict
  setup: state_lib.Setup
  tokenizer: object
  history: list          # every logged train metric dict (with 'step')
  evals: list            # every eval dict (with 'step')
  sample: str | None
  stopped_early: bool


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _Preemption:
  """SIGTERM (sent by Cloud TPU VMs before maintenance) or a first Ctrl-C (SIGINT) -> save
  at the end of the current step and exit cleanly; a second Ctrl-C stops at once
  (KeyboardInterrupt), losing only the steps since the last checkpoint."""

  def __init__(self):
    self.requested = None  # the name of the signal that asked to stop
    self._prev = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._prev[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested == 'Ctrl-C':
      raise KeyboardInterrupt  # the second Ctrl-C
    if signum == signal.SIGINT:
      _print('Ctrl-C: saving a checkpoint at the end of this step, then exiting '
             '(Ctrl-C again to stop at once)')
    self.requested = 'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'

  def __exit__(self, *exc):
    for sig, prev in self._prev.items():
      signal.signal(sig, prev)


def check_batch(cfg, mesh, objective=None) -> None:
  """ConfigError unless a micro-batch's rows (train.global_batch / train.grad_accum
  examples, objective.rows_per_example rows each) split over the data-parallel devices and
  the global batch over the processes."""
  objective = objectives.get(cfg) if objective is None else objective
  dp = sharding.data_parallel_size(mesh, cfg.rules)
  micro = cfg.train.global_batch // cfg.train.grad_accum * objective.rows_per_example
  if micro % dp:
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) / train.grad_accum '
        f'({cfg.train.grad_accum}) = {micro} rows per micro-batch is not divisible '
        f'by the data-parallel size {dp} (mesh axes {cfg.rules.batch})')
  if cfg.train.global_batch % jax.process_count():
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) is not divisible by the '
        f'{jax.process_count()} processes')


class WorkdirError(TrainingError):
  """The run directory cannot be used (a file, not writable)."""


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that this process can write there: a clear
  WorkdirError now rather than an OSError after restoring and compiling."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory; choose a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write-test-'):
      pass
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir} is not writable ({e.strerror or e}); choose a '
                       'writable directory') from None


def _eval_line(step: int, e: dict) -> str:
  def name(k):
    return k[5:-5] if k.endswith('/loss') else k[5:]
  shown = lambda k: k.startswith('eval/') and not k.startswith(('eval/logps/', 'eval/rewards/c',
                                                                 'eval/rewards/rej'))
  named = ''.join(f', {name(k)} {v:.4f}' for k, v in e.items() if shown(k))
  if 'eval_loss' not in e:  # an online objective's eval: rewards, no loss
    return f'step {step}: eval{named[1:]}'
  return f'step {step}: eval_loss {e["eval_loss"]:.4f}{named}'


def train(cfg, workdir: str, devices=None, stop_after: int | None = None) -> Result:
  """Runs (or resumes) the run described by `cfg` in `workdir`.

  `stop_after`: save and return once this step is reached, as a preemption would
  (the schedule still runs to cfg.train.steps; run again to continue).
  """
  # ---- Setup: config, devices, mesh, objective, where the run starts ----------------
  config_lib.validate(cfg)
  distributed.initialize(cfg)  # multi-process runs (a no-op if started already, or single)
  check_workdir(workdir)  # before anything expensive
  mesh = sharding.make_mesh(cfg.mesh, devices)
  objective = objectives.get(cfg)
  check_batch(cfg, mesh, objective)
  pi, pc = jax.process_index(), jax.process_count()
  if pi == 0:  # the process that logs: wandb installed if train.wandb asks for it
    metrics_lib.check_wandb(cfg.train.wandb)
  _print(f'lmjax: {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind} | '
         f'mesh {dict(mesh.shape)} | workdir {workdir}')
  setup = state_lib.make_setup(cfg, mesh, objective)
  ckpt = ckpt_lib.Checkpointer(workdir, cfg)
  resumed_meta, source = None, None
  if ckpt.latest_step() is not None:
    compat.check_resumable(ckpt.read_config(), cfg, ckpt.directory)
    resumed_meta = ckpt.read_meta()
    if setup.needs_base:  # LoRA's frozen base / DPO's reference: the recorded init_from
      if not resumed_meta.get('init_from'):
        raise ckpt_lib.CheckpointError(f'{ckpt.directory} holds no run started from a base '
                                       'model (no init_from in its meta): use a new --workdir')
      source = weights.base_source(resumed_meta['init_from'], ckpt.directory)
    elif cfg.init_from.path:
      _print(f'init_from.path ignored: resuming this workdir\'s own checkpoint '
             f'(step {ckpt.latest_step()})')
  elif cfg.init_from.path:
    source = weights.open_init_source(cfg.init_from)
    compat.check_init_source(source, cfg)
  run_meta = {'init_from': (resumed_meta or {}).get('init_from'),
              'provenance': provenance.collect(mesh.devices.flat),  # source, versions, devices
              'rewinds': list((resumed_meta or {}).get('rewinds', []))}  # train.on_spike
  if source is not None:
    run_meta['init_from'] = {'path': source.path, 'format': source.format, 'step': source.step}
  for key in ckpt_lib.HF_META_KEYS:  # an HF source model's config files, kept for export
    run_meta[key] = (resumed_meta.get(key) if resumed_meta is not None
                     else getattr(source, key, None))
  load_base = lambda: source.load_params(cfg, setup)  # resharded onto this mesh

  # ---- Data: tokenizer, the data check, the objective's tables, the stream ----------
  tok = tokenizer_lib.run_tokenizer(cfg, resumed_meta, source)
  run_meta['tokenizer'] = tok.location
  # degenerate records counted (and dropped by index); no eval split, no eval
  checked = objective.check_data(tok, log=_print)
  run_meta['data_check'] = checked.meta
  eval_every = cfg.train.eval_every if checked.has_eval else 0
  splits = [cfg.data.train_split] + ([cfg.data.eval_split] if eval_every > 0 else [])
  objective.prepare(setup, tok, splits, workdir=workdir, base=run_meta['init_from'],
                    load_base=load_base)  # e.g. DPO's precomputed reference log-probs
  train_iter = objective.data_iterator(tok, cfg.data.train_split,
                                       batch_size=cfg.train.global_batch // pc,
                                       process_index=pi, process_count=pc, seed=cfg.seed,
                                       keep=checked.keep)
  # exact match: the first N questions of the objective's own eval data (none: skipped)
  em_examples = objective.answer_examples(tok, cfg.data.eval_split) if eval_every > 0 else []

  # ---- State: resume the workdir's latest checkpoint, start from init_from, or init --
  if resumed_meta is not None:
    state = ckpt.restore(setup.abstract_saved, data_iter=train_iter)
    state = setup.rebuild(state, load_base)  # LoRA's frozen base, DPO's reference copy
    _print(f'resumed from step {int(state["step"])} ({ckpt.directory})')
  elif source is not None:
    state = state_lib.init_state(cfg, setup, params=load_base())
    _print(f'params from init_from {source}; fresh optimizer state, step 0; '
           f'tokenizer {tok.location}')
  else:
    state = state_lib.init_state(cfg, setup)
  start = int(state['step'])
  # data batches read so far (the step count unless a rewind skipped some)
  data_pos = int((resumed_meta or {}).get('data_batches', start))
  _print(f'model: {setup.n_params / 1e6:.2f}M params | {cfg.model.n_layers} layers, '
         f'd_model {cfg.model.d_model}, vocab {cfg.model.vocab_size} | stage {objective.name}'
         + (f' | {moe_lib.describe(cfg.model)}' if transformer.is_moe(cfg.model) else ''))
  slow = moe_lib.dropless_warning(cfg.model)
  if slow:
    _print(f'warning: {slow}')
  if setup.lora is not None:
    _print(f'{lora_lib.describe(cfg)} ({setup.n_trainable / setup.n_params:.2%} of the '
           f'model); base {cfg.lora.base_dtype}, frozen')

  # ---- Compile up front, report memory ----------------------------------------------
  train_step = step_lib.make_train_step(cfg, setup, telemetry=False)
  eval_step = objective.eval_step(setup)
  merged = step_lib.make_merge(setup)  # weights -> params to generate with
  seq, gb = cfg.data.seq_len, cfg.train.global_batch * objective.rows_per_example  # rows
  batch_spec = step_lib.batch_spec(cfg, mesh, gb, objective)
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh, cfg.rules):
    compiled = train_step.jitted.lower(setup.abstract_state, batch_spec).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_txt = ''
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    mem_txt = f' | step memory {total / 2**20:.1f} MiB per device'
  compiled_log = compiled  # the step that ends a log window: with telemetry, its own
  if cfg.train.telemetry:
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh, cfg.rules):
      compiled_log = step_lib.make_train_step(cfg, setup, telemetry=True).jitted.lower(
          setup.abstract_state, batch_spec).compile()
    mem_txt += (f' (+{time.perf_counter() - t0:.1f}s: the same step with telemetry, run at '
                'log steps)')
  _print(f'compiled train step in {compile_s:.1f}s{mem_txt}')

  flops_per_step = transformer.flops_per_token(cfg.model, seq) * gb * seq
  peak = metrics_lib.peak_flops(mesh.devices.flat[0])
  n_dev = mesh.devices.size
  writer = metrics_lib.MetricWriter(workdir, wandb=cfg.train.wandb,
                                    config=config_lib.to_dict(cfg))
  if resumed_meta is not None:
    writer.resumed(start)
  if pi == 0:  # <workdir>/run.json: one entry per start of the run
    provenance.record_start(workdir, run_meta['provenance'], start)
  history, evals = [], []
  stopped_early = False

  def run_eval(step):
    e = objective.evaluate(eval_step, setup.weights(state), tok, mesh, pi, pc, checked.keep)
    if em_examples:
      em = objective.exact_match(setup.graphdef, merged(setup.weights(state)), tok, mesh,
                                 em_examples)
      e['eval/exact_match'] = em['accuracy']
    writer.write(step, e)
    evals.append({'step': step, **e})
    return e

  def save(step, force=False):
    meta = dict(run_meta, rewinds=list(run_meta['rewinds']), data_batches=data_pos)
    ckpt.save(step, setup.saved(state), cfg, data_iter=train_iter, force=force, meta=meta)

  def read():
    nonlocal data_pos
    data_pos += 1
    return next(train_iter)

  def next_batch(step):
    """(the step's device batch, seconds spent reading it): as read, or for an online
    objective sampled from the current policy (rollout metrics kept for the log)."""
    t = time.perf_counter()
    host = read()
    read_s = time.perf_counter() - t
    host, rollout_m = objective.rollout(setup, tok, state, host, step, more=read)
    if rollout_m:
      window_rollout.append(rollout_m)
    host, counts = objective.split_batch(host)  # counted here, not on device
    window_counts[:] += counts
    step_lib.check_host_batch(cfg, host)
    return sharding.place_batch(host, mesh, cfg.rules), read_s

  def log_counts():
    """The objective's counters over this log window, summed over all processes."""
    counts = window_counts.copy()
    if pc > 1:
      counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    window_counts[:] = 0
    return {name: float(c) for name, c in zip(objective.counters, counts)}

  # ---- Train -------------------------------------------------------------------------
  progress = None
  if cfg.train.progress_bar and pi == 0:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=cfg.train.steps, initial=start, desc='train', dynamic_ncols=True)
  def report(msg):  # above the progress bar, when there is one
    (progress.write(msg) if progress is not None else _print(msg))

  monitor = spikes_lib.SpikeMonitor(cfg.train)
  pending = []  # (step, data position after it, its loss values on device), not yet judged

  def judge():
    """Every pending step's verdict (spikes.SpikeMonitor), in order: None when all are
    ok, else the step to continue from after a rewind; a stop raises TrainingError."""
    values = jax.device_get([v for _, _, v in pending])
    steps = [(done, pos) for done, pos, _ in pending]
    pending.clear()
    for (done, pos), v in zip(steps, values):
      verdict = monitor.observe(done, v)
      if verdict.action == 'stop':
        hint = ('' if state_lib.guarded(cfg) or 'non-finite' not in verdict.reason
                else '; train.skip_bad_steps=True skips such steps, train.on_spike=rewind '
                'rewinds to the last checkpoint')
        raise TrainingError(f'{verdict.reason} at step {done}; last checkpoint: step '
                            f'{ckpt.latest_step()} in {ckpt.directory}{hint}')
      if verdict.action == 'rewind':
        return rewind(done, pos, verdict.reason)
    return None

  def rewind(done, pos, reason):
    """Restores the last checkpoint before step `done` (a spike), skips the data batches
    after it (loss_spike.skip_batches, and at least through the spike's own): the step
    to continue from."""
    nonlocal state, data_pos, window_t, window_steps, data_s
    ckpt.wait()
    before = [s for s in ckpt.all_steps() if s < done]
    if not before:
      raise TrainingError(f'{reason} at step {done}, and no checkpoint before it to rewind '
                          f'to (train.on_spike=rewind): save one sooner (checkpoint.every)')
    limit = cfg.train.loss_spike.max_rewinds
    if len(run_meta['rewinds']) >= limit:
      raise TrainingError(f'{reason} at step {done}, after {limit} rewinds '
                          f'(train.loss_spike.max_rewinds); last checkpoint: step '
                          f'{ckpt.latest_step()} in {ckpt.directory}')
    back = before[-1]
    frozen = {k: v for k, v in state.items() if k in setup.unsaved()}  # never change
    state = {**ckpt.restore(setup.abstract_saved, step=back, data_iter=train_iter), **frozen}
    data_pos = int(ckpt.read_meta(back).get('data_batches', back))
    skip_to = max(data_pos + cfg.train.loss_spike.skip_batches, pos)
    first = data_pos
    while data_pos < skip_to:  # the iterator advances exactly: read and dropped
      read()
    record = {'step': done, 'reason': reason, 'restored_step': back,
              'skipped_batches': [first, skip_to]}
    run_meta['rewinds'].append(record)
    writer.rewound(back, record)
    history[:] = [h for h in history if h['step'] <= back]
    evals[:] = [e for e in evals if e['step'] <= back]
    monitor.rewound(back)
    window_counts[:] = 0
    window_rollout.clear()
    window_t, window_steps, data_s = time.perf_counter(), 0, 0.0
    if progress is not None:
      progress.n = back
      progress.refresh()
    report(f'step {done}: {reason}; rewound to the checkpoint of step {back} and skipped '
           f'data batches {first}..{skip_to - 1} (train.on_spike=rewind)')
    return back

  if start == 0 and eval_every > 0:
    report(_eval_line(0, run_eval(0)))
  window_t, window_steps, data_s = time.perf_counter(), 0, 0.0
  window_counts = np.zeros(len(objective.counters), np.int64)  # this process's, since the last log
  window_rollout = []  # an online objective's rollout metrics since the last log
  watched = ('loss', 'grad_norm', 'skipped', 'skipped_in_a_row')  # what SpikeMonitor judges
  step = start
  try:
    with _Preemption() as preempt:
      while step < cfg.train.steps:
        batch, read_s = next_batch(step)
        data_s += read_s
        logs = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
        with jax.transfer_guard('disallow'):  # no implicit host<->device copies in the step
          state, m = (compiled_log if logs else compiled)(state, batch)
        window_steps += 1
        done = step = step + 1
        pending.append((done, data_pos, {k: m[k] for k in watched if k in m}))
        if progress is not None:
          progress.update(1)

        evals_now = eval_every > 0 and (done % eval_every == 0 or done == cfg.train.steps)
        stops = bool(preempt.requested) or done == stop_after
        saves = stops or done == cfg.train.steps or (
            cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0)
        if logs or evals_now or saves:  # judge the steps so far: never log, eval or save a spike
          back = judge()
          if back is not None:
            step = back
            continue

        if logs:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          dt = time.perf_counter() - window_t
          tps = window_steps * gb * seq / dt
          m.update(tokens_per_s=tps, step_s=dt / window_steps, data_wait_frac=data_s / dt,
                   mfu=(flops_per_step * window_steps / dt / (peak * n_dev)) if peak else None)
          m.update(log_counts())
          if cfg.train.telemetry:
            m['stability/spike_score'] = monitor.spike_score()
          if cfg.train.on_spike == 'rewind':
            m['rewinds'] = float(len(run_meta['rewinds']))
          if window_rollout:  # an online objective's rollouts, averaged over the window
            m.update({k: float(np.mean([r[k] for r in window_rollout if k in r]))
                      for k in window_rollout[-1]})
            window_rollout.clear()
            parts = [v for k, v in m.items() if k.startswith('time/')]
            if parts:  # the rest of the step: the update (and reading the data)
              m['time/update_s'] = max(m['step_s'] - sum(parts), 0.0)
          writer.write(done, m)
          history.append({'step': done, **m})
          if progress is not None:
            shown = dict(loss=f'{m["loss"]:.3f}', tok_s=f'{tps:,.0f}')
            if 'reward' in m:
              shown['reward'] = f'{m["reward"]:.3f}'
            if 'rollout_tokens_per_s' in m:
              shown['gen_tok_s'] = f'{m["rollout_tokens_per_s"]:,.0f}'
            progress.set_postfix(**shown)
          window_t, window_steps, data_s = time.perf_counter(), 0, 0.0

        if evals_now:
          report(_eval_line(done, run_eval(done)))

        if stops:
          _print(f'{preempt.requested or "stop_after"}: saving a checkpoint at step {done} and '
                 'exiting')
          save(done, force=True)
          stopped_early = True
          break
        if saves:
          save(done)
  finally:  # also when a stop raises: a sweep in one process goes on cleanly
    if progress is not None:
      progress.close()
    ckpt.wait()
    ckpt.close()
    train_iter.close()  # stops grain's prefetch and read threads
    writer.close()

  # ---- Sample ------------------------------------------------------------------------
  text = None
  if cfg.train.sample_at_end and not stopped_early:
    s = cfg.sample
    prompt, ids = objective.sample_prompt(tok, s.prompt)  # chat: a user turn, templated
    text = generate.sample(setup.graphdef, merged(setup.weights(state)), tok, [ids],
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, seed=cfg.seed)[0]
    _print(f'--- sample (prompt {s.prompt!r}) ---\n{prompt}{text}\n---')
  return Result(state=state, setup=setup, tokenizer=tok, history=history, evals=evals,
                sample=text, stopped_early=stopped_early)
