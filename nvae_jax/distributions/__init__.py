"""Output (decoder) likelihoods over images and the nats -> bits conversions.

``make_output_distribution(name, **options)`` builds one of the modules below; each follows the
contract of :mod:`nvae_jax.distributions.base` (``log_prob`` / ``sample`` / ``mean``,
``continuous``, ``num_channels``).

=============================  ===============================================  ============
name                           options                                          net_out K
=============================  ===============================================  ============
``bernoulli``                  none                                             C
``gaussian_fixed``             log_sigma=0, log_sigma_min=None, log_sigma_max   C
``gaussian_shared``            log_sigma_min=-6, log_sigma_max=None             C
``gaussian_optimal``           stop_gradient, log_sigma_min/max, momentum       C
``gaussian_optimal_per_image`` same, plus eval_sigma ('running'|'per_image')    C
``gaussian_per_pixel``         log_sigma_min=-6, log_sigma_max=None             2C
``categorical``                num_bits=8                                       2**bits C
``logistic_mixture``           num_mixture=10, num_bits=8, faithful=False       10M (RGB), 3M
``nvae_normal``                density_on_x=False                               2C
=============================  ===============================================  ============
"""

from __future__ import annotations

from typing import Any

from nvae_jax.distributions.bernoulli import Bernoulli
from nvae_jax.distributions.categorical import Categorical
from nvae_jax.distributions.gaussian import (GaussianFixed, GaussianOptimal, GaussianPerPixel,
                                             GaussianShared, NVAENormal, normal_log_density)
from nvae_jax.distributions.logistic_mixture import LogisticMixture
from nvae_jax.distributions.softclip import softclip
from nvae_jax.distributions.units import bits_per_dim, nats_to_bits

_FACTORIES: dict[str, Any] = {
    'bernoulli': Bernoulli,
    'gaussian_fixed': GaussianFixed,
    'gaussian_shared': GaussianShared,
    'gaussian_optimal': lambda **kw: GaussianOptimal(per_image=False, **kw),
    'gaussian_optimal_per_image': lambda **kw: GaussianOptimal(per_image=True, **kw),
    'gaussian_per_pixel': GaussianPerPixel,
    'categorical': Categorical,
    'logistic_mixture': LogisticMixture,
    'nvae_normal': NVAENormal,
}

OUTPUT_DISTRIBUTIONS = tuple(_FACTORIES)


def make_output_distribution(name: str, **options):
  """Builds the output distribution ``name`` with keyword ``options`` (see the table above)."""
  if name not in _FACTORIES:
    raise ValueError(f'unknown output distribution {name!r}; expected one of '
                     f'{list(OUTPUT_DISTRIBUTIONS)}')
  try:
    return _FACTORIES[name](**options)
  except TypeError as e:
    raise TypeError(f'output distribution {name!r}: bad options {sorted(options)}: {e}') from e


__all__ = [
    'Bernoulli', 'Categorical', 'GaussianFixed', 'GaussianOptimal', 'GaussianPerPixel',
    'GaussianShared', 'LogisticMixture', 'NVAENormal', 'OUTPUT_DISTRIBUTIONS', 'bits_per_dim',
    'make_output_distribution', 'nats_to_bits', 'normal_log_density', 'softclip',
]
