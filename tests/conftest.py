"""Test setup: 8 host CPU devices (set before jax is imported) so sharded runs can be
compared with single-device ones in the same process."""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiled programs cached on disk (keyed by the program, jax version and flags), shared by
# the xdist workers and the subprocess tests: the tests compile the same tiny models again
# and again (a quarter of the suite's time, measured on 2 cores).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'lmjax-tests-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(2**30))  # LRU beyond 1 GiB

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)
if os.environ['JAX_PLATFORMS'] == 'tpu':  # float32 references: no bf16 passes of XLA's matmuls
  jax.config.update('jax_default_matmul_precision', 'highest')


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def base(tmp_path_factory):
  """(root, workdir) of a tiny pretrained run (tokenizer recorded in its meta): the base
  model of the SFT and DPO tests."""
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  from util import pretrain_cfg, write_corpus  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('base')
  write_corpus(root / 'text', n_files=40)
  workdir = str(root / 'base')
  loop.train(pretrain_cfg(root), workdir)
  return root, workdir
