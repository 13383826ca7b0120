"""Gaussian output densities: the calibrated decoders of sigma-VAE and NVAE's Normal decoder.

All of them are *continuous* densities (``continuous = True``): their "bits/dim" is not a discrete
likelihood and is not comparable with Bernoulli, categorical or logistic-mixture numbers.

sigma-VAE decoders (Rybkin, Daniilidis & Levine 2020), density on x in [0, 1]
--------------------------------------------------------------------------------
The mean is the network output passed through a sigmoid, mu = sigmoid(net_out[..., :C]), as the
sigma-VAE reference code does (its decoder ends in ``nn.Sigmoid``).  Per element

    -log N(x; mu, sigma) = 0.5 ((x - mu) / sigma)^2 + log sigma + 0.5 log(2 pi),

summed over H, W, C of each example in float32.  They differ in where log sigma comes from; every
log sigma passes through :func:`softclip` with the given bounds (``None`` = no bound):

* ``gaussian_fixed``: a constant ``log_sigma`` (default 0: the unit-variance Gaussian, i.e. MSE).
  No clip by default; ``log_sigma_min=-6`` reproduces the upstream code, which softclips even the
  constant, so that log sigma = -6 + softplus(6) ~ +0.0025 instead of 0.
* ``gaussian_shared``: one learned scalar parameter ``log_sigma`` (init 0), shared by every pixel,
  channel and image; lower bound -6 by default (sigma >= e^-6, about half the distance between
  8-bit colour values).
* ``gaussian_optimal``: the maximum-likelihood sigma, sigma^2 = MSE = mean over the batch and
  H, W, C of (x - mu)^2, analytic, one scalar per batch.  Gradients flow through it unless
  ``stop_gradient=True`` (upstream does not stop them).  At evaluation (``train=False``) and in
  ``sample`` a running average of the batch MSE is used instead (the paper's choice): a sigma
  computed from the very images being scored would make p(x|z) depend on x beyond the Gaussian
  term, so it would not be a normalised density and the NLL would be optimistic; it would also
  couple the examples of an eval batch (padded rows would change the others' scores).  The running
  average lives in the ``'batch_stats'`` collection (``mse_avg`` and ``avg_weight``, a debiased
  exponential moving average with ``momentum``) and is updated only when ``train=True`` outside
  initialisation; before any update it is 1 (the unit Gaussian).
* ``gaussian_optimal_per_image``: sigma_i^2 = MSE of image i over H, W, C.  At evaluation the
  default (``eval_sigma='running'``) uses the running average of the batch MSE (the mean of the
  per-image MSEs), for the same reason as above: the per-image optimum fits sigma to the test
  image itself, which is not a density of that image.  ``eval_sigma='per_image'`` scores with the
  per-image optimum anyway (as the training objective does); it is reported as an optimistic
  score, not a likelihood bound.
* ``gaussian_per_pixel``: the network outputs 2C channels, [0, C) the mean logits and [C, 2C)
  log sigma, softclipped to [log_sigma_min, log_sigma_max] (default [-6, none]).

Sampling at temperature t draws clip(mu + t sigma eps, 0, 1); ``mean`` is mu.

NVAE's Normal decoder (``nvae_normal``, ``--num_mixture_dec 1`` in the original)
------------------------------------------------------------------------------
Channels [0, C) hold raw means and [C, 2C) raw log-scales, soft-clamped as NVAE does:
mu = 5 tanh(mu_raw / 5), sigma = exp(5 tanh(l_raw / 5)) + 0.01.  The density is on y = 2x - 1 in
[-1, 1] (no Jacobian, like the original); ``density_on_x=True`` adds log 2 per dimension, giving the
density of x = (y + 1) / 2 comparable with the sigma-VAE decoders above.  Sampling uses the
temperature (the original ignores it) and clamps y to [-1, 1].
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import host_init
from nvae_jax.distributions import _common
from nvae_jax.distributions.softclip import check_bounds, softclip

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_MSE_FLOOR = 1e-12  # keeps log(MSE) and its gradient finite when a batch is reconstructed exactly


def normal_log_density(x: jax.Array, mean: jax.Array, log_sigma: jax.Array) -> jax.Array:
  """Elementwise log N(x; mean, exp(log_sigma)^2) = -0.5 z^2 - log sigma - 0.5 log 2 pi."""
  z = (x - mean) * jnp.exp(-log_sigma)
  return -0.5 * jnp.square(z) - log_sigma - _HALF_LOG_2PI


def _sample_clipped(rng, mean, sigma, temperature, low, high):
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return jnp.clip(mean + temperature * sigma * eps, low, high)


class _SigmoidMeanGaussian(nn.Module):
  """Shared plumbing: mean = sigmoid of the first C channels; subclasses supply log sigma."""

  #: Number of net_out channels per image channel (2 for per-pixel sigma).
  channels_per_image_channel = 1
  continuous = True
  name_for_errors = 'gaussian'

  @classmethod
  def num_channels(cls, image_channels: int) -> int:
    return cls.channels_per_image_channel * image_channels

  def _split(self, net_out):
    c = _common.image_channels(self.name_for_errors, net_out, self.channels_per_image_channel)
    net_out = _common.f32(net_out)
    return jax.nn.sigmoid(net_out[..., :c]), net_out[..., c:]

  def _check(self, net_out, x):
    _common.check_inputs(self.name_for_errors, net_out, x,
                         None if x is None else self.num_channels(x.shape[-1]))

  def _report_sigma(self, log_sigma):
    self.sow('intermediates', 'sigma', jnp.mean(jnp.exp(log_sigma)))

  def _log_prob_with(self, mean, x, log_sigma):
    self._report_sigma(log_sigma)
    return _common.sum_per_example(normal_log_density(_common.f32(x), mean, log_sigma))

  def mean(self, net_out: jax.Array) -> jax.Array:
    self._check(net_out, None)
    return self._split(net_out)[0]


class _ScalarSigmaGaussian(_SigmoidMeanGaussian):
  """One log sigma for every element, from the subclass's ``_log_sigma()``."""

  def log_prob(self, net_out, x, train: bool = False):
    del train
    self._check(net_out, x)
    return self._log_prob_with(self._split(net_out)[0], x, self._log_sigma())

  def sample(self, net_out, rng, temperature: float = 1.0):
    self._check(net_out, None)
    mean = self._split(net_out)[0]
    return _sample_clipped(rng, mean, jnp.exp(self._log_sigma()), temperature, 0.0, 1.0)


class GaussianFixed(_ScalarSigmaGaussian):
  """Gaussian with a constant log sigma (``log_sigma``, default 0 = unit variance)."""

  log_sigma: float = 0.0
  log_sigma_min: Optional[float] = None
  log_sigma_max: Optional[float] = None
  name_for_errors = 'gaussian_fixed'

  def _log_sigma(self):
    check_bounds(self.name_for_errors, self.log_sigma_min, self.log_sigma_max)
    return softclip(jnp.asarray(self.log_sigma, jnp.float32), self.log_sigma_min,
                    self.log_sigma_max)


class GaussianShared(_ScalarSigmaGaussian):
  """Gaussian with one learned scalar log sigma (parameter ``log_sigma``, initialised to 0)."""

  log_sigma_min: Optional[float] = -6.0
  log_sigma_max: Optional[float] = None
  name_for_errors = 'gaussian_shared'

  def setup(self):
    check_bounds(self.name_for_errors, self.log_sigma_min, self.log_sigma_max)
    self.raw_log_sigma = host_init.param(self, 'log_sigma', host_init.Constant(0.0), ())

  def _log_sigma(self):
    return softclip(self.raw_log_sigma, self.log_sigma_min, self.log_sigma_max)


class GaussianOptimal(_SigmoidMeanGaussian):
  """Gaussian with the analytic maximum-likelihood sigma (sigma^2 = MSE); see the module doc.

  Attributes:
    per_image: False: one sigma per batch (``gaussian_optimal``); True: one per image.
    stop_gradient: stop the gradient through the analytic sigma (off upstream).
    log_sigma_min, log_sigma_max: softclip bounds on log sigma = 0.5 log MSE.
    momentum: of the running average of the batch MSE used at evaluation and for sampling.
    eval_sigma: ``'running'`` (default) or, for ``per_image=True`` only, ``'per_image'``.
  """

  per_image: bool = False
  stop_gradient: bool = False
  log_sigma_min: Optional[float] = -6.0
  log_sigma_max: Optional[float] = None
  momentum: float = 0.99
  eval_sigma: str = 'running'

  @property
  def name_for_errors(self):
    return 'gaussian_optimal_per_image' if self.per_image else 'gaussian_optimal'

  def setup(self):
    check_bounds(self.name_for_errors, self.log_sigma_min, self.log_sigma_max)
    allowed = ('running', 'per_image') if self.per_image else ('running',)
    if self.eval_sigma not in allowed:
      raise ValueError(f'{self.name_for_errors}: eval_sigma must be one of {allowed}, got '
                       f'{self.eval_sigma!r}')
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f'{self.name_for_errors}: momentum must be in [0, 1), got {self.momentum}')
    zero = host_init.Constant(0.0)
    self.mse_avg = host_init.variable(self, 'batch_stats', 'mse_avg', zero, ())
    self.avg_weight = host_init.variable(self, 'batch_stats', 'avg_weight', zero, ())

  def running_mse(self) -> jax.Array:
    """The debiased running average of the batch MSE (1 before the first training update)."""
    w = self.avg_weight.value
    return jnp.where(w > 0, self.mse_avg.value / jnp.where(w > 0, w, 1.0), 1.0)

  def _clip(self, log_sigma):
    log_sigma = softclip(log_sigma, self.log_sigma_min, self.log_sigma_max)
    return jax.lax.stop_gradient(log_sigma) if self.stop_gradient else log_sigma

  def _log_sigma_from_mse(self, mse):
    return self._clip(0.5 * jnp.log(jnp.maximum(mse, _MSE_FLOOR)))

  def log_prob(self, net_out, x, train: bool = False):
    self._check(net_out, x)
    mean = self._split(net_out)[0]
    sq = jnp.square(_common.f32(x) - mean)
    if train or (self.per_image and self.eval_sigma == 'per_image'):
      if self.per_image:
        mse = jnp.mean(sq, axis=(1, 2, 3), keepdims=True)
      else:
        mse = jnp.mean(sq)
      if train and not self.is_initializing():
        batch_mse = jax.lax.stop_gradient(jnp.mean(sq))
        m = self.momentum
        self.mse_avg.value = m * self.mse_avg.value + (1.0 - m) * batch_mse
        self.avg_weight.value = m * self.avg_weight.value + (1.0 - m)
    else:
      mse = self.running_mse()
    return self._log_prob_with(mean, x, self._log_sigma_from_mse(mse))

  def sample(self, net_out, rng, temperature: float = 1.0):
    self._check(net_out, None)
    mean = self._split(net_out)[0]
    sigma = jnp.exp(self._log_sigma_from_mse(self.running_mse()))
    return _sample_clipped(rng, mean, sigma, temperature, 0.0, 1.0)


class GaussianPerPixel(_SigmoidMeanGaussian):
  """Network-predicted per-pixel sigma: 2C channels, [0, C) mean logits, [C, 2C) log sigma."""

  log_sigma_min: Optional[float] = -6.0
  log_sigma_max: Optional[float] = None
  channels_per_image_channel = 2
  name_for_errors = 'gaussian_per_pixel'

  def _params(self, net_out):
    check_bounds(self.name_for_errors, self.log_sigma_min, self.log_sigma_max)
    mean, raw = self._split(net_out)
    return mean, softclip(raw, self.log_sigma_min, self.log_sigma_max)

  def log_prob(self, net_out, x, train: bool = False):
    del train
    self._check(net_out, x)
    mean, log_sigma = self._params(net_out)
    return self._log_prob_with(mean, x, log_sigma)

  def sample(self, net_out, rng, temperature: float = 1.0):
    self._check(net_out, None)
    mean, log_sigma = self._params(net_out)
    return _sample_clipped(rng, mean, jnp.exp(log_sigma), temperature, 0.0, 1.0)


class NVAENormal(nn.Module):
  """NVAE's Normal decoder on y = 2x - 1 (see the module docstring)."""

  density_on_x: bool = False
  continuous = True

  @staticmethod
  def num_channels(image_channels: int) -> int:
    return 2 * image_channels

  def _params(self, net_out):
    c = _common.image_channels('nvae_normal', net_out, 2)
    net_out = _common.f32(net_out)
    mu = 5.0 * jnp.tanh(net_out[..., :c] / 5.0)
    sigma = jnp.exp(5.0 * jnp.tanh(net_out[..., c:] / 5.0)) + 0.01
    return mu, sigma

  def log_prob(self, net_out, x, train: bool = False):
    del train
    _common.check_inputs('nvae_normal', net_out, x, 2 * x.shape[-1])
    mu, sigma = self._params(net_out)
    y = 2.0 * _common.f32(x) - 1.0
    lp = -0.5 * jnp.square((y - mu) / sigma) - jnp.log(sigma) - _HALF_LOG_2PI
    if self.density_on_x:
      lp = lp + math.log(2.0)
    self.sow('intermediates', 'sigma', jnp.mean(sigma))
    return _common.sum_per_example(lp)

  def sample(self, net_out, rng, temperature: float = 1.0):
    _common.check_inputs('nvae_normal', net_out, None)
    mu, sigma = self._params(net_out)
    return 0.5 * _sample_clipped(rng, mu, sigma, temperature, -1.0, 1.0) + 0.5

  def mean(self, net_out):
    _common.check_inputs('nvae_normal', net_out, None)
    mu, _ = self._params(net_out)
    return 0.5 * jnp.clip(mu, -1.0, 1.0) + 0.5
