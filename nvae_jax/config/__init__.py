"""The library's config: the schema and defaults of every field (``schema``), their validation
(``validation``), and the builders the experiment files in ``configs/`` compose: NVAE's original
defaults and published setups (``nvae``), the Glow / emerging-convolution flows (``flow``).

Experiment files only compose and override these: ``configs/nvae_cifar10.py`` is
``nvae.published(...)`` plus its dataset fields.
"""

from nvae_jax.config.schema import base_config  # noqa: F401
from nvae_jax.config.validation import ConfigError, validate  # noqa: F401
