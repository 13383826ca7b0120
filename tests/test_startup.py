"""Start-up: the persistent compilation cache settings (``nvae_jax.compile_cache``)."""

import os

import jax
import jax.numpy as jnp

from nvae_jax import compile_cache


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
