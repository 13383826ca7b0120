"""Helpers shared by the output distributions: input checks and float32 reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(dist: str, net_out: jax.Array, x: jax.Array | None,
                 expected_channels: int | None = None) -> None:
  """Checks ranks and channel counts statically; raises a ValueError naming the argument."""
  if net_out.ndim != 4:
    raise ValueError(f'{dist}: net_out must be [B, H, W, K], got shape {tuple(net_out.shape)}')
  if x is None:
    return
  if x.ndim != 4:
    raise ValueError(f'{dist}: x must be [B, H, W, C], got shape {tuple(x.shape)}')
  if x.shape[:3] != net_out.shape[:3]:
    raise ValueError(f'{dist}: x and net_out must agree on [B, H, W]; x has {tuple(x.shape)}, '
                     f'net_out has {tuple(net_out.shape)}')
  if expected_channels is not None and net_out.shape[-1] != expected_channels:
    raise ValueError(f'{dist}: net_out must have {expected_channels} channels for images with '
                     f'{x.shape[-1]} channels, got {net_out.shape[-1]}')


def image_channels(dist: str, net_out: jax.Array, per_channel: int) -> int:
  """Recovers C from K = per_channel * C, with a clear error when K is not a multiple."""
  k = net_out.shape[-1]
  if k % per_channel:
    raise ValueError(f'{dist}: net_out channels must be a multiple of {per_channel}, got {k}')
  return k // per_channel


def sum_per_example(a: jax.Array) -> jax.Array:
  """Sums an elementwise [B, ...] array over all but the batch axis, in float32."""
  a = a.astype(jnp.float32)
  return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def f32(a: jax.Array) -> jax.Array:
  return jnp.asarray(a).astype(jnp.float32)
