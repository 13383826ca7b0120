"""Precision and rematerialisation policies, read from the config in one place.

Parameters and every reported number (losses, log-determinants, likelihoods) stay float32;
``compute_dtype`` is what convolutions and activations run in.  ``remat`` wraps a flax module class
in ``nn.remat`` with a named ``jax.checkpoint_policies`` policy.

Remat keeps JAX's CSE prevention (``prevent_cse=True``).  Without it, the recomputation that the
backward pass of a cell *outside* a ``lax.scan`` asks for is the same expression as the forward
pass, and XLA's common-subexpression elimination merges the two, so the forward values are kept
after all: with ``prevent_cse=False`` the mnist_tiny gradient program needed 355 MB of temporary
memory under ``nothing_saveable`` against 376 MB without remat; with ``prevent_cse=True``,
141 MB (jax 0.11.2, XLA's ``memory_analysis()``; README, *NVAE speed and memory*).  Inside a scan
the loop boundary already keeps them apart (``nvae_jax.nn.stacked`` passes ``False`` there).
The prevention is an optimisation barrier that jax 0.10's XLA:CPU removes before its own CSE
unless told not to; the platform's CPU options keep it (``nvae_jax.compile_options``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


def compute_dtype(name: str):
  """Maps ``config.precision.compute_dtype`` to a jnp dtype, with a clear error."""
  if name not in _DTYPES:
    raise ValueError(f'precision.compute_dtype: expected one of {sorted(_DTYPES)}, got {name!r}')
  return _DTYPES[name]


def checkpoint_policy(name: str):
  """Returns the ``jax.checkpoint_policies`` member named ``name`` (None for ``'none'``)."""
  if name in ('none', '', None):
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or name.startswith('_'):
    raise ValueError(f'remat.policy: unknown policy {name!r}; expected "none" or a name in '
                     'jax.checkpoint_policies such as "nothing_saveable" or "dots_saveable"')
  return policy


def remat(module_cls, policy_name: str, **kwargs):
  """``nn.remat(module_cls)`` under the named policy, or ``module_cls`` itself for ``'none'``."""
  policy = checkpoint_policy(policy_name)
  if policy is None:
    return module_cls
  return nn.remat(module_cls, policy=policy, prevent_cse=True, **kwargs)
