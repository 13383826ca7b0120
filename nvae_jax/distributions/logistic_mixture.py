"""Discretized mixture of logistics (DML) over 2**num_bits-level images, as in NVAE / PixelCNN++.

Layout of ``net_out`` (M = ``num_mixture``), per pixel:

* RGB (C = 3, K = 10 M channels): [0, M) mixture logits pi_m; the remaining 9M channels reshape
  to [3 (R, G, B), 3M] and, for colour c, hold the means mu_{c,m} at [c, m], the log-scales at
  [c, M + m] (clamped >= -7) and raw coupling coefficients at [c, 2M + m] (passed through tanh).
  On y = 2x - 1 in [-1, 1], with a_m, b_m, c_m the tanh coefficients in the R, G, B slots,

      mean_R = mu_R,   mean_G = mu_G + a y_R,   mean_B = mu_B + b y_R + c y_G.

* Grayscale (C = 1, K = 3M channels): [0, M) logits, [M, 2M) means, [2M, 3M) log-scales.

Each sub-pixel of component m is a logistic(mean, s) discretised to bins of half-width
h = 1 / (2**bits - 1) around the values y_k = 2k / (2**bits - 1) - 1:

    P(y_k) = F((y_k + h - mean) / s) - F((y_k - h - mean) / s),   F = sigmoid,

with the lowest bin extended to -inf and the highest to +inf.  The colour log-probabilities are
summed, log_softmax(pi) added, and logsumexp over m gives the per-pixel log-probability; the
result is summed over H, W in float32.

Two modes:

* ``faithful=False`` (default), corrected: x is mapped to its level k = round(x (2**bits - 1));
  only k = 0 takes the lower tail and only k = 2**bits - 1 the upper one (the thresholds sit half
  a bin inside [-1, 1]); the bin edges are computed from the integer 2k +- 1, so the upper edge
  of bin k and the lower edge of bin k + 1 are the same float32 number and the masses telescope;
  and the interior bins use the exact, stable identity

      log(F(b) - F(a)) = log F(b) + log(1 - F(a)) + log(1 - exp(-(b - a))),

  which needs no small-probability fallback.  Every channel's pmf thus sums to 1 over the
  2**bits values up to float32 round-off of the individual terms (~1e-6).
* ``faithful=True`` reproduces the original NVAE code, quirks included: the upper tail is used
  for y > 0.99 and the lower tail for y < -0.999, otherwise log(max(cdf_delta, 1e-10)) when
  cdf_delta > 1e-5 and log pdf(y) - log((2**bits - 1) / 2) below that.  For 8 bits the value 254
  (y = 0.992) also takes the upper tail, so the per-channel pmf is not normalised: it sums to up
  to about 1.6 when the mass sits near 255 (see tests/test_distributions.py for the measured
  value).  Use it only to reproduce original numbers.

Sampling at temperature t: the component is drawn by Gumbel-max, argmax(pi + t g) (= argmax of
pi / t + g, i.e. mixture weights proportional to softmax(pi / t); t = 0 picks the most likely
component), then y_c = mean_c + t s_c Logistic(0, 1) (the original divides the noise by t, a
bug), clamped to [-1, 1] channel by channel through the coupling (G and B use the clamped R, G).
``mean`` follows NVAE: softmax-weighted means and coefficients, coupled and clamped the same way
(this is not the exact mean of the coupled mixture).  Outputs are in [0, 1].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax.distributions import _common

_LOG_SCALE_MIN = -7.0


def _log1mexp(d: jax.Array) -> jax.Array:
  """log(1 - exp(-d)) for d > 0, stable, with finite gradients (Maechler's two branches).

  Each branch only sees arguments where it is finite, so that the branch ``where`` does not
  select is not an inf whose zero cotangent would turn into NaN.
  """
  small = d < math.log(2.0)
  d_small = jnp.where(small, d, 1.0)
  d_big = jnp.where(small, 1.0, d)
  return jnp.where(small, jnp.log(-jnp.expm1(-d_small)), jnp.log1p(-jnp.exp(-d_big)))


class LogisticMixture(nn.Module):
  """Discretized logistic mixture likelihood (see the module docstring)."""

  num_mixture: int = 10
  num_bits: int = 8
  faithful: bool = False
  continuous = False

  def num_channels(self, image_channels: int) -> int:
    if image_channels == 3:
      return 10 * self.num_mixture
    if image_channels == 1:
      return 3 * self.num_mixture
    raise ValueError('logistic_mixture: images must have 1 or 3 channels, got '
                     f'{image_channels}')

  def _params(self, net_out):
    m = self.num_mixture
    if m < 1:
      raise ValueError(f'logistic_mixture: num_mixture must be >= 1, got {m}')
    if not 1 <= self.num_bits <= 16:
      raise ValueError(f'logistic_mixture: num_bits must be in [1, 16], got {self.num_bits}')
    k = net_out.shape[-1]
    if k == 10 * m:
      c = 3
    elif k == 3 * m:
      c = 1
    else:
      raise ValueError(f'logistic_mixture: net_out must have 10 * num_mixture (RGB) or '
                       f'3 * num_mixture (grayscale) = {10 * m} or {3 * m} channels, got {k}')
    net_out = _common.f32(net_out)
    logits = net_out[..., :m]
    # [c, 3M] for RGB (means, log-scales, coefficients), [1, 2M] for grayscale.
    rest = net_out[..., m:].reshape(net_out.shape[:3] + (c, (k - m) // c))
    means = rest[..., :m]
    log_scales = jnp.maximum(rest[..., m:2 * m], _LOG_SCALE_MIN)
    coeffs = jnp.tanh(rest[..., 2 * m:3 * m]) if c == 3 else None
    return logits, means, log_scales, coeffs

  @staticmethod
  def _couple(means, coeffs, y):
    """Channel means after coupling; means/coeffs [..., C, M], y [..., C] in [-1, 1]."""
    if coeffs is None:
      return means
    y = y[..., None]
    mean_r = means[..., 0, :]
    mean_g = means[..., 1, :] + coeffs[..., 0, :] * y[..., 0, :]
    mean_b = means[..., 2, :] + coeffs[..., 1, :] * y[..., 0, :] + coeffs[..., 2, :] * y[..., 1, :]
    return jnp.stack([mean_r, mean_g, mean_b], axis=-2)

  def _channel_log_probs(self, x, mean, log_scale):
    """log P(x) per component and channel; x [..., C, 1] in [0, 1], mean / log_scale [..., C, M]."""
    max_val = 2.0 ** self.num_bits - 1.0
    inv_s = jnp.exp(-log_scale)
    if self.faithful:
      y = 2.0 * x - 1.0
      h = 1.0 / max_val
      centered = y - mean
      plus_in = inv_s * (centered + h)
      min_in = inv_s * (centered - h)
      cdf_delta = jax.nn.sigmoid(plus_in) - jax.nn.sigmoid(min_in)
      mid_in = inv_s * centered
      log_pdf_mid = mid_in - log_scale - 2.0 * jax.nn.softplus(mid_in)
      mid = jnp.where(cdf_delta > 1e-5, jnp.log(jnp.maximum(cdf_delta, 1e-10)),
                      log_pdf_mid - math.log(max_val / 2.0))
      return jnp.where(y < -0.999, -jax.nn.softplus(-plus_in),
                       jnp.where(y > 0.99, -jax.nn.softplus(min_in), mid))
    # Edges (2k +- 1 - max) / max of level k, from exact integers: bin k's upper edge and bin
    # k + 1's lower edge are bitwise equal.
    k = jnp.clip(jnp.round(x * max_val), 0.0, max_val)
    plus_in = inv_s * ((2.0 * k + 1.0 - max_val) / max_val - mean)
    min_in = inv_s * ((2.0 * k - 1.0 - max_val) / max_val - mean)
    log_cdf_plus = -jax.nn.softplus(-plus_in)  # log F(b)
    log_sf_min = -jax.nn.softplus(min_in)  # log (1 - F(a))
    # b - a in float32 is exact when a, b are within a factor 2 (Sterbenz), i.e. whenever the
    # difference is small next to them; the floor only guards an underflow for huge scales.
    d = jnp.maximum(plus_in - min_in, 1e-30)
    mid = log_cdf_plus + log_sf_min + _log1mexp(d)
    return jnp.where(k < 0.5, log_cdf_plus, jnp.where(k > max_val - 0.5, log_sf_min, mid))

  def log_prob(self, net_out, x, train: bool = False):
    del train
    _common.check_inputs('logistic_mixture', net_out, x, self.num_channels(x.shape[-1]))
    logits, means, log_scales, coeffs = self._params(net_out)
    x = _common.f32(x)
    mean = self._couple(means, coeffs, 2.0 * x - 1.0)
    lp = self._channel_log_probs(x[..., None], mean, log_scales)  # [B, H, W, C, M]
    lp = jnp.sum(lp, axis=-2) + jax.nn.log_softmax(logits, axis=-1)
    return _common.sum_per_example(jax.nn.logsumexp(lp, axis=-1))

  @staticmethod
  def _clamp_coupled(y, coeffs):
    """Clamps [..., C] to [-1, 1] channel by channel, coupling G and B to the clamped values."""
    if coeffs is None:
      return jnp.clip(y, -1.0, 1.0)
    r = jnp.clip(y[..., 0], -1.0, 1.0)
    g = jnp.clip(y[..., 1] + coeffs[..., 0] * r, -1.0, 1.0)
    b = jnp.clip(y[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g, -1.0, 1.0)
    return jnp.stack([r, g, b], axis=-1)

  def sample(self, net_out, rng, temperature: float = 1.0):
    _common.check_inputs('logistic_mixture', net_out, None)
    logits, means, log_scales, coeffs = self._params(net_out)
    rng_mix, rng_noise = jax.random.split(rng)
    g = jax.random.gumbel(rng_mix, logits.shape, jnp.float32)
    sel = jax.nn.one_hot(jnp.argmax(logits + temperature * g, axis=-1), self.num_mixture,
                         dtype=jnp.float32)[..., None, :]  # [B, H, W, 1, M]
    mean = jnp.sum(means * sel, axis=-1)
    scale = jnp.exp(jnp.sum(log_scales * sel, axis=-1))
    coeff = None if coeffs is None else jnp.sum(coeffs * sel, axis=-1)
    u = jax.random.logistic(rng_noise, mean.shape, jnp.float32)
    y = self._clamp_coupled(mean + temperature * scale * u, coeff)
    return 0.5 * y + 0.5

  def mean(self, net_out):
    _common.check_inputs('logistic_mixture', net_out, None)
    logits, means, _, coeffs = self._params(net_out)
    w = jax.nn.softmax(logits, axis=-1)[..., None, :]
    mean = jnp.sum(means * w, axis=-1)
    coeff = None if coeffs is None else jnp.sum(coeffs * w, axis=-1)
    return 0.5 * self._clamp_coupled(mean, coeff) + 0.5
