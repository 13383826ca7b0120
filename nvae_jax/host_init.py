"""Variable initialisation on the host (numpy), so that initialising a model compiles nothing.

Flax initialises a model by running its forward pass; under ``jax.jit`` that is one XLA program
with a random-number kernel per parameter, and XLA:CPU spends over a minute compiling it for an
NVAE.  Instead, the NVAE modules create their variables through :func:`param` and
:func:`variable`, which, besides the usual ``Module.param``/``Module.variable``, note *how* each
variable is initialised (a :class:`Uniform`, :class:`Constant` or :class:`LogWeightNorm`) when a
:func:`recording` is active.  :func:`initialise` then

1. traces ``init_fn`` once with ``jax.eval_shape`` (shapes only, no compilation) while recording,
2. draws every recorded variable in numpy, in creation order, each from its own generator
   ``np.random.default_rng([seed, crc32(path)])`` (the result does not depend on the order in
   which variables are drawn, nor on how many other variables the model has).

The distributions are those of the flax initialisers next to them (PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv/linear weights and biases, ones/zeros for batch
norm, weight-norm g_0 = log(||W_0 * M|| + 0.01) + log(scale)); the random streams differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_RECORDERS: list[dict] = []


@dataclasses.dataclass(frozen=True)
class Uniform:
  """U(low, high); callable as a flax initialiser ``(key, shape, dtype)``."""
  low: float
  high: float

  def __call__(self, key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, self.low, self.high)

  def host(self, rng: np.random.Generator, shape, siblings) -> np.ndarray:
    del siblings
    return rng.uniform(self.low, self.high, shape).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Constant:
  """Every entry ``value``; callable as a flax initialiser ``(key, shape, dtype)``."""
  value: float

  def __call__(self, key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, self.value, dtype)

  def host(self, rng, shape, siblings) -> np.ndarray:
    del rng, siblings
    return np.full(shape, self.value, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class LogWeightNorm:
  """g_0 = log(||W * M|| + 0.01) + log(scale) per output channel (last axis) of the sibling
  parameter ``kernel`` of the same module; ``mask`` M (numpy, broadcastable) or None."""
  mask: Optional[np.ndarray] = None
  scale: float = 1.0
  kernel: str = 'kernel'

  def host(self, rng, shape, siblings) -> np.ndarray:
    del rng
    w = np.asarray(siblings[self.kernel], np.float64)
    if self.mask is not None:
      w = w * self.mask
    norm = np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - 1))))
    g = np.log(norm + 1e-2) + np.log(self.scale)
    if g.shape != tuple(shape):
      raise ValueError(f'LogWeightNorm: kernel {w.shape} gives {g.shape}, expected {shape}')
    return g.astype(np.float32)


def _note(module: nn.Module, collection: str, name: str, init) -> None:
  if _RECORDERS and module.is_initializing():
    _RECORDERS[-1][(collection,) + tuple(module.scope.path) + (name,)] = init


def param(module: nn.Module, name: str, init, shape, jax_init: Optional[Callable] = None):
  """``module.param(name, jax_init or init, shape, float32)``, noting ``init`` for the host."""
  value = module.param(name, jax_init or init, tuple(shape), jnp.float32)
  _note(module, 'params', name, init)
  return value


def variable(module: nn.Module, collection: str, name: str, init: Constant, shape):
  """``module.variable(collection, name, ...)`` initialised to ``init``, noted for the host."""
  var = module.variable(collection, name, lambda: init(None, tuple(shape)))
  _note(module, collection, name, init)
  return var


@contextlib.contextmanager
def recording():
  """Collects ``{(collection, *module path, name): initialiser}`` of the variables created."""
  records: dict = {}
  _RECORDERS.append(records)
  try:
    yield records
  finally:
    _RECORDERS.pop()


def path_seed(seed: int, path: tuple[str, ...]) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32('/'.join(path).encode())])


def initialise(init_fn: Callable[..., Any], seed: int, collections, *args) -> tuple[dict, Any]:
  """Host values of the recorded ``collections`` of ``init_fn(*args)``, and its abstract output.

  ``init_fn`` returns a flax variable dict; every leaf of the named collections must have been
  created through :func:`param` / :func:`variable` (a missing record is an error naming the
  path).  Returns ``({collection: tree of numpy arrays}, abstract output of init_fn)``.
  """
  with recording() as records:
    # A fresh function each time: jax caches traces by function, and a cached trace records nothing.
    abstract = jax.eval_shape(lambda *a: init_fn(*a), *args)  # pylint: disable=unnecessary-lambda
  out = {}
  for col in collections:
    flat = traverse_util.flatten_dict(dict(abstract.get(col, {})))
    unknown = [p for p in flat if (col,) + p not in records]
    if unknown:
      raise ValueError(f'host initialisation: no recorded initialiser for {col}/'
                       f'{"/".join(unknown[0])} (create it with nvae_jax.host_init.param)')
    values: dict = {}
    by_module: dict = {}
    for key, init in records.items():
      if key[0] != col or key[1:] not in flat:
        continue
      path = key[1:]
      siblings = by_module.setdefault(path[:-1], {})
      leaf = flat[path]
      v = init.host(path_seed(seed, key), tuple(leaf.shape), siblings)
      if v.shape != tuple(leaf.shape):
        raise ValueError(f'host initialisation of {"/".join(key)}: got shape {v.shape}, '
                         f'expected {tuple(leaf.shape)}')
      values[path] = siblings[path[-1]] = v.astype(leaf.dtype)
    out[col] = traverse_util.unflatten_dict(values)
  return out, abstract
