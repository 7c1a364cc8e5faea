"""The grouped matmul of dropless MoE dispatch: rows sorted by expert times each row's
expert weights, `x [M, K] @ w[g] [K, N]` for the rows of group g (sizes [G]).

Two implementations (model.moe.grouped_matmul):
  xla     (default) `jax.lax.ragged_dot`: XLA's lowering. A grouped GEMM on TPU and on
          NVIDIA GPUs with cuDNN >= 9.22; elsewhere a dense matmul over every group (G
          times the work: 0.12x a dense MLP's throughput on an H200 with cuDNN 9.19).
  pallas  jax's Pallas Mosaic-GPU kernels for Hopper (sm90: H100, H200):
          `ragged_dot_mgpu.ragged_dot` forward and for the input's gradient (weights
          transposed), `transposed_ragged_dot_mgpu.transposed_ragged_dot` for the
          weights' gradient, tied by a custom VJP. bf16 / f16 operands, K and N multiples
          of 128. Not yet run on a GPU here: tests/test_gpu.py checks it against the
          reference and the GPU check times it (docs/benchmarks.md), so it stays opt-in
          until those have passed.
  auto    pallas where it applies (a Hopper GPU, those dtypes and shapes), else xla.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHOICES = ('auto', 'xla', 'pallas')
# Kernel tiles: rows x output columns x contraction, and pipeline depth.
BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 64, 4


def hopper() -> bool:
  """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x)."""
  if jax.default_backend() != 'gpu':
    return False
  cc = str(getattr(jax.devices()[0], 'compute_capability', ''))
  return cc.startswith('9')


def pallas_fits(x, w) -> str | None:
  """Why the Pallas kernels cannot take x [M, K] @ w [G, K, N] here, or None."""
  if not hopper():
    return 'not an NVIDIA Hopper GPU'
  if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
    return f'operands {x.dtype} x {w.dtype} (the kernels take bf16 or f16 on both sides)'
  k, n = w.shape[1], w.shape[2]
  if k % BLOCK_N or n % BLOCK_N:
    return f'K={k}, N={n} are not multiples of {BLOCK_N}'
  return None


def resolve(choice: str, x, w) -> str:
  """'xla' or 'pallas' for model.moe.grouped_matmul=`choice` on these operands."""
  if choice == 'xla':
    return 'xla'
  why = pallas_fits(x, w)
  if choice == 'pallas' and why:
    from lmjax.config import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f'model.moe.grouped_matmul=pallas: {why}; use auto or xla')
  return 'xla' if why else 'pallas'


def grouped_matmul(x, w, sizes, impl: str = 'xla'):
  """x [M, K] (rows sorted by group), w [G, K, N], sizes [G] int32 -> [M, N]."""
  if resolve(impl, x, w) == 'xla':
    return jax.lax.ragged_dot(x, w, sizes)
  return _pallas(x, w, sizes)


def _kernels():
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  return ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot


def _forward(x, w, sizes, transpose_rhs=False):
  ragged, _ = _kernels()
  return ragged(x, w, group_sizes=sizes, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K,
                max_concurrent_steps=STAGES, grid_block_n=1, transpose_rhs=transpose_rhs)


@jax.custom_vjp
def _pallas(x, w, sizes):
  return _forward(x, w, sizes)


def _pallas_fwd(x, w, sizes):
  return _forward(x, w, sizes), (x, w, sizes)


def _pallas_bwd(res, g):
  x, w, sizes = res
  _, transposed = _kernels()
  g = g.astype(x.dtype)
  dx = _forward(g, w, sizes, transpose_rhs=True)                       # [M, K]
  dw = transposed(x, g, group_sizes=sizes, block_m=BLOCK_M, block_n=BLOCK_N,
                  block_k=BLOCK_K, max_concurrent_steps=STAGES, grid_block_n=1)  # [G, K, N]
  return dx, dw.astype(w.dtype), None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
