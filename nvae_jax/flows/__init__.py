"""Bijective layers for normalising flows, all with one contract.

``y, logdet = layer(x, reverse=False)`` on NHWC input ``x``; ``logdet`` has shape [batch] and is
float32 at least (float64 when ``x`` is float64, under ``jax.enable_x64``).  ``reverse=True`` is the
exact inverse and returns the inverse's log-det, i.e. minus the forward log-det at the
corresponding point.  Layers are flax linen modules, constructible from their hyper-parameters
alone; the channel count is read from the input at ``init``.

Mixing layers (``actnorm.py``, ``conv1x1.py``, ``emerging.py``, ``periodic.py``) compute in float32
(float64 for float64 inputs) whatever the input dtype, and return float32 outputs for bfloat16 or
float16 inputs.  Flow blocks: ``coupling.py``, ``squeeze.py``, ``split.py``, ``permutations.py``;
dequantisation and bits/dim arithmetic: the ``dequantize`` module.
"""

from nvae_jax.flows import dequantize
from nvae_jax.flows.actnorm import ActNorm
from nvae_jax.flows.conv1x1 import Conv1x1
from nvae_jax.flows.coupling import AdditiveCoupling, AffineCoupling
from nvae_jax.flows.emerging import EmergingConv, naive_inverse
from nvae_jax.flows.periodic import PeriodicConv
from nvae_jax.flows.permutations import Reverse, Shuffle
from nvae_jax.flows.split import Split
from nvae_jax.flows.squeeze import Squeeze

__all__ = [
    'ActNorm', 'AdditiveCoupling', 'AffineCoupling', 'Conv1x1', 'EmergingConv', 'PeriodicConv',
    'Reverse', 'Shuffle', 'Split', 'Squeeze', 'dequantize', 'naive_inverse',
]
