"""Start-up and host memory: the persistent compilation cache settings (``nvae_jax.compile_cache``)
and returning the compiler's freed heap (``nvae_jax.host_memory``)."""

import ctypes
import ctypes.util
import os

import jax
import jax.numpy as jnp
import pytest

from nvae_jax import compile_cache, host_memory


def test_resolve_rules(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.resolve('auto') == os.path.join(str(tmp_path), 'nvae_jax', 'jax_cache')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert compile_cache.resolve('auto') == str(tmp_path / 'jax')
  monkeypatch.setenv(compile_cache.ENV, 'off')
  assert compile_cache.resolve('auto') is None
  assert compile_cache.resolve('OFF') is None
  assert compile_cache.resolve(str(tmp_path / 'x')) == str(tmp_path / 'x')


def test_enable_after_a_compile_moves_the_cache(tmp_path):
  """JAX fixes its cache at the first compile of a process; enable() must still take effect."""
  before = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.jit(lambda x: x + 1)(1.0)  # a compile before enable()
  try:
    assert compile_cache.enable(str(tmp_path / 'cache')) == str(tmp_path / 'cache')
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    x = jnp.ones(7)
    jax.jit(lambda x: jnp.sin(x) * 3.5 + 0.25)(x).block_until_ready()
    entries = os.listdir(tmp_path / 'cache')
    assert any(e.startswith('jit__lambda') for e in entries)
    assert compile_cache.enable('off') is None
    jax.jit(lambda x: jnp.cos(x) * 1.5)(x).block_until_ready()
    assert sorted(os.listdir(tmp_path / 'cache')) == sorted(entries)
  finally:
    compile_cache.enable(before or 'off')
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status') or not host_memory._malloc_trim(),
                    reason='needs Linux with glibc')
def test_release_freed_heap_returns_pages_to_the_system():
  """200 MB of freed 4 KB heap blocks, pinned below a live block, go back to the system."""
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(4096) for _ in range(50_000)]
  for b in blocks:
    ctypes.memset(b, 1, 4096)  # touch the pages, so that they are resident
  pin = libc.malloc(4096)  # keeps free() from shrinking the heap top by itself
  for b in blocks:
    libc.free(b)
  before = _rss_mb()
  assert host_memory.release_freed_heap()
  after = _rss_mb()
  libc.free(pin)
  assert before - after > 150, (before, after)
