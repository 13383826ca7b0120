"""The library's config: the schema and defaults of every field (``schema``), their validation
(``validation``), and the builders the experiment files in ``configs/`` compose: NVAE's original
arguments, defaults and published setups (``nvae``), the original NVAE's dataset table
(``datasets``), the Glow / emerging-convolution flows (``flow``) and the sigma-VAE conv VAE
(``conv_vae``).  Nothing here imports the experiment folder ``configs/``.

Experiment files only compose and override these: ``configs/nvae_cifar10.py`` is
``nvae.published_config('cifar10', arg)``.
"""

from nvae_jax.config.schema import base_config  # noqa: F401
from nvae_jax.config.validation import ConfigError, validate  # noqa: F401
