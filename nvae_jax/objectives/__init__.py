"""NVAE training objectives: KL warm-up and balancing, spectral and batch-norm regularisers."""

from nvae_jax.objectives.kl import kl_balance, kl_balance_alpha, kl_coeff, regularizer_weight
from nvae_jax.objectives.spectral import (batchnorm_loss, conv_groups, init_spectral_state,
                                          init_spectral_state_host,
                                          kernel_matrix, power_iteration, spectral_loss)

__all__ = ['batchnorm_loss', 'conv_groups', 'init_spectral_state', 'init_spectral_state_host', 'kernel_matrix', 'kl_balance',
           'kl_balance_alpha', 'kl_coeff', 'power_iteration', 'regularizer_weight',
           'spectral_loss']
