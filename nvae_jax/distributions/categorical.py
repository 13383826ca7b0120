"""Categorical output distribution: a 2**num_bits-way softmax per sub-pixel.

``net_out`` has K * C channels with K = 2**num_bits; the K logits of image channel c are the
contiguous block [c K, (c + 1) K) (i.e. net_out reshapes to [B, H, W, C, K]).  A pixel value
x = k / (K - 1) is class k, so

    log p(x) = sum_{h, w, c} log_softmax(logits[h, w, c])[k(h, w, c)],  k = round(x (K - 1)).

x must lie on the num_bits grid (it is rounded to the nearest class, not checked under jit).
Sampling at temperature t is Gumbel-max on logits / t, written argmax(logits + t * Gumbel) so that
t = 0 gives the mode; ``mean`` is the expected value sum_k p_k k / (K - 1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.distributions import _common


class Categorical(nn.Module):
  """Independent 2**num_bits-way categorical per sub-pixel (see the module docstring)."""

  num_bits: int = 8
  continuous = False

  def num_channels(self, image_channels: int) -> int:
    return (2 ** self.num_bits) * image_channels

  def _logits(self, net_out):
    if not 1 <= self.num_bits <= 16:
      raise ValueError(f'categorical: num_bits must be in [1, 16], got {self.num_bits}')
    k = 2 ** self.num_bits
    c = _common.image_channels('categorical', net_out, k)
    return _common.f32(net_out).reshape(net_out.shape[:3] + (c, k))

  def log_prob(self, net_out, x, train: bool = False):
    del train
    _common.check_inputs('categorical', net_out, x, self.num_channels(x.shape[-1]))
    logits = self._logits(net_out)
    k = logits.shape[-1]
    idx = jnp.clip(jnp.round(_common.f32(x) * (k - 1)), 0, k - 1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return _common.sum_per_example(jnp.take_along_axis(logp, idx[..., None], axis=-1))

  def sample(self, net_out, rng, temperature: float = 1.0):
    _common.check_inputs('categorical', net_out, None)
    logits = self._logits(net_out)
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    k = jnp.argmax(logits + temperature * g, axis=-1)
    return k.astype(jnp.float32) / (logits.shape[-1] - 1)

  def mean(self, net_out):
    _common.check_inputs('categorical', net_out, None)
    logits = self._logits(net_out)
    k = logits.shape[-1]
    values = jnp.arange(k, dtype=jnp.float32) / (k - 1)
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * values, axis=-1)
