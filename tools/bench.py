"""Benchmarks a config's train step: one table row per mode.

  python tools/bench.py --config=configs/pretrain_tiny.py [--steps=10] [--warmup=2]
      [--mode=full|lora|both] [--objective=lm|dpo|kto|grpo|both|all] [--data=synthetic|real]
      [--config.KEY=VALUE ...] [--peak_tflops=X] [--json=out.json] [--matmuls | --moe_rows]
      [--telemetry]

Columns: device (count x kind), mode, objective (lm: next-token, the pretraining and SFT
step; dpo: train.global_batch pairs = twice the rows, with its reference: adapters_off /
copy / precomputed; kto: train.global_batch examples = twice the rows too, each with its
KL row, the same tokens as dpo's; grpo: the update on train.global_batch x
grpo.num_generations rows, every token a completion token, plus the rollout's generated
tokens/s; both = lm and dpo, all = lm, dpo, kto and grpo), params (the
model's), trainable (what the optimizer updates), optimizer-state bytes (all devices),
batch x seq, tokens/s, MFU, step time, peak memory per device (compiled.memory_analysis():
arguments + outputs + temporaries - aliased), compile time. --config.KEY=VALUE overrides a
config field, as for `python -m lmjax.train` (e.g. --config.model.remat=dots; JSON rows
record them).

MFU = tokens/s x (6N + 6·L·T·heads·head_dim) / (devices x peak), the standard formula
(causal attention counted once; N = every matmul weight incl. the output projection) for
both modes: a LoRA step skips the base weights' gradient matmuls, so the same formula
credits it with work it does not do and its MFU reads as "full-fine-tuning-equivalent".
The peak is the device's bf16 dense datasheet figure (lmjax.train.metrics.peak_flops;
H100 SXM 989 TFLOP/s); on CPU there is none unless --peak_tflops is given.

--mode=lora trains LoRA adapters (the config's lora group, targets/rank) on a frozen
random base, as `lora.enabled=True` would with init_from; both = full then LoRA on the
same model and batch. A DPO row's tokens/s counts both rows of a pair and its MFU the
policy's 6N + attention per token only: the reference's forward pass (2N per token,
unless precomputed) is work the formula does not credit.
--data=real times the config's own input pipeline (tokenizer and
dataset built if missing) and reports the fraction of time spent waiting for it;
synthetic = one random batch placed once (isolates the step).
--matmuls traces the step instead of timing it (seconds, on any machine, at the full
bench size) and prints its matmul FLOPs per token, forward and gradient (remat's
recomputation included; xla attention counts both halves of T x T), beside the MFU
formula's, and their shares by operand dtypes and precision: a float32 operand under the
default precision is a float32 (at best TF32) matmul on a GPU, half the bf16 rate or less.
--moe_rows (an MoE config) times, instead of the step, jitted forward + backward (the
gradients of the weights and of the input) of one feed-forward block alone at the config's
sizes (model.d_model, model.moe experts/top_k/d_ff/shared_d_ff, data.seq_len x
train.global_batch tokens, model.dtype compute on model.param_dtype weights, routing by a
freshly initialised router): four rows, `moe dropless` (the grouped matmuls,
`jax.lax.ragged_dot`), `moe capacity` (model.moe.capacity_factor slots per expert and row:
batched matmuls over the slots, padding included), `moe dense` (dense dispatch: every
expert on every token) and `mlp` (a dense SwiGLU of hidden size top_k x moe.d_ff +
shared_d_ff: the same active FLOPs). Each is credited with the same work, 6 x
active_ffn_params FLOPs per token (the k experts, the shared expert, the router: what the
MFU formula counts for the layer), and its TFLOP/s computed from that. `work`: the matmul
FLOPs the row's algorithm does per credited FLOP (~E/k for dense dispatch,
~capacity_factor for capacity, 1 for dropless, ~1 for the mlp, which has no router);
`XLA work`: the FLOPs of the compiled program (XLA's cost analysis, elementwise work
included) per credited FLOP (on a GPU XLA's count leaves out library calls: read it on
CPU or TPU). On a GPU, dropless far below the mlp row's TFLOP/s means ragged_dot ran as a
dense padded matmul over all E experts (as it does with cuDNN < 9.22: 0.12x the mlp on an
H200, docs/benchmarks.md). On CPU it does too: jax's generic lowering of ragged_dot masks the rows and multiplies them by
every expert (E times the credited work, k times dense dispatch's), so there dropless
reads slower than dense dispatch.
--telemetry times every row twice, without and with train.telemetry (the step that
also computes the per-layer stability statistics: mode `<mode>+telemetry`), and prints
its extra step time: what a run pays once per train.log_every steps (the loop runs
the telemetry step at the log steps only).
Bad input: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmjax import cli


def _prepare(cfg, mode: str, objective: str, devices=None):
  """(cfg for mode/objective, mesh, setup, train step, batch spec): what `run` times and
  `matmul_shares` traces."""
  from lmjax import config as config_lib
  from lmjax import sharding
  from lmjax.models import lora as lora_lib
  from lmjax.train import loop, objectives
  from lmjax.train import state as state_lib
  from lmjax.train import step as step_lib

  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.lora.enabled = mode == 'lora'
    if objective in ('dpo', 'kto', 'grpo'):
      cfg.stage = objective
      if objective == 'grpo' and not cfg.grpo.path:
        cfg.grpo.path = 'builtin:synthetic'  # prompts are not read: rows are synthetic
    elif cfg.stage in ('dpo', 'kto', 'grpo'):
      raise config_lib.ConfigError(f"objective='lm' with a stage={cfg.stage!r} config: use "
                                   f'objective={cfg.stage!r}')
  if mode == 'lora':
    lora_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  obj = objectives.get(cfg)
  loop.check_batch(cfg, mesh, obj)
  setup = state_lib.make_setup(cfg, mesh, obj)
  train_step = step_lib.make_train_step(cfg, setup)
  spec = step_lib.batch_spec(cfg, mesh, cfg.train.global_batch * obj.rows_per_example, obj)
  return cfg, mesh, setup, train_step, spec


def matmul_shares(cfg, *, mode: str = 'full', objective: str = 'lm', devices=None) -> dict:
  """The traced train step's matmul FLOPs per token (forward and gradient; no compile, no
  memory), and their shares by operand dtypes and precision: a float32 operand without a
  bf16 algorithm is a float32 matmul on a GPU."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax
  from lmjax import sharding
  from lmjax.models import transformer
  from lmjax.train import metrics as metrics_lib

  cfg, mesh, setup, train_step, spec = _prepare(cfg, mode, objective, devices)
  with sharding.use_mesh(mesh, cfg.rules):
    jaxpr = jax.make_jaxpr(train_step.jitted)(setup.abstract_state, spec)
  by = collections.Counter()
  for lhs, rhs, precision, flops in metrics_lib.matmuls(jaxpr):
    prec = getattr(precision, 'name', None) or 'default'
    by[f'{lhs.dtype} x {rhs.dtype} ({prec})'] += flops
  total = sum(by.values())
  tokens = cfg.train.global_batch * setup.objective.rows_per_example * cfg.data.seq_len
  return {'mode': mode, 'objective': objective, 'matmul_flops_per_token': total / tokens,
          'formula_flops_per_token': transformer.flops_per_token(cfg.model, cfg.data.seq_len),
          'shares': {k: v / total for k, v in by.most_common()}}


def matmul_table(shares: dict) -> str:
  """`matmul_shares` as a heading line and a markdown table."""
  lines = [f'{shares["mode"]} {shares["objective"]}: '
           f'{shares["matmul_flops_per_token"] / 1e6:,.1f} MFLOP/token in matmuls, '
           f'{shares["formula_flops_per_token"] / 1e6:,.1f} by the MFU formula',
           '| operands (precision) | share of matmul FLOPs |', '|---|---|']
  lines += [f'| {k} | {v:.3f} |' for k, v in shares['shares'].items()]
  return '\n'.join(lines)


def moe_rows(cfg, *, steps: int = 10, warmup: int = 2,
             peak_tflops: float | None = None) -> list[dict]:
  """Times jitted forward + backward of the MoE feed-forward block of `cfg` alone, with
  dropless and with dense dispatch, and of a dense SwiGLU MLP of the same active FLOPs
  (hidden size top_k x moe.d_ff + moe.shared_d_ff), on one device: three rows (see the
  module docstring), each credited with 6 x moe.active_ffn_params FLOPs per token."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lmjax import config as config_lib
  from lmjax.models import grouped_matmul as gmm_lib
  from lmjax.models import moe as moe_lib
  from lmjax.models import transformer
  from lmjax.train import metrics as metrics_lib

  cfg = cfg.copy_and_resolve_references()
  m = cfg.model
  if not transformer.is_moe(m):
    raise config_lib.ConfigError('--moe_rows needs an MoE config (model.moe.experts > 0)')
  e, k = int(m.moe.experts), int(m.moe.top_k)
  f = int(m.moe.d_ff) or m.d_ff
  hidden = k * f + int(m.moe.shared_d_ff)
  b, t, d = cfg.train.global_batch, cfg.data.seq_len, m.d_model
  active = moe_lib.active_ffn_params(m)
  dense_m = m.copy_and_resolve_references()
  dense_m.d_ff = hidden
  with nnx.use_eager_sharding(False):
    block = moe_lib.MoE(m, nnx.Rngs(0), transformer.DTYPES[m.param_dtype])
    mlp = transformer.MLP(dense_m, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (b, t, d), transformer.DTYPES[m.dtype])
  cases = [  # (row, module, forward, matmul work per token / 6)
      ('moe dropless', block, lambda mod, x: mod(x, dispatch='dropless')[0], active),
      ('moe capacity', block, lambda mod, x: mod(x, dispatch='capacity')[0],
       active * moe_lib.capacity(float(m.moe.capacity_factor), t, k, e) * e / (t * k)),
      ('moe dense', block, lambda mod, x: mod(x, dispatch='dense')[0],
       moe_lib.total_ffn_params(m)),
      ('mlp', mlp, lambda mod, x: mod(x), 3 * d * hidden)]
  if gmm_lib.hopper() and m.moe.grouped_matmul == 'xla':  # jax's Hopper kernels too
    pallas_m = m.copy_and_resolve_references()
    pallas_m.moe.grouped_matmul = 'auto'
    with nnx.use_eager_sharding(False):
      pallas_block = moe_lib.MoE(pallas_m, nnx.Rngs(0), transformer.DTYPES[m.param_dtype])
    cases.insert(1, ('moe dropless pallas', pallas_block,
                     lambda mod, x: mod(x, dispatch='dropless')[0], active))
  dev = jax.devices()[0]
  peak = peak_tflops * 1e12 if peak_tflops else metrics_lib.peak_flops(dev)
  rows = []
  for name, module, forward, work in cases:
    graphdef, params = nnx.split(module)

    def loss(params, x, graphdef=graphdef, forward=forward):
      y = forward(nnx.merge(graphdef, params), x)
      return jnp.mean(jnp.square(y.astype(jnp.float32)))

    t0 = time.perf_counter()
    try:
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    except Exception as e:  # pylint: disable=broad-except
      if name != 'moe dropless pallas':
        raise
      # The opt-in kernels, tried wherever they might run: a failure is reported, and the
      # other rows still measured.
      print(f'moe dropless pallas: failed ({type(e).__name__}: {str(e)[:300]})',
            file=sys.stderr)
      continue
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()  # a dict; a list of one on older jax
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    xla_flops = (cost or {}).get('flops')
    mem = compiled.memory_analysis()
    peak_mem = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    out = None
    for _ in range(warmup):
      out = compiled(params, x)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
      out = compiled(params, x)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / steps
    tps = b * t / dt
    tflops = 6 * active * tps / 1e12
    rows.append({
        'bench': 'moe_ffn', 'row': name, 'device': f'1 x {dev.device_kind}',
        'batch': b, 'seq_len': t, 'd_model': d, 'experts': e, 'top_k': k,
        'd_ff': hidden if name == 'mlp' else f, 'shared_d_ff': int(m.moe.shared_d_ff),
        'dtype': m.dtype, 'tokens_per_s': tps, 'step_s': dt,
        'flops_per_token': 6 * active, 'tflops': tflops,
        'of_peak': tflops * 1e12 / peak if peak else None, 'work': work / active,
        'xla_work': xla_flops / (b * t * 6 * active) if xla_flops else None,
        'peak_mem_bytes': peak_mem, 'compile_s': compile_s})
  return rows


MOE_HEADER = ('row', 'device', 'tokens (batch x seq)', 'd_model', 'E / k / d_ff', 'tokens/s',
              'step', 'TFLOP/s (active)', 'of peak', 'work', 'XLA work', 'peak mem',
              'compile')


def moe_table(rows: list[dict]) -> str:
  """`moe_rows` as a markdown table and a line comparing the rows' TFLOP/s."""
  lines = ['| ' + ' | '.join(MOE_HEADER) + ' |', '|' + '---|' * len(MOE_HEADER)]
  for r in rows:
    if r['row'] == 'mlp':
      size = f'd_ff {r["d_ff"]}'
    else:
      size = f'{r["experts"]} / {r["top_k"]} / {r["d_ff"]}'
      size += f' + shared {r["shared_d_ff"]}' if r['shared_d_ff'] else ''
    cells = (r['row'], r['device'], f'{r["batch"]} x {r["seq_len"]}', str(r['d_model']),
             size, f'{r["tokens_per_s"]:,.0f}', f'{r["step_s"] * 1e3:,.2f} ms',
             f'{r["tflops"]:,.4g}',
             'n/a' if r['of_peak'] is None else f'{r["of_peak"]:.1%}', f'{r["work"]:.2f}x',
             'n/a' if r['xla_work'] is None else f'{r["xla_work"]:.2f}x',
             _mib(r['peak_mem_bytes']), f'{r["compile_s"]:.1f} s')
    lines.append('| ' + ' | '.join(cells) + ' |')
  by = {r['row']: r for r in rows}
  mlp = by.get('mlp')
  if mlp:
    lines.append('TFLOP/s (active) vs the dense MLP: ' + ', '.join(
        f'{r["row"]} {r["tflops"] / mlp["tflops"]:.2f}x (doing {r["work"]:.2f}x the '
        'credited work' + ('' if r['xla_work'] is None else
                            f', {r["xla_work"]:.2f}x by XLA\'s count') + ')'
        for r in rows if r is not mlp))
  return '\n'.join(lines)


def run(cfg, *, mode: str = 'full', objective: str = 'lm', steps: int = 10, warmup: int = 2,
        data: str = 'synthetic', peak_tflops: float | None = None, devices=None) -> dict:
  """Times `steps` train steps (after `warmup`) of `cfg` in `mode` ('full' | 'lora') with
  `objective` ('lm': next-token, the pretraining/SFT step; 'dpo': train.global_batch
  pairs, 2x the rows, against cfg.dpo.reference; 'kto': train.global_batch examples and
  their KL rows, 2x the rows, against cfg.kto.reference); returns the table row as a
  dict."""
  import jax
  import numpy as np

  from lmjax import config as config_lib
  from lmjax import sharding
  from lmjax.data import tokenizer as tokenizer_lib
  from lmjax.models import transformer
  from lmjax.train import metrics as metrics_lib
  from lmjax.train import state as state_lib
  from lmjax.train import step as step_lib

  cfg, mesh, setup, train_step, spec = _prepare(cfg, mode, objective, devices)
  state = state_lib.init_state(cfg, setup)
  gb, seq = cfg.train.global_batch * setup.objective.rows_per_example, cfg.data.seq_len
  keys = tuple(spec)
  reference = getattr(setup.objective, 'reference', None)  # DPO's, KTO's: the row's label
  if data == 'real' and 'ref_logps' in keys:  # <dpo|kto>.reference='precomputed'
    raise config_lib.ConfigError(f"--data=real with {objective}.reference='precomputed' "
                                 'needs the tables the training loop computes: bench it '
                                 'with --data=synthetic')
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh, cfg.rules):
    compiled = train_step.jitted.lower(setup.abstract_state, spec).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak_mem = None
  if mem is not None:
    peak_mem = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)

  if data == 'synthetic':
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.model.vocab_size, (gb, seq + 1)).astype(np.int32)
    host = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
            'segment_ids': np.ones((gb, seq), np.int32),
            'positions': np.tile(np.arange(seq, dtype=np.int32), (gb, 1)),
            'loss_mask': np.ones((gb, seq), np.float32)}
    if 'ref_logps' in keys:  # any finite reference log-probs: the step's work is the same
      host['ref_logps'] = np.full((gb,), -float(seq), np.float32)
    if 'label' in keys and cfg.stage == 'kto':  # liked and disliked examples alternate
      host['label'] = (np.arange(gb) // 2 % 2).astype(np.int32)  # (each with its KL row)
    elif 'label' in keys:  # DPO with soft labels: a judge's p on both rows of a pair
      host['label'] = np.full((gb,), 0.75, np.float32)
    if 'weight' in keys:  # KTO: each example's loss weight
      host['weight'] = np.ones((gb,), np.float32)
    if 'old_logps' in keys:  # GRPO: every token a completion token, advantages ±1
      host['old_logps'] = np.full((gb, seq), -np.log(cfg.model.vocab_size), np.float32)
      host['advantages'] = np.where(np.arange(gb) % 2, -1.0, 1.0).astype(np.float32)
    fixed = sharding.place_batch(host, mesh, cfg.rules)
    it = None
    next_batch = lambda: fixed
  else:
    tok = tokenizer_lib.run_tokenizer(cfg)
    it = setup.objective.data_iterator(tok, cfg.data.train_split,
                                       batch_size=cfg.train.global_batch // jax.process_count(),
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())

    def next_batch():
      host = {k: v for k, v in next(it).items() if k in keys}
      return sharding.place_batch(host, mesh, cfg.rules)

  try:
    for _ in range(warmup):
      state, m = compiled(state, next_batch())
    jax.block_until_ready(m)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
      tw = time.perf_counter()
      batch = next_batch()
      wait += time.perf_counter() - tw
      state, m = compiled(state, batch)
    loss = float(jax.device_get(m['loss']))  # waits for the last step
    dt = time.perf_counter() - t0
  finally:
    if it is not None:
      it.close()

  rollout = {}
  if objective == 'grpo':
    rollout = _rollout_rate(cfg, setup, state, steps=max(1, steps // 5))
  dev = mesh.devices.flat[0]
  peak = peak_tflops * 1e12 if peak_tflops else metrics_lib.peak_flops(dev)
  tps = steps * gb * seq / dt
  flops = transformer.flops_per_token(cfg.model, seq) * tps
  opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(setup.abstract_state['opt_state']))
  return {
      'device': f'{mesh.devices.size} x {dev.device_kind}',
      'mode': mode, 'objective': objective + (f' ({reference})' if reference else ''),
      'params': setup.n_params, 'trainable': setup.n_trainable,
      'opt_state_bytes': opt_bytes, 'batch': gb, 'seq_len': seq,
      'tokens_per_s': tps, 'mfu': flops / (peak * mesh.devices.size) if peak else None,
      'step_s': dt / steps, 'peak_mem_bytes': peak_mem, 'compile_s': compile_s,
      'data_wait_frac': wait / dt, 'loss': loss, 'data': data,
      'remat': cfg.model.remat, 'dtype': cfg.model.dtype, **rollout,
  }


def _rollout_rate(cfg, setup, state, steps: int) -> dict:
  """GRPO's sampling: train.global_batch random prompts of data.seq_len -
  grpo.max_completion_length tokens, grpo.num_generations completions each, the full
  max_completion_length (no stop token) from the state's params, with the KV-cache sampler
  on the training mesh (after one untimed compile): {'rollout_tokens_per_s' (generated
  tokens), 'rollout_s' (one rollout)}."""
  import numpy as np

  from lmjax import generate
  from lmjax.train import step as step_lib
  g = cfg.grpo
  rng = np.random.default_rng(1)
  p = cfg.data.seq_len - g.max_completion_length
  prompts = [rng.integers(3, cfg.model.vocab_size, p).tolist()
             for _ in range(cfg.train.global_batch) for _ in range(g.num_generations)]
  params = step_lib.make_merge(setup)(setup.weights(state))

  def once(seed):
    return generate.generate(setup.graphdef, params, prompts,
                             max_new_tokens=g.max_completion_length,
                             temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                             seed=seed, mesh=setup.mesh, rules=setup.rules)

  once(0)
  t0 = time.perf_counter()
  for i in range(steps):
    out = once(i + 1)
  dt = (time.perf_counter() - t0) / steps
  return {'rollout_tokens_per_s': float(out.lengths.sum()) / dt, 'rollout_s': dt}


HEADER = ('device', 'mode', 'objective', 'params', 'trainable', 'opt state', 'batch x seq', 'tokens/s',
          'MFU', 'step', 'peak mem/dev', 'compile')


def _mib(b):
  return 'n/a' if b is None else f'{b / 2**20:,.1f} MiB'


def format_row(r: dict) -> tuple:
  return (r['device'], r['mode'], r['objective'], f'{r["params"] / 1e6:,.2f}M',
          f'{r["trainable"] / 1e6:,.3f}M', _mib(r['opt_state_bytes']),
          f'{r["batch"]} x {r["seq_len"]}', f'{r["tokens_per_s"]:,.0f}',
          'n/a' if r['mfu'] is None else f'{r["mfu"]:.1%}', f'{r["step_s"] * 1e3:,.1f} ms',
          _mib(r['peak_mem_bytes']), f'{r["compile_s"]:.1f} s')


def table(rows: list[dict]) -> str:
  """A markdown table of rows (for docs/benchmarks.md)."""
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(format_row(r)) + ' |' for r in rows]
  return '\n'.join(lines)


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', required=True, help='configs/*.py[:arg]')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--mode', default='full', choices=('full', 'lora', 'both'))
  parser.add_argument('--objective', default='lm',
                      choices=('lm', 'dpo', 'kto', 'grpo', 'both', 'all'))
  parser.add_argument('--data', default='synthetic', choices=('synthetic', 'real'))
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='per-device peak for MFU (default: the datasheet bf16 figure)')
  parser.add_argument('--json', default=None, help='append the rows to this JSONL file')
  parser.add_argument('--matmuls', action='store_true',
                      help='trace the step (no compile, no timing) and print its matmul '
                      'FLOPs per token and their shares by operand dtype and precision')
  parser.add_argument('--moe_rows', action='store_true',
                      help="time the config's MoE feed-forward block alone (dropless, dense "
                      'dispatch, a dense MLP of the same active FLOPs) instead of the step')
  parser.add_argument('--telemetry', action='store_true',
                      help='time each row without and with train.telemetry (its cost)')
  cli.add_verbose_flag(parser)
  args, flags = parser.parse_known_args(argv)  # the rest: --config.KEY=VALUE overrides

  from lmjax import config as config_lib
  from ml_collections.config_flags import config_path
  cfg = config_lib.load(args.config, overrides={'lora.enabled': False}, flags=flags)
  overrides = {k: config_path.get_value(k, cfg) for k in
               (f.split('=', 1)[0].split('.', 1)[1] for f in flags)}
  modes = ('full', 'lora') if args.mode == 'both' else (args.mode,)
  objectives = {'both': ('lm', 'dpo'), 'all': ('lm', 'dpo', 'kto', 'grpo')}.get(
      args.objective, (args.objective,))
  rows = []
  if args.matmuls and args.moe_rows:
    raise config_lib.ConfigError('--matmuls and --moe_rows are separate modes: pass one')
  if args.moe_rows:
    rows = moe_rows(cfg, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    for r in rows:
      r.update(config=args.config, overrides=overrides)
    print(moe_table(rows))
    if args.json:
      with open(args.json, 'a') as f:
        for r in rows:
          f.write(json.dumps(r) + '\n')
    return 0
  if args.matmuls:
    for objective in objectives:
      for mode in modes:
        print(matmul_table(matmul_shares(cfg, mode=mode, objective=objective)))
    return 0
  for objective in objectives:
    for mode in modes:
      for telemetry in ((False, True) if args.telemetry else (bool(cfg.train.telemetry),)):
        c = config_lib.from_dict(config_lib.to_dict(cfg))
        c.train.telemetry = telemetry
        rows.append(run(c, mode=mode, objective=objective, steps=args.steps,
                        warmup=args.warmup, data=args.data, peak_tflops=args.peak_tflops))
        rows[-1].update(config=args.config, overrides=overrides)
        if telemetry:
          rows[-1]['mode'] += '+telemetry'
  print(table(rows))
  if args.telemetry:
    for off, on in zip(rows[::2], rows[1::2]):
      extra = on['step_s'] / off['step_s'] - 1
      print(f'{off["mode"]} {off["objective"]}: telemetry costs {extra:+.1%} step time '
            f'({off["step_s"]:.4f} s -> {on["step_s"]:.4f} s) on the steps that log: '
            f'{extra / cfg.train.log_every:+.2%} of the run at train.log_every='
            f'{cfg.train.log_every}')
  by = {(r['mode'], r['objective'].split()[0]): r for r in rows}
  for o in objectives:
    full, lo = by.get(('full', o)), by.get(('lora', o))
    if full and lo:
      print(f'{o}: LoRA vs full: {lo["tokens_per_s"] / full["tokens_per_s"]:.2f}x tokens/s, '
            f'{lo["opt_state_bytes"] / full["opt_state_bytes"]:.2%} of the optimizer state, '
            f'{lo["trainable"] / full["trainable"]:.2%} of the trainable params')
  for m in modes:
    lm, dpo = by.get((m, 'lm')), by.get((m, 'dpo'))
    if lm and dpo:
      print(f'{m}: DPO vs LM step: {lm["tokens_per_s"] / dpo["tokens_per_s"]:.2f}x the time '
            f'per token ({dpo["step_s"] / lm["step_s"]:.2f}x the step time for '
            f'{dpo["batch"] / lm["batch"]:.0f}x the rows; reference '
            f'{dpo["objective"].split("(")[-1].rstrip(")")})')
    grpo = by.get((m, 'grpo'))
    if grpo:
      print(f'{m}: GRPO rollout: {grpo["rollout_tokens_per_s"]:,.0f} generated tokens/s '
            f'({grpo["rollout_s"]:.2f} s for {grpo["batch"]} completions of '
            f'{cfg.grpo.max_completion_length} tokens); update step {grpo["step_s"]:.3f} s')
    if grpo and lm:  # rows of the same length (G completions per prompt)
      print(f'{m}: GRPO update vs LM step: {lm["tokens_per_s"] / grpo["tokens_per_s"]:.2f}x '
            f'the time per token ({grpo["step_s"] / lm["step_s"]:.2f}x the step time for '
            f'{grpo["batch"] / lm["batch"]:.0f}x the rows)')
    kto = by.get((m, 'kto'))
    if kto and dpo:  # the same tokens: B examples + their KL rows vs B pairs
      print(f'{m}: KTO vs DPO step: {kto["step_s"] / dpo["step_s"]:.2f}x the step time on '
            f'the same tokens ({kto["batch"]} rows each; reference '
            f'{kto["objective"].split("(")[-1].rstrip(")")})')
  if args.json:
    with open(args.json, 'a') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
