"""Space-to-depth squeeze (Glow's ``squeeze2d``) and its inverse.

``Squeeze(factor=f)`` maps ``[B, H, W, C] -> [B, H/f, W/f, C f^2]`` with

    y[b, i, j, c f^2 + f a + d] = x[b, f i + a, f j + d, c],   a, d in {0, ..., f-1},

i.e. each ``f x f`` patch becomes ``f^2`` channels (channel-major, as Glow orders them).  It is a
permutation of the coordinates, so ``log|det J| = 0``; ``reverse=True`` is depth-to-space.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.flows.coupling import accum_dtype, check_nhwc


def squeeze2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Space-to-depth; ``H`` and ``W`` must be divisible by ``factor``."""
  check_nhwc(x, 'squeeze2d')
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f'squeeze2d: height and width must be divisible by factor={factor}, got '
                     f'shape {x.shape}')
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // factor, w // factor, c * factor * factor)


def unsqueeze2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Depth-to-space, the inverse of :func:`squeeze2d`; ``C`` must be divisible by ``factor**2``."""
  check_nhwc(x, 'unsqueeze2d')
  b, h, w, c = x.shape
  if c % (factor * factor):
    raise ValueError(f'unsqueeze2d: channels must be divisible by factor**2={factor * factor}, '
                     f'got shape {x.shape}')
  x = x.reshape(b, h, w, c // (factor * factor), factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * factor, w * factor, c // (factor * factor))


class Squeeze(nn.Module):
  """The bijective-layer form of :func:`squeeze2d`: ``y, logdet = Squeeze()(x, reverse)``."""
  factor: int = 2

  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    y = unsqueeze2d(x, self.factor) if reverse else squeeze2d(x, self.factor)
    return y, jnp.zeros(x.shape[:1], accum_dtype(x))
