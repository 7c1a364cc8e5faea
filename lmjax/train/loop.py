"""The training loop shared by every stage. Reads top to bottom in named sections:
setup -> data -> state (restore or init) -> compile -> train (log, eval, checkpoint) -> sample.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import generate, sharding
from lmjax.data import pipeline
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.models import transformer
from lmjax.train import metrics as metrics_lib
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib

log = logging.getLogger('lmjax')

# Fields that define the parameter shapes; a checkpoint can only resume with equal ones.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim',
             'd_ff', 'tie_embeddings', 'qkv_bias', 'param_dtype')


class TrainingError(RuntimeError):
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
  """SIGTERM (sent by Cloud TPU VMs before maintenance) -> save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._prev = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def check_batch(cfg, mesh) -> None:
  dp = sharding.data_parallel_size(mesh, cfg.rules)
  micro = cfg.train.global_batch // cfg.train.grad_accum
  if micro % dp:
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) / train.grad_accum '
        f'({cfg.train.grad_accum}) = {micro} sequences per micro-batch is not divisible '
        f'by the data-parallel size {dp} (mesh axes {cfg.rules.batch})')
  if cfg.train.global_batch % jax.process_count():
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) is not divisible by the '
        f'{jax.process_count()} processes')


def check_resumable(saved_cfg, cfg, where: str) -> None:
  diff = [k for k in ARCH_KEYS if saved_cfg.model[k] != cfg.model[k]]
  if diff:
    detail = ', '.join(f'model.{k}: checkpoint {saved_cfg.model[k]!r} vs config {cfg.model[k]!r}'
                       for k in diff)
    raise ckpt_lib.CheckpointError(
        f'the checkpoint in {where} was trained with a different model ({detail}); '
        'use a new --workdir or the same model config')


def evaluate(eval_step, params, cfg, tok, mesh, process_index, process_count) -> dict:
  """Mean next-token loss over up to cfg.train.eval_batches batches of the eval split."""
  it = pipeline.make_lm_iterator(cfg, tok, cfg.data.eval_split,
                                 batch_size=cfg.train.global_batch // process_count,
                                 process_index=process_index, process_count=process_count,
                                 repeat=False)
  total, count = 0.0, 0.0
  for _, batch in zip(range(cfg.train.eval_batches), it):
    nll, n = eval_step(params, sharding.place_batch(batch, mesh, cfg.rules))
    total, count = total + float(nll), count + float(n)
  if count == 0:
    raise TrainingError(f'eval split {cfg.data.eval_split!r} gave no full batch of '
                        f'{cfg.train.global_batch} x {cfg.data.seq_len} tokens')
  return {'eval_loss': total / count, 'eval_ppl': math.exp(min(total / count, 50.0)),
          'eval_tokens': count}


def train(cfg, workdir: str, devices=None, stop_after: int | None = None) -> Result:
  """Runs (or resumes) the run described by `cfg` in `workdir`.

  `stop_after`: save and return once this step is reached, as a preemption would
  (the schedule still runs to cfg.train.steps; run again to continue).
  """
  # ---- Setup: config, devices, mesh -------------------------------------------------
  config_lib.validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batch(cfg, mesh)
  pi, pc = jax.process_index(), jax.process_count()
  _print(f'lmjax: {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind} | '
         f'mesh {dict(mesh.shape)} | workdir {workdir}')

  # ---- Data: tokenizer and the training stream --------------------------------------
  tok = tokenizer_lib.load_tokenizer(cfg)
  train_iter = pipeline.make_lm_iterator(
      cfg, tok, cfg.data.train_split, batch_size=cfg.train.global_batch // pc,
      process_index=pi, process_count=pc, seed=cfg.seed)

  # ---- State: resume from the workdir's latest checkpoint, or initialise ------------
  setup = state_lib.make_setup(cfg, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, cfg)
  if ckpt.latest_step() is not None:
    check_resumable(ckpt.read_config(), cfg, ckpt.directory)
    state = ckpt.restore(setup.abstract_state, data_iter=train_iter)
    _print(f'resumed from step {int(state["step"])} ({ckpt.directory})')
  else:
    state = state_lib.init_state(cfg, setup)
  start = int(state['step'])
  _print(f'model: {setup.n_params / 1e6:.2f}M params | {cfg.model.n_layers} layers, '
         f'd_model {cfg.model.d_model}, vocab {cfg.model.vocab_size}')

  # ---- Compile up front, report memory ----------------------------------------------
  train_step = step_lib.make_train_step(cfg, setup)
  eval_step = step_lib.make_eval_step(cfg, setup)
  seq, gb = cfg.data.seq_len, cfg.train.global_batch
  batch_sh = sharding.batch_sharding(mesh, cfg.rules)
  batch_spec = {k: jax.ShapeDtypeStruct((gb, seq), jnp.float32 if k == 'loss_mask' else jnp.int32,
                                        sharding=batch_sh)
                for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')}
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
  _print(f'compiled train step in {compile_s:.1f}s{mem_txt}')

  flops_per_step = transformer.flops_per_token(cfg.model, seq) * gb * seq
  peak = metrics_lib.peak_flops(mesh.devices.flat[0])
  n_dev = mesh.devices.size
  writer = metrics_lib.MetricWriter(workdir)
  history, evals = [], []
  stopped_early = False

  def run_eval(step):
    e = evaluate(eval_step, state['params'], cfg, tok, mesh, pi, pc)
    writer.write(step, e)
    evals.append({'step': step, **e})
    return e

  def save(step, force=False):
    ckpt.save(step, state, cfg, data_iter=train_iter, force=force)

  # ---- Train -------------------------------------------------------------------------
  progress = None
  if cfg.train.progress_bar and pi == 0:
    from tqdm.auto import tqdm
    progress = tqdm(total=cfg.train.steps, initial=start, desc='train', dynamic_ncols=True)
  if start == 0 and cfg.train.eval_every > 0:
    e = run_eval(0)
    _print(f'step 0: eval_loss {e["eval_loss"]:.4f}')
  window_t, window_steps, data_s = time.perf_counter(), 0, 0.0
  with _Preemption() as preempt:
    for step in range(start, cfg.train.steps):
      t_data = time.perf_counter()
      batch = sharding.place_batch(next(train_iter), mesh, cfg.rules)
      data_s += time.perf_counter() - t_data
      with jax.transfer_guard('disallow'):  # no implicit host<->device copies in the step
        state, m = compiled(state, batch)
      window_steps += 1
      done = step + 1
      if progress is not None:
        progress.update(1)

      if done % cfg.train.log_every == 0 or done == cfg.train.steps:
        m = jax.device_get(m)
        if not np.isfinite(m['loss']) or not np.isfinite(m['grad_norm']):
          raise TrainingError(
              f'non-finite loss {m["loss"]} / grad norm {m["grad_norm"]} at step {done}; '
              f'last checkpoint: step {ckpt.latest_step()} in {ckpt.directory}')
        dt = time.perf_counter() - window_t
        tps = window_steps * gb * seq / dt
        m = {k: float(v) for k, v in m.items()}
        m.update(tokens_per_s=tps, step_s=dt / window_steps, data_wait_frac=data_s / dt,
                 mfu=(flops_per_step * window_steps / dt / (peak * n_dev)) if peak else None)
        writer.write(done, m)
        history.append({'step': done, **m})
        if progress is not None:
          progress.set_postfix(loss=f'{m["loss"]:.3f}', tok_s=f'{tps:,.0f}')
        window_t, window_steps, data_s = time.perf_counter(), 0, 0.0

      if cfg.train.eval_every > 0 and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
        e = run_eval(done)
        msg = f'step {done}: eval_loss {e["eval_loss"]:.4f}'
        (progress.write(msg) if progress is not None else _print(msg))

      if preempt.requested or done == stop_after:
        _print(f'{"SIGTERM" if preempt.requested else "stop_after"}: saving a checkpoint '
               f'at step {done} and exiting')
        save(done, force=True)
        stopped_early = True
        break
      if (cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
        if done % cfg.train.log_every:  # never checkpoint params we have not checked
          loss = float(jax.device_get(m['loss']))
          if not np.isfinite(loss):
            raise TrainingError(f'non-finite loss {loss} at step {done}; not saving')
        save(done)
  if progress is not None:
    progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  # ---- Sample ------------------------------------------------------------------------
  text = None
  if cfg.train.sample_at_end and not stopped_early:
    s = cfg.sample
    text = generate.sample(setup.graphdef, state['params'], tok, [s.prompt],
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, seed=cfg.seed)[0]
    _print(f'--- sample (prompt {s.prompt!r}) ---\n{s.prompt}{text}\n---')
  return Result(state=state, setup=setup, tokenizer=tok, history=history, evals=evals,
                sample=text, stopped_early=stopped_early)
