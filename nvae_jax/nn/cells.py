"""NVAE cells (the ``res_mbconv`` architecture instance), NHWC.

Every residual cell computes ``out = skip(x) + 0.1 * SE(ops(x))`` (SE only with ``use_se``).

* :class:`ResBNSwishCell` (encoder side: ``normal_pre``, ``normal_enc``, ``down_pre``,
  ``down_enc``): ops = BN -> Swish -> Conv3x3 (WN, bias, pad 1, stride s, C_in -> C_out) -> BN ->
  Swish -> Conv3x3 (WN, bias, pad 1).  Skip: identity for stride 1, :class:`FactorizedReduce` for
  stride 2 (C -> 2C, H/2).
  Variables: ``bn_0``, ``conv_0``, ``bn_1``, ``conv_1``, ``se``, ``skip`` (down cells).
* :class:`MBConvCell` (decoder side: ``normal_dec`` ex=6, ``normal_post`` ex=3, and the ``up_*``
  versions): ops = [nearest x2 if up] -> BN -> Conv1x1 C_in -> E (no WN, no bias) -> BN -> Swish ->
  depthwise Conv5x5 (pad 2, no WN, no bias) -> BN -> Swish -> Conv1x1 E -> C_out (no WN, no bias) ->
  BN, with E = round(C_in * ex).  Skip: identity, or for up cells bilinear(align_corners) x2 then a
  WN Conv1x1 C_in -> C_out without bias.
  Variables: ``bn_in``, ``conv_expand``, ``bn_expand``, ``conv_depthwise``, ``bn_depthwise``,
  ``conv_project``, ``bn_out``, ``se``, ``skip_conv`` (up cells).
* :class:`FactorizedReduce`: Swish, then four WN 1x1 stride-2 convs with bias on the (even, even),
  (odd, odd), (even, odd), (odd, even) pixel lattices, concatenated; C_out/4 channels each except
  the last, which takes the remainder.  Variables ``conv_1`` ... ``conv_4``.
* :class:`EncCombiner`: enc_feature + Conv1x1(dec_state) (WN, bias).  Variable ``conv``.
* :class:`DecCombiner`: Conv1x1(concat[dec_state, z]) (WN, bias).  Variable ``conv``.

Cells take ``(x, train)``; ``train`` selects batch statistics (True) or running statistics.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.nn.activations import swish
from nvae_jax.nn.conv import Conv2D
from nvae_jax.nn.norm import BatchNorm
from nvae_jax.nn.resample import upsample_bilinear2x_align_corners, upsample_nearest2x
from nvae_jax.nn.se import SqueezeExcite

RESIDUAL_SCALE = 0.1


class FactorizedReduce(nn.Module):
  """Stride-2 skip path of the down cells (see the module docstring)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.features % 2:
      raise ValueError(f'{self.name}: FactorizedReduce needs an even number of output channels, '
                       f'got {self.features}')
    q = self.features // 4
    sizes = (q, q, q, self.features - 3 * q)
    h = swish(x)
    inputs = (h, h[:, 1:, 1:], h[:, :, 1:], h[:, 1:, :])
    outs = [Conv2D(n, 1, stride=2, use_bias=True, dtype=self.dtype, name=f'conv_{i + 1}')(v)
            for i, (n, v) in enumerate(zip(sizes, inputs))]
    return jnp.concatenate(outs, axis=-1)


class ResBNSwishCell(nn.Module):
  """BN-Swish-Conv residual cell of the encoder (stride 1 or 2)."""
  features: int
  stride: int = 1
  use_se: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c_in = x.shape[-1]
    if self.stride == 1:
      if c_in != self.features:
        raise ValueError(f'{self.name}: a stride-1 cell keeps the channels; got C_in={c_in}, '
                         f'features={self.features}')
      skip = x
    elif self.stride == 2:
      skip = FactorizedReduce(self.features, dtype=self.dtype, name='skip')(x)
    else:
      raise ValueError(f'{self.name}: stride must be 1 or 2, got {self.stride}')
    h = x
    for k in range(2):
      h = swish(BatchNorm(dtype=self.dtype, name=f'bn_{k}')(h, train))
      h = Conv2D(self.features, 3, stride=self.stride if k == 0 else 1, padding=1, use_bias=True,
                 dtype=self.dtype, name=f'conv_{k}')(h)
    if self.use_se:
      h = SqueezeExcite(dtype=self.dtype, name='se')(h)
    return skip + RESIDUAL_SCALE * h


class MBConvCell(nn.Module):
  """Inverted-residual (MBConv) cell of the decoder and post-processing towers."""
  features: int
  expansion: int
  upsample: bool = False
  use_se: bool = True
  kernel_size: int = 5
  depthwise_impl: str = 'lax'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c_in = x.shape[-1]
    if self.upsample:
      skip = Conv2D(self.features, 1, dtype=self.dtype, name='skip_conv')(
          upsample_bilinear2x_align_corners(x))
      h = upsample_nearest2x(x)
    else:
      if c_in != self.features:
        raise ValueError(f'{self.name}: a normal MBConv cell keeps the channels; got C_in={c_in}, '
                         f'features={self.features}')
      skip, h = x, x
    hidden = int(round(c_in * self.expansion))
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)  # noqa: E731
    plain = dict(weight_norm=False, use_bias=False, dtype=self.dtype)
    h = bn('bn_in')(h, train)
    h = Conv2D(hidden, 1, name='conv_expand', **plain)(h)
    h = swish(bn('bn_expand')(h, train))
    h = Conv2D(hidden, self.kernel_size, padding=(self.kernel_size - 1) // 2, groups=hidden,
               depthwise_impl=self.depthwise_impl, name='conv_depthwise', **plain)(h)
    h = swish(bn('bn_depthwise')(h, train))
    h = Conv2D(self.features, 1, name='conv_project', **plain)(h)
    h = bn('bn_out')(h, train)
    if self.use_se:
      h = SqueezeExcite(dtype=self.dtype, name='se')(h)
    return skip + RESIDUAL_SCALE * h


class EncCombiner(nn.Module):
  """Encoder combiner: enc_feature + Conv1x1(dec_state) (WN, bias), C_dec -> C_enc."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, enc_feature: jax.Array, dec_state: jax.Array) -> jax.Array:
    return enc_feature + Conv2D(self.features, 1, use_bias=True, dtype=self.dtype,
                                name='conv')(dec_state)


class DecCombiner(nn.Module):
  """Decoder combiner: Conv1x1(concat[dec_state, z]) (WN, bias), C_dec + L_z -> C_dec."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dec_state: jax.Array, z: jax.Array) -> jax.Array:
    h = jnp.concatenate([dec_state.astype(self.dtype), z.astype(self.dtype)], axis=-1)
    return Conv2D(self.features, 1, use_bias=True, dtype=self.dtype, name='conv')(h)
