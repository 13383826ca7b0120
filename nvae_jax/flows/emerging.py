"""Emerging convolutions (Hoogeboom, van den Berg & Welling 2019): invertible k x k convolutions
built from two masked autoregressive convolutions with opposite orderings.

Autoregressive convolution.  With l = (k - 1) / 2, dilation d and a "quadrant" kernel
Q [l+1, l+1, C, C] (the live taps of the paper's k x k mask M1),

    L(x; Q)[i, j, o] = sum_{p, q = 0..l} sum_c x[i + p d, j + q d, c] Q[p, q, c, o]

with x zero outside the image.  Output pixel (i, j) sees itself and the pixels below and to its
right; at its own pixel, output channel o sees only input channels c <= o: Q[0, 0] is upper
triangular in [in, out] indexing, with diagonal exp(log_diag) (parameterised so that it can never
reach zero), and its lower triangle is masked out.  Ordering pixels in reverse raster order (bottom
row first, right to left) and channels ascending, the Jacobian of L is lower triangular with
diagonal exp(log_diag) repeated H W times, so

    log|det dL/dx| = H * W * sum_c log_diag[c].

Zero padding only deletes terms, so the triangular structure survives at the borders.  The
mirrored convolution R(x; Q) = F L(F x; Q), with F reversing height, width *and* channels, is
triangular in the opposite order (raster order, channels descending): this is the paper's mask M2,
M1 flipped on all four axes.

Emerging convolution (this module):

    y = R(L(W x; Q1); Q2) + bias,      W an optional invertible 1x1 conv (``use_1x1``),
    log|det J| = H * W * (sum log_diag_1 + sum log_diag_2) [+ H * W * log|det W|].

The composition is not triangular, and its receptive field is the full k x k (the point of the
method), yet its log-det is exact and costs O(C).  The paper's flow step is actnorm -> 1x1 ->
emerging -> coupling, where the official code calls the 1x1 and the two masked convolutions
separately; ``use_1x1=True`` (the default) puts that 1x1 inside this layer, so a step is
actnorm -> EmergingConv -> coupling.

Inverse.  Solving L(x) = y: output pixel (i, j) depends only on the input pixels with a strictly
larger wavefront index t(i, j) = i // d + j // d (a tap (p, q) != (0, 0) moves t by p + q >= 1),
plus its own pixel through the triangular centre matrix.  Pixels with the same t therefore never
depend on each other, for any dilation, and the inverse is a ``lax.scan`` over
t = T-1, ..., 0 (T = (H-1)//d + (W-1)//d + 1, i.e. H + W - 1 steps for d = 1 and about half as many
for d = 2, instead of H W C for the naive element-by-element solve).  Each step gathers the
(l+1) x (l+1) neighbourhoods of the wavefront's pixels (zero outside the image), forms the
residual r = y - (off-centre taps applied to the already solved pixels) and solves the pixels'
triangular systems x Q[0,0] = r at once, vectorised over batch and pixels, by a product with
Q[0,0]^{-1} (one C x C triangular solve per call).  Total work O(B H W C^2 (l+1)^2), about one
forward convolution, in T sequential steps.  R is inverted by flipping.  ``naive_inverse``
(``inverse_algorithm='naive'``) is the per-pixel raster-order solve with H W sequential steps,
kept as a benchmark baseline and test oracle.

Initialisation (the paper's ``stable_init``): masked taps ~ N(0, init_scale^2), log_diag = 0 (so
the centre diagonal is exactly 1), bias = 0.  The raw kernels store the whole quadrant [l+1, l+1,
C, C]; the masked-out lower triangle of the centre tap and its diagonal are ignored.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nvae_jax.flows.conv1x1 import (HIGHEST, VARIANTS, Conv1x1, batch_logdet, check_nhwc,
                                    compute_dtype, triangular_inverse)

DILATIONS = (1, 2)
INVERSE_ALGORITHMS = ('wavefront', 'naive')


def quadrant_mask(size: int, channels: int, dtype=jnp.float32) -> jax.Array:
  """Mask of the free off-diagonal weights of a quadrant kernel [size, size, C, C].

  Ones everywhere except the centre tap [0, 0], where only c_in < c_out is free (its diagonal is
  parameterised separately and its lower triangle must be zero).
  """
  mask = np.ones((size, size, channels, channels))
  mask[0, 0] = np.triu(np.ones((channels, channels)), 1)
  return jnp.asarray(mask, dtype)


def ar_kernel(raw: jax.Array, log_diag: jax.Array) -> jax.Array:
  """The effective quadrant kernel: masked ``raw`` plus diag(exp(log_diag)) at the centre tap."""
  size, _, c, _ = raw.shape
  kernel = raw * quadrant_mask(size, c, raw.dtype)
  return kernel.at[0, 0].add(jnp.diag(jnp.exp(log_diag)))


def flip_all(x: jax.Array) -> jax.Array:
  """Reverses height, width and channels of an NHWC array (an involution)."""
  return x[:, ::-1, ::-1, ::-1]


def ar_conv(x: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """L(x; Q)[i, j, o] = sum_{p,q,c} x[i + p d, j + q d, c] Q[p, q, c, o] (zero outside).

  ``kernel`` is the quadrant kernel Q [l+1, l+1, C, C]; this is the paper's masked k x k SAME
  convolution computed as a (l+1) x (l+1) VALID one on an input padded at the bottom and right.
  """
  pad = (kernel.shape[0] - 1) * dilation
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((0, pad), (0, pad)),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=HIGHEST)


def wavefront_index(height: int, width: int, dilation: int = 1) -> np.ndarray:
  """t(i, j) = i // d + j // d: pixels with equal t never depend on each other under L."""
  return (np.arange(height) // dilation)[:, None] + (np.arange(width) // dilation)[None, :]


def wavefronts(height: int, width: int, dilation: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Row and column indices [T, P] of the pixels of each wavefront t = 0..T-1.

  Wavefronts shorter than the longest (P pixels) are padded with the out-of-image pixel
  (height, width), which reads as zero and whose writes are dropped.
  """
  t_map = wavefront_index(height, width, dilation)
  num_steps = int(t_map.max()) + 1
  longest = int(np.bincount(t_map.ravel()).max())
  rows = np.full((num_steps, longest), height, np.int32)
  cols = np.full((num_steps, longest), width, np.int32)
  for t in range(num_steps):
    i, j = np.nonzero(t_map == t)
    rows[t, :len(i)], cols[t, :len(j)] = i, j
  return rows, cols


def _solve_pixels(y, x, rows, cols, off_centre, centre_inverse, dilation):
  """Solves L(x) = y at the pixels (rows, cols) [P], given x at every pixel they depend on."""
  taps = np.arange(off_centre.shape[0]) * dilation
  near_rows = rows[:, None, None] + taps[None, :, None]  # [P, l+1, l+1]
  near_cols = cols[:, None, None] + taps[None, None, :]
  window = x.at[:, near_rows, near_cols, :].get(mode='fill', fill_value=0)  # [B, P, l+1, l+1, C]
  target = y.at[:, rows, cols, :].get(mode='fill', fill_value=0)  # [B, P, C]
  residual = target - jnp.einsum('bnpqc,pqco->bno', window, off_centre, precision=HIGHEST)
  solved = jnp.einsum('bnc,co->bno', residual, centre_inverse, precision=HIGHEST)
  return x.at[:, rows, cols, :].set(solved, mode='drop')


def ar_conv_inverse(y: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """Solves ``ar_conv(x, kernel, dilation) = y`` for x, one anti-diagonal wavefront per step.

  ``lax.scan`` over the T = (H-1)//d + (W-1)//d + 1 wavefronts from the last to the first; each
  step gathers the (l+1) x (l+1) neighbourhoods of the wavefront's pixels (all solved at earlier
  steps), forms the residual and solves the pixels' triangular C x C systems at once.  Total work
  O(B H W C^2 (l+1)^2), about one forward convolution, in T sequential steps.
  """
  _, h, w, _ = y.shape
  rows, cols = wavefronts(h, w, dilation)
  off_centre = kernel.at[0, 0].set(0)
  centre_inverse = triangular_inverse(kernel[0, 0], lower=False)

  def step(x, idx):
    return _solve_pixels(y, x, idx[0], idx[1], off_centre, centre_inverse, dilation), None

  xs = jnp.asarray(np.stack([rows, cols], axis=1)[::-1].copy())  # [T, 2, P], last wavefront first
  x, _ = lax.scan(step, jnp.zeros_like(y), xs)
  return x


def ar_conv_naive_inverse(y: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """Solves ``ar_conv(x, kernel, dilation) = y`` pixel by pixel in reverse raster order.

  ``lax.scan`` over the H W pixels (bottom row first, right to left), each step slicing the
  (l+1) x (l+1) dilated neighbourhood out of a zero-padded copy and solving the pixel's C x C
  triangular system.  O(B H W C^2 (l+1)^2) work in H W sequential steps.
  """
  b, h, w, c = y.shape
  size = kernel.shape[0]
  pad = (size - 1) * dilation
  off_centre = kernel.at[0, 0].set(0)
  centre_inverse = triangular_inverse(kernel[0, 0], lower=False)

  def step(x_pad, n):
    i = h - 1 - n // w
    j = w - 1 - n % w
    window = lax.dynamic_slice(x_pad, (0, i, j, 0), (b, pad + 1, pad + 1, c))
    window = window[:, ::dilation, ::dilation, :]
    target = lax.dynamic_slice(y, (0, i, j, 0), (b, 1, 1, c))[:, 0, 0, :]
    residual = target - jnp.einsum('bpqc,pqco->bo', window, off_centre, precision=HIGHEST)
    solved = jnp.dot(residual, centre_inverse, precision=HIGHEST)
    return lax.dynamic_update_slice(x_pad, solved[:, None, None, :], (0, i, j, 0)), None

  x_pad = jnp.zeros((b, h + pad, w + pad, c), y.dtype)
  x_pad, _ = lax.scan(step, x_pad, jnp.arange(h * w))
  return x_pad[:, :h, :w, :]


class EmergingConv(nn.Module):
  """Emerging k x k convolution: [1x1 ->] L(.; Q1) -> R(.; Q2) -> + bias (module docstring).

  Attributes:
    kernel_size: odd k >= 1 of the masked convolutions (the live quadrant is (k+1)/2 square).
    dilation: 1 or 2.
    use_1x1: apply an invertible 1x1 convolution first (the paper's flow step); default True.
    conv1x1_variant: ``'plain'``, ``'plu'`` or ``'qr'`` for that 1x1 convolution.
    inverse_algorithm: ``'wavefront'`` (H + W - 1 sequential steps, the default) or ``'naive'``
      (H W sequential steps; for benchmarks and tests).
    init_scale: standard deviation of the initial masked taps.
    param_dtype: dtype of the stored parameters.

  Call: ``y, logdet = layer(x, reverse=False)``; logdet [batch], H W (sum log_diag_1 +
  sum log_diag_2) plus the 1x1's.  Parameters: ``kernel_1``, ``kernel_2`` [l+1, l+1, C, C],
  ``log_diag_1``, ``log_diag_2``, ``bias`` [C], and the ``conv1x1`` submodule's.
  """
  kernel_size: int = 3
  dilation: int = 1
  use_1x1: bool = True
  conv1x1_variant: str = 'plain'
  inverse_algorithm: str = 'wavefront'
  init_scale: float = 0.02
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    k = self.kernel_size
    if not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
      raise ValueError(f'EmergingConv.kernel_size: expected an odd integer >= 1, got {k!r}')
    if self.dilation not in DILATIONS:
      raise ValueError(f'EmergingConv.dilation: expected one of {DILATIONS}, '
                       f'got {self.dilation!r}')
    if self.conv1x1_variant not in VARIANTS:
      raise ValueError(f'EmergingConv.conv1x1_variant: expected one of {VARIANTS}, '
                       f'got {self.conv1x1_variant!r}')
    if self.inverse_algorithm not in INVERSE_ALGORITHMS:
      raise ValueError(f'EmergingConv.inverse_algorithm: expected one of {INVERSE_ALGORITHMS}, '
                       f'got {self.inverse_algorithm!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'EmergingConv')
    dt = compute_dtype(x)
    x = x.astype(dt)
    _, h, w, c = x.shape
    size = (self.kernel_size + 1) // 2
    kinit = jax.nn.initializers.normal(self.init_scale)
    shape = (size, size, c, c)
    raw_1 = self.param('kernel_1', kinit, shape, self.param_dtype)
    raw_2 = self.param('kernel_2', kinit, shape, self.param_dtype)
    log_d1 = self.param('log_diag_1', nn.initializers.zeros, (c,), self.param_dtype).astype(dt)
    log_d2 = self.param('log_diag_2', nn.initializers.zeros, (c,), self.param_dtype).astype(dt)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype).astype(dt)
    q1 = ar_kernel(raw_1.astype(dt), log_d1)
    q2 = ar_kernel(raw_2.astype(dt), log_d2)
    conv1x1 = Conv1x1(self.conv1x1_variant, param_dtype=self.param_dtype,
                      name='conv1x1') if self.use_1x1 else None
    logabs = h * w * (jnp.sum(log_d1) + jnp.sum(log_d2))
    d = self.dilation

    if not reverse:
      ld = batch_logdet(logabs, x)
      if conv1x1 is not None:
        x, ld_1x1 = conv1x1(x)
        ld = ld + ld_1x1
      x = ar_conv(x, q1, d)
      x = flip_all(ar_conv(flip_all(x), q2, d))
      return x + bias, ld

    inverse = ar_conv_inverse if self.inverse_algorithm == 'wavefront' else ar_conv_naive_inverse
    ld = batch_logdet(-logabs, x)
    x = x - bias
    x = flip_all(inverse(flip_all(x), q2, d))
    x = inverse(x, q1, d)
    if conv1x1 is not None:
      x, ld_1x1 = conv1x1(x, reverse=True)
      ld = ld + ld_1x1
    return x, ld


def naive_inverse(layer: EmergingConv, variables, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inverse of ``layer`` by the per-pixel raster-order scan (H W sequential steps).

  Same result as ``layer.apply(variables, y, reverse=True)``; for benchmarks and as a test oracle.
  """
  return layer.clone(inverse_algorithm='naive').apply(variables, y, reverse=True)
