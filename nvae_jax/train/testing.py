"""A tiny ModelTask for testing the platform (and a worked example of the ModelTask contract).

``TinyVAE``: a one-layer Gaussian-latent VAE with batch norm (so that mutable model state is
exercised) and a Bernoulli decoder, on images ``[B, H, W, C]`` in ``[0, 1]`` (H, W even)::

  encoder  h = swish(BN(conv3x3_stride2(x)))          [B, H/2, W/2, F]
           mu, log_sigma = conv1x1(h)                 [B, H/2, W/2, Z] each
  decoder  logits = conv_transpose3x3_stride2(z)      [B, H, W, C]
  loss     = E_q[-log Bernoulli(x | logits)] + KL(N(mu, sigma^2) || N(0, 1)),  one sample of z

``evaluate`` returns the single-sample negative ELBO as ``nll`` (an upper bound, good enough for
platform tests).  Registered as the model name ``tiny_test_vae``; the image side is the one
``init`` saw (before ``init``: ``config.data.image_size``, 8 when 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.models.base import ModelTaskBase, register


class _Net(nn.Module):
  features: int
  latent: int
  channels: int

  def setup(self):
    # No bias before batch norm: its true gradient is 0 and Adam would amplify rounding noise.
    self.conv = nn.Conv(self.features, (3, 3), strides=(2, 2), use_bias=False)
    self.bn = nn.BatchNorm(momentum=0.9)
    self.head = nn.Conv(2 * self.latent, (1, 1))
    self.dec = nn.ConvTranspose(self.channels, (3, 3), strides=(2, 2))

  def encode(self, x, train: bool):
    h = nn.swish(self.bn(self.conv(2.0 * x - 1.0), use_running_average=not train))
    mu, log_sigma = jnp.split(self.head(h), 2, axis=-1)
    return mu, jnp.clip(log_sigma, -7.0, 2.0)

  def decode(self, z):
    return self.dec(z)

  def __call__(self, x, z_noise, train: bool):
    mu, log_sigma = self.encode(x, train)
    z = mu + jnp.exp(log_sigma) * z_noise
    return self.decode(z), mu, log_sigma


def _bernoulli_log_prob(logits, x):
  return jnp.sum(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits),
                 axis=(1, 2, 3))


def _kl(mu, log_sigma):
  return jnp.sum(0.5 * (mu**2 + jnp.exp(2 * log_sigma) - 1.0) - log_sigma, axis=(1, 2, 3))


@register('tiny_test_vae')
class TinyVAETask(ModelTaskBase):
  """ModelTask of the tiny VAE; ``config.model`` may set ``features`` and ``latent``."""

  mutable_collections = ('batch_stats',)

  def __init__(self, config):
    m = config.model
    self.features = int(m.get('features', 4))
    self.latent = int(m.get('latent', 2))
    self.channels = int(config.data.channels)
    size = int(config.data.image_size) or 8
    self._hw = (size, size)
    self.net = _Net(self.features, self.latent, self.channels)

  def _noise_shape(self, x):
    b, h, w, _ = x.shape
    return (b, h // 2, w // 2, self.latent)

  def init(self, rng, batch):
    x = batch['image']
    self._hw = tuple(int(s) for s in x.shape[1:3])
    return self.net.init(rng, x, jnp.zeros(self._noise_shape(x)), train=False)

  def _elbo_terms(self, variables, x, rng, train):
    noise = jax.random.normal(rng, self._noise_shape(x))
    if train:
      (logits, mu, log_sigma), new_state = self.net.apply(
          variables, x, noise, train=True, mutable=['batch_stats'])
    else:
      logits, mu, log_sigma = self.net.apply(variables, x, noise, train=False)
      new_state = None
    recon = -_bernoulli_log_prob(logits, x)
    kl = _kl(mu, log_sigma)
    return recon, kl, new_state

  def loss(self, variables, batch, rng, step):
    recon, kl, new_state = self._elbo_terms(variables, batch['image'], rng, train=True)
    loss = jnp.mean(recon + kl)
    return loss, ({'recon': jnp.mean(recon), 'kl': jnp.mean(kl)}, dict(new_state))

  def evaluate(self, variables, batch, rng):
    recon, kl, _ = self._elbo_terms(variables, batch['image'], rng, train=False)
    return {'nll': recon + kl, 'kl': kl}

  def sample(self, variables, rng, num, temperature):
    h, w = self._hw
    z = temperature * jax.random.normal(rng, (num, h // 2, w // 2, self.latent))
    logits = self.net.apply(variables, z, method=_Net.decode)
    return jax.nn.sigmoid(logits)

  def reconstruct(self, variables, batch, rng):
    mu, _ = self.net.apply(variables, batch['image'], False, method=_Net.encode)
    return jax.nn.sigmoid(self.net.apply(variables, mu, method=_Net.decode))

  def describe(self, image_shape=None):
    h, w = self._hw if image_shape is None else tuple(int(s) for s in image_shape[:2])
    return {'inputs': (h, w, self.channels), 'latents': [(h // 2, w // 2, self.latent)],
            'outputs': (h, w, self.channels),
            'likelihood': {'name': 'bernoulli', 'continuous': False}}
