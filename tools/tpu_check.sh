#!/usr/bin/env bash
# The TPU check in one command, on a single-host Cloud TPU VM with 8 chips (v5litepod-8,
# v6e-8: tests/test_context_parallel.py's meshes need 8 devices; the bench cases also split
# over 4), in a checkout with lmjax, jax[tpu] and pytest installed:  bash tools/tpu_check.sh
# (README, "TPU check": creating the VM and installing with tools/launch_tpu.py.)
# Wheels in $WHEELS (default .whl/) are installed first (tools/device_env.sh).
# 1. environment (jax, its devices, the TPU's device_kind, package versions); 2. the
# splash attention kernel and context-parallel tests on the TPU, compiled, not interpreted
# ($TPU_TESTS, default tests/test_splash.py tests/test_context_parallel.py); 3.
# tools/bench_suite.py --suite=tpu within $BENCH_BUDGET seconds (default 600): the 125M
# and 1B bench configs, splash vs xla attention, seq 2048 and 8192.
# BENCH_ARGS adds bench_suite flags (word-split; tests/test_bench.py runs this script on
# CPU with --smoke); BENCH_ONLY, comma-separated case names, is passed whole as --only
# (the case names hold spaces: BENCH_ONLY='1b seq 8192 splash,1b seq 8192 xla').
# JAX_PLATFORMS defaults to tpu. Writes under $OUT (or /tmp/tpu_check): env.txt,
# test_splash.log, bench.log, bench.err, rows.jsonl, table.md; the last lines printed are
# the bench table, splash / xla tokens/s per (config, seq), and the MFU targets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tpu_check}
mkdir -p "$OUT"
BUDGET=${BENCH_BUDGET:-600}
source tools/device_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-tpu}
{
  date -u
  echo "JAX_PLATFORMS=$JAX_PLATFORMS TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())
d = jax.devices()[0]
print('device_kind', repr(d.device_kind), 'platform', d.platform, 'devices', jax.device_count(),
      'local', jax.local_device_count(), 'processes', jax.process_count())
try: print('memory per device', (d.memory_stats() or {}).get('bytes_limit'))
except Exception as e: print('memory per device: unknown', type(e).__name__)
import importlib.metadata as md
for p in ('jaxlib', 'libtpu', 'libtpu-nightly', 'flax', 'optax', 'orbax-checkpoint', 'grain',
          'ml-collections', 'tensorflow-datasets', 'sentencepiece', 'numpy', 'pytest'):
  try: print(p, md.version(p))
  except md.PackageNotFoundError: print(p, 'missing')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
TPU_TESTS=${TPU_TESTS:-tests/test_splash.py tests/test_context_parallel.py}
timeout 300 python3 -m pytest -q -p no:cacheprovider $TPU_TESTS > "$OUT/test_splash.log" 2>&1
echo "$TPU_TESTS exit $?: $(tail -1 "$OUT/test_splash.log")"
grep -E '^(FAILED|ERROR)|^E ' "$OUT/test_splash.log" | head -20
timeout $((BUDGET + 400)) python3 tools/bench_suite.py --suite=tpu --budget_s="$BUDGET" \
  --json="$OUT/rows.jsonl" --md="$OUT/table.md" ${BENCH_ONLY:+"--only=$BENCH_ONLY"} \
  ${BENCH_ARGS:-} 2> "$OUT/bench.err" | tee "$OUT/bench.log"
echo "bench_suite exit ${PIPESTATUS[0]}"
