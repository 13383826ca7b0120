"""Affine and additive coupling layers (Glow: Kingma & Dhariwal 2018; Dinh et al. 2017).

The input ``x`` (NHWC, ``C >= 2`` channels) is split along channels into ``x_a = x[..., :C//2]``
and ``x_b = x[..., C//2:]``.  A network ``h = NN(x_a)`` conditions the transform of ``x_b``;
``x_a`` passes through unchanged, so the Jacobian is block-triangular and its log-determinant is
that of the ``x_b`` block.

* Affine (Glow's ``flow_coupling=1``): ``shift = h[..., 0::2]``, ``s = sigmoid(h[..., 1::2] + 2)``,

      y_b = (x_b + shift) * s,          log|det J| = sum_{h,w,c} log s,
      x_b = y_b / s - shift             (inverse; log-det -sum log s).

  The ``+2`` keeps ``s ~ 0.88`` at initialisation and ``s`` in (0, 1) bounds the gradients.
* Additive (``flow_coupling=0``): ``y_b = x_b + h``, ``log|det J| = 0``.

``NN`` is conv3x3(hidden) -> [actnorm] -> ReLU -> conv1x1(hidden) -> [actnorm] -> ReLU ->
:class:`ZeroConv` 3x3, whose zero initialisation makes every coupling the identity at init.
Convolutions run in ``dtype`` (None: the input's); ``h``, the transform of ``x_b`` and the
log-det are computed in float32 or wider.  Cost: one network pass in both directions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_nhwc(x: jax.Array, name: str, min_channels: int = 1) -> None:
  """Raises a ValueError unless ``x`` is a floating NHWC array with ``>= min_channels`` channels."""
  if x.ndim != 4:
    raise ValueError(f'{name}: expected an NHWC array (4 dims), got shape {x.shape}')
  if x.shape[-1] < min_channels:
    raise ValueError(f'{name}: expected at least {min_channels} channels, got shape {x.shape}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name}: expected a floating dtype, got {x.dtype}')


def accum_dtype(x: jax.Array):
  """The dtype of log-determinants for input ``x``: float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


class ZeroConv(nn.Module):
  """Glow's ``conv2d_zeros``: a zero-initialised conv with bias, scaled by ``exp(3 * logs)``.

  ``out = (conv(x, W) + b) * exp(logscale_factor * logs)`` with ``W``, ``b``, ``logs`` all zero at
  init, so the output starts at exactly 0.  The output is float32 (or wider).
  """
  features: int
  kernel_size: int = 3
  logscale_factor: float = 3.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    y = nn.Conv(self.features, (k, k), padding='SAME', kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.zeros, dtype=self.dtype, name='conv')(x)
    logs = self.param('logs', nn.initializers.zeros, (self.features,), jnp.float32)
    y = y.astype(accum_dtype(x))
    return y * jnp.exp(self.logscale_factor * logs).astype(y.dtype)


class CouplingNet(nn.Module):
  """``NN(x_a)``: conv3x3 -> [actnorm] -> ReLU -> conv1x1 -> [actnorm] -> ReLU -> ZeroConv 3x3.

  With ``actnorm=True`` the hidden convs have no bias and are followed by the data-dependent
  :class:`nvae_jax.flows.actnorm.ActNorm` (as in Glow); its log-det is irrelevant here and dropped.
  """
  hidden: int
  out_features: int
  actnorm: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.actnorm:
      from nvae_jax.flows.actnorm import ActNorm  # pylint: disable=import-outside-toplevel
    h = x
    for i, k in enumerate((3, 1)):
      h = nn.Conv(self.hidden, (k, k), padding='SAME', use_bias=not self.actnorm,
                  dtype=self.dtype, name=f'conv{i}')(h)
      if self.actnorm:
        h, _ = ActNorm(name=f'actnorm{i}')(h)
      h = nn.relu(h)
    return ZeroConv(self.out_features, 3, dtype=self.dtype, name='out')(h)


def _split(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  check_nhwc(x, name, min_channels=2)
  ca = x.shape[-1] // 2
  return x[..., :ca], x[..., ca:]


class AffineCoupling(nn.Module):
  """Glow's affine coupling; see the module docstring for the maths.

  Attributes:
    hidden: width of the coupling network.
    actnorm: use actnorm (Glow) instead of biases inside the network.
    dtype: compute dtype of the network's convolutions (None: the input's).
  """
  hidden: int = 512
  actnorm: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    xa, xb = _split(x, 'AffineCoupling')
    cb = xb.shape[-1]
    h = CouplingNet(self.hidden, 2 * cb, self.actnorm, self.dtype, name='net')(xa)
    acc = accum_dtype(x)
    h = h.astype(acc)
    shift, pre = h[..., 0::2], h[..., 1::2] + 2.0
    scale = jax.nn.sigmoid(pre)
    logdet = jnp.sum(jax.nn.log_sigmoid(pre), axis=(1, 2, 3))
    xb = xb.astype(acc)
    if not reverse:
      yb = (xb + shift) * scale
    else:
      yb = xb / scale - shift
      logdet = -logdet
    return jnp.concatenate([xa, yb.astype(x.dtype)], axis=-1), logdet


class AdditiveCoupling(nn.Module):
  """Additive (volume-preserving) coupling ``y_b = x_b + NN(x_a)``; log-det 0.

  Attributes are those of :class:`AffineCoupling`.
  """
  hidden: int = 512
  actnorm: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    xa, xb = _split(x, 'AdditiveCoupling')
    acc = accum_dtype(x)
    h = CouplingNet(self.hidden, xb.shape[-1], self.actnorm, self.dtype, name='net')(xa)
    h = h.astype(acc)
    xb = xb.astype(acc)
    yb = xb - h if reverse else xb + h
    return (jnp.concatenate([xa, yb.astype(x.dtype)], axis=-1),
            jnp.zeros(x.shape[:1], acc))
