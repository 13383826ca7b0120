"""The NVAE wing: ``plan`` (static shapes), ``network`` (flax modules), ``task`` (the ModelTask:
config -> model, loss, evaluation) and ``sampling`` (temperatures, BN re-estimation, encoding,
reconstruction).  Imports go down only: sampling -> task -> network -> plan."""

from nvae_jax.models.nvae.network import NVAE, importance_weighted_nll  # noqa: F401
from nvae_jax.models.nvae.plan import NVAEArch, groups_per_scale  # noqa: F401
from nvae_jax.models.nvae.task import (NVAETask, likelihood_from_config,  # noqa: F401
                                       resolve_depthwise_impl)
