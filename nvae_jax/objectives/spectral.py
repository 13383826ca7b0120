"""Spectral and batch-norm regularisers of NVAE.

**Spectral regulariser.**  For every convolution (weight-normalised or not, masked AR convs with
their mask) the effective kernel is a matrix M = W~.view(C_out, C_in/groups * kh * kw).  Power
iteration with persistent vectors, normalize(a) = a / max(||a||, 1e-3):

    v <- normalize(u^T M),   u <- normalize(M v)

run 40 times on the first call (the vectors start as normalised N(0, 1) draws) and 4 times on every
later call, without gradient.  Then sigma(M) = u^T M v with the gradient flowing through M only,
and L_SR = sum over convs of sigma.

Convs whose matrices have the same shape are iterated as one batch, and the state is kept per
such group, as in the original: the ``'spectral'`` collection (checkpointed with the model) is
``{'u': {key: [n, rows]}, 'v': {key: [n, cols]}, 'calls': int32}`` with ``key = 'o<rows>_i<cols>'``
and the n convs of a group in the order of their sorted module paths; ``calls`` counts the updates
(0 = fresh: 40 iterations).  Grouping keeps the compiled program small (a few ops per group rather
than per conv), which matters for models with hundreds of convs.

Layout: the columns of v follow the HWIO kernel's (kh, kw, C_in) flattening, i.e. the matrix is
kernel.reshape(kh kw C_in, C_out)^T; singular values and u are those of PyTorch's OIHW
flattening, and v is a fixed permutation of it (``torch_v_to_hwi``).

**BN regulariser.**  L_BN = sum over batch-norm layers of max_c |gamma_c| (``scale``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from nvae_jax.nn.conv import CONV_KERNELS

FIRST_CALL_ITERS = 40
ITERS = 4
NORMALIZE_EPS = 1e-3


def kernel_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> [O, I * kh * kw] in PyTorch's (I, kh, kw) flattening order."""
  return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[3], -1)


def torch_v_to_hwi(v: np.ndarray, kernel_shape) -> np.ndarray:
  """A right vector over PyTorch's (I, kh, kw) columns -> this module's (kh, kw, I) columns."""
  kh, kw, i, _ = kernel_shape
  return np.asarray(v).reshape(v.shape[:-1] + (i, kh, kw)).transpose(
      tuple(range(v.ndim - 1)) + (v.ndim, v.ndim + 1, v.ndim - 1)).reshape(v.shape)


def group_key(kernel_shape) -> str:
  kh, kw, i, o = kernel_shape
  return f'o{o}_i{kh * kw * i}'


def conv_groups(conv_kernels: Mapping[str, Any]) -> dict[str, list[tuple[str, ...]]]:
  """{group key: sorted module paths} of the convs in a ``'conv_kernels'`` collection."""
  groups: dict[str, list[tuple[str, ...]]] = {}
  for path, kernel in sorted(_flat_kernels(conv_kernels).items()):
    groups.setdefault(group_key(kernel.shape), []).append(path)
  return groups


def _flat_kernels(conv_kernels: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """{module path: kernel} from the sown ``'conv_kernels'`` collection."""
  flat = traverse_util.flatten_dict(dict(conv_kernels))
  out = {}
  for path, value in flat.items():
    if path[-1] != 'kernel' or len(value.shape) != 4:
      raise ValueError(f'{CONV_KERNELS}: unexpected entry {"/".join(path)}')
    out[path[:-1]] = value
  return out


def _normalize(a: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
  return a / jnp.maximum(norm, NORMALIZE_EPS)


def _sizes(key: str) -> tuple[int, int]:
  o, i = key[1:].split('_i')
  return int(o), int(i)


def init_spectral_state(conv_kernels: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Fresh state: normalised N(0, 1) vectors for every conv in ``conv_kernels``."""
  groups = conv_groups(conv_kernels)
  keys = jax.random.split(rng, 2 * max(len(groups), 1))
  u, v = {}, {}
  for j, (key, paths) in enumerate(sorted(groups.items())):
    rows, cols = _sizes(key)
    u[key] = _normalize(jax.random.normal(keys[2 * j], (len(paths), rows), jnp.float32))
    v[key] = _normalize(jax.random.normal(keys[2 * j + 1], (len(paths), cols), jnp.float32))
  return {'u': u, 'v': v, 'calls': jnp.zeros((), jnp.int32)}


def init_spectral_state_host(conv_kernels: Mapping[str, Any],
                             rng: np.random.Generator) -> dict[str, Any]:
  """:func:`init_spectral_state` drawn in numpy (shapes of ``conv_kernels`` suffice)."""
  u, v = {}, {}
  for key, paths in sorted(conv_groups(conv_kernels).items()):
    rows, cols = _sizes(key)
    for name, size, out in (('u', rows, u), ('v', cols, v)):
      a = rng.standard_normal((len(paths), size))
      a = a / np.maximum(np.sqrt(np.sum(a * a, axis=-1, keepdims=True)), NORMALIZE_EPS)
      out[key] = a.astype(np.float32)
  return {'u': u, 'v': v, 'calls': np.zeros((), np.int32)}


def power_iteration(mats: dict, u: dict, v: dict, num_iters) -> tuple[dict, dict]:
  """``num_iters`` steps v = normalize(u^T M), u = normalize(M v) on every group (no gradient).

  ``mats[k]`` is [n, cols, rows] (the transposed matrices), ``u[k]`` [n, rows], ``v[k]``
  [n, cols].
  """
  mats = lax.stop_gradient(mats)

  def body(_, uv):
    u, v = uv
    v = {k: _normalize(jnp.einsum('ncr,nr->nc', mats[k], u[k])) for k in mats}
    u = {k: _normalize(jnp.einsum('ncr,nc->nr', mats[k], v[k])) for k in mats}
    return u, v

  return lax.fori_loop(0, num_iters, body, (lax.stop_gradient(u), lax.stop_gradient(v)))


def spectral_loss(conv_kernels: Mapping[str, Any], state: Mapping[str, Any],
                  num_iters: int | None = None):
  """L_SR = sum of sigma_max estimates, and the updated state.

  Args:
    conv_kernels: the ``'conv_kernels'`` collection of a forward pass.
    state: the ``'spectral'`` collection (see the module docstring).
    num_iters: power iterations to run; by default 40 when ``state['calls'] == 0`` and 4 after.
      ``0`` evaluates sigma = u^T M v with the stored vectors as they are.

  Returns:
    (loss, new_state, sigmas) with ``sigmas`` a {group key: [n]} dict (convs in sorted path
    order, see :func:`conv_groups`).
  """
  kernels = _flat_kernels(conv_kernels)
  groups = conv_groups(conv_kernels)
  u0, v0 = dict(state['u']), dict(state['v'])
  problems = []
  for key, paths in groups.items():
    rows, cols = _sizes(key)
    if key not in u0 or key not in v0:
      problems.append(f'{key}: no vectors for {len(paths)} convs')
    elif u0[key].shape != (len(paths), rows) or v0[key].shape != (len(paths), cols):
      problems.append(f'{key}: vectors {u0[key].shape}, {v0[key].shape} for {len(paths)} convs '
                      f'of {rows}x{cols}')
  extra = sorted(set(u0) - set(groups))
  if problems or extra:
    raise ValueError(f'spectral state does not match the model convs: {problems}; unused groups '
                     f'{extra}')
  calls = state['calls']
  if num_iters is None:
    num_iters = jnp.where(calls == 0, FIRST_CALL_ITERS, ITERS)
  mats = {}
  for key, paths in groups.items():
    rows, _ = _sizes(key)
    mats[key] = jnp.stack([kernels[p].astype(jnp.float32).reshape(-1, rows) for p in paths])
  u, v = power_iteration(mats, {k: u0[k] for k in mats}, {k: v0[k] for k in mats}, num_iters)
  sigmas = {k: jnp.einsum('nc,ncr,nr->n', v[k], mats[k], u[k]) for k in mats}
  loss = sum((jnp.sum(s) for s in sigmas.values()), jnp.zeros((), jnp.float32))
  return loss, {'u': u, 'v': v, 'calls': calls + 1}, sigmas


def batchnorm_loss(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> jax.Array:
  """L_BN = sum over BN layers (modules with 'mean'/'var' batch stats) of max_c |scale_c|."""
  flat_params = traverse_util.flatten_dict(dict(params))
  loss = jnp.zeros((), jnp.float32)
  for path in traverse_util.flatten_dict(dict(batch_stats)):
    if path[-1] != 'mean':
      continue
    scale = flat_params.get(path[:-1] + ('scale',))
    if scale is None:
      raise ValueError(f'batchnorm_loss: no scale parameter for BN {"/".join(path[:-1])}')
    loss = loss + jnp.max(jnp.abs(scale))
  return loss
