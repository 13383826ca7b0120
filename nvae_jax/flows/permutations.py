"""Fixed channel permutations (Glow's ``flow_permutation`` 0 = reverse, 1 = shuffle).

``y[..., c] = x[..., perm[c]]`` for a fixed permutation ``perm`` of the channels; a permutation
matrix has ``|det| = 1``, so ``log|det J| = 0``, and the inverse gathers with ``argsort(perm)``.
The permutation is not a variable: ``Reverse`` uses ``perm = [C-1, ..., 0]`` and ``Shuffle``
draws ``perm`` from ``numpy.random.default_rng(seed)`` at trace time, so the same ``seed`` and
channel count always give the same permutation (checkpoints need no extra state).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax.flows.coupling import accum_dtype, check_nhwc


def _apply(x: jax.Array, perm: np.ndarray, reverse: bool) -> tuple[jax.Array, jax.Array]:
  idx = np.argsort(perm) if reverse else perm
  return x[..., idx], jnp.zeros(x.shape[:1], accum_dtype(x))


class Reverse(nn.Module):
  """Reverses the channel order (its own inverse)."""

  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'Reverse')
    return _apply(x, np.arange(x.shape[-1])[::-1], reverse)


def shuffle_permutation(num_channels: int, seed: int) -> np.ndarray:
  """The permutation used by ``Shuffle(seed)`` on ``num_channels`` channels."""
  return np.random.default_rng(seed).permutation(num_channels)


class Shuffle(nn.Module):
  """A fixed random channel permutation determined by ``seed``."""
  seed: int = 0

  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'Shuffle')
    return _apply(x, shuffle_permutation(x.shape[-1], self.seed), reverse)
