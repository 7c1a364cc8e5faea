#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (about 8 minutes on one
# H100/H200):   bash tools/gpu_check.sh
# Wheels in $WHEELS (default .whl/) are installed first: for a GPU machine without internet
# access, run tools/fetch_device_wheels.sh where PyPI is reachable and copy its .whl/ along.
# 1. environment (GPU, driver, jax, cuDNN); 2. tests/test_gpu.py (cuDNN attention against
# xla on packed rows); 3. the MoE feed-forward rows (tools/bench.py --moe_rows: dropless
# grouped matmuls vs dense dispatch vs a dense MLP of the same active FLOPs; $MOE_ARGS
# replaces its arguments); 4. tools/bench_suite.py --suite=gpu within $BENCH_BUDGET
# seconds. BENCH_ARGS adds bench_suite flags (e.g. --only=...; tests/test_bench.py runs
# this script on CPU with --smoke). Writes under $OUT (or /tmp/gpu_check): env.txt,
# test_gpu.log, moe.log, moe_rows.jsonl, bench.log, bench.err, rows.jsonl, table.md; the
# last lines printed are the bench table and the GPU targets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BUDGET=${BENCH_BUDGET:-330}
source tools/device_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())
from jax._src.lib import cuda_versions
print('cudnn', cuda_versions.cudnn_get_version() if cuda_versions else None)
import importlib.metadata as md
for p in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'ml-collections',
          'tensorflow-datasets', 'sentencepiece', 'numpy'):
  try: print(p, md.version(p))
  except md.PackageNotFoundError: print(p, 'missing')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
echo "tests/test_gpu.py exit $?: $(tail -1 "$OUT/test_gpu.log")"
grep -E '^(FAILED|ERROR)|^E ' "$OUT/test_gpu.log" | head -20
MOE_ARGS=${MOE_ARGS:---config=configs/bench/moe_1b.py --steps=10}
timeout 240 python3 tools/bench.py --moe_rows $MOE_ARGS --json="$OUT/moe_rows.jsonl" \
  > "$OUT/moe.log" 2>&1
echo "moe rows exit $?:"
grep -E '^\||vs the dense MLP|^error' "$OUT/moe.log"
timeout $((BUDGET + 200)) python3 tools/bench_suite.py --suite=gpu --budget_s="$BUDGET" \
  --json="$OUT/rows.jsonl" --md="$OUT/table.md" ${BENCH_ARGS:-} 2> "$OUT/bench.err" \
  | tee "$OUT/bench.log"
echo "bench_suite exit ${PIPESTATUS[0]}"
