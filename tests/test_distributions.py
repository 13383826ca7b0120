"""Tests of the output likelihoods against independent computations.

* brute-force normalisation of every discrete likelihood over all 2**bits values of a pixel;
* the faithful DML's known lack of normalisation near 255;
* float64 numpy re-computations of the corrected DML, the categorical and the Gaussians;
* the optimal sigma as the numerical minimiser of the Gaussian NLL;
* the original NVAE's outputs (shared/fixtures/nvae_reference) for DML, Bernoulli and Normal.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from conftest import SHARED
from nvae_jax import distributions as D
from nvae_jax.distributions import make_output_distribution

FIXTURES = os.path.join(SHARED, 'fixtures', 'nvae_reference')


def _apply(dist, method, *args, variables=None, mutable=False):
  if variables is None:
    variables = dist.init(_key(0), *args, method=method)
  return dist.apply(variables, *args, method=method, mutable=mutable)


def _key(i):
  # rbg keys: XLA:CPU compiles threefry random bits several times slower, and the library does
  # not depend on the key implementation.
  return jax.random.key(i, impl='rbg')


_JITTED = {}


def _log_prob(dist, net_out, x, train=False, variables=None):
  """Jitted ``dist.log_prob``; one compiled function per distinct distribution and mode."""
  if variables is None:
    variables = dist.init(_key(0), net_out, x, train, method='log_prob')
  key = (repr(dist), train)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda v, n, y: dist.apply(v, n, y, train, method='log_prob'))
  return _JITTED[key](variables, net_out, x)


# --------------------------------------------------------------------------------------------
# Softclip and units.


def test_softclip_bounds_values_and_gradients():
  low, high = -6.0, 2.0
  t = jnp.array([-1e4, -60.0, low - 1.0, low, 0.0, high, high + 1.0, 60.0, 1e4], jnp.float32)
  lo = D.softclip(t, low=low)
  hi = D.softclip(t, high=high)
  both = D.softclip(t, low=low, high=high)
  t64 = np.asarray(t, np.float64)
  assert np.all(np.asarray(lo) >= low) and np.all(np.asarray(hi) <= high)
  # Upper then lower: the lower bound is exact, the upper one holds up to log(1 + e^-(high-low)).
  assert np.all(np.asarray(both) >= low)
  assert np.all(np.asarray(both) <= high + math.log1p(math.exp(-(high - low))) + 1e-6)
  np.testing.assert_allclose(both, low + np.logaddexp(0.0, high - np.logaddexp(0.0, high - t64)
                                                      - low), rtol=1e-6, atol=2e-6)
  # Closed forms: low + softplus(t - low), high - softplus(high - t).
  # float32 evaluation error: about one ulp of the bounds / inputs, absolute.
  np.testing.assert_allclose(lo, low + np.logaddexp(0.0, t64 - low), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(hi, high - np.logaddexp(0.0, high - t64), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(D.softclip(jnp.float32(low), low), low + math.log(2.0), rtol=1e-6)
  assert D.softclip(t) is t
  for kw in (dict(low=low), dict(high=high), dict(low=low, high=high)):
    g = jax.vmap(jax.grad(lambda s, kw=kw: D.softclip(s, **kw)))(t)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) >= 0) and np.all(np.asarray(g) <= 1)
  with pytest.raises(ValueError, match='low < high'):
    D.softclip(t, low=1.0, high=0.0)


def test_bits_per_dim_and_nats_to_bits():
  np.testing.assert_allclose(D.nats_to_bits(math.log(2.0) * 5), 5.0, rtol=1e-12)
  nats = np.array([3072 * math.log(2.0) * 3.5, 784 * math.log(2.0)])
  np.testing.assert_allclose(D.bits_per_dim(nats[:1], 3072), [3.5], rtol=1e-12)
  np.testing.assert_allclose(D.bits_per_dim(nats[1], 784), 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match='num_dims'):
    D.bits_per_dim(1.0, 0)


def test_registry_names_and_errors():
  assert set(D.OUTPUT_DISTRIBUTIONS) == {
      'bernoulli', 'gaussian_fixed', 'gaussian_shared', 'gaussian_optimal',
      'gaussian_optimal_per_image', 'gaussian_per_pixel', 'categorical', 'logistic_mixture',
      'nvae_normal'}
  with pytest.raises(ValueError, match='gaussian_shared'):
    make_output_distribution('gaussian')
  with pytest.raises(TypeError, match='num_mixture'):
    make_output_distribution('bernoulli', num_mixture=3)
  dml = make_output_distribution('logistic_mixture', num_mixture=4)
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match='40'):
    _log_prob(dml, jnp.zeros((1, 2, 2, 30)), x)
  with pytest.raises(ValueError, match='6 channels'):
    _log_prob(make_output_distribution('gaussian_per_pixel'), jnp.zeros((1, 2, 2, 3)), x)
  with pytest.raises(ValueError, match=r'\[B, H, W\]'):
    _log_prob(make_output_distribution('bernoulli'), jnp.zeros((1, 2, 3, 3)), x)


# --------------------------------------------------------------------------------------------
# Discrete likelihoods sum to one (brute force over every value of a pixel).


def _pixel_grid(bits, channels):
  """All (2**bits)**channels values of one pixel, as [N, 1, 1, C] images in [0, 1]."""
  k = 2 ** bits
  vals = np.arange(k, dtype=np.float32) / (k - 1)
  grid = np.stack(np.meshgrid(*([vals] * channels), indexing='ij'), -1).reshape(-1, channels)
  return jnp.asarray(grid[:, None, None, :])


def _total_mass(dist, net_pixel, x):
  net = jnp.broadcast_to(net_pixel.reshape(1, 1, 1, -1), x.shape[:3] + (net_pixel.size,))
  return float(np.sum(np.exp(np.asarray(_log_prob(dist, net, x), np.float64))))


def test_bernoulli_sums_to_one_over_binary_pixels():
  dist = make_output_distribution('bernoulli')
  net = jnp.asarray(np.random.default_rng(0).normal(size=3) * 3, jnp.float32)
  assert _total_mass(dist, net, _pixel_grid(1, 3)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('bits,channels', [(8, 1), (5, 3)])
def test_categorical_sums_to_one(bits, channels):
  dist = make_output_distribution('categorical', num_bits=bits)
  net = jnp.asarray(np.random.default_rng(1).normal(size=channels * 2 ** bits) * 4, jnp.float32)
  assert _total_mass(dist, net, _pixel_grid(bits, channels)) == pytest.approx(1.0, abs=2e-6)


def _dml_pixel(rng, m, near_top=False, log_scale=None):
  """Random RGB DML parameters for one pixel (10 m values)."""
  net = rng.normal(size=10 * m).astype(np.float32)
  if near_top:  # every channel's mean in [0.98, 1], no coupling
    for c in range(3):
      net[m + 3 * m * c:m + 3 * m * c + m] = 0.98 + 0.02 * rng.random(m)
      net[m + 3 * m * c + 2 * m:m + 3 * m * c + 3 * m] = 0.0
  if log_scale is not None:
    for c in range(3):
      net[m + 3 * m * c + m:m + 3 * m * c + 2 * m] = log_scale
  return jnp.asarray(net)


def _dml_joint_mass(dist, bits):
  """net_pixel -> sum of P over all (2**bits)^3 RGB values of one pixel (scanned over R)."""
  k = 2 ** bits
  vals = jnp.arange(k, dtype=jnp.float32) / (k - 1)
  g, b = (a.reshape(-1) for a in jnp.meshgrid(vals, vals, indexing='ij'))

  @jax.jit
  def mass(net_pixel):
    net = jnp.broadcast_to(net_pixel.reshape(1, 1, 1, -1), (k * k, 1, 1, net_pixel.size))

    def mass_given_r(r):
      x = jnp.stack([jnp.full_like(g, r), g, b], -1)[:, None, None, :]
      return jnp.sum(jnp.exp(dist.apply({}, net, x, method='log_prob')))

    return jnp.sum(jax.lax.map(mass_given_r, vals))

  return lambda net_pixel: float(mass(net_pixel))


# The masses telescope exactly (shared float32 bin edges), so the sum is exact up to the float32
# error of the few significant terms (~1e-7 each; measured <= 2.4e-7).
# 8 bits: 2^24 values per pixel, so one component (each coupled conditional must then sum to 1
# for every conditioning value); 5 bits: a 3-component mixture.
@pytest.mark.parametrize('bits,m', [(8, 1), (5, 3)])
def test_corrected_dml_rgb_sums_to_one(bits, m):
  rng = np.random.default_rng(bits)
  dist = make_output_distribution('logistic_mixture', num_mixture=m, num_bits=bits)
  mass = _dml_joint_mass(dist, bits)
  nets = [_dml_pixel(rng, m), _dml_pixel(rng, m, near_top=True, log_scale=-7.0)]
  if bits == 5:
    nets.append(_dml_pixel(rng, m, log_scale=-4.0))
  for net in nets:
    assert mass(net) == pytest.approx(1.0, abs=2e-6)


@pytest.mark.parametrize('bits', [8, 5])
def test_corrected_dml_grayscale_sums_to_one(bits):
  rng = np.random.default_rng(10 + bits)
  dist = make_output_distribution('logistic_mixture', num_mixture=4, num_bits=bits)
  x = _pixel_grid(bits, 1)
  for log_scale in (None, -7.0, 2.0):
    net = rng.normal(size=12).astype(np.float32)
    net[4:8] = rng.uniform(-1.1, 1.1, size=4)
    if log_scale is not None:
      net[8:12] = log_scale
    assert _total_mass(dist, jnp.asarray(net), x) == pytest.approx(1.0, abs=2e-6)


def test_faithful_dml_is_not_normalised_near_255():
  """The original's top-bin test (y > 0.99) gives 8-bit value 254 the upper-tail mass too.

  Measured (one channel, one component): the pmf sums to 1.64 for mean 1 and log-scale -5, 1.42
  for mean 0.98 and log-scale -3, and tends to 2 for means beyond 1 (so up to 8 for an RGB pixel;
  measured 2.77 with means in [0.98, 1] and log-scale -4).  The corrected mode sums to 1.
  """
  faithful = make_output_distribution('logistic_mixture', num_mixture=1, faithful=True)
  corrected = make_output_distribution('logistic_mixture', num_mixture=1)
  x = _pixel_grid(8, 1)
  net = jnp.array([0.0, 1.0, -5.0])
  assert _total_mass(faithful, net, x) == pytest.approx(1.64, abs=0.01)
  assert _total_mass(corrected, net, x) == pytest.approx(1.0, abs=2e-6)
  net = jnp.array([0.0, 0.98, -3.0])
  assert _total_mass(faithful, net, x) == pytest.approx(1.42, abs=0.01)
  # Away from the edge bins, where the faithful mode takes no fallback (P > 1e-5), they agree.
  net = jnp.broadcast_to(jnp.array([0.0, -0.2, -1.0]), (5, 1, 1, 3))
  xs = jnp.array([26.0, 77.0, 128.0, 179.0, 230.0]).reshape(5, 1, 1, 1) / 255.0
  np.testing.assert_allclose(_log_prob(faithful, net, xs), _log_prob(corrected, net, xs),
                             rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Float64 re-computations.


def _logistic_cdf(z):
  return special.expit(z)


def _dml_reference(net, x, m, bits):
  """Corrected DML log-likelihood per example, float64 numpy, straight from the definition."""
  net = np.asarray(net, np.float64)
  y = 2.0 * np.asarray(x, np.float64) - 1.0
  k = net.shape[-1]
  c = 3 if k == 10 * m else 1
  logits = net[..., :m]
  rest = net[..., m:].reshape(net.shape[:3] + (c, -1))
  means, log_s = rest[..., :m], np.maximum(rest[..., m:2 * m], -7.0)
  if c == 3:
    co = np.tanh(rest[..., 2 * m:3 * m])
    yr, yg = y[..., 0:1], y[..., 1:2]
    means = np.stack([means[..., 0, :], means[..., 1, :] + co[..., 0, :] * yr,
                      means[..., 2, :] + co[..., 1, :] * yr + co[..., 2, :] * yg], -2)
  h = 1.0 / (2 ** bits - 1)
  s = np.exp(log_s)
  yy = y[..., None]
  upper = np.where(yy > 1 - h, 1.0, _logistic_cdf((yy + h - means) / s))
  lower = np.where(yy < -1 + h, 0.0, _logistic_cdf((yy - h - means) / s))
  p = np.prod(upper - lower, axis=-2)  # [B, H, W, M]
  w = special.softmax(logits, axis=-1)
  return np.log(np.sum(w * p, axis=-1)).reshape(net.shape[0], -1).sum(-1)


@pytest.mark.parametrize('channels,bits', [(3, 8), (1, 5)])
def test_corrected_dml_matches_float64_reference(channels, bits):
  m = 3
  rng = np.random.default_rng(20 + channels)
  dist = make_output_distribution('logistic_mixture', num_mixture=m, num_bits=bits)
  k = 10 * m if channels == 3 else 3 * m
  net = rng.normal(size=(4, 5, 5, k)).astype(np.float32) * 0.6
  x = rng.integers(0, 2 ** bits, size=(4, 5, 5, channels))
  x[0, 0, :] = 0  # both edge bins
  x[0, 1, :] = 2 ** bits - 1
  x = (x / (2 ** bits - 1)).astype(np.float32)
  got = _log_prob(dist, jnp.asarray(net), jnp.asarray(x))
  np.testing.assert_allclose(got, _dml_reference(net, x, m, bits), rtol=2e-6)


def test_categorical_matches_float64_reference():
  rng = np.random.default_rng(5)
  bits, c = 4, 3
  net = rng.normal(size=(2, 3, 3, c * 16)).astype(np.float32)
  k = rng.integers(0, 16, size=(2, 3, 3, c))
  x = (k / 15).astype(np.float32)
  logp = special.log_softmax(net.astype(np.float64).reshape(2, 3, 3, c, 16), axis=-1)
  ref = np.take_along_axis(logp, k[..., None], -1).reshape(2, -1).sum(-1)
  dist = make_output_distribution('categorical', num_bits=bits)
  np.testing.assert_allclose(_log_prob(dist, jnp.asarray(net), jnp.asarray(x)), ref, rtol=1e-6)
  probs = special.softmax(net.astype(np.float64).reshape(2, 3, 3, c, 16), axis=-1)
  np.testing.assert_allclose(_apply(dist, 'mean', jnp.asarray(net)),
                             probs @ (np.arange(16) / 15), rtol=1e-5)


def _gauss_nll64(x, mean, log_sigma):
  """Per-example Gaussian NLL, float64."""
  e = 0.5 * ((x - mean) / np.exp(log_sigma)) ** 2 + log_sigma + 0.5 * np.log(2 * np.pi)
  return e.reshape(x.shape[0], -1).sum(-1)


@pytest.fixture(scope='module')
def gauss_batch():
  rng = np.random.default_rng(7)
  net = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
  x = rng.random((4, 6, 6, 2)).astype(np.float32)
  return net, x, special.expit(net.astype(np.float64)), x.astype(np.float64)


def test_fixed_shared_and_per_pixel_gaussians_match_float64(gauss_batch):
  net, x, mu, x64 = gauss_batch
  dist = make_output_distribution('gaussian_fixed', log_sigma=-1.5)
  np.testing.assert_allclose(-_log_prob(dist, net, x), _gauss_nll64(x64, mu, -1.5), rtol=1e-6)
  # Upstream's softclip of the constant: log sigma = -6 + softplus(6) ~ 0.0025.
  dist = make_output_distribution('gaussian_fixed', log_sigma_min=-6.0)
  np.testing.assert_allclose(-_log_prob(dist, net, x),
                             _gauss_nll64(x64, mu, -6 + np.logaddexp(0, 6.0)), rtol=1e-6)
  dist = make_output_distribution('gaussian_shared')
  variables = dist.init(_key(0), net, x, True, method='log_prob')
  assert float(variables['params']['log_sigma']) == 0.0
  variables = {'params': {'log_sigma': jnp.float32(-2.0)}}
  np.testing.assert_allclose(-_log_prob(dist, net, x, variables=variables),
                             _gauss_nll64(x64, mu, -6 + np.logaddexp(0, 4.0)), rtol=1e-6)
  dist = make_output_distribution('gaussian_per_pixel', log_sigma_min=-3.0, log_sigma_max=1.0)
  net2 = np.concatenate([net, 4 * net[..., ::-1]], -1)
  ls = 4 * net[..., ::-1].astype(np.float64)
  ls = 1.0 - np.logaddexp(0, 1.0 - ls)  # upper bound first, then the lower one
  ls = -3.0 + np.logaddexp(0, ls + 3.0)
  np.testing.assert_allclose(-_log_prob(dist, net2, x), _gauss_nll64(x64, mu, ls), rtol=1e-6)


def _sigma_from(dist, variables, net, x, train):
  (lp, state) = dist.apply(variables, net, x, train, method='log_prob',
                           mutable=['batch_stats', 'intermediates'])
  return lp, float(state['intermediates']['sigma'][0])


def test_optimal_sigma_minimises_the_batch_nll(gauss_batch):
  net, x, mu, x64 = gauss_batch
  dist = make_output_distribution('gaussian_optimal', log_sigma_min=None)
  variables = dist.init(_key(0), net, x, True, method='log_prob')
  lp, sigma = _sigma_from(dist, variables, net, x, True)
  res = optimize.minimize_scalar(lambda s: _gauss_nll64(x64, mu, s).sum(), bounds=(-5, 2),
                                 method='bounded', options=dict(xatol=1e-10))
  np.testing.assert_allclose(math.log(sigma), res.x, atol=1e-5)
  np.testing.assert_allclose(-np.sum(lp), res.fun, rtol=1e-6)
  np.testing.assert_allclose(-lp, _gauss_nll64(x64, mu, res.x), rtol=1e-5)


def test_optimal_per_image_sigma_minimises_each_nll(gauss_batch):
  net, x, mu, x64 = gauss_batch
  dist = make_output_distribution('gaussian_optimal_per_image', log_sigma_min=None)
  variables = dist.init(_key(0), net, x, True, method='log_prob')
  lp = np.asarray(dist.apply(variables, net, x, True, method='log_prob',
                             mutable=['batch_stats'])[0])
  for i in range(x.shape[0]):
    res = optimize.minimize_scalar(lambda s, i=i: _gauss_nll64(x64[i:i + 1], mu[i:i + 1], s)[0],
                                   bounds=(-5, 2), method='bounded', options=dict(xatol=1e-10))
    np.testing.assert_allclose(-lp[i], res.fun, rtol=1e-6)
  # Default lower clip at -6: an exact reconstruction gives sigma = exp(-6 + softplus(...)).
  dist = make_output_distribution('gaussian_optimal_per_image')
  xs = jax.nn.sigmoid(jnp.asarray(net))
  _, sigma = _sigma_from(dist, dist.init(_key(0), net, xs, True, method='log_prob'),
                         net, xs, True)
  assert sigma >= math.exp(-6.0)


def test_optimal_sigma_running_average_is_used_in_eval(gauss_batch):
  net, x, mu, x64 = gauss_batch
  momentum = 0.9
  dist = make_output_distribution('gaussian_optimal', momentum=momentum)
  variables = dist.init(_key(0), net, x, True, method='log_prob')
  stats0 = variables['batch_stats']
  assert float(stats0['avg_weight']) == 0.0  # init does not update the average
  # Before any update the eval sigma is 1 (softclipped: -6 + softplus(6)).
  np.testing.assert_allclose(-_log_prob(dist, net, x, variables=variables),
                             _gauss_nll64(x64, mu, -6 + np.logaddexp(0, 6.0)), rtol=1e-6)
  x2 = np.clip(x * 0.5 + 0.3, 0, 1).astype(np.float32)
  mses = []
  for batch in (x, x2, x):
    _, upd = dist.apply(variables, net, batch, True, method='log_prob', mutable=['batch_stats'])
    variables = {'batch_stats': upd['batch_stats']}
    mses.append(np.mean((batch.astype(np.float64) - mu) ** 2))
  w = np.array([momentum ** 2, momentum, 1.0]) * (1 - momentum)
  avg = np.sum(w * mses) / np.sum(w)
  log_sigma = -6 + np.logaddexp(0, 0.5 * np.log(avg) + 6)
  np.testing.assert_allclose(-_log_prob(dist, net, x2, variables=variables),
                             _gauss_nll64(x2.astype(np.float64), mu, log_sigma), rtol=1e-5)
  # Eval neither updates the average nor couples rows: garbage rows leave the others unchanged.
  garbage = np.concatenate([x2[:2], np.ones_like(x2[:2])])
  lp, upd = dist.apply(variables, net, garbage, False, method='log_prob', mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, upd['batch_stats'], variables['batch_stats'])
  np.testing.assert_allclose(lp[:2], _log_prob(dist, net, x2, variables=variables)[:2],
                             rtol=1e-6)
  # The per-image variant evaluates with the same running average by default ...
  per_image = make_output_distribution('gaussian_optimal_per_image', momentum=momentum)
  np.testing.assert_allclose(_log_prob(per_image, net, x2, variables=variables),
                             _log_prob(dist, net, x2, variables=variables), rtol=1e-6)
  # ... or, on request, with each image's own optimum.
  own = make_output_distribution('gaussian_optimal_per_image', eval_sigma='per_image',
                                 log_sigma_min=None)
  mse_i = np.mean((x64 - mu) ** 2, axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(-_log_prob(own, net, x, variables=variables),
                             _gauss_nll64(x64, mu, 0.5 * np.log(mse_i)), rtol=1e-5)


def test_stop_gradient_flag_changes_only_gradients(gauss_batch):
  net, x, _, _ = gauss_batch
  grads = {}
  for sg in (False, True):
    dist = make_output_distribution('gaussian_optimal', stop_gradient=sg)
    v = dist.init(_key(0), net, x, True, method='log_prob')
    f = lambda n, dist=dist, v=v: jnp.sum(dist.apply(v, n, x, True, method='log_prob',
                                                    mutable=['batch_stats'])[0])
    grads[sg] = (f(net), jax.grad(f)(jnp.asarray(net)))
  np.testing.assert_allclose(grads[False][0], grads[True][0], rtol=1e-6)
  # With sigma^2 = MSE the gradient of the summed NLL is (N/2) d log MSE, not d SSE / (2 MSE)
  # of a constant sigma: here they differ only by the second term being zero with stop_gradient.
  assert not np.allclose(grads[False][1], grads[True][1])


# --------------------------------------------------------------------------------------------
# Gradients, dtypes, sampling.


def _all_dists():
  return [
      ('bernoulli', {}, 1), ('gaussian_fixed', {}, 1), ('gaussian_shared', {}, 1),
      ('gaussian_optimal', {}, 1), ('gaussian_optimal_per_image', {}, 1),
      ('gaussian_per_pixel', {'log_sigma_max': 2.0}, 2), ('categorical', {'num_bits': 3}, 8),
      ('logistic_mixture', {'num_mixture': 2}, None),
      ('logistic_mixture', {'num_mixture': 2, 'faithful': True}, None),
      ('nvae_normal', {}, 2)]


@pytest.mark.parametrize('name,options,per_c', _all_dists())
def test_log_prob_gradients_finite_and_float32(name, options, per_c):
  rng = np.random.default_rng(11)
  c = 3
  dist = make_output_distribution(name, **options)
  k = dist.num_channels(c)
  assert k == (per_c * c if per_c else 10 * options['num_mixture'])
  bits = options.get('num_bits', 8)
  x = rng.integers(0, 2 ** bits, size=(2, 4, 4, c)) / (2 ** bits - 1)
  if name == 'bernoulli':
    x = np.round(x)
  x[0, 0], x[0, 1] = 0.0, 1.0
  x = jnp.asarray(x, jnp.float32)
  # Extreme raw outputs too: huge logits, log-scales far below the -7 clamp and far above.
  net = rng.normal(size=(2, 4, 4, k)).astype(np.float32) * 3
  net[1, 0] = 60.0
  net[1, 1] = -60.0
  net = jnp.asarray(net, jnp.bfloat16)
  v = dist.init(_key(0), net, x, True, method='log_prob')

  def f(params, n):
    out, _ = dist.apply({**v, 'params': params}, n, x, True, method='log_prob',
                        mutable=['batch_stats'])
    return jnp.sum(out), out

  (total, out), (gp, gn) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      v.get('params', {}), net)
  assert out.shape == (2,) and out.dtype == jnp.float32 and np.isfinite(total)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves((gp, gn)))
  assert np.any(np.asarray(gn, np.float32) != 0)
  # Discrete log-likelihoods are <= 0.
  if not dist.continuous and not options.get('faithful'):
    assert np.all(np.asarray(out) <= 1e-4)


@pytest.mark.parametrize('name,options,per_c', _all_dists())
def test_sample_and_mean_shapes_and_range(name, options, per_c):
  del per_c
  dist = make_output_distribution(name, **options)
  net = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 5, dist.num_channels(3))) * 2,
                    jnp.float32)
  v = dist.init(_key(0), net, jnp.zeros((3, 4, 5, 3)), True, method='log_prob')
  sample = jax.jit(lambda v, n, r, t: dist.apply(v, n, r, t, method='sample'))
  for t in (1.0, 0.7):
    s = sample(v, net, _key(2), t)
    assert s.shape == (3, 4, 5, 3) and s.dtype == jnp.float32
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
  mean = jax.jit(lambda v, n: dist.apply(v, n, method='mean'))(v, net)
  assert mean.shape == (3, 4, 5, 3) and float(mean.min()) >= 0 and float(mean.max()) <= 1
  if name.startswith('gaussian') or name == 'nvae_normal':
    # Temperature 0 removes the pixel noise.
    s0 = sample(v, net, _key(2), 0.0)
    np.testing.assert_allclose(s0, mean, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_dml_sampling_matches_its_cdf(temperature):
  """Empirical CDF of grayscale DML samples vs the tempered mixture's CDF (noise scale s t)."""
  logits, mus, log_s = np.array([0.3, -0.4]), np.array([-0.3, 0.4]), np.array([-1.5, -2.0])
  net = jnp.broadcast_to(jnp.asarray(np.concatenate([logits, mus, log_s]), jnp.float32),
                         (20000, 1, 1, 6))
  dist = make_output_distribution('logistic_mixture', num_mixture=2)
  y = 2 * np.asarray(jax.jit(lambda n, r: dist.apply({}, n, r, temperature, method='sample'))(
      net, _key(3))) - 1
  w = special.softmax(logits / temperature)
  for q in (-0.6, -0.3, 0.0, 0.3, 0.6):
    cdf = np.sum(w * _logistic_cdf((q - mus) / (np.exp(log_s) * temperature)))
    assert np.mean(y <= q) == pytest.approx(cdf, abs=0.015)  # 3+ binomial standard deviations


def test_dml_mean_couples_weighted_means():
  m = 2
  rng = np.random.default_rng(4)
  net = rng.normal(size=(1, 1, 1, 10 * m)).astype(np.float32) * 0.5
  dist = make_output_distribution('logistic_mixture', num_mixture=m)
  got = np.asarray(dist.apply({}, jnp.asarray(net), method='mean')).reshape(3)
  n = net.reshape(-1).astype(np.float64)
  w = special.softmax(n[:m])
  rest = n[m:].reshape(3, 3 * m)
  mu = rest[:, :m] @ w
  co = np.tanh(rest[:, 2 * m:]) @ w
  r = np.clip(mu[0], -1, 1)
  g = np.clip(mu[1] + co[0] * r, -1, 1)
  b = np.clip(mu[2] + co[1] * r + co[2] * g, -1, 1)
  np.testing.assert_allclose(got, (np.array([r, g, b]) + 1) / 2, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The original NVAE's outputs.


def _fixture(name, crop=False):
  z = np.load(os.path.join(FIXTURES, name, 'io.npz'))
  x, logits = z['x'].transpose(0, 2, 3, 1), z['logits'].transpose(0, 2, 3, 1)
  if crop:
    x, logits = x[:, 2:30, 2:30], logits[:, 2:30, 2:30]
  return jnp.asarray(logits), jnp.asarray(x), z['recon']


def test_faithful_dml_reproduces_nvae_recon():
  logits, x, recon = _fixture('cifar_tiny_s0')
  dist = make_output_distribution('logistic_mixture', num_mixture=10, num_bits=8, faithful=True)
  np.testing.assert_allclose(-_log_prob(dist, logits, x), recon, rtol=1e-5)
  # The corrected mode is a different (normalised) likelihood on the same data.
  corrected = make_output_distribution('logistic_mixture', num_mixture=10, num_bits=8)
  assert not np.allclose(-_log_prob(corrected, logits, x), recon, rtol=1e-4)


def test_bernoulli_reproduces_nvae_mnist_recon():
  logits, x, recon = _fixture('mnist_tiny_s0', crop=True)
  np.testing.assert_allclose(-_log_prob(make_output_distribution('bernoulli'), logits, x), recon,
                             rtol=1e-5)


def test_nvae_normal_reproduces_nvae_recon():
  logits, x, recon = _fixture('cifar_tiny_nonf_gauss_s0')
  dist = make_output_distribution('nvae_normal')
  np.testing.assert_allclose(-_log_prob(dist, logits, x), recon, rtol=1e-5)
  on_x = make_output_distribution('nvae_normal', density_on_x=True)
  np.testing.assert_allclose(_log_prob(on_x, logits, x) - _log_prob(dist, logits, x),
                             np.full(8, 3 * 32 * 32 * math.log(2.0)), rtol=1e-5)
