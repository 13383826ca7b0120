"""NVAE's diagonal Normal over latent variables, with the residual parameterisation.

From raw network outputs (mu_raw, l_raw) and a temperature t:

    mu    = 5 tanh(mu_raw / 5)                       (soft clamp to (-5, 5))
    sigma = (exp(5 tanh(l_raw / 5)) + 0.01) * t       (floor 0.01 before the temperature)

Residual posterior (``--res_dist``): q = from_raw(mu_p_raw + dmu_raw, l_p_raw + dl_raw), i.e. the
raw parameters are added *before* the soft clamp.  The top prior is
``from_raw(0, 0)`` = N(0, 1.01^2).

Element-wise densities (summing is left to the caller):

    log N(z; mu, sigma) = -((z - mu) / sigma)^2 / 2 - log(2 pi) / 2 - log sigma
    KL(q || p) = ((mu_q - mu_p) / sigma_p)^2 / 2 + (sigma_q / sigma_p)^2 / 2 - 1/2
                 - log(sigma_q / sigma_p)

A sample is z = eps * sigma + mu with eps ~ N(0, 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_FLOOR = 1e-2
_HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)


def soft_clamp5(x: jax.Array) -> jax.Array:
  """5 tanh(x / 5)."""
  return 5.0 * jnp.tanh(x / 5.0)


class LatentNormal(NamedTuple):
  """A diagonal Normal with already-clamped ``mu`` and ``sigma`` (a pytree)."""
  mu: jax.Array
  sigma: jax.Array

  @classmethod
  def from_raw(cls, mu_raw: jax.Array, log_sigma_raw: jax.Array,
               temperature: float | jax.Array = 1.0) -> 'LatentNormal':
    """Soft-clamped parameters from raw network outputs (see the module docstring)."""
    sigma = jnp.exp(soft_clamp5(log_sigma_raw)) + SIGMA_FLOOR
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
      sigma = sigma * temperature
    return cls(soft_clamp5(mu_raw), sigma)

  @classmethod
  def from_params(cls, params: jax.Array, temperature: float | jax.Array = 1.0
                  ) -> 'LatentNormal':
    """Splits a conv output [..., 2L] into (mu_raw, log_sigma_raw) = first L, last L channels."""
    mu_raw, log_sigma_raw = split_params(params)
    return cls.from_raw(mu_raw, log_sigma_raw, temperature)

  def sample(self, eps: jax.Array) -> jax.Array:
    """Reparameterised sample z = eps * sigma + mu."""
    return eps * self.sigma + self.mu

  def log_prob(self, z: jax.Array) -> jax.Array:
    """Element-wise log-density."""
    u = (z - self.mu) / self.sigma
    return -0.5 * u * u - _HALF_LOG_2PI - jnp.log(self.sigma)

  def kl(self, other: 'LatentNormal') -> jax.Array:
    """Element-wise analytic KL(self || other)."""
    t1 = (self.mu - other.mu) / other.sigma
    t2 = self.sigma / other.sigma
    return 0.5 * (t1 * t1 + t2 * t2) - 0.5 - jnp.log(t2)


def split_params(params: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2L] -> ([..., L], [..., L]) along the channel axis."""
  c = params.shape[-1]
  if c % 2:
    raise ValueError(f'split_params: expected an even number of channels, got {c}')
  return params[..., :c // 2], params[..., c // 2:]


def top_prior(shape, dtype=jnp.float32, temperature: float | jax.Array = 1.0) -> LatentNormal:
  """The fixed prior of the top group: from_raw(0, 0), i.e. N(0, (1.01 t)^2)."""
  zeros = jnp.zeros(shape, dtype)
  return LatentNormal.from_raw(zeros, zeros, temperature)
