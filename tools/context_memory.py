"""Memory per device of one train step against sequence length, with and without context
parallelism: compiles the step (it never runs it) for a batch of one sequence of each
length, on cp devices splitting that sequence (mesh.sequence=cp; cp=1: one device holds
it whole), and prints compiled.memory_analysis() per device as a table.

  python tools/context_memory.py [--config=configs/bench/llama_125m.py:cpu]
      [--seq=2048,4096,8192] [--cp=1,4] [--json=rows.jsonl] [--config.KEY=VALUE ...]

On CPU it forces 8 host devices (XLA_FLAGS) when none are forced. Columns: arguments
(parameters, optimizer state and the batch: replicated over the sequence axis, so the
same at every cp), temporaries (activations kept for the backward pass, attention scores
among them: [heads, T/cp, T] a layer with xla attention), peak = arguments + outputs +
temporaries - aliased (the donated state). docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8').strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lmjax import cli  # pylint: disable=wrong-import-position


def measure(cfg, seq_len: int, cp: int) -> dict:
  """One row: the step for one sequence of seq_len tokens split over cp devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import bench  # pylint: disable=g-import-not-at-top
  from lmjax import sharding  # pylint: disable=g-import-not-at-top
  cfg = cfg.copy_and_resolve_references()
  cfg.data.seq_len = seq_len
  cfg.train.update(global_batch=1, grad_accum=1)
  cfg.mesh.update(data=1, fsdp=1, expert=1, sequence=cp, tensor=1)
  devices = jax.devices()[:cp]
  if len(devices) < cp:
    raise SystemExit(f'--cp={cp} needs {cp} devices, {len(jax.devices())} available')
  cfg, mesh, setup, train_step, spec = bench._prepare(cfg, 'full', 'lm', devices)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh, cfg.rules):
    compiled = train_step.jitted.lower(setup.abstract_state, spec).compile()
  mem = compiled.memory_analysis()
  return {'seq_len': seq_len, 'cp': cp, 'device': f'{cp} x {devices[0].device_kind}',
          'attention': cfg.model.attention, 'remat': cfg.model.remat,
          'argument_bytes': mem.argument_size_in_bytes,
          'temp_bytes': mem.temp_size_in_bytes,
          'peak_bytes': (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
          'compile_s': time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
  gib = lambda b: f'{b / 2**30:.2f}'
  out = ['| seq_len | cp | arguments GiB | temporaries GiB | peak GiB / device |',
         '| ---: | ---: | ---: | ---: | ---: |']
  out += [f"| {r['seq_len']} | {r['cp']} | {gib(r['argument_bytes'])} | "
          f"{gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} |" for r in rows]
  return '\n'.join(out)


@cli.main
def main(argv) -> int:
  from lmjax import config as config_lib  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/bench/llama_125m.py:cpu')
  parser.add_argument('--seq', default='2048,4096,8192')
  parser.add_argument('--cp', default='1,4')
  parser.add_argument('--json', default='')
  args, overrides = parser.parse_known_args(argv)
  cfg = config_lib.load(args.config, flags=overrides)
  rows = []
  for seq_len in (int(s) for s in args.seq.split(',')):
    for cp in (int(c) for c in args.cp.split(',')):
      row = measure(cfg, seq_len, cp)
      print(f"seq {seq_len} cp {cp}: peak {row['peak_bytes'] / 2**30:.2f} GiB a device "
            f"(compiled in {row['compile_s']:.0f} s)", file=sys.stderr, flush=True)
      rows.append(row)
      if args.json:
        with open(args.json, 'a', encoding='utf-8') as f:
          f.write(json.dumps(row) + '\n')
  print(table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
