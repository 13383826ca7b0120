"""KL warm-up, KL balancing and the regulariser weight of NVAE (nvae_spec.md §2).

KL warm-up (``utils.kl_coeff`` of the original), with N the total number of training steps:

    beta(step) = max(min((step - c N) / (a N), 1), beta_min)

with a = ``kl_anneal_portion`` (0.3), c = ``kl_const_portion`` (1e-4) and beta_min =
``kl_const_coeff`` (1e-4).

KL balancing (only while beta < 1; afterwards every gamma_g = 1).  For kl_all [B, G]:

    k_g = mean_b |KL_{b,g}| + 0.01
    gamma_g = G (k_g / alpha_g) / sum_h (k_h / alpha_h)         (stop-gradient; mean gamma = 1)
    balanced_KL_b = beta * sum_g gamma_g KL_{b,g}

alpha ("square" scheme): for decoder scale i (i = 0 at the top, lowest resolution) with n_i
groups, alpha = 4^i / n_i for each of its groups, divided by the minimum so that min alpha = 1.

Regulariser weight: lambda, or with annealing the geometric interpolation
lambda(beta) = exp((1 - beta) ln lambda_init + beta ln lambda).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def kl_coeff(step, total_steps: float, anneal_portion: float, const_portion: float,
             min_coeff: float) -> jax.Array:
  """The KL warm-up coefficient beta(step), float32."""
  if total_steps <= 0:
    raise ValueError(f'kl_coeff: total_steps must be positive, got {total_steps}')
  if anneal_portion <= 0:
    raise ValueError(f'kl_coeff: kl_anneal_portion must be positive, got {anneal_portion}')
  step = jnp.asarray(step, jnp.float32)
  ramp = (step - const_portion * total_steps) / (anneal_portion * total_steps)
  return jnp.maximum(jnp.minimum(ramp, 1.0), min_coeff).astype(jnp.float32)


def kl_balance_alpha(groups_per_scale: Sequence[int]) -> np.ndarray:
  """alpha per group in decoder order; ``groups_per_scale`` is listed high -> low resolution."""
  decoder_order = list(groups_per_scale)[::-1]
  alpha = np.concatenate([np.full(n, 4.0 ** i / n) for i, n in enumerate(decoder_order)])
  return (alpha / alpha.min()).astype(np.float32)


def kl_balance(kl_all: jax.Array, beta: jax.Array, alpha, balance: bool = True):
  """Balanced, warmed-up KL per example.

  Args:
    kl_all: [B, G] per-example, per-group KL (decoder order).
    beta: the warm-up coefficient.
    alpha: [G] from :func:`kl_balance_alpha`.
    balance: whether balancing is enabled at all (it is further gated by beta < 1).

  Returns:
    (beta * KL_b [B], gamma [G], mean_b KL_{b,g} [G]).
  """
  kl_all = jnp.asarray(kl_all, jnp.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  if kl_all.ndim != 2 or alpha.shape != (kl_all.shape[1],):
    raise ValueError(f'kl_balance: expected kl_all [B, G] and alpha [G], got {kl_all.shape} '
                     f'and {alpha.shape}')
  kl_vals = jnp.mean(kl_all, axis=0)
  plain = jnp.sum(kl_all, axis=1)
  if not balance:
    return beta * plain, jnp.ones_like(kl_vals), kl_vals
  coeff = jnp.mean(jnp.abs(kl_all), axis=0) + 0.01
  coeff = coeff / alpha * jnp.sum(coeff)
  coeff = lax.stop_gradient(coeff / jnp.mean(coeff))
  balanced = jnp.sum(kl_all * coeff, axis=1)
  active = beta < 1.0
  kl = jnp.where(active, balanced, plain)
  gamma = jnp.where(active, coeff, jnp.ones_like(coeff))
  return beta * kl, gamma, kl_vals


def regularizer_weight(beta: jax.Array, weight: float, anneal: bool = False,
                       weight_init: float = 10.0) -> jax.Array:
  """lambda, or exp((1 - beta) ln lambda_init + beta ln lambda) with ``anneal``."""
  if not anneal:
    return jnp.asarray(weight, jnp.float32)
  if weight <= 0 or weight_init <= 0:
    raise ValueError('weight_decay_norm_anneal needs positive weight_decay_norm and '
                     f'weight_decay_norm_init, got {weight} and {weight_init}')
  return jnp.exp((1.0 - beta) * np.log(weight_init) + beta * np.log(weight)).astype(jnp.float32)
