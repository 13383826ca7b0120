"""Up-sampling by 2 used by NVAE's up cells (NHWC).

* Nearest: every pixel repeated 2 x 2 (the MBConv main path).
* Bilinear with ``align_corners=True`` (the skip path; JAX's ``image.resize`` has no
  align-corners mode).  Along an axis of length n the output index i in [0, 2n) samples the source
  position p = i (n - 1) / (2n - 1); with i0 = floor(p), i1 = min(i0 + 1, n - 1) and f = p - i0,
  out[i] = (1 - f) x[i0] + f x[i1].  Applied separably over H then W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2 x 2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _align_corners_taps(n: int):
  """Indices (i0, i1) and weight f of the 2x align-corners interpolation of a length-n axis."""
  out = 2 * n
  scale = (n - 1) / (out - 1) if out > 1 else 0.0
  p = np.arange(out, dtype=np.float64) * scale
  i0 = np.floor(p).astype(np.int32)
  i1 = np.minimum(i0 + 1, n - 1)
  return i0, i1, (p - i0).astype(np.float32)


def _interp_axis(x: jax.Array, axis: int) -> jax.Array:
  i0, i1, f = _align_corners_taps(x.shape[axis])
  shape = [1] * x.ndim
  shape[axis] = f.shape[0]
  f = jnp.asarray(f, x.dtype).reshape(shape)
  return jnp.take(x, i0, axis=axis) * (1 - f) + jnp.take(x, i1, axis=axis) * f


def upsample_bilinear2x_align_corners(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], bilinear with align_corners=True."""
  return _interp_axis(_interp_axis(x, 1), 2)
