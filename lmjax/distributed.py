"""JAX's multi-controller runtime: one process per host, all running the same program.

initialize(cfg) must run before anything touches a device. It starts
`jax.distributed.initialize` when the run is multi-process:
  - cfg.distributed.coordinator_address (or $LMJAX_COORDINATOR_ADDRESS) set: that
    coordinator (host:port, process 0's), with num_processes / process_id from the config
    or $LMJAX_NUM_PROCESSES / $LMJAX_PROCESS_ID (a GPU cluster, or several processes on one
    machine);
  - else, with mode='auto', on a Cloud TPU VM (TPU devices present) or under SLURM / Open
    MPI with more than one task: JAX's own cluster detection (no arguments), which reads
    the TPU metadata / scheduler environment;
  - else a single process.
Every process then sees all devices of the job (jax.devices()) and its own
(jax.local_devices()); the data pipeline reads process_index's share, checkpoints are
written jointly. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import glob
import os

import jax

from lmjax import config as config_lib

ENV = {'coordinator_address': 'LMJAX_COORDINATOR_ADDRESS',
       'num_processes': 'LMJAX_NUM_PROCESSES', 'process_id': 'LMJAX_PROCESS_ID'}
UNSET = {'coordinator_address': '', 'num_processes': 0, 'process_id': -1}  # config defaults


def _tpu_vm() -> bool:
  return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def _scheduler_tasks() -> int:
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if os.environ.get(var, '').isdigit():
      return int(os.environ[var])
  return 1


def settings(cfg) -> dict | None:
  """The arguments initialize() passes to jax.distributed.initialize ({} = JAX's cluster
  auto-detection), or None for a single-process run. ConfigError names a missing field."""
  d = cfg.distributed
  if d.mode not in ('auto', 'manual', 'off'):
    raise config_lib.ConfigError(f"distributed.mode must be 'auto', 'manual' or 'off', got "
                                 f'{d.mode!r}')
  if d.mode == 'off':
    return None
  value = {k: d[k] if d[k] != UNSET[k] else os.environ.get(env, '') for k, env in ENV.items()}
  if value['coordinator_address'] or d.mode == 'manual':
    missing = [k for k, v in value.items() if v in ('', None)]
    if missing:
      raise config_lib.ConfigError(
          'a multi-process run needs ' + ', '.join(f'distributed.{k} (or ${ENV[k]})'
                                                   for k in missing))
    try:
      n, pid = int(value['num_processes']), int(value['process_id'])
    except ValueError:
      raise config_lib.ConfigError(
          f'distributed.num_processes / process_id must be integers, got '
          f'{value["num_processes"]!r} / {value["process_id"]!r}') from None
    if not 0 <= pid < n:
      raise config_lib.ConfigError(f'distributed.process_id {pid} is not in [0, {n})')
    return {'coordinator_address': str(value['coordinator_address']), 'num_processes': n,
            'process_id': pid}
  if _tpu_vm() or _scheduler_tasks() > 1:
    return {}
  return None


def initialize(cfg) -> bool:
  """Starts the multi-process runtime when cfg / the environment call for it (see the
  module doc); returns whether this is a multi-process run. Idempotent."""
  args = settings(cfg)
  if args is None:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU only; else unused
  try:
    jax.distributed.initialize(**args,
                               initialization_timeout=int(cfg.distributed.timeout_s))
  except RuntimeError as e:
    if args:  # an explicit coordinator: a run that cannot join must not go on alone
      raise
    # Auto-detected (e.g. a notebook on a TPU VM that has used JAX already): one process.
    print(f'lmjax: jax.distributed not started ({str(e).splitlines()[0][:200]}); '
          'running as a single process', flush=True)
    return False
  return True
