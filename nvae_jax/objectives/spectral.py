"""Spectral and batch-norm regularisers of NVAE.

**Spectral regulariser.**  For every convolution (weight-normalised or not, masked AR convs with
their mask) take the effective kernel as the matrix M = W~.view(C_out, C_in/groups * kh * kw)
(PyTorch's OIHW flattening, so the right singular vectors are comparable with the original's).
Power iteration with persistent vectors, normalize(a) = a / max(||a||, 1e-3):

    v <- normalize(u^T M),   u <- normalize(M v)

run 40 times on the first call (the vectors start as normalised N(0, 1) draws) and 4 times on every
later call, without gradient.  Then sigma(M) = u^T M v with the gradient flowing through M only,
and L_SR = sum over convs of sigma.  Matrices of the same shape are iterated as one batch.

State (the ``'spectral'`` collection, checkpointed with the model): ``{'u': tree, 'v': tree,
'calls': int32}`` where the trees mirror the module paths of the convs (``u`` [C_out], ``v``
[C_in/groups * kh * kw] per conv) and ``calls`` counts the updates (0 = fresh: use 40 iterations).

**BN regulariser.**  L_BN = sum over batch-norm layers of max_c |gamma_c| (``scale``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from nvae_jax.nn.conv import CONV_KERNELS

FIRST_CALL_ITERS = 40
ITERS = 4
NORMALIZE_EPS = 1e-3


def kernel_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> [O, I * kh * kw] in PyTorch's (I, kh, kw) flattening order."""
  return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[3], -1)


def _flat_kernels(conv_kernels: Mapping[str, Any]) -> dict[tuple[str, ...], jax.Array]:
  """{module path: kernel} from the sown ``'conv_kernels'`` collection."""
  flat = traverse_util.flatten_dict(dict(conv_kernels))
  out = {}
  for path, value in flat.items():
    if path[-1] != 'kernel':
      raise ValueError(f'{CONV_KERNELS}: unexpected entry {"/".join(path)}')
    out[path[:-1]] = value
  return out


def _normalize(a: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
  return a / jnp.maximum(norm, NORMALIZE_EPS)


def init_spectral_state(conv_kernels: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Fresh state: normalised N(0, 1) vectors for every conv in ``conv_kernels``."""
  flat = _flat_kernels(conv_kernels)
  u, v = {}, {}
  keys = jax.random.split(rng, 2 * max(len(flat), 1))
  for i, (path, kernel) in enumerate(sorted(flat.items())):
    rows, cols = kernel.shape[3], kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    u[path] = _normalize(jax.random.normal(keys[2 * i], (rows,), jnp.float32))
    v[path] = _normalize(jax.random.normal(keys[2 * i + 1], (cols,), jnp.float32))
  return {'u': traverse_util.unflatten_dict(u), 'v': traverse_util.unflatten_dict(v),
          'calls': jnp.zeros((), jnp.int32)}


def power_iteration(mats: jax.Array, u: jax.Array, v: jax.Array, num_iters) -> tuple:
  """``num_iters`` batched steps v = normalize(u^T M), u = normalize(M v) (no gradient)."""
  mats = lax.stop_gradient(mats)

  def body(_, uv):
    u, v = uv
    v = _normalize(jnp.einsum('nr,nrc->nc', u, mats))
    u = _normalize(jnp.einsum('nrc,nc->nr', mats, v))
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
    (loss, new_state, sigmas) with ``sigmas`` a {module path: sigma} dict.
  """
  kernels = _flat_kernels(conv_kernels)
  u_flat = traverse_util.flatten_dict(dict(state['u']))
  v_flat = traverse_util.flatten_dict(dict(state['v']))
  missing = sorted(set(kernels) - set(u_flat))
  extra = sorted(set(u_flat) - set(kernels))
  if missing or extra:
    raise ValueError('spectral state does not match the model convs: missing '
                     f'{["/".join(p) for p in missing]}, unused {["/".join(p) for p in extra]}')
  calls = state['calls']
  if num_iters is None:
    num_iters = jnp.where(calls == 0, FIRST_CALL_ITERS, ITERS)
  groups: dict[tuple[int, int], list[tuple[str, ...]]] = {}
  mats = {p: kernel_matrix(k.astype(jnp.float32)) for p, k in kernels.items()}
  for p in sorted(mats):
    groups.setdefault(mats[p].shape, []).append(p)
  new_u, new_v, sigmas = {}, {}, {}
  loss = jnp.zeros((), jnp.float32)
  for shape, paths in groups.items():
    m = jnp.stack([mats[p] for p in paths])
    u0 = jnp.stack([u_flat[p] for p in paths])
    v0 = jnp.stack([v_flat[p] for p in paths])
    if shape[0] != u0.shape[1] or shape[1] != v0.shape[1]:
      raise ValueError(f'spectral state: vectors {u0.shape[1:]}, {v0.shape[1:]} do not fit '
                       f'matrices {shape} at {"/".join(paths[0])}')
    u, v = power_iteration(m, u0, v0, num_iters)
    sigma = jnp.einsum('nr,nrc,nc->n', u, m, v)
    loss = loss + jnp.sum(sigma)
    for i, p in enumerate(paths):
      new_u[p], new_v[p], sigmas[p] = u[i], v[i], sigma[i]
  new_state = {'u': traverse_util.unflatten_dict(new_u),
               'v': traverse_util.unflatten_dict(new_v), 'calls': calls + 1}
  return loss, new_state, sigmas


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
