"""Test-wide JAX settings. They must be set before jax initialises its backend."""

import os

# 8 fake CPU devices for the sharding tests; a single device is still the default elsewhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# A persistent compilation cache outside the repository: a bonus on a reused machine.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/nvae_jax_jit'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared')
