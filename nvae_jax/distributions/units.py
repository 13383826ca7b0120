"""The one place that converts nats to bits and to bits per dimension.

    bits = nats / ln 2,    bits/dim = nats_per_image / (ln 2 * num_dims),

with num_dims = H * W * C of the scored region (e.g. 784 for MNIST cropped to 28x28, 3072 for
32x32 RGB).  Bits/dim of a continuous density (Gaussian decoders) is not a discrete likelihood.
"""

from __future__ import annotations

import math

_LN2 = math.log(2.0)


def nats_to_bits(nats):
  """Converts nats to bits (works on Python floats, numpy and jax arrays)."""
  return nats / _LN2


def bits_per_dim(nats_per_image, num_dims: int):
  """Bits per dimension from a negative log-likelihood in nats per image."""
  if int(num_dims) != num_dims or num_dims <= 0:
    raise ValueError(f'bits_per_dim: num_dims must be a positive integer, got {num_dims!r}')
  return nats_to_bits(nats_per_image) / num_dims

