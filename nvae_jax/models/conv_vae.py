"""The small convolutional VAE of sigma-VAE (Rybkin, Daniilidis & Levine 2020), any decoder.

Model (images x in [0, 1], NHWC):

* encoder: three convolutions with ``model.channels`` filters (default 32, 64, 128) and
  ``model.strides`` (default 1, 2, 2, as the sigma-VAE reference code: 28x28 -> 7x7), kernel 3
  for stride 1 and 4 for stride 2, each followed by ReLU; flatten; a dense layer to the mean and
  log-scale of q(z|x) = N(mu, diag sigma^2), z of ``model.latent_dim`` (default 20) dimensions;
* decoder: dense to the encoder's last feature map (followed by a ReLU only with
  ``model.dec_in_relu``: the sigma-VAE reference code has none), then transposed convolutions mirroring
  the encoder back to H x W (kernel 4 for stride 2, computed as a 3x3 convolution followed by
  depth-to-space, :class:`Upsample2x`, which is the same function with the same parameters;
  kernel 3 for stride 1), the last one producing the K = ``num_channels(C)`` raw channels the
  output distribution ``model.decoder`` needs (Gaussian means pass through a sigmoid inside the
  distribution);
* prior p(z) = N(0, I) and the analytic
  KL(q || p) = sum_j 0.5 (mu_j^2 + sigma_j^2 - 1) - log sigma_j.

H and W must be divisible by the product of the strides (4 by default).  Convolutions run in
``precision.compute_dtype``; parameters, the latent statistics, the KL and the likelihood are
float32.

Objective (per example sums, averaged over the batch, in nats):

    loss = mean_b [ recon_b + beta KL_b ],   recon_b = -log p(x_b | z_b),  z_b ~ q(z | x_b),

with ``model.beta`` (default 1; sigma-VAE's point is that a calibrated decoder needs no beta).
Training metrics: ``loss``, ``recon``, ``kl``, ``nelbo`` = mean_b (recon_b + KL_b) (the negative
ELBO whatever beta, nats per image, the same name and sign as evaluation's ``nelbo``) and, for the
Gaussian decoders, ``sigma`` (the mean decoder sigma of the batch).

Evaluation: with ``eval.num_importance_samples`` K = 1 the per-example ``nll`` is the negative
ELBO with one posterior sample and the analytic KL; with K > 1 it is the importance-weighted bound
-log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), evaluated ``eval.importance_chunk`` samples at a
time.  Both are *upper bounds* on -log p(x) (in expectation over the samples), not the NLL itself;
for the Gaussian decoders they bound a continuous density on [0, 1] (negative values are normal)
and are not comparable with discrete likelihoods.  The optimal-sigma decoders evaluate with their
running-average sigma (see ``nvae_jax.distributions.gaussian``).

``config.model`` fields (defaults in ``MODEL_DEFAULTS``): ``decoder`` (an output distribution
name), ``latent_dim``, ``beta``, ``channels``, ``strides``, ``log_sigma`` (gaussian_fixed),
``clip_fixed_sigma`` (softclip the fixed log sigma at ``log_sigma_min`` like upstream),
``log_sigma_min``, ``log_sigma_max`` (None = no upper bound), ``sigma_stop_gradient``,
``sigma_momentum`` and ``sigma_eval`` (optimal-sigma decoders), ``num_mixture`` and ``faithful``
(logistic_mixture), ``sample_output`` (``'auto'``: decoder means for the Gaussian and Bernoulli
decoders, as the sigma-VAE paper shows, pixel samples for categorical / logistic_mixture;
``'mean'``; ``'sample'``), ``dec_in_relu`` (a ReLU after the decoder's dense input layer:
``configs/sigma_vae_*.py`` set False, as the reference code; True, the default for configs that do
not name the field, keeps the network of configs written before it existed).  Categorical and
logistic-mixture decoders use ``data.num_bits``.

The reference code's other layer shapes differ from this network (its third encoder conv is 5x5,
its transposed convs 6x6, 6x6 and 5x5, and its encoder outputs log sigma^2 where this one outputs
log sigma); removing the ReLU alone was enough for the paper's recipe to train, and the other
differences were not tested (README).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import distributions as dists
from nvae_jax import policy
from nvae_jax.models.base import ModelTaskBase, register

MODEL_DEFAULTS = dict(
    decoder='gaussian_optimal', latent_dim=20, beta=1.0, channels=(32, 64, 128),
    strides=(1, 2, 2), log_sigma=0.0, clip_fixed_sigma=False, log_sigma_min=-6.0,
    log_sigma_max=None, sigma_stop_gradient=False, sigma_momentum=0.99, sigma_eval='running',
    num_mixture=10, faithful=False, sample_output='auto', dec_in_relu=True)

_STATEFUL = ('gaussian_optimal', 'gaussian_optimal_per_image')


def analytic_kl(mu: jax.Array, log_sigma: jax.Array) -> jax.Array:
  """KL(N(mu, sigma^2) || N(0, 1)) over the last axis: sum 0.5 (mu^2 + sigma^2 - 1) - log sigma."""
  return jnp.sum(0.5 * (jnp.square(mu) + jnp.exp(2.0 * log_sigma) - 1.0) - log_sigma, axis=-1)


# Sub-pixel taps of a 4-tap, stride-2 transposed convolution with 'SAME' padding (see
# ``subpixel_kernel``): _PHASE_TAPS[r][a] is the kernel row feeding output phase r from the input
# at offset a - 1; index 4 points at an appended zero row.
_PHASE_TAPS = ((0, 2, 4), (4, 1, 3))


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """A [4, 4, I, O] transposed-convolution kernel as the [3, 3, I, 4 O] kernel of its sub-pixel form.

  ``lax.conv_transpose(x, K, (2, 2), 'SAME')`` (the kernel not flipped, as flax's ConvTranspose
  calls it) pads the 2x-dilated input by 2 on each side and correlates it with K, so in 1-D

      y[2m]     = x[m-1] K[0] + x[m] K[2],
      y[2m + 1] = x[m]   K[1] + x[m+1] K[3].

  Both output phases r are a 3-tap correlation of x over offsets a - 1, a in {0, 1, 2}, with taps
  K[_PHASE_TAPS[r][a]] (and zero where the phase does not use the offset).  In 2-D the four
  phases (r, s) stack on the channel axis in the order (r, s, O), which ``depth_to_space``
  interleaves back into the 2H x 2W output.
  """
  if kernel.ndim != 4 or kernel.shape[:2] != (4, 4):
    raise ValueError(f'subpixel_kernel: expected a [4, 4, in, out] kernel, got shape '
                     f'{tuple(kernel.shape)}')
  taps = jnp.asarray(_PHASE_TAPS)  # [r, a]
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  w = padded[taps[:, None, :, None], taps[None, :, None, :]]  # [r, s, a, b, I, O]
  i, o = kernel.shape[2:]
  return jnp.transpose(w, (2, 3, 4, 0, 1, 5)).reshape(3, 3, i, 4 * o)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
  """[B, H, W, (r, s, C)] -> [B, H block, W block, C] with out[b, h block + r, w block + s, c]."""
  b, h, w, d = x.shape
  c = d // (block * block)
  x = x.reshape(b, h, w, block, block, c)
  return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, h * block, w * block, c)


class Upsample2x(nn.Module):
  """Stride-2, 4x4, 'SAME' transposed convolution computed as a 3x3 convolution + depth-to-space.

  The same function and the same parameters (``kernel`` [4, 4, I, O] with lecun-normal init and a
  zero ``bias`` [O]) as ``nn.ConvTranspose(O, (4, 4), strides=(2, 2), padding='SAME')``; only the
  computation differs (see ``subpixel_kernel``).  XLA:CPU computes the weight gradient of the
  strided transposed convolution very slowly; the 3x3 form's forward and backward pass measured
  6-7x faster per layer at the paper's sizes, although it does 9/4 of the multiply-adds (the taps
  a phase does not use are zeros).
  """

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (4, 4, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    w = subpixel_kernel(kernel).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return depth_to_space(y) + bias.astype(self.dtype)


def _std_normal_log_density(z):
  return jnp.sum(-0.5 * jnp.square(z) - 0.5 * math.log(2.0 * math.pi), axis=-1)


class ConvVAE(nn.Module):
  """Encoder, decoder and output distribution of the sigma-VAE conv VAE for H x W x C images."""

  image_shape: tuple[int, int, int]
  channels: Sequence[int]
  strides: Sequence[int]
  latent_dim: int
  likelihood: nn.Module
  dtype: Any = jnp.float32
  #: How the stride-2 decoder layers compute: 'subpixel' (``Upsample2x``, fast on CPU) or
  #: 'transpose' (``nn.ConvTranspose``); the same parameters and the same function.
  upsample: str = 'subpixel'
  #: ReLU after the dense input layer of the decoder (the sigma-VAE reference code has none).
  dec_in_relu: bool = False

  def setup(self):
    h, w, c = self.image_shape
    conv = dict(dtype=self.dtype, param_dtype=jnp.float32, padding='SAME')
    self.enc = [nn.Conv(f, (4, 4) if s == 2 else (3, 3), strides=(s, s), name=f'enc_{i}', **conv)
                for i, (f, s) in enumerate(zip(self.channels, self.strides))]
    self.head = nn.Dense(2 * self.latent_dim, param_dtype=jnp.float32, name='head')
    total = math.prod(self.strides)
    self.feat_shape = (h // total, w // total, self.channels[-1])
    self.dec_in = nn.Dense(math.prod(self.feat_shape), dtype=self.dtype,
                           param_dtype=jnp.float32, name='dec_in')
    outs = list(self.channels[:-1])[::-1] + [self.likelihood.num_channels(c)]
    if self.upsample not in ('subpixel', 'transpose'):
      raise ValueError(f"ConvVAE.upsample: expected 'subpixel' or 'transpose', got "
                       f'{self.upsample!r}')
    subpixel = self.upsample == 'subpixel'
    self.dec = [Upsample2x(f, dtype=self.dtype, name=f'dec_{i}') if s == 2 and subpixel else
                nn.ConvTranspose(f, (4, 4) if s == 2 else (3, 3), strides=(s, s),
                                 name=f'dec_{i}', **conv)
                for i, (f, s) in enumerate(zip(outs, list(self.strides)[::-1]))]

  def encode(self, x):
    """x [B, H, W, C] in [0, 1] -> (mu, log_sigma), each float32 [B, latent_dim]."""
    h = x.astype(self.dtype)
    for layer in self.enc:
      h = nn.relu(layer(h))
    stats = self.head(h.reshape(h.shape[0], -1)).astype(jnp.float32)
    return stats[:, :self.latent_dim], stats[:, self.latent_dim:]

  def decode(self, z):
    """z [N, latent_dim] -> raw decoder output float32 [N, H, W, K]."""
    h = self.dec_in(z.astype(self.dtype))
    if self.dec_in_relu:
      h = nn.relu(h)
    h = h.reshape((z.shape[0],) + self.feat_shape)
    for i, layer in enumerate(self.dec):
      h = layer(h)
      if i < len(self.dec) - 1:
        h = nn.relu(h)
    return h.astype(jnp.float32)

  def __call__(self, x, eps, train: bool):
    """One-sample ELBO terms: (log p(x|z) [B], KL [B]) with z = mu + sigma eps."""
    mu, log_sigma = self.encode(x)
    net_out = self.decode(mu + jnp.exp(log_sigma) * eps)
    return self.likelihood.log_prob(net_out, x, train), analytic_kl(mu, log_sigma)

  def log_weights(self, x, eps):
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for eps [k, B, L] (eval mode) -> [k, B]."""
    mu, log_sigma = self.encode(x)
    k, b = eps.shape[:2]
    z = mu + jnp.exp(log_sigma) * eps
    net_out = self.decode(z.reshape(k * b, -1))
    xs = jnp.broadcast_to(x, (k,) + x.shape).reshape((k * b,) + x.shape[1:])
    log_px = self.likelihood.log_prob(net_out, xs, False).reshape(k, b)
    # log q(z|x) = log N(eps; 0, 1) - sum log sigma.
    log_q = _std_normal_log_density(eps) - jnp.sum(log_sigma, axis=-1)
    return log_px + _std_normal_log_density(z) - log_q

  def output(self, net_out, rng, temperature, mode: str):
    if mode == 'mean':
      return self.likelihood.mean(net_out)
    return self.likelihood.sample(net_out, rng, temperature)


def _model_field(m, name):
  return m[name] if name in m else MODEL_DEFAULTS[name]


@register('conv_vae')
class ConvVAETask(ModelTaskBase):
  """ModelTask of the sigma-VAE conv VAE (see the module docstring)."""

  def __init__(self, config):
    m = config.model
    unknown = sorted(set(m.keys()) - set(MODEL_DEFAULTS) - {'name'})
    if unknown:
      raise ValueError(f'model.{unknown[0]}: unknown field for model.name="conv_vae"; expected '
                       f'one of {sorted(MODEL_DEFAULTS)} (found unknown fields {unknown})')
    get = lambda name: _model_field(m, name)
    self.decoder = get('decoder')
    if self.decoder not in dists.OUTPUT_DISTRIBUTIONS:
      raise ValueError(f'model.decoder: expected one of {list(dists.OUTPUT_DISTRIBUTIONS)}, got '
                       f'{self.decoder!r}')
    self.latent_dim = _positive_int('model.latent_dim', get('latent_dim'))
    self.beta = float(get('beta'))
    if self.beta < 0:
      raise ValueError(f'model.beta: expected a value >= 0, got {self.beta}')
    self.channels = tuple(_positive_int('model.channels', c) for c in get('channels'))
    self.strides = tuple(int(s) for s in get('strides'))
    if len(self.channels) != len(self.strides) or not self.channels:
      raise ValueError(f'model.channels and model.strides: expected tuples of the same non-zero '
                       f'length, got {self.channels} and {self.strides}')
    if any(s not in (1, 2) for s in self.strides):
      raise ValueError(f'model.strides: expected entries 1 or 2, got {self.strides}')
    self.dec_in_relu = get('dec_in_relu')
    if not isinstance(self.dec_in_relu, bool):
      raise ValueError(f'model.dec_in_relu: expected a bool, got {self.dec_in_relu!r}')
    self.sample_output = get('sample_output')
    if self.sample_output not in ('auto', 'mean', 'sample'):
      raise ValueError(f"model.sample_output: expected 'auto', 'mean' or 'sample', got "
                       f'{self.sample_output!r}')
    if self.sample_output == 'auto':
      discrete = self.decoder in ('categorical', 'logistic_mixture')
      self.sample_output = 'sample' if discrete else 'mean'
    self._decoder_opts = self._decoder_options(self.decoder, config, get)
    # An unbound instance for num_channels / continuous; each ConvVAE gets its own copy.
    self.likelihood = dists.make_output_distribution(self.decoder, **self._decoder_opts)
    self.mutable_collections = ('batch_stats',) if self.decoder in _STATEFUL else ()
    self.dtype = policy.compute_dtype(config.precision.compute_dtype)
    self.num_importance = _positive_int('eval.num_importance_samples',
                                        config.eval.num_importance_samples)
    chunk = int(config.eval.get('importance_chunk', 0) or self.num_importance)
    if chunk <= 0 or self.num_importance % chunk:
      raise ValueError(f'eval.importance_chunk: expected a positive divisor of '
                       f'eval.num_importance_samples={self.num_importance}, got {chunk}')
    self.importance_chunk = chunk
    self._config = config
    self._image_shape = None
    if self.decoder == 'bernoulli' and config.data.get('binarize', 'none') == 'none':
      logging.warning('model.decoder="bernoulli" with data.binarize="none": the Bernoulli '
                      'cross-entropy on intensities is not a likelihood; set data.binarize to '
                      '"dynamic" for binarised MNIST.')

  @staticmethod
  def _decoder_options(d: str, config, get) -> dict[str, Any]:
    low, high = get('log_sigma_min'), get('log_sigma_max')
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    if low is not None and high is not None and not low < high:
      raise ValueError(f'model.log_sigma_min / model.log_sigma_max: expected min < max, got '
                       f'{low} and {high}')
    if d == 'gaussian_fixed':
      return dict(log_sigma=float(get('log_sigma')),
                  log_sigma_min=low if bool(get('clip_fixed_sigma')) else None,
                  log_sigma_max=high)
    if d in ('gaussian_shared', 'gaussian_per_pixel'):
      return dict(log_sigma_min=low, log_sigma_max=high)
    if d in _STATEFUL:
      opts = dict(stop_gradient=bool(get('sigma_stop_gradient')), log_sigma_min=low,
                  log_sigma_max=high, momentum=float(get('sigma_momentum')))
      if d == 'gaussian_optimal_per_image':
        opts['eval_sigma'] = get('sigma_eval')
      elif get('sigma_eval') != 'running':
        raise ValueError(f"model.sigma_eval: only 'running' applies to gaussian_optimal, got "
                         f"{get('sigma_eval')!r}")
      return opts
    if d == 'categorical':
      return dict(num_bits=int(config.data.num_bits))
    if d == 'logistic_mixture':
      return dict(num_mixture=_positive_int('model.num_mixture', get('num_mixture')),
                  num_bits=int(config.data.num_bits), faithful=bool(get('faithful')))
    if d == 'nvae_normal':
      return dict(density_on_x=True)  # comparable with the other Gaussians, all on [0, 1]
    return {}

  # ------------------------------------------------------------------------------------------

  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C): from the batch seen by ``init`` (the platform passes shapes, models do not read
    the data config)."""
    if self._image_shape is None:
      raise ValueError('conv_vae: the input shape is unknown; call init first (or pass '
                       'image_shape to describe)')
    return self._image_shape

  def _module(self, shape) -> ConvVAE:
    h, w, c = shape
    total = math.prod(self.strides)
    if h % total or w % total:
      raise ValueError(f'image: H and W must be divisible by {total} (the product of '
                       f'model.strides={self.strides}), got H={h}, W={w}')
    self.likelihood.num_channels(c)  # raises for unsupported channel counts
    return ConvVAE(image_shape=(h, w, c), channels=self.channels, strides=self.strides,
                   latent_dim=self.latent_dim, dtype=self.dtype, dec_in_relu=self.dec_in_relu,
                   likelihood=dists.make_output_distribution(self.decoder, **self._decoder_opts))

  def _image(self, batch):
    x = batch['image']
    if x.ndim != 4:
      raise ValueError(f"batch['image']: expected [B, H, W, C], got shape {tuple(x.shape)}")
    return x.astype(jnp.float32)

  def init(self, rng, batch):
    x = self._image(batch)
    self._image_shape = tuple(int(s) for s in x.shape[1:])
    module = self._module(self._image_shape)
    eps = jnp.zeros((x.shape[0], self.latent_dim), jnp.float32)
    variables = module.init(rng, x, eps, True)
    return {k: v for k, v in variables.items() if k in ('params',) + self.mutable_collections}

  def loss(self, variables, batch, rng, step):
    del step
    x = self._image(batch)
    module = self._module(x.shape[1:])
    eps = jax.random.normal(rng, (x.shape[0], self.latent_dim), jnp.float32)
    (log_px, kl), updates = module.apply(variables, x, eps, True,
                                         mutable=list(self.mutable_collections) + ['intermediates'])
    recon = -log_px
    loss = jnp.mean(recon + self.beta * kl)
    metrics = dict(loss=loss, recon=jnp.mean(recon), kl=jnp.mean(kl),
                   nelbo=jnp.mean(recon + kl))
    sigma = jax.tree.leaves(updates.get('intermediates', {}))
    if sigma:
      metrics['sigma'] = jnp.mean(sigma[0]).astype(jnp.float32)
    return loss, (metrics, {k: updates[k] for k in self.mutable_collections})

  def evaluate(self, variables, batch, rng):
    """Per-example ``nll`` (an upper bound, see the module doc), ``nelbo``, ``recon``, ``kl``."""
    x = self._image(batch)
    module = self._module(x.shape[1:])
    rng_elbo, rng_iw = jax.random.split(rng)
    eps = jax.random.normal(rng_elbo, (x.shape[0], self.latent_dim), jnp.float32)
    log_px, kl = module.apply(variables, x, eps, False)
    out = dict(nelbo=kl - log_px, recon=-log_px, kl=kl)
    if self.num_importance == 1:
      out['nll'] = out['nelbo']
      return out
    k, chunk = self.num_importance, self.importance_chunk
    # All the noise up front (K B L floats), so that the bound does not depend on the chunking.
    eps = jax.random.normal(rng_iw, (k // chunk, chunk, x.shape[0], self.latent_dim), jnp.float32)
    log_w = jax.lax.map(lambda e: module.apply(variables, x, e, method=ConvVAE.log_weights), eps)
    log_w = log_w.reshape(k, x.shape[0])
    out['nll'] = -(jax.nn.logsumexp(log_w, axis=0) - math.log(k))
    return out

  def sample(self, variables, rng, num, temperature):
    """``num`` images from z ~ N(0, t^2 I), decoded (``model.sample_output``), in [0, 1]."""
    module = self._module(self.image_shape())
    rng_z, rng_x = jax.random.split(rng)
    z = temperature * jax.random.normal(rng_z, (num, self.latent_dim), jnp.float32)
    net_out = module.apply(variables, z, method=ConvVAE.decode)
    return module.apply(variables, net_out, rng_x, temperature, self.sample_output,
                        method=ConvVAE.output)

  def reconstruct(self, variables, batch, rng):
    """Decodes the posterior mean of each image (``model.sample_output`` picks mean / sample)."""
    x = self._image(batch)
    module = self._module(x.shape[1:])
    mu, _ = module.apply(variables, x, method=ConvVAE.encode)
    net_out = module.apply(variables, mu, method=ConvVAE.decode)
    return module.apply(variables, net_out, rng, 1.0, self.sample_output, method=ConvVAE.output)

  def describe(self, image_shape=None):
    h, w, c = self.image_shape() if image_shape is None else (int(s) for s in image_shape)
    return {
        'inputs': (h, w, c), 'latents': [(self.latent_dim,)],
        'outputs': (h, w, self.likelihood.num_channels(c)),
        'likelihood': {'name': self.decoder, 'continuous': bool(self.likelihood.continuous)},
        'beta': self.beta, 'sample_output': self.sample_output,
    }


def _positive_int(field: str, value) -> int:
  if isinstance(value, bool) or int(value) != value or int(value) <= 0:
    raise ValueError(f'{field}: expected a positive integer, got {value!r}')
  return int(value)
