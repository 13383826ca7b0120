"""Invertible 1x1 convolutions (Glow; Hoogeboom et al. 2019 QR), and the helpers every layer shares.

A 1x1 convolution mixes channels with one C x C matrix W applied at every pixel,
``y[b, i, j, :] = x[b, i, j, :] @ W`` (row vectors, ``y_o = sum_c x_c W[c, o]``).  Its Jacobian is
block diagonal with H*W copies of W^T, so

    log|det J| = H * W * log|det W|,

independent of the data.  Three parameterisations of W (``Conv1x1(variant=...)``):

* ``'plain'``: W itself, initialised to a random orthogonal matrix (QR of a Gaussian).
  log|det W| from an LU ``slogdet`` (O(C^3)); the inverse applies W^{-1} obtained from the LU
  factors (O(C^3 + N C^2) for N pixels).  Nothing keeps W invertible: maximum likelihood pushes det W away from 0.
* ``'plu'`` (Glow's LU form): W = P L U with L unit lower-triangular, U = strictly-upper +
  diag(exp(log_s)), so log|det W| = sum_c log_s[c] (O(C)) and W^{-1} = U^{-1} L^{-1} comes from two
  triangular solves (O(C^3)), applied to the N pixels in O(N C^2).
  Here P = I: the initial value is built from the pivoted LU of a random orthogonal W0,
  ``W0 D = P0 L U`` (D = the signs of diag U, so that diag U > 0), and the layer starts at the
  random orthogonal matrix ``L U = P0^T W0 D``.  Any fixed P gives the same family up to a fixed
  channel permutation, so nothing non-trainable has to be stored (every variable is in
  ``'params'``).  Like Glow's frozen P and sign, this covers one open cell of GL(C): the matrices
  whose leading principal minors are all positive.
* ``'qr'`` (the emerging-convolutions paper): W = Q R with Q = H_1 ... H_C a product of C
  Householder reflections H_i = I - 2 v_i v_i^T / (v_i^T v_i) (v_i ~ N(0, I), det Q = (-1)^C,
  Q^{-1} = Q^T) and R = strictly-upper + diag(exp(log_d)); log|det W| = sum_c log_d[c].
  W^{-1} = R^{-1} Q^T needs one triangular solve.  The positive diagonal fixes
  sign(det W) = (-1)^C, which loses nothing else: every W of that sign has such a factorisation.

Precision: parameters are float32; the computation runs in float32, or in float64 when ``x`` is
float64 (under ``jax.enable_x64``).  Matrix products use ``Precision.HIGHEST`` so that accelerators
do not silently use TF32/bfloat16 passes, which would break exact invertibility.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

VARIANTS = ('plain', 'plu', 'qr')


# --------------------------------------------------------------------------------------------
# Helpers shared by the flow layers of this package.


def check_nhwc(x: jax.Array, layer: str) -> None:
  """Raises a ValueError naming ``layer`` unless ``x`` is a rank-4 floating NHWC array."""
  if x.ndim != 4:
    raise ValueError(f'{layer}: x must be a rank-4 NHWC array [batch, height, width, channels], '
                     f'got shape {tuple(x.shape)} (rank {x.ndim})')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{layer}: x must have a floating dtype, got {x.dtype}')


def compute_dtype(x: jax.Array):
  """float64 for float64 inputs, float32 for everything else (bfloat16 and float16 included)."""
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def batch_logdet(value: jax.Array, x: jax.Array) -> jax.Array:
  """Broadcasts a data-independent log-det to shape [batch] in the compute dtype of ``x``."""
  return jnp.broadcast_to(value.astype(compute_dtype(x)), (x.shape[0],))


def matmul_channels(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` over the channel axis of an NHWC array, at full precision."""
  return jnp.einsum('bhwc,co->bhwo', x, w, precision=HIGHEST)


def triangular_inverse(a: jax.Array, *, lower: bool, unit_diagonal: bool = False) -> jax.Array:
  """a^{-1} of a triangular C x C matrix, by one triangular solve against the identity.

  The layers apply a^{-1} to the B H W pixels as one matrix product: on XLA:CPU a triangular
  solve with many right-hand sides is one to two orders of magnitude slower than the product,
  and for these small, well-conditioned triangular matrices the accuracy is the same.
  """
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return lax.linalg.triangular_solve(a, eye, left_side=True, lower=lower,
                                     unit_diagonal=unit_diagonal)


# --------------------------------------------------------------------------------------------
# Initialisers and parameterisations.


def _plu_init(key: jax.Array, c: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(strict lower, strict upper, log_s) such that L U is a random orthogonal matrix."""
  w0 = jax.nn.initializers.orthogonal()(key, (c, c), jnp.float32)
  _, lower, upper = jax.scipy.linalg.lu(w0)
  diag = jnp.diagonal(upper)
  upper = upper * jnp.sign(diag)[None, :]  # column signs: W0 D stays orthogonal, diag U > 0
  return (jnp.tril(lower, -1).astype(dtype), jnp.triu(upper, 1).astype(dtype),
          jnp.log(jnp.abs(diag)).astype(dtype))


def householder_product(vs: jax.Array) -> jax.Array:
  """Q = H_1 H_2 ... H_n for the rows v_i of ``vs`` [n, C], H_i = I - 2 v_i v_i^T / |v_i|^2."""
  c = vs.shape[-1]

  def apply(q, v):
    qv = jnp.dot(q, v, precision=HIGHEST)
    return q - (2.0 / jnp.dot(v, v, precision=HIGHEST)) * jnp.outer(qv, v), None

  q, _ = lax.scan(apply, jnp.eye(c, dtype=vs.dtype), vs)
  return q


class Conv1x1(nn.Module):
  """Invertible 1x1 convolution ``y = x @ W`` per pixel; see the module docstring for the maths.

  Attributes:
    variant: ``'plain'`` (W, log-det by slogdet), ``'plu'`` (W = L U, log-det = H W sum log_s)
      or ``'qr'`` (W = Q R with C Householder reflections, log-det = H W sum log_d).
    param_dtype: dtype of the stored parameters.

  Call: ``y, logdet = layer(x, reverse=False)`` with x NHWC; ``logdet`` has shape [batch].
  ``reverse=True`` applies W^{-1} and returns -H W log|det W|.  Parameters (channels inferred from
  x at init): plain ``kernel`` [C, C]; plu ``lower``, ``upper`` [C, C] (only the strict triangles
  are used), ``log_s`` [C]; qr ``householder`` [C, C] (row i = v_i), ``upper`` [C, C] (strict
  upper triangle used), ``log_diag`` [C].
  """
  variant: str = 'plain'
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f'Conv1x1.variant: expected one of {VARIANTS}, got {self.variant!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'Conv1x1')
    dt = compute_dtype(x)
    x = x.astype(dt)
    _, h, w, c = x.shape
    pixels = h * w

    if self.variant == 'plain':
      kernel = self.param('kernel', jax.nn.initializers.orthogonal(), (c, c),
                          self.param_dtype).astype(dt)
      logabs = pixels * jnp.linalg.slogdet(kernel)[1]
      if not reverse:
        return matmul_channels(x, kernel), batch_logdet(logabs, x)
      # W^{-1} from one LU factorisation and its triangular solves against the identity.
      inverse = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(kernel),
                                          jnp.eye(c, dtype=dt))
      return matmul_channels(x, inverse), batch_logdet(-logabs, x)

    if self.variant == 'plu':
      # All three parameters are derived from one key so that L U starts orthogonal.
      key = self.make_rng('params') if self.is_initializing() else jax.random.key(0)
      lower = self.param('lower', lambda _, k: _plu_init(k, c, self.param_dtype)[0], key)
      upper = self.param('upper', lambda _, k: _plu_init(k, c, self.param_dtype)[1], key)
      log_s = self.param('log_s', lambda _, k: _plu_init(k, c, self.param_dtype)[2], key)
      lower = jnp.tril(lower.astype(dt), -1) + jnp.eye(c, dtype=dt)
      log_s = log_s.astype(dt)
      upper = jnp.triu(upper.astype(dt), 1) + jnp.diag(jnp.exp(log_s))
      logabs = pixels * jnp.sum(log_s)
      if not reverse:
        kernel = jnp.dot(lower, upper, precision=HIGHEST)
        return matmul_channels(x, kernel), batch_logdet(logabs, x)
      # W^{-1} = U^{-1} L^{-1}, each factor by a triangular solve.
      inverse = jnp.dot(triangular_inverse(upper, lower=False),
                        triangular_inverse(lower, lower=True, unit_diagonal=True),
                        precision=HIGHEST)
      return matmul_channels(x, inverse), batch_logdet(-logabs, x)

    # 'qr'
    vs = self.param('householder', jax.nn.initializers.normal(1.0), (c, c),
                    self.param_dtype).astype(dt)
    upper = self.param('upper', nn.initializers.zeros, (c, c), self.param_dtype)
    log_d = self.param('log_diag', nn.initializers.zeros, (c,), self.param_dtype).astype(dt)
    q = householder_product(vs)
    r = jnp.triu(upper.astype(dt), 1) + jnp.diag(jnp.exp(log_d))
    logabs = pixels * jnp.sum(log_d)
    if not reverse:
      kernel = jnp.dot(q, r, precision=HIGHEST)
      return matmul_channels(x, kernel), batch_logdet(logabs, x)
    # W^{-1} = R^{-1} Q^T, R^{-1} by a triangular solve.
    inverse = jnp.dot(triangular_inverse(r, lower=False), q.T, precision=HIGHEST)
    return matmul_channels(x, inverse), batch_logdet(-logabs, x)
