"""Squeeze-and-excitation (Hu et al. 2018) as in NVAE, without weight normalisation.

s = mean_{H,W}(x);  s = sigmoid(W2 relu(W1 s + b1) + b2);  out = x * s,
with W1: C -> max(C // 16, 4) and W2: max(C // 16, 4) -> C (plain linear layers, PyTorch's default
init; they are not part of the spectral regulariser).  Parameters: ``fc1``, ``fc2`` (flax Dense,
kernel [in, out], bias [out]).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import host_init
from nvae_jax.nn.conv import torch_uniform_init


class Linear(nn.Module):
  """y = x W + b with PyTorch's default init (float32 parameters, computed in ``dtype``)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = torch_uniform_init(x.shape[-1])
    kernel = host_init.param(self, 'kernel', init, (x.shape[-1], self.features))
    bias = host_init.param(self, 'bias', init, (self.features,))
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    hidden = max(c // 16, 4)
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = Linear(hidden, dtype=self.dtype, name='fc1')(s)
    s = jax.nn.relu(s)
    s = Linear(c, dtype=self.dtype, name='fc2')(s)
    s = jax.nn.sigmoid(s)
    return x * s[:, None, None, :].astype(x.dtype)
