"""JAX's persistent compilation cache, on by default, so that a second start skips compilation.

Where compiled programs are kept, from ``config.compile_cache`` (a string):

* ``'auto'`` (the default): ``$NVAE_JAX_COMPILE_CACHE`` if set, else ``$JAX_COMPILATION_CACHE_DIR``
  if set, else ``$XDG_CACHE_HOME/nvae_jax/jax_cache`` (``~/.cache/nvae_jax/jax_cache``);
* ``'off'``: no persistent cache (``NVAE_JAX_COMPILE_CACHE=off`` does the same for ``'auto'``);
* any other value: that directory.

JAX opens its cache at the first compilation of a process (importing optax already compiles), so
:func:`enable` also resets JAX's cache state, which makes the new folder apply to every later
compilation (``nvae_jax.train.build.build`` calls it before the model compiles).  Programs that compile in
less than ``MIN_COMPILE_SECONDS`` are not stored.  Entries are keyed by the program, the
compiler flags, the device and the jax version, so one folder serves any number of configs.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

ENV = 'NVAE_JAX_COMPILE_CACHE'
OFF = ('off', 'none', 'false', '0')
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'nvae_jax', 'jax_cache')


def resolve(setting: str = 'auto') -> Optional[str]:
  """The cache directory for a ``config.compile_cache`` value, or None when disabled."""
  setting = (setting or 'auto').strip()
  if setting.lower() == 'auto':
    setting = (os.environ.get(ENV) or os.environ.get('JAX_COMPILATION_CACHE_DIR')
               or default_dir())
  if setting.lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str = 'auto') -> Optional[str]:
  """Points JAX's persistent compilation cache at :func:`resolve` (setting); returns the folder."""
  path = resolve(setting)
  jax_compilation_cache.reset_cache()  # JAX decided on its cache at its first compile
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
