"""Glow's ``split2d``: factor out half of the channels under a learned conditional prior.

Forward: ``x = [z1, z2]`` along channels (``z1 = x[..., :C//2]``).  ``z2`` leaves the flow and is
modelled by a diagonal Gaussian whose parameters come from a zero-initialised 3x3 conv of ``z1``
(:class:`nvae_jax.flows.coupling.ZeroConv`, ``2 C_2`` outputs, ``mu = h[..., 0::2]``,
``log sigma = h[..., 1::2]``):

    eps = (z2 - mu(z1)) / sigma(z1)
    log p(z2 | z1) = sum_{h,w,c} [ -eps^2 / 2 - log sigma - log(2 pi) / 2 ].

With ``learn_prior=False`` (Glow without ``--learnprior``) ``mu = 0``, ``sigma = 1``.  At
initialisation the learned prior is N(0, 1) too.

Reverse: ``z2 = mu(z1) + temperature * sigma(z1) * eps`` and ``x = [z1, z2]``.  ``eps`` is the
standardised noise: pass the ``eps`` returned by the forward pass for an exact round trip, or
``N(0, I)`` draws to sample.  The map ``x -> (z1, eps)`` is a bijection whose Jacobian
log-determinant is ``-sum log sigma``; hence ``log p(z2 | z1) = log N(eps; 0, I) - sum log sigma``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.flows.coupling import ZeroConv, accum_dtype, check_nhwc


def standard_normal_logprob(eps: jax.Array) -> jax.Array:
  """``sum log N(eps; 0, I)`` over all but the batch axis, in eps's (float32+) dtype."""
  eps = eps.astype(accum_dtype(eps))
  return jnp.sum(-0.5 * jnp.square(eps) - 0.5 * math.log(2 * math.pi),
                 axis=tuple(range(1, eps.ndim)))


class Split(nn.Module):
  """``z1, log_prob, eps = Split()(x)``; ``x, log_prob = Split()(z1, reverse=True, eps=eps)``.

  Attributes:
    learn_prior: a conditional prior ``N(mu(z1), sigma(z1))`` (True) or ``N(0, 1)`` (False).
    dtype: compute dtype of the prior's conv (None: the input's).
  """
  learn_prior: bool = True
  dtype: Any = None

  def _prior(self, z1: jax.Array, c2: int) -> tuple[jax.Array, jax.Array]:
    acc = accum_dtype(z1)
    if not self.learn_prior:
      zeros = jnp.zeros(z1.shape[:-1] + (c2,), acc)
      return zeros, zeros
    h = ZeroConv(2 * c2, 3, dtype=self.dtype, name='prior')(z1)
    return h[..., 0::2], h[..., 1::2]

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False, eps: jax.Array | None = None,
               temperature: float = 1.0):
    if not reverse:
      check_nhwc(x, 'Split', min_channels=2)
      c1 = x.shape[-1] // 2
      z1, z2 = x[..., :c1], x[..., c1:]
      mu, logs = self._prior(z1, z2.shape[-1])
      e = (z2.astype(mu.dtype) - mu) * jnp.exp(-logs)
      logp = standard_normal_logprob(e) - jnp.sum(logs, axis=(1, 2, 3))
      return z1, logp, e.astype(x.dtype)
    check_nhwc(x, 'Split (reverse, z1)')
    if eps is None:
      raise ValueError('Split(reverse=True): eps (the standardised z2, shape [B, H, W, C2]) is '
                       'required; draw it from N(0, I) to sample')
    if eps.shape[:-1] != x.shape[:-1] or eps.shape[-1] not in (x.shape[-1], x.shape[-1] + 1):
      raise ValueError(f'Split(reverse=True): eps must have shape {x.shape[:-1]} + '
                       f'({x.shape[-1]} or {x.shape[-1] + 1},), got {eps.shape}')
    mu, logs = self._prior(x, eps.shape[-1])
    e = eps.astype(mu.dtype)
    z2 = mu + temperature * jnp.exp(logs) * e
    # log p(z2 | z1) of the z2 drawn, whose standardised value is temperature * eps.
    logp = standard_normal_logprob(temperature * e) - jnp.sum(logs, axis=(1, 2, 3))
    return jnp.concatenate([x, z2.astype(x.dtype)], axis=-1), logp
