"""The conv-VAE family's model fields (sigma-VAE's small calibrated-decoder VAE), shared by
``configs/sigma_vae_mnist.py`` and ``configs/sigma_vae_cifar10.py``."""

import ml_collections
from ml_collections import config_dict

# The decoders (output-distribution names) the sigma-VAE configs accept.
DECODERS = ('bernoulli', 'gaussian_fixed', 'gaussian_shared', 'gaussian_optimal',
            'gaussian_optimal_per_image', 'gaussian_per_pixel', 'categorical',
            'logistic_mixture', 'nvae_normal')


def model_config(decoder: str = 'gaussian_optimal') -> ml_collections.ConfigDict:
  """Every ``conv_vae`` field at the sigma-VAE defaults (see nvae_jax/models/conv_vae.py)."""
  return ml_collections.ConfigDict(dict(
      name='conv_vae', decoder=decoder, latent_dim=20, beta=1.0, channels=(32, 64, 128),
      strides=(1, 2, 2), log_sigma=0.0, clip_fixed_sigma=False, log_sigma_min=-6.0,
      log_sigma_max=config_dict.placeholder(float), sigma_stop_gradient=False,
      sigma_momentum=0.99, sigma_eval='running', num_mixture=10, faithful=False,
      sample_output='auto', dec_in_relu=False))
