"""Uniform dequantisation, flow preprocessing and the discrete NLL / bits-per-dim of a flow.

Every number a flow reports (nats per image, bits/dim) is computed here, in one place.

Data format
-----------
Batches hold ``x`` in ``[0, 1]`` quantised to ``b`` bits: ``x = k / (2**b - 1)`` with integer
``k`` in ``{0, ..., 2**b - 1}`` (binary data is ``b = 1``).

Dequantisation
--------------
``x_cont = (k + u) / 2**b`` with ``u ~ U[0, 1)^D``, so ``x_cont`` lies in the bin
``[k / 2**b, (k + 1) / 2**b)`` of volume ``2**(-b D)``.  Glow's 8-bit recipe
``x/256 - 0.5 + U(0, 1/256)`` is this followed by the ``'center'`` preprocessing below.

Preprocessing (a bijection ``y = g(x_cont)`` applied before the flow)
--------------------------------------------------------------------
* ``'center'`` (Glow): ``y = x_cont - 1/2``; ``log|det dg/dx| = 0``.
* ``'logit'`` (Real NVP): ``p = alpha + (1 - 2 alpha) x_cont``, ``y = log p - log(1 - p)``;
  ``log|det dg/dx| = sum_d [log(1 - 2 alpha) - log p_d - log(1 - p_d)]``.

The discrete NLL
----------------
With a flow ``z = f(y)`` and prior ``p_Z``, the density of ``x_cont`` is

    log p(x_cont) = log p_Z(f(y)) + log|det df/dy| + log|det dg/dx|,

and the probability of the bin of ``k`` is ``P(k) = 2**(-b D) E_u[p((k + u) / 2**b)]``.  By
Jensen, ``-log P(k) <= E_u[-log p(x_cont)] + D b log 2``, so the reported NLL in nats of the
discrete data (one sample of ``u``) is

    nll = -log p(x_cont) + D * b * log(2)                               (:func:`discrete_nll`)
    bits/dim = nll / (D * log(2))                                        (:func:`bits_per_dim`)

with ``D = H * W * C`` the number of dimensions of one example.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PREPROCESSING = ('center', 'logit')


def _check_bits(num_bits: int) -> int:
  if not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
    raise ValueError(f'num_bits: expected an int in [1, 16], got {num_bits!r}')
  return num_bits


def to_integers(x: jax.Array, num_bits: int) -> jax.Array:
  """``k = round(x * (2**b - 1))`` as float32 (or x's wider float dtype), for ``x`` in [0, 1]."""
  levels = 2**_check_bits(num_bits) - 1
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.clip(jnp.round(x.astype(dtype) * levels), 0, levels)


def dequantize(x: jax.Array, u: jax.Array, num_bits: int) -> jax.Array:
  """Uniform dequantisation ``x_cont = (k + u) / 2**b`` of ``x = k / (2**b - 1)``.

  Args:
    x: quantised data in [0, 1], any shape.
    u: noise in [0, 1), same shape as ``x`` (``jax.random.uniform``; 0.5 for bin centres).
    num_bits: the bit depth ``b`` of ``x``.
  """
  if jnp.shape(u) != jnp.shape(x):
    raise ValueError(f'dequantize: u must have the shape of x {jnp.shape(x)}, got {jnp.shape(u)}')
  k = to_integers(x, num_bits)
  return (k + u.astype(k.dtype)) / 2**num_bits


def quantize(x_cont: jax.Array, num_bits: int) -> jax.Array:
  """Inverse of :func:`dequantize` up to the noise: the bin ``k`` of ``x_cont``, as ``k / (2**b - 1)``.

  Values outside [0, 1) are clipped to the first / last bin (samples may leave the cube).
  """
  n = 2**_check_bits(num_bits)
  k = jnp.clip(jnp.floor(x_cont * n), 0, n - 1)
  return k / (n - 1)


def undo_dequantize(x_cont: jax.Array, u: jax.Array, num_bits: int) -> jax.Array:
  """Exact inverse of :func:`dequantize` given the same noise: ``(x_cont 2**b - u) / (2**b - 1)``.

  Unlike :func:`quantize` nothing is rounded, so it exposes any error of a flow's round trip.
  """
  n = 2**_check_bits(num_bits)
  return (x_cont * n - u) / (n - 1)


def _check_kind(kind: str) -> str:
  if kind not in PREPROCESSING:
    raise ValueError(f'preprocess: expected one of {PREPROCESSING}, got {kind!r}')
  return kind


def preprocess(x_cont: jax.Array, kind: str = 'center',
               alpha: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """The bijection ``y = g(x_cont)`` and its per-example ``log|det dg/dx|`` (see module docstring).

  Args:
    x_cont: dequantised data in [0, 1), shape ``[B, ...]``.
    kind: ``'center'`` or ``'logit'``.
    alpha: the logit squeeze ``alpha`` in (0, 1/2) (``'logit'`` only).

  Returns:
    ``(y, logdet)`` with ``logdet`` of shape ``[B]`` in float32 or wider.
  """
  _check_kind(kind)
  acc = jnp.promote_types(x_cont.dtype, jnp.float32)
  axes = tuple(range(1, x_cont.ndim))
  if kind == 'center':
    return x_cont - 0.5, jnp.zeros(x_cont.shape[:1], acc)
  if not 0.0 < alpha < 0.5:
    raise ValueError(f'alpha: expected a value in (0, 0.5), got {alpha!r}')
  p = alpha + (1.0 - 2.0 * alpha) * x_cont
  y = jnp.log(p) - jnp.log1p(-p)
  ld = math.log(1.0 - 2.0 * alpha) - jnp.log(p) - jnp.log1p(-p)
  return y, jnp.sum(ld.astype(acc), axis=axes)


def postprocess(y: jax.Array, kind: str = 'center', alpha: float = 0.05) -> jax.Array:
  """The inverse ``x_cont = g^{-1}(y)`` of :func:`preprocess`."""
  _check_kind(kind)
  if kind == 'center':
    return y + 0.5
  return (jax.nn.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)


def discrete_nll(log_density: jax.Array, num_dims: int, num_bits: int) -> jax.Array:
  """Nats of the discrete data: ``-log p(x_cont) + D b log 2`` (module docstring).

  Args:
    log_density: ``log p(x_cont)`` per example (prior + flow log-det + preprocessing log-det).
    num_dims: ``D = H W C`` of one example.
    num_bits: the bit depth ``b``.
  """
  return -log_density + num_dims * _check_bits(num_bits) * math.log(2.0)


def bits_per_dim(nll: jax.Array, num_dims: int) -> jax.Array:
  """``nll / (D log 2)``: nats per example -> bits per dimension."""
  return nll / (num_dims * math.log(2.0))
