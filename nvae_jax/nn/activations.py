"""Activations used by NVAE: Swish (x * sigmoid(x)) and ELU (alpha = 1)."""

import jax


def swish(x: jax.Array) -> jax.Array:
  """x * sigmoid(x)."""
  return x * jax.nn.sigmoid(x)


def elu(x: jax.Array) -> jax.Array:
  """x for x > 0, exp(x) - 1 otherwise."""
  return jax.nn.elu(x)
