"""Activation normalisation (Glow): a per-channel affine map with data-dependent initialisation.

    y[b, i, j, c] = (x[b, i, j, c] + bias[c]) * exp(log_scale[c])
    x = y * exp(-log_scale) - bias
    log|det J| = H * W * sum_c log_scale[c]     (independent of the data; O(C) to compute)

The scale is parameterised by its logarithm, so it can never reach zero.

Data-dependent initialisation (DDI), done the functional flax way: ``layer.init(rng, x)`` computes
the statistics of the batch ``x`` inside the parameter initialisers, so after init the layer maps
that batch to zero mean and unit variance per channel (over batch, height and width):
``bias = -mean(x)``, ``log_scale = -log(std(x) + eps)``.  The initialisers run only when the
parameters are created; ``apply`` never re-initialises, so restoring a checkpoint cannot undo a
trained actnorm (a known trap of stateful PyTorch versions).  Under ``jit`` with a sharded batch the
statistics are those of the global batch.  Initialising with ``reverse=True`` (no data in the input
space) or with ``data_init=False`` gives the identity (bias 0, log_scale 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.flows.conv1x1 import batch_logdet, check_nhwc, compute_dtype


class ActNorm(nn.Module):
  """Per-channel scale and bias with data-dependent init; see the module docstring.

  Attributes:
    eps: added to the batch standard deviation at init (Glow: 1e-6).
    data_init: if False, initialise to the identity instead of from the batch.
    param_dtype: dtype of the stored parameters.

  Call: ``y, logdet = layer(x, reverse=False)``; logdet [batch].  Parameters: ``bias`` [C],
  ``log_scale`` [C].
  """
  eps: float = 1e-6
  data_init: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    check_nhwc(x, 'ActNorm')
    dt = compute_dtype(x)
    x = x.astype(dt)
    _, h, w, c = x.shape
    use_data = self.data_init and not reverse

    def init_bias(_, batch):
      if not use_data:
        return jnp.zeros((c,), self.param_dtype)
      return (-jnp.mean(batch, axis=(0, 1, 2))).astype(self.param_dtype)

    def init_log_scale(_, batch):
      if not use_data:
        return jnp.zeros((c,), self.param_dtype)
      std = jnp.std(batch, axis=(0, 1, 2))
      return (-jnp.log(std + self.eps)).astype(self.param_dtype)

    bias = self.param('bias', init_bias, x).astype(dt)
    log_scale = self.param('log_scale', init_log_scale, x).astype(dt)
    logabs = h * w * jnp.sum(log_scale)
    if not reverse:
      return (x + bias) * jnp.exp(log_scale), batch_logdet(logabs, x)
    return x * jnp.exp(-log_scale) - bias, batch_logdet(-logabs, x)
