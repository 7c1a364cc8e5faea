"""Runs a named suite of tools/bench.py cases in one process, within a time budget, and
checks the targets (tools/gpu_check.sh runs the gpu suite on a GPU, tools/tpu_check.sh the
tpu suite on a TPU VM).

  python tools/bench_suite.py --suite=gpu [--budget_s=420] [--json=rows.jsonl] [--md=t.md]
  python tools/bench_suite.py --suite=gpu --smoke   # the same cases, tiny, on CPU (CI)
  python tools/bench_suite.py --suite=tpu           # splash vs xla attention, seq 2048 / 8192

Cases run in priority order (the headline rows first); a case that fails is recorded
with its error and the suite goes on; once --budget_s has passed, the remaining cases
are recorded as skipped. Each row is appended to --json as soon as it is measured, so a
run cut short keeps what it measured. The last lines printed are the table and the
target checks (gpu: MFU of the 125M and 1B configs, LoRA vs full tokens/s, DPO vs SFT step;
tpu: the two MFU targets on the splash rows at seq 2048, then splash / xla tokens/s for
each config and sequence length).

--smoke swaps each config's cuDNN attention for xla (the ':cpu' arg), and a case's own
splash attention too (Pallas interpret mode on CPU is slow), and shrinks the model, batch
and sequence (SMOKE), one step each: it checks that every case's config and overrides are
valid and that the driver works, not speed.
Bad arguments: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback

from lmjax import cli
from lmjax.config import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  config: str                      # configs/... relative to the repository root
  overrides: tuple = ()            # (key, value) pairs
  mode: str = 'full'               # full | lora
  objective: str = 'lm'            # lm | dpo
  steps: int = 20


B125, B1 = 'configs/bench/llama_125m.py', 'configs/bench/llama_1b.py'
MOE1B = 'configs/bench/moe_1b.py'
# Synthetic rows are one document each: model.max_segments=1 runs cuDNN's plain causal
# kernel, what an unpacked run gets; the 'packed' cases measure the segment-offset path.
ONE = (('model.max_segments', 1),)


def _splash_and_xla(name: str, config: str, overrides: tuple) -> tuple[Case, Case]:
  """The case `name` twice, '<name> splash' and '<name> xla': the attention set
  explicitly (the bench configs choose cuDNN, or xla with ':cpu')."""
  return tuple(Case(f'{name} {a}', config, overrides + (('model.attention', a),))
               for a in ('splash', 'xla'))


# The TPU check (tools/tpu_check.sh): the 125M and 1B bench configs with jax's Pallas splash
# kernel and with xla attention, at seq 2048 and 8192; the two rows of each (config, seq)
# side by side. Every case holds 65,536 tokens a step, 8 rows at 8192: the 125m's own batch
# at 2048 (32 rows; 8 at 8192), the 1b's doubled to 32 (its 16 rows of 2048 would be 4 at
# 8192, which 8 data-parallel chips cannot split, and tests/test_context_parallel.py needs an
# 8-chip host). What grows with tokens (the saved weight-matmul outputs, the logits) is
# then the same at both lengths, so with splash, which never holds the [B, heads, T, T]
# scores, the 1b fits at 8192 wherever it fits at 2048 (1 row of 8192 a chip on 8 chips);
# xla holds 4x the scores a token at 8192. The 125m at 8192 takes the 1b's remat,
# dots_no_batch (attention recomputed in the backward pass): without remat xla would keep
# every layer's f32 scores, 12 layers x 8 rows x 12 heads x 8192^2 x 4 B = 288 GiB.
TPU_CASES = (
    *_splash_and_xla('125m seq 2048', B125, (('data.seq_len', 2048),)),
    *_splash_and_xla('1b seq 2048', B1, (('data.seq_len', 2048), ('train.global_batch', 32))),
    *_splash_and_xla('125m seq 8192', B125, (('data.seq_len', 8192), ('train.global_batch', 8),
                                             ('model.remat', 'dots_no_batch'))),
    *_splash_and_xla('1b seq 8192', B1, (('data.seq_len', 8192), ('train.global_batch', 8))),
)

SUITES = {
    'gpu': (
        Case('125m', B125, ONE),
        Case('1b', B1, ONE),
        Case('1b lora', B1, ONE, mode='lora'),
        Case('1b lora dpo', B1, ONE, mode='lora', objective='dpo'),
        Case('moe 1b', MOE1B, ONE),
        # jax's Pallas Mosaic-GPU grouped matmul kernels (Hopper only; fails elsewhere).
        Case('moe 1b pallas', MOE1B, ONE + (('model.moe.grouped_matmul', 'pallas'),)),
        Case('moe 1b capacity 1.25', MOE1B, ONE + (('model.moe.dispatch', 'capacity'),)),
        # the step a run with train.telemetry takes at its log steps: against '1b'
        Case('1b telemetry', B1, ONE + (('train.telemetry', True),)),
        Case('1b lora bf16 base', B1, ONE + (('lora.base_dtype', 'bfloat16'),), mode='lora'),
        Case('125m packed (max_segments 32)', B125, (('model.max_segments', 32),)),
        Case('1b packed (max_segments 32)', B1, (('model.max_segments', 32),)),
        # xla attention keeps each layer's f32 [B, heads, T, T] scores for the gradient:
        # batch 8 fits where 32 would need ~72 GiB more.
        Case('125m xla attention batch 8', B125,
             (('model.attention', 'xla'), ('train.global_batch', 8))),
        Case('125m batch 8', B125, ONE + (('train.global_batch', 8),)),
        Case('125m scanned layers', B125, ONE + (('model.scan_layers', True),)),
        Case('125m loss_chunk 512', B125, ONE + (('model.loss_chunk', 512),)),
        Case('125m batch 64 remat dots_no_batch', B125,
             ONE + (('train.global_batch', 64), ('model.remat', 'dots_no_batch'))),
        Case('1b remat none', B1, ONE + (('model.remat', 'none'),)),
        Case('1b remat full batch 32', B1,
             ONE + (('model.remat', 'full'), ('train.global_batch', 32))),
        Case('1b bf16 params', B1, ONE + (('model.param_dtype', 'bfloat16'),)),
        Case('1b loss_chunk 512', B1, ONE + (('model.loss_chunk', 512),)),
        Case('1b full dpo (copy)', B1, ONE, objective='dpo'),
        Case('1b full dpo (precomputed)', B1, ONE + (('dpo.reference', 'precomputed'),),
             objective='dpo'),
        Case('1b unrolled layers', B1, ONE + (('model.scan_layers', False),)),
        Case('1b lora unrolled layers', B1, ONE + (('model.scan_layers', False),), mode='lora'),
        Case('125m batch 64', B125, ONE + (('train.global_batch', 64),)),
    ),
    'tpu': TPU_CASES,
}

SMOKE = (('model.d_model', 64), ('model.n_layers', 2), ('model.n_heads', 4),
         ('model.n_kv_heads', 2), ('model.d_ff', 128), ('model.vocab_size', 512),
         ('tokenizer.vocab_size', 512), ('data.seq_len', 64), ('train.global_batch', 8))


def _get(rows: dict, name: str, key: str):
  r = rows.get(name)
  return None if r is None or r.get('status') != 'ok' else r[key]


def _ratio(a, b):
  return None if a is None or b is None else a / b


# The targets of a suite: (label, value from the rows, bound, 'min' | 'max').
def targets(rows: dict, suite: str = 'gpu') -> list[tuple[str, float | None, float, str]]:
  def get(name, key):
    return _get(rows, name, key)

  if suite == 'tpu':  # the configs' standing MFU targets, on the splash rows at seq 2048
    return [('125m MFU (splash, seq 2048)', get('125m seq 2048 splash', 'mfu'), 0.40, 'min'),
            ('1b MFU (splash, seq 2048)', get('1b seq 2048 splash', 'mfu'), 0.55, 'min')]
  return [
      ('125m MFU', get('125m', 'mfu'), 0.40, 'min'),
      ('1b MFU', get('1b', 'mfu'), 0.55, 'min'),
      ('1b LoRA / full tokens/s', _ratio(get('1b lora', 'tokens_per_s'),
                                         get('1b', 'tokens_per_s')), 1.3, 'min'),
      # On the same tokens: a DPO step has 2x the rows of the LM (SFT) step.
      ('1b LoRA DPO / SFT time per token', _ratio(get('1b lora', 'tokens_per_s'),
                                                  get('1b lora dpo', 'tokens_per_s')), 2.2,
       'max'),
  ]


def comparisons(rows: dict, suite: str = 'gpu') -> list[tuple[str, float | None]]:
  """(label, value) lines without a bound: for the tpu suite, splash / xla tokens/s of each
  (config, seq) pair of cases (None: a row of the pair was not measured)."""
  if suite != 'tpu':
    return []
  pairs = [c.name[:-len(' splash')] for c in SUITES[suite] if c.name.endswith(' splash')]
  return [(f'{p}: splash / xla tokens/s', _ratio(_get(rows, f'{p} splash', 'tokens_per_s'),
                                                 _get(rows, f'{p} xla', 'tokens_per_s')))
          for p in pairs]


def case_config(case: Case, smoke: bool):
  """(the case's validated ConfigDict, its overrides)."""
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(ROOT, case.config) + (':cpu' if smoke else '')
  overrides = dict(case.overrides + (SMOKE if smoke else ()))
  if smoke and 'train.global_batch' in dict(case.overrides):
    overrides['train.global_batch'] = 16
  if smoke and overrides.get('model.loss_chunk'):
    overrides['model.loss_chunk'] = 16
  if smoke and overrides.get('model.attention', 'xla') != 'xla':
    overrides['model.attention'] = 'xla'  # as ':cpu' does: splash would run interpreted
  return config_lib.load(path, overrides={'lora.enabled': False, **overrides}), overrides


def run_case(case: Case, smoke: bool, peak_tflops: float | None) -> dict:
  cfg, overrides = case_config(case, smoke)
  steps, warmup = (1, 1) if smoke else (case.steps, 2)
  row = bench.run(cfg, mode=case.mode, objective=case.objective, steps=steps, warmup=warmup,
                  peak_tflops=peak_tflops)
  row.update(config=case.config, overrides=overrides)
  return row


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--suite', default='gpu', choices=sorted(SUITES))
  parser.add_argument('--budget_s', type=float, default=420.0,
                      help='start no case after this many seconds')
  parser.add_argument('--only', default='', help='comma-separated case names to run')
  parser.add_argument('--smoke', action='store_true', help='tiny cases on CPU (see above)')
  parser.add_argument('--peak_tflops', type=float, default=None)
  parser.add_argument('--json', default=None, help='append each row to this JSONL file')
  parser.add_argument('--md', default=None, help='write the table and checks here')
  cli.add_verbose_flag(parser)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  cases = SUITES[args.suite]
  if args.only:
    names = [n.strip() for n in args.only.split(',')]
    unknown = sorted(set(names) - {c.name for c in cases})
    if unknown:
      raise ConfigError(f'--only: unknown case(s) {unknown}; known: {[c.name for c in cases]}')
    cases = tuple(c for c in cases if c.name in names)
  print(f'bench_suite: {len(cases)} cases on {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, jax {jax.__version__}, budget {args.budget_s:.0f} s',
        flush=True)
  t0 = time.perf_counter()
  rows = {}
  for case in cases:
    elapsed = time.perf_counter() - t0
    if elapsed > args.budget_s:
      row = {'status': 'skipped', 'error': f'budget ({elapsed:.0f} s elapsed)'}
    else:
      try:
        row = {'status': 'ok', **run_case(case, args.smoke, args.peak_tflops)}
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        row = {'status': 'failed', 'error': f'{type(e).__name__}: {str(e)[:300]}'}
      gc.collect()
      jax.clear_caches()
    row.update(case=case.name, suite=args.suite, smoke=args.smoke,
               date=time.strftime('%Y-%m-%d'), wall_s=time.perf_counter() - t0)
    rows[case.name] = row
    line = (bench.format_row(row) if row['status'] == 'ok' else (row['status'], row['error']))
    print(f'[{row["wall_s"]:6.0f} s] {case.name}: ' + ' | '.join(map(str, line)), flush=True)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps(row) + '\n')

  ok = [r for r in rows.values() if r['status'] == 'ok']
  lines = ['| case | ' + ' | '.join(bench.HEADER) + ' |',
           '|' + '---|' * (len(bench.HEADER) + 1)]
  lines += [f'| {r["case"]} | ' + ' | '.join(bench.format_row(r)) + ' |' for r in ok]
  lines += [f'| {r["case"]} | {r["status"]}: {r["error"]} |' for r in rows.values()
            if r['status'] != 'ok']
  lines.append('')
  for label, value in comparisons(rows, args.suite):
    lines.append(f'- {label}: ' + ('not measured' if value is None else f'{value:.2f}x'))
  for label, value, bound, kind in targets(rows, args.suite):
    fmt = (lambda x: f'{x:.1%}') if 'MFU' in label else (lambda x: f'{x:.2f}x')
    if value is None:
      verdict = 'not measured'
    else:
      good = value >= bound if kind == 'min' else value <= bound
      verdict = f'{fmt(value)}, {"meets" if good else "misses"}'
    lines.append(f'- {label}: {verdict} (target {">=" if kind == "min" else "<="} '
                 f'{fmt(bound)})')
  text = '\n'.join(lines)
  print(text)
  if args.md:
    with open(args.md, 'w') as f:
      f.write(text + '\n')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
