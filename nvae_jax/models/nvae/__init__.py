"""The NVAE family: ``plan`` (static shapes), ``network`` (flax modules), ``sampling``
(temperatures, BN re-estimation, encoding) and ``task`` (the ModelTask: config -> model, loss,
evaluation, sampling hooks).  Imports go down only: task -> sampling -> network -> plan (checked
by tests/test_architecture.py)."""

from nvae_jax.models.nvae.network import NVAE, importance_weighted_nll  # noqa: F401
from nvae_jax.models.nvae.plan import NVAEArch, groups_per_scale  # noqa: F401
from nvae_jax.models.nvae.task import (NVAETask, likelihood_from_config,  # noqa: F401
                                       resolve_depthwise_impl)
