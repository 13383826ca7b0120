"""Masked (autoregressive) convolutions and NVAE's volume-preserving flow cells.

**Masks** (HWIO, kernel k, centre m = (k - 1) / 2).  Spatially every row above the centre is 1,
the centre row is 1 left of the centre, the rest is 0; the centre tap carries a channel mask:

* full conv with C_out >= C_in (r = C_out / C_in): output block i (channels i r ... (i+1) r - 1)
  sees input channels < i, or <= i when ``zero_diag`` is False;
* full conv with C_out < C_in (r = C_in / C_out): output i sees input blocks <= i (channels
  < (i+1) r), or < i (channels < i r) when ``zero_diag`` is True;
* depthwise: the centre is 1, or 0 with ``zero_diag``.

``mirror`` flips both spatial axes of the mask (not the channel order), which reverses the raster
order of the dependence.

**ARConv2D**: W~ = exp(g) (W * M) / (||W * M|| + 1e-5) per output channel, g_0 =
log(||W_0 * M|| + 0.01) + log(weight_init_scale).

**ARCell** (NVAE's CellAR, L = latent channels, H = 6 L):
    h = ELU(ARConv3x3(z; L -> H, no bias, zero_diag))
    h = ELU(ARConv5x5 depthwise(h; no bias))
    mu = ARConv1x1(ELU(h); H -> L, bias, init scale 0.1)
    z' = z - mu,   log|det dz'/dz| = 0
Because mu_c at pixel p depends only on z channels < c at p and on every channel at raster-earlier
pixels (raster-later with ``mirror``), the Jacobian is unit triangular: the flow is volume
preserving.  Variables: ``conv_z0``, ``conv_z2``, ``mu`` (each ``kernel``, ``log_weight_norm``,
``bias`` for ``mu``).

**PairedARCell**: ``cell1`` (mirror False) then ``cell2`` (mirror True).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax import host_init
from nvae_jax.nn.activations import elu
from nvae_jax.nn.conv import (conv2d, initial_log_weight_norm, record_kernel, torch_uniform_init,
                              weight_normalize)

AR_EXPANSION = 6


def ar_channel_mask(c_in: int, c_out: int, groups: int, zero_diag: bool) -> np.ndarray:
  """Centre-tap channel mask, [C_in / groups, C_out] (see the module docstring)."""
  if groups == 1:
    if c_in % c_out and c_out % c_in:
      raise ValueError(f'ar_channel_mask: one of C_in={c_in}, C_out={c_out} must divide the other')
    mask = np.ones((c_out, c_in), np.float32)
    if c_out >= c_in:
      r = c_out // c_in
      for i in range(c_in):
        mask[i * r:(i + 1) * r, i + 1:] = 0
        if zero_diag:
          mask[i * r:(i + 1) * r, i] = 0
    else:
      r = c_in // c_out
      for i in range(c_out):
        mask[i, (i + 1) * r:] = 0
        if zero_diag:
          mask[i, i * r:(i + 1) * r] = 0
    return mask.T
  if groups == c_in:
    return np.full((1, c_out), 0.0 if zero_diag else 1.0, np.float32)
  raise ValueError(f'ar_channel_mask: groups must be 1 or C_in={c_in}, got {groups}')


def ar_conv_mask(kernel_size: int, c_in: int, c_out: int, groups: int, zero_diag: bool,
                 mirror: bool) -> np.ndarray:
  """Full HWIO mask [k, k, C_in / groups, C_out] of a masked conv."""
  k = kernel_size
  m = (k - 1) // 2
  mask = np.ones((k, k, c_in // groups, c_out), np.float32)
  mask[m:, :] = 0
  mask[m, :m] = 1
  mask[m, m] = ar_channel_mask(c_in, c_out, groups, zero_diag)
  if mirror:
    mask = mask[::-1, ::-1].copy()
  return mask


class ARConv2D(nn.Module):
  """Masked weight-normalised conv (stride 1, 'same' size via padding (k - 1) / 2)."""
  features: int
  kernel_size: int
  groups: int = 1
  use_bias: bool = False
  zero_diag: bool = False
  mirror: bool = False
  weight_init_scale: float = 1.0
  depthwise_impl: str = 'lax'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in, k = x.shape[-1], self.kernel_size
    mask_np = ar_conv_mask(k, c_in, self.features, self.groups, self.zero_diag, self.mirror)
    mask = jnp.asarray(mask_np)
    fan_in = c_in // self.groups * k * k
    kernel = host_init.param(self, 'kernel', torch_uniform_init(fan_in),
                             (k, k, c_in // self.groups, self.features))
    g = host_init.param(
        self, 'log_weight_norm', host_init.LogWeightNorm(mask_np, self.weight_init_scale),
        (self.features,),
        jax_init=lambda _, shape, dtype: initial_log_weight_norm(kernel * mask,
                                                                 self.weight_init_scale))
    w = weight_normalize(kernel * mask, g)
    record_kernel(self, w)
    y = conv2d(x.astype(self.dtype), w.astype(self.dtype), padding=(k - 1) // 2,
               groups=self.groups, depthwise_impl=self.depthwise_impl)
    if self.use_bias:
      bias = host_init.param(self, 'bias', torch_uniform_init(fan_in), (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class ARCell(nn.Module):
  """One volume-preserving IAF shift cell, z - mu_AR(z) (see the module docstring)."""
  mirror: bool = False
  depthwise_impl: str = 'lax'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    num_z = z.shape[-1]
    hidden = AR_EXPANSION * num_z
    common = dict(mirror=self.mirror, dtype=self.dtype, depthwise_impl=self.depthwise_impl)
    h = elu(ARConv2D(hidden, 3, zero_diag=True, name='conv_z0', **common)(z))
    h = elu(ARConv2D(hidden, 5, groups=hidden, name='conv_z2', **common)(h))
    mu = ARConv2D(num_z, 1, use_bias=True, weight_init_scale=0.1, name='mu', **common)(elu(h))
    return z - mu.astype(z.dtype)


class PairedARCell(nn.Module):
  """``cell1`` (raster order) then ``cell2`` (mirrored order); log-determinant 0."""
  depthwise_impl: str = 'lax'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = ARCell(mirror=False, depthwise_impl=self.depthwise_impl, dtype=self.dtype,
               name='cell1')(z)
    return ARCell(mirror=True, depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                  name='cell2')(z)
