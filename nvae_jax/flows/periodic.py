"""Periodic (circular) k x k convolution computed in the Fourier domain (Hoogeboom et al. 2019).

With l = (k - 1) / 2, kernel K [k, k, C, C] and bias b, the layer is the wrap-padded spatial
cross-correlation centred on the kernel's centre tap (what ``jnp.pad(x, mode='wrap')`` followed by
a VALID ``lax.conv_general_dilated`` computes):

    y[i, j, o] = sum_{a, b, c} x[(i + a - l) mod H, (j + b - l) mod W, c] K[a, b, c, o] + b[o].

It is a circular convolution y = x (*) g with the kernel placed at g[(l - a) mod H, (l - b) mod W]
= K[a, b] (taps landing on the same cell add up, so any odd k works for any H, W, even k > H).
Hence no output shift is needed, unlike the original code whose roll by 1 is only right for k = 3.
In the Fourier basis the layer is block diagonal: with M(u, v) = DFT(g)(u, v) [C, C] complex,

    Y(u, v) = X(u, v) M(u, v)   (row vectors over channels),
    log|det J| = sum_{u < H} sum_{v < W} log|det M(u, v)|.

Since g is real, M(-u, -v) = conj(M(u, v)), so only the ``rfft2`` half-spectrum v = 0..W//2 is
computed, and each column counts twice except those equal to their own mirror: v = 0, and
v = W/2 when W is even.  Cost: H (W//2 + 1) complex C x C determinants, O(H W C^3 / 2),
independent of the data and of the batch.

The forward pass is rfft2 -> per-frequency product -> irfft2: O(B H W (C log(HW) + C^2)).  The
inverse solves X(u, v) M(u, v) = Y(u, v) per frequency (one LU factorisation per frequency shared
by the batch): O(H W C^3 / 2 + B H W C^2) plus the FFTs, with no sequential steps.

Initialisation: a random orthogonal C x C matrix at the centre tap plus N(0, s^2) noise on every
tap with s = init_scale / (k sqrt(C)), which keeps the spectral norm of the perturbation at
about 2 init_scale at every frequency whatever k and C, so the layer starts well conditioned.

The FFTs run in complex64 (float32 and lower-precision inputs) or complex128 (float64 inputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax.flows.conv1x1 import HIGHEST, batch_logdet, check_nhwc, compute_dtype


def kernel_spectrum(kernel: jax.Array, height: int, width: int) -> jax.Array:
  """M [H, W//2 + 1, C, C] = rfft2 of the kernel placed so that its centre tap sits at (0, 0)."""
  k = kernel.shape[0]
  l = (k - 1) // 2
  rows = (l - np.arange(k)) % height
  cols = (l - np.arange(k)) % width
  c_in, c_out = kernel.shape[2:]
  grid = jnp.zeros((height, width, c_in, c_out), kernel.dtype)
  grid = grid.at[rows[:, None], cols[None, :]].add(kernel)  # .add: aliased taps accumulate
  return jnp.fft.rfft2(grid, axes=(0, 1))


def rfft_column_weights(width: int) -> np.ndarray:
  """How many columns v of the full spectrum each rfft column stands for (1 or 2)."""
  weights = np.full(width // 2 + 1, 2.0)
  weights[0] = 1.0
  if width % 2 == 0:
    weights[-1] = 1.0
  return weights


def spectrum_logdet(spectrum: jax.Array, width: int) -> jax.Array:
  """sum over the full H x W spectrum of log|det M(u, v)|, from the rfft half [H, W//2+1, C, C]."""
  logabs = jnp.linalg.slogdet(spectrum)[1]
  weights = jnp.asarray(rfft_column_weights(width), logabs.dtype)
  return jnp.sum(logabs * weights[None, :])


class PeriodicConv(nn.Module):
  """Invertible circular k x k convolution via FFT; see the module docstring for the maths.

  Attributes:
    kernel_size: odd k >= 1.
    init_scale: size of the initial perturbation around an orthogonal centre tap.
    param_dtype: dtype of the stored parameters.

  Call: ``y, logdet = layer(x, reverse=False)``; logdet [batch] = sum_{u,v} log|det M(u,v)|.
  Parameters: ``kernel`` [k, k, C, C] (HWIO, cross-correlation as ``lax.conv``), ``bias`` [C].
  """
  kernel_size: int = 3
  init_scale: float = 0.1
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    k = self.kernel_size
    if not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
      raise ValueError(f'PeriodicConv.kernel_size: expected an odd integer >= 1, got {k!r}')
    super().__post_init__()

  def _init_kernel(self, rng, shape, dtype):
    k, _, c, _ = shape
    r_orth, r_noise = jax.random.split(rng)
    noise = jax.random.normal(r_noise, shape, jnp.float32) * (self.init_scale / (k * c**0.5))
    centre = jax.nn.initializers.orthogonal()(r_orth, (c, c), jnp.float32)
    return noise.at[(k - 1) // 2, (k - 1) // 2].add(centre).astype(dtype)

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'PeriodicConv')
    dt = compute_dtype(x)
    x = x.astype(dt)
    b, h, w, c = x.shape
    k = self.kernel_size
    kernel = self.param('kernel', self._init_kernel, (k, k, c, c), self.param_dtype).astype(dt)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype).astype(dt)
    spectrum = kernel_spectrum(kernel, h, w)
    logabs = spectrum_logdet(spectrum, w)

    if not reverse:
      xf = jnp.fft.rfft2(x, axes=(1, 2))
      yf = jnp.einsum('buvc,uvco->buvo', xf, spectrum, precision=HIGHEST)
      y = jnp.fft.irfft2(yf, s=(h, w), axes=(1, 2)).astype(dt)
      return y + bias, batch_logdet(logabs, x)

    yf = jnp.fft.rfft2(x - bias, axes=(1, 2))
    # X M = Y  <=>  M^T X^T = Y^T, with the batch as the right-hand sides of each frequency.
    rhs = jnp.transpose(yf, (1, 2, 3, 0))  # [H, W', C, B]
    xf = jnp.linalg.solve(jnp.swapaxes(spectrum, -1, -2), rhs)
    xf = jnp.transpose(xf, (3, 0, 1, 2))
    out = jnp.fft.irfft2(xf, s=(h, w), axes=(1, 2)).astype(dt)
    return out, batch_logdet(-logabs, x)
