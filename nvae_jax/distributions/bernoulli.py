"""Bernoulli output distribution over binary pixels.

With logits l per sub-pixel:  log p(x | l) = x l - softplus(l),  x in {0, 1}, summed over H, W, C.
The same expression for x in [0, 1] is the usual cross-entropy on intensities; it is then not a
normalised likelihood (the continuous Bernoulli would need an extra normaliser).

Sampling at temperature t: x = 1[l + t * Logistic(0, 1) > 0], i.e. Bernoulli(sigmoid(l / t));
t = 1 is an ordinary Bernoulli draw and t = 0 thresholds the probabilities at 1/2.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.distributions import _common


class Bernoulli(nn.Module):
  """Independent Bernoulli per sub-pixel; ``net_out`` holds one logit per image channel."""

  continuous = False

  @staticmethod
  def num_channels(image_channels: int) -> int:
    return image_channels

  def log_prob(self, net_out: jax.Array, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    _common.check_inputs('bernoulli', net_out, x, x.shape[-1])
    logits, x = _common.f32(net_out), _common.f32(x)
    return _common.sum_per_example(x * logits - jax.nn.softplus(logits))

  def sample(self, net_out: jax.Array, rng: jax.Array, temperature: float = 1.0) -> jax.Array:
    _common.check_inputs('bernoulli', net_out, None)
    logits = _common.f32(net_out)
    noise = jax.random.logistic(rng, logits.shape, jnp.float32)
    return (logits + temperature * noise > 0).astype(jnp.float32)

  def mean(self, net_out: jax.Array) -> jax.Array:
    _common.check_inputs('bernoulli', net_out, None)
    return jax.nn.sigmoid(_common.f32(net_out))
