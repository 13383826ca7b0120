"""Bijective layers for normalising flows, all with one contract.

``y, logdet = layer(x, reverse=False)`` on NHWC input ``x``; ``logdet`` has shape [batch] and is
float32 at least (float64 when ``x`` is float64, under ``jax.enable_x64``).  ``reverse=True`` is the
exact inverse and returns the inverse's log-det, i.e. minus the forward log-det at the
corresponding point.  Layers are flax linen modules, constructible from their hyper-parameters
alone; the channel count is read from the input at ``init``.
"""

from nvae_jax.flows.actnorm import ActNorm
from nvae_jax.flows.conv1x1 import Conv1x1
from nvae_jax.flows.emerging import EmergingConv, naive_inverse
from nvae_jax.flows.periodic import PeriodicConv

__all__ = ['ActNorm', 'Conv1x1', 'EmergingConv', 'PeriodicConv', 'naive_inverse']
