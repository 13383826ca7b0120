"""Soft clipping of a value to an interval (sigma-VAE, Sec. 3.1; "Handful of Trials", PETS).

    upper:  t -> high - softplus(high - t)        (<= high, ~t far below high)
    lower:  t -> low + softplus(t - low)          (>= low, ~t far above low)

With both bounds the upper clip is applied first and the lower one second, as in PETS.  The lower
bound (the one that keeps sigma away from 0) then holds exactly; the upper one holds up to
log(1 + exp(-(high - low))), since the lower clip adds softplus(t - low) - (t - low) > 0 (below
0.0025 when high - low >= 6).  Unlike a hard clip the gradient never vanishes exactly, and it is
finite everywhere (it lies in (0, 1]).  The lower clip is not the identity near the bound:
``softclip(low, low) = low + log 2``.
"""

from __future__ import annotations

import jax


def softclip(t: jax.Array, low: float | None = None, high: float | None = None) -> jax.Array:
  """Softly clips ``t`` to ``[low, high]``; either bound may be ``None`` (no bound on that side)."""
  check_bounds('softclip', low, high)
  if high is not None:
    t = high - jax.nn.softplus(high - t)
  if low is not None:
    t = low + jax.nn.softplus(t - low)
  return t


def check_bounds(name: str, low: float | None, high: float | None) -> None:
  """Raises a ValueError naming ``name`` when both bounds are set and not ``low < high``."""
  if low is not None and high is not None and not low < high:
    raise ValueError(f'{name}: expected low < high (log_sigma_min < log_sigma_max), got '
                     f'low={low}, high={high}')
