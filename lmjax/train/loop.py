"""The training loop shared by every stage. Reads top to bottom in named sections:
setup -> data -> state (resume, start from init_from, or init) -> compile ->
train (log, eval, checkpoint) -> sample.

A stage is a batch format plus a loss, not a loop: cfg.stage='pretrain' reads documents
(data/pipeline.py), 'sft' reads conversations (data/formats.py: loss on assistant tokens
only, overlong counts logged as sft/dropped and sft/truncated, and greedy exact-match
accuracy on the eval split at each eval), 'dpo' reads preference pairs (data/preference.py:
chosen/rejected rows, the DPO loss of train/losses.py against a reference that is the base
with the adapters off, a frozen copy, or log-probs precomputed into the data). Each trains
every weight or, with cfg.lora.enabled, LoRA adapters on the frozen init_from model
(adapter-only checkpoints whose meta points to that base).

Continued pretraining: with cfg.init_from.path set and no checkpoint in the workdir yet,
the params come from that run (resharded onto this mesh), with a fresh optimizer at step 0
and, unless tokenizer.path is set, that run's tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import tempfile
import threading
import time

import jax
import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import distributed, generate, provenance, sharding
from lmjax import evaluate as evaluate_lib
from lmjax.data import check as data_check
from lmjax.data import formats, pipeline, preference
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import NotFoundError, UserError
from lmjax.models import lora as lora_lib
from lmjax.models import transformer
from lmjax.train import metrics as metrics_lib
from lmjax.train import ref_logps
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib

log = logging.getLogger('lmjax')

# Fields that define the parameter shapes; a checkpoint can only resume with equal ones.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim',
             'd_ff', 'tie_embeddings', 'qkv_bias', 'param_dtype')
# Fields that change what the params compute but not their shapes: init_from warns when
# they differ (changing them can be the point, e.g. RoPE scaling for longer contexts).
FUNCTION_KEYS = ('rope_theta', 'rope_scaling', 'norm_eps')


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


def rows_per_example(cfg) -> int:
  """Rows of a batch per train.global_batch unit: 2 for DPO (a pair), else 1."""
  return 2 if cfg.stage == 'dpo' else 1


def check_batch(cfg, mesh) -> None:
  dp = sharding.data_parallel_size(mesh, cfg.rules)
  micro = cfg.train.global_batch // cfg.train.grad_accum * rows_per_example(cfg)
  if micro % dp:
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) / train.grad_accum '
        f'({cfg.train.grad_accum}) = {micro} rows per micro-batch is not divisible '
        f'by the data-parallel size {dp} (mesh axes {cfg.rules.batch})')
  if cfg.train.global_batch % jax.process_count():
    raise config_lib.ConfigError(
        f'train.global_batch ({cfg.train.global_batch}) is not divisible by the '
        f'{jax.process_count()} processes')


def arch_diff(source_model, model) -> list[tuple[str, object, object]]:
  """(key, source value, config value) for each ARCH_KEYS field that differs; only the
  keys `source_model` defines are compared, head_dim 0 as d_model // n_heads."""
  def value(m, k):
    if k == 'head_dim' and not m.get('head_dim'):
      return m['d_model'] // m['n_heads']
    return m[k]
  return [(k, value(source_model, k), value(model, k)) for k in ARCH_KEYS
          if k in source_model and value(source_model, k) != value(model, k)]


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


def lora_diff(saved_cfg, cfg) -> list[tuple[str, object, object]]:
  """(key, checkpoint value, config value) for each LoRA setting that shapes the saved
  state (adapters, their optimizer state) and differs: enabled, rank, the targets and
  train_params (as resolved, so 'q_proj' equals 'q')."""
  a, b = saved_cfg.lora, cfg.lora
  if a.enabled != b.enabled:
    return [('lora.enabled', a.enabled, b.enabled)]
  if not a.enabled:
    return []
  out = [('lora.rank', a.rank, b.rank)] if a.rank != b.rank else []
  if lora_lib.select_targets(a.targets) != lora_lib.select_targets(b.targets):
    out.append(('lora.targets', a.targets, b.targets))
  if lora_lib.full_params(saved_cfg) != lora_lib.full_params(cfg):
    out.append(('lora.train_params', a.train_params, b.train_params))
  return out


def check_resumable(saved_cfg, cfg, where: str) -> None:
  diff = [(f'model.{k}', a, b) for k, a, b in arch_diff(saved_cfg.model, cfg.model)]
  diff += lora_diff(saved_cfg, cfg)
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, a, b in diff)
    raise ckpt_lib.CheckpointError(
        f'the checkpoint in {where} was trained with different settings ({detail}); '
        'use a new --workdir or the checkpoint\'s settings')


def check_init_source(source: ckpt_lib.InitSource, cfg) -> None:
  diff = arch_diff(source.model, cfg.model)
  if source.format == 'hf':  # converted to the config's dtype on load
    diff = [d for d in diff if d[0] != 'param_dtype']
  if diff:
    detail = ', '.join(f'model.{k}: source {a!r} vs config {b!r}' for k, a, b in diff)
    raise config_lib.ConfigError(
        f'init_from {source} has a different model architecture ({detail}); set these '
        'model fields to the source\'s')
  for k in FUNCTION_KEYS:
    theirs = source.model.get(k)
    ours = cfg.model[k].to_dict() if hasattr(cfg.model[k], 'to_dict') else cfg.model[k]
    if k == 'rope_scaling' and theirs is not None and theirs.get('type') == ours['type'] == 'none':
      continue
    if theirs is not None and theirs != ours:
      _print(f'WARNING: init_from {source} has model.{k}={theirs!r}, this config {ours!r}')


def load_tokenizer(cfg, resumed_meta: dict | None,
                   source: ckpt_lib.InitSource | None) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: cfg.tokenizer.path when set; else, for a run from init_from,
  its source's (recorded in the checkpoint meta, so a resumed run keeps it); else the
  default path (trained on the train split if missing)."""
  path, whose = cfg.tokenizer.path, ''
  if not path and resumed_meta and resumed_meta.get('init_from'):
    path, whose = resumed_meta.get('tokenizer', ''), 'this run\'s (checkpoint meta)'
  if not path and source is not None:
    if not source.tokenizer_path:
      raise config_lib.ConfigError(
          f'init_from {source} has no tokenizer (tokenizer.json or tokenizer.model): set '
          'tokenizer.path')
    path, whose = source.tokenizer_path, f'the tokenizer of init_from {source}'
  if not whose:
    return tokenizer_lib.load_tokenizer(cfg)
  if not os.path.exists(path):
    raise NotFoundError(f'{whose} is missing: {path}; set tokenizer.path')
  inherited = cfg.copy_and_resolve_references()
  inherited.tokenizer.update(path=path, train_if_missing=False)
  return tokenizer_lib.load_tokenizer(inherited)


def data_iterator(cfg, tok, split: str, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1, seed: int | None = None, repeat: bool = True,
                  source: str | None = None, refs: dict | None = None,
                  keep: dict | None = None):
  """The stage's batches: documents (pretrain; `source` = a named mixture/eval source),
  conversations (sft) or preference pairs (dpo: batch_size pairs, 2 * batch_size rows,
  with 'ref_logps' from refs[split] when given); sft and dpo rows carry
  'dropped'/'truncated' counts to strip, and read the records keep[split] only when given
  (the data check's: data/check.py). This process's share of cfg.data.shards data
  shards (pipeline.shard_iterator)."""
  kept = (keep or {}).get(split)
  def make(**shard):
    if cfg.stage == 'sft':
      return formats.make_sft_iterator(cfg, tok, split, seed=seed, repeat=repeat, keep=kept,
                                       **shard)
    if cfg.stage == 'dpo':  # batch_size pairs: 2 * batch_size rows
      return preference.make_pair_iterator(cfg, tok, split, ref_logps=(refs or {}).get(split),
                                           seed=seed, repeat=repeat, keep=kept, **shard)
    return pipeline.make_lm_iterator(cfg, tok, split, source=source, seed=seed,
                                     repeat=repeat, **shard)
  return pipeline.shard_iterator(make, cfg.data.shards, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)


def _eval_sums(eval_step, weights, cfg, tok, mesh, process_index, process_count,
               source=None, refs=None, keep=None) -> list:
  """eval_step's outputs (on the host) for cfg.train.eval_batches batches of the eval split
  (repeated if this process's share is shorter)."""
  it = data_iterator(cfg, tok, cfg.data.eval_split,
                     batch_size=cfg.train.global_batch // process_count,
                     process_index=process_index, process_count=process_count,
                     repeat=True, source=source, refs=refs, keep=keep)
  try:
    sums = []
    for _ in range(cfg.train.eval_batches):
      host = {k: v for k, v in next(it).items() if k not in formats.COUNTS}
      step_lib.check_host_batch(cfg, host)
      sums.append(eval_step(weights, sharding.place_batch(host, mesh, cfg.rules)))
  finally:
    it.close()  # stops its prefetch thread
  return jax.device_get(sums)


def evaluate(eval_step, weights, cfg, tok, mesh, process_index, process_count,
             refs=None, keep=None) -> dict:
  """Mean next-token loss over exactly cfg.train.eval_batches batches of each eval set.

  weights: what eval_step takes (setup.weights(state): params, and adapters with LoRA).
  Sets: the training data's eval split ('eval_loss'; with a mixture, the tokens of all its
  sources' eval batches pooled) and each named source, i.e. every data.mixture and
  data.eval_sources entry ('eval/<name>/loss'). An eval split is read in order and
  repeated when this process's share holds fewer batches, so every process runs the same
  number of eval steps (each is a collective: uneven counts would hang a multi-host run);
  a small split then counts some documents twice. DPO: refs = the precomputed reference
  log-probs (train/ref_logps.py), if the run uses them. keep: data_iterator's.
  """
  def run(source):
    sums = _eval_sums(eval_step, weights, cfg, tok, mesh, process_index, process_count, source,
                      keep=keep)
    nll, n = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0).tolist()
    if n == 0:
      raise TrainingError(f'eval split {cfg.data.eval_split!r} ({source or "data"}) has no '
                          'loss tokens')
    return nll, n

  if cfg.stage == 'dpo':
    return _evaluate_dpo(eval_step, weights, cfg, tok, mesh, process_index, process_count,
                         refs, keep)
  named = {name: run(name) for name in config_lib.eval_sources(cfg.data)}
  mixture = config_lib.mixture_sources(cfg.data)
  if mixture:
    nll, n = np.sum([named[name] for name in mixture], axis=0).tolist()
  else:
    nll, n = run(None)
  out = {'eval_loss': nll / n, 'eval_ppl': math.exp(min(nll / n, 50.0)), 'eval_tokens': n}
  out.update((f'eval/{name}/loss', a / b) for name, (a, b) in named.items())
  return out


def _evaluate_dpo(eval_step, weights, cfg, tok, mesh, process_index, process_count,
                  refs, keep=None) -> dict:
  """DPO loss and TRL's metrics over cfg.train.eval_batches batches of held-out pairs:
  eval_loss, eval/rewards/accuracies, eval/rewards/margins, ..."""
  sums = _eval_sums(eval_step, weights, cfg, tok, mesh, process_index, process_count,
                    refs=refs, keep=keep)
  total = {k: float(np.sum([float(s[k]) for s in sums])) for k in sums[0]}
  n = total.pop('pairs')
  out = {'eval_loss': total.pop('loss') / n, 'eval_pairs': n}
  out.update((f'eval/{k}', v / n) for k, v in total.items())
  return out


def sft_exact_match(cfg, graphdef, params, tok, mesh, examples: list[dict]) -> dict:
  """Greedy answers to `examples` ({'prompt', 'answer'}) with the (merged) params, cut at
  the template's end of turn: evaluate.exact_match's result."""
  def gen(prompts):
    ids = [formats.prompt_ids(p, tok, cfg.sft.template) for p in prompts]
    out = generate.generate(graphdef, params, ids, max_new_tokens=cfg.sft.eval_max_new_tokens,
                            temperature=0.0, stop_tokens=tok.stop_ids, mesh=mesh,
                            rules=dict(cfg.rules))
    return [tok.decode(ids) for ids in out.ids()]
  return evaluate_lib.exact_match(gen, examples, batch_size=max(len(examples), 1),
                                  normalize=formats.answer_normalizer(cfg.sft.template, tok))


def _eval_line(step: int, e: dict) -> str:
  def name(k):
    return k[5:-5] if k.endswith('/loss') else k[5:]
  shown = lambda k: k.startswith('eval/') and not k.startswith(('eval/logps/', 'eval/rewards/c',
                                                                 'eval/rewards/rej'))
  named = ''.join(f', {name(k)} {v:.4f}' for k, v in e.items() if shown(k))
  return f'step {step}: eval_loss {e["eval_loss"]:.4f}{named}'


def train(cfg, workdir: str, devices=None, stop_after: int | None = None) -> Result:
  """Runs (or resumes) the run described by `cfg` in `workdir`.

  `stop_after`: save and return once this step is reached, as a preemption would
  (the schedule still runs to cfg.train.steps; run again to continue).
  """
  # ---- Setup: config, devices, mesh, where the run starts ---------------------------
  config_lib.validate(cfg)
  distributed.initialize(cfg)  # multi-process runs (a no-op if started already, or single)
  check_workdir(workdir)  # before anything expensive
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batch(cfg, mesh)
  pi, pc = jax.process_index(), jax.process_count()
  if pi == 0:  # the process that logs: wandb installed if train.wandb asks for it
    metrics_lib.check_wandb(cfg.train.wandb)
  _print(f'lmjax: {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind} | '
         f'mesh {dict(mesh.shape)} | workdir {workdir}')
  ckpt = ckpt_lib.Checkpointer(workdir, cfg)
  resumed_meta, source = None, None
  if ckpt.latest_step() is not None:
    check_resumable(ckpt.read_config(), cfg, ckpt.directory)
    resumed_meta = ckpt.read_meta()
    if cfg.lora.enabled or cfg.stage == 'dpo':  # the base / reference: the recorded one
      if not resumed_meta.get('init_from'):
        raise ckpt_lib.CheckpointError(f'{ckpt.directory} holds no run started from a base '
                                       'model (no init_from in its meta): use a new --workdir')
      source = ckpt_lib.base_source(resumed_meta['init_from'], ckpt.directory)
    elif cfg.init_from.path:
      _print(f'init_from.path ignored: resuming this workdir\'s own checkpoint '
             f'(step {ckpt.latest_step()})')
  elif cfg.init_from.path:
    source = ckpt_lib.open_init_source(cfg.init_from)
    check_init_source(source, cfg)
  run_meta = {'init_from': (resumed_meta or {}).get('init_from'),
              'provenance': provenance.collect(mesh.devices.flat)}  # source, versions, devices
  if source is not None:
    run_meta['init_from'] = {'path': source.path, 'format': source.format, 'step': source.step}
  for key in ckpt_lib.HF_META_KEYS:  # an HF source model's config files, kept for export
    run_meta[key] = (resumed_meta.get(key) if resumed_meta is not None
                     else getattr(source, key, None))

  # ---- Data: tokenizer, precomputed DPO references, the training stream -------------
  tok = load_tokenizer(cfg, resumed_meta, source)
  run_meta['tokenizer'] = tok.location
  # sft/dpo: degenerate records counted (and dropped by index); no eval split, no eval
  checked = data_check.check_stage(cfg, tok, log=_print)
  run_meta['data_check'] = checked.meta
  eval_every = cfg.train.eval_every if checked.has_eval else 0
  setup = state_lib.make_setup(cfg, mesh)
  refs = None
  if step_lib.reference_mode(cfg) == 'precomputed':  # the reference = init_from's params
    splits = [cfg.data.train_split] + ([cfg.data.eval_split] if eval_every > 0 else [])
    refs = ref_logps.tables(cfg, setup, tok, splits, workdir=workdir,
                            reference=run_meta['init_from'],
                            load_params=lambda: source.load_params(cfg, setup))
  train_iter = data_iterator(cfg, tok, cfg.data.train_split,
                             batch_size=cfg.train.global_batch // pc,
                             process_index=pi, process_count=pc, seed=cfg.seed, refs=refs,
                             keep=checked.keep)
  sft = cfg.stage in ('sft', 'dpo')  # conversation data: overlong counts, exact match
  em_examples = []  # the exact-match set: the first N of cfg.sft's eval split
  if sft and cfg.sft.eval_examples > 0 and eval_every > 0 and checked.exact_match:
    em_examples = formats.answer_examples(cfg, cfg.data.eval_split, cfg.sft.eval_examples,
                                          tok)
  mixture = list(config_lib.mixture_sources(cfg.data))  # rows tag tokens 1..len: tokens/<name>

  # ---- State: resume the workdir's latest checkpoint, start from init_from, or init --
  if resumed_meta is not None:
    state = ckpt.restore(setup.abstract_saved, data_iter=train_iter)
    if setup.lora is not None:  # the frozen base, from the recorded init_from
      state['params'] = source.load_params(cfg, setup)  # in lora.base_dtype
    if setup.reference:  # DPO's frozen reference copy: the recorded init_from
      state['ref_params'] = source.load_params(cfg, setup)
    _print(f'resumed from step {int(state["step"])} ({ckpt.directory})')
  elif source is not None:
    state = state_lib.init_state(cfg, setup, params=source.load_params(cfg, setup))
    _print(f'params from init_from {source}; fresh optimizer state, step 0; '
           f'tokenizer {tok.location}')
  else:
    state = state_lib.init_state(cfg, setup)
  start = int(state['step'])
  _print(f'model: {setup.n_params / 1e6:.2f}M params | {cfg.model.n_layers} layers, '
         f'd_model {cfg.model.d_model}, vocab {cfg.model.vocab_size} | stage {cfg.stage}')
  if setup.lora is not None:
    _print(f'{lora_lib.describe(cfg)} ({setup.n_trainable / setup.n_params:.2%} of the '
           f'model); base {cfg.lora.base_dtype}, frozen')

  # ---- Compile up front, report memory ----------------------------------------------
  train_step = step_lib.make_train_step(cfg, setup)
  eval_step = (step_lib.make_dpo_eval_step(cfg, setup) if cfg.stage == 'dpo'
               else step_lib.make_eval_step(cfg, setup))
  merged = step_lib.make_merge(setup)  # weights -> params to generate with
  seq, gb = cfg.data.seq_len, cfg.train.global_batch * rows_per_example(cfg)  # gb: rows
  batch_spec = step_lib.batch_spec(cfg, mesh, gb)
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
  writer = metrics_lib.MetricWriter(workdir, wandb=cfg.train.wandb,
                                    config=config_lib.to_dict(cfg))
  if resumed_meta is not None:
    writer.resumed(start)
  if pi == 0:  # <workdir>/run.json: one entry per start of the run
    provenance.record_start(workdir, run_meta['provenance'], start)
  history, evals = [], []
  stopped_early = False

  def run_eval(step):
    e = evaluate(eval_step, setup.weights(state), cfg, tok, mesh, pi, pc, refs, checked.keep)
    if em_examples:
      em = sft_exact_match(cfg, setup.graphdef, merged(setup.weights(state)), tok, mesh,
                           em_examples)
      e['eval/exact_match'] = em['accuracy']
    writer.write(step, e)
    evals.append({'step': step, **e})
    return e

  def save(step, force=False):
    ckpt.save(step, setup.saved(state), cfg, data_iter=train_iter, force=force, meta=run_meta)

  def next_batch():
    host = next(train_iter)
    if sft:  # overlong conversations since the last batch; counted, then dropped
      window_overlong[:] += [int(np.sum(host.pop(k))) for k in formats.COUNTS]
    if mixture:  # count each source's tokens on host, then drop the tag
      window_tokens[:] += np.bincount(host.pop(pipeline.SOURCE).ravel(),
                                      minlength=len(mixture) + 1)[1:len(mixture) + 1]
    step_lib.check_host_batch(cfg, host)
    return sharding.place_batch(host, mesh, cfg.rules)

  def window_counts():
    """tokens/<source> and sft/{dropped,truncated} of this log window, all processes."""
    counts = np.concatenate([window_tokens, window_overlong])
    if pc > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    window_tokens[:], window_overlong[:] = 0, 0
    out = {f'tokens/{name}': float(c) for name, c in zip(mixture, counts)}
    if sft:
      out.update((f'sft/{k}', float(c)) for k, c in zip(formats.COUNTS, counts[len(mixture):]))
    return out

  # ---- Train -------------------------------------------------------------------------
  progress = None
  if cfg.train.progress_bar and pi == 0:
    from tqdm.auto import tqdm
    progress = tqdm(total=cfg.train.steps, initial=start, desc='train', dynamic_ncols=True)
  def report(msg):  # above the progress bar, when there is one
    (progress.write(msg) if progress is not None else _print(msg))

  if start == 0 and eval_every > 0:
    report(_eval_line(0, run_eval(0)))
  window_t, window_steps, data_s = time.perf_counter(), 0, 0.0
  window_tokens = np.zeros(len(mixture), np.int64)  # this process's, since the last log
  window_overlong = np.zeros(len(formats.COUNTS), np.int64)
  with _Preemption() as preempt:
    for step in range(start, cfg.train.steps):
      t_data = time.perf_counter()
      batch = next_batch()
      data_s += time.perf_counter() - t_data
      with jax.transfer_guard('disallow'):  # no implicit host<->device copies in the step
        state, m = compiled(state, batch)
      window_steps += 1
      done = step + 1
      if progress is not None:
        progress.update(1)

      if done % cfg.train.log_every == 0 or done == cfg.train.steps:
        m = jax.device_get(m)
        if m.get('skipped_in_a_row', 0) > cfg.train.max_skips_in_a_row:
          raise TrainingError(
              f'{int(m["skipped_in_a_row"])} steps in a row skipped (train.skip_bad_steps; '
              f'the last: loss {m["loss"]}, grad norm {m["grad_norm"]}) at step {done}; '
              f'last checkpoint: step {ckpt.latest_step()} in {ckpt.directory}')
        if not m.get('skipped', False) and (not np.isfinite(m['loss'])
                                            or not np.isfinite(m['grad_norm'])):
          raise TrainingError(
              f'non-finite loss {m["loss"]} / grad norm {m["grad_norm"]} at step {done}; '
              f'last checkpoint: step {ckpt.latest_step()} in {ckpt.directory}'
              + ('' if state_lib.guarded(cfg) else '; train.skip_bad_steps=True skips such '
                 'steps'))
        dt = time.perf_counter() - window_t
        tps = window_steps * gb * seq / dt
        m = {k: float(v) for k, v in m.items()}
        m.update(tokens_per_s=tps, step_s=dt / window_steps, data_wait_frac=data_s / dt,
                 mfu=(flops_per_step * window_steps / dt / (peak * n_dev)) if peak else None)
        m.update(window_counts())
        writer.write(done, m)
        history.append({'step': done, **m})
        if progress is not None:
          progress.set_postfix(loss=f'{m["loss"]:.3f}', tok_s=f'{tps:,.0f}')
        window_t, window_steps, data_s = time.perf_counter(), 0, 0.0

      if eval_every > 0 and (done % eval_every == 0 or done == cfg.train.steps):
        report(_eval_line(done, run_eval(done)))

      if preempt.requested or done == stop_after:
        _print(f'{preempt.requested or "stop_after"}: saving a checkpoint at step {done} and '
               'exiting')
        save(done, force=True)
        stopped_early = True
        break
      if (cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
        if done % cfg.train.log_every and not state_lib.guarded(cfg):
          # never checkpoint params we have not checked (guarded steps never apply bad ones)
          loss = float(jax.device_get(m['loss']))
          if not np.isfinite(loss):
            raise TrainingError(f'non-finite loss {loss} at step {done}; not saving')
        save(done)
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
    prompt, ids = s.prompt, s.prompt
    if sft:  # the prompt as a user turn, in the chat template
      prompt = formats.render_prompt([{'role': 'user', 'content': s.prompt},
                                      {'role': 'assistant', 'content': ''}],
                                     cfg.sft.template, tok)
      ids = formats.prompt_ids(prompt, tok, cfg.sft.template)
    text = generate.sample(setup.graphdef, merged(setup.weights(state)), tok, [ids],
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, seed=cfg.seed)[0]
    _print(f'--- sample (prompt {s.prompt!r}) ---\n{prompt}{text}\n---')
  return Result(state=state, setup=setup, tokenizer=tok, history=history, evals=evals,
                sample=text, stopped_early=stopped_early)
