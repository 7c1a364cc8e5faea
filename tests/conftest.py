"""Test setup: 8 host CPU devices (set before jax is imported) so sharded runs can be
compared with single-device ones in the same process."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)
