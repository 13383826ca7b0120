"""Exactness of the flow blocks and of the whole multi-scale flow, in float64.

Every log-determinant is compared with ``slogdet`` of the dense Jacobian of the flattened map
(``jax.jacfwd``) to 1e-9, every inverse with a round trip to 1e-10, and the bits/dim arithmetic
with a brute-force histogram density.  x64 is switched on for this module only.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvae_jax.config import base_config
from nvae_jax.flows import dequantize as dq
from nvae_jax.flows.coupling import AdditiveCoupling, AffineCoupling
from nvae_jax.flows.permutations import Reverse, Shuffle, shuffle_permutation
from nvae_jax.flows.split import Split
from nvae_jax.flows.squeeze import Squeeze, squeeze2d, unsqueeze2d
from nvae_jax.models import glow

LOGDET_TOL = 1e-9
ROUND_TRIP_TOL = 1e-10
# XLA's backend optimisations cost more compile time than these tiny graphs ever run.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def key(seed):
  # 'rbg' keys compile several times faster than threefry ones on CPU.
  return jax.random.key(seed, impl='rbg')


@pytest.fixture(scope='module', autouse=True)
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(key(seed), shape, jnp.float64)


def perturb(params, seed, scale):
  """Moves every parameter off its (often identity) initial value, in float64.

  numpy draws the noise: per-leaf jax.random calls would each compile.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64) + scale * rng.normal(
      size=p.shape)), params)


def dense_slogdet(fn):
  """``x -> slogdet(d fn(x_b) / d x_b)`` per example ``b`` of the flattened map, to be called
  inside a jitted function (``fn`` maps [1, ...] to a pytree whose leaves are concatenated)."""

  def one(xb):
    def flat(v):
      return jnp.concatenate([jnp.ravel(o) for o in jax.tree.leaves(fn(v.reshape(xb.shape)))])
    jac = jax.jacfwd(flat)(xb.reshape(-1))
    assert jac.shape[0] == jac.shape[1], jac.shape
    return jnp.linalg.slogdet(jac)

  return lambda x: jax.vmap(one)(x[:, None])


# -- couplings -------------------------------------------------------------------------------------


@pytest.mark.parametrize('cls', [AffineCoupling, AdditiveCoupling])
def test_coupling_logdet_and_inverse(cls):
  layer = cls(hidden=6)
  shape = (2, 5, 4, 3)  # odd H and C: x_a has 1 channel, x_b 2
  x, z = _normal(0, shape), _normal(3, shape)

  @jit
  def check(params, x, z):
    y, logdet = layer.apply(params, x)
    sign, logabs = dense_slogdet(lambda v: layer.apply(params, v)[0])(x)
    x_back, logdet_inv = layer.apply(params, y, reverse=True)
    z_back = layer.apply(params, layer.apply(params, z, reverse=True)[0])[0]
    return y, logdet, sign, logabs, x_back, logdet_inv, z_back

  params0 = jit(layer.init)(key(1), x)
  params = perturb(params0, 2, 0.3)
  y, logdet, sign, logabs, x_back, logdet_inv, z_back = check(params, x, z)
  assert y.dtype == jnp.float64 and logdet.shape == (2,)
  # Per-example log-dets, each against the dense Jacobian of its own example.
  assert np.all(sign != 0)
  np.testing.assert_allclose(logdet, logabs, rtol=0, atol=LOGDET_TOL)
  np.testing.assert_allclose(x_back, x, rtol=0, atol=ROUND_TRIP_TOL)
  np.testing.assert_allclose(logdet_inv, -logdet, rtol=0, atol=ROUND_TRIP_TOL)
  np.testing.assert_allclose(z_back, z, rtol=0, atol=ROUND_TRIP_TOL)  # z -> x -> z
  if cls is AffineCoupling:
    assert np.all(np.abs(logdet) > 1.0)  # the perturbed scales really are non-trivial
    # At init the output conv is zero: shift = 0 and scale = sigmoid(2) on x_b only (Glow).
    y0, logdet0 = check(params0, x, z)[:2]
    s = 1.0 / (1.0 + math.exp(-2.0))
    np.testing.assert_array_equal(y0[..., :1], x[..., :1])
    np.testing.assert_allclose(y0[..., 1:], x[..., 1:] * s, rtol=1e-14)
    np.testing.assert_allclose(logdet0, [5 * 4 * 2 * math.log(s)] * 2, rtol=1e-14)
  else:
    np.testing.assert_array_equal(logdet, 0.0)


def test_coupling_rejects_one_channel():
  with pytest.raises(ValueError, match='at least 2 channels'):
    AffineCoupling(hidden=4).init(key(0), jnp.zeros((1, 4, 4, 1)))


# -- squeeze and permutations ----------------------------------------------------------------------


def test_squeeze_matches_index_formula_and_inverts():
  x = _normal(0, (2, 4, 6, 3))
  y, logdet = Squeeze().apply({}, x)
  ref = np.zeros((2, 2, 3, 12))
  xn = np.asarray(x)
  for i in range(2):
    for j in range(3):
      for c in range(3):
        for a in range(2):
          for d in range(2):
            ref[:, i, j, 4 * c + 2 * a + d] = xn[:, 2 * i + a, 2 * j + d, c]
  np.testing.assert_array_equal(y, ref)
  np.testing.assert_array_equal(logdet, 0.0)
  np.testing.assert_array_equal(Squeeze().apply({}, y, reverse=True)[0], x)
  sign, logabs = jit(dense_slogdet(squeeze2d))(x)
  np.testing.assert_array_equal(np.abs(sign), 1.0)
  np.testing.assert_array_equal(logabs, 0.0)
  with pytest.raises(ValueError, match='divisible by factor=2'):
    squeeze2d(jnp.zeros((1, 5, 4, 1)))
  with pytest.raises(ValueError, match='divisible by factor\\*\\*2=4'):
    unsqueeze2d(jnp.zeros((1, 2, 2, 3)))


@pytest.mark.parametrize('layer,perm', [(Reverse(), np.arange(8)[::-1]),
                                        (Shuffle(seed=5), shuffle_permutation(8, 5))])
def test_fixed_permutations(layer, perm):
  x = _normal(0, (2, 3, 3, 8))
  y, logdet = layer.apply({}, x)
  np.testing.assert_array_equal(y, np.asarray(x)[..., perm])
  np.testing.assert_array_equal(logdet, 0.0)
  np.testing.assert_array_equal(layer.apply({}, y, reverse=True)[0], x)
  assert sorted(perm) == list(range(8))
  assert not np.array_equal(shuffle_permutation(8, 5), shuffle_permutation(8, 6))


# -- split ----------------------------------------------------------------------------------------


def _std_normal_logprob(e):
  e = np.asarray(e).reshape(e.shape[0], -1)
  return np.sum(-0.5 * e**2 - 0.5 * np.log(2 * np.pi), axis=1)


@pytest.mark.parametrize('learn_prior', [True, False])
def test_split_log_prob_is_a_change_of_variables(learn_prior):
  split = Split(learn_prior=learn_prior)
  x = _normal(0, (2, 4, 4, 5))  # odd: z1 has 2 channels, z2 has 3

  @jit
  def check(params, x):
    z1, logp, eps = split.apply(params, x)
    # (z1, z2) -> (z1, eps) is triangular: log p(z2|z1) = log N(eps) + log|d eps / d z2|.
    _, logabs = dense_slogdet(lambda v: split.apply(params, v)[::2])(x)
    back, logp_back = split.apply(params, z1, reverse=True, eps=eps)
    hot = split.apply(params, z1, reverse=True, eps=eps, temperature=0.7)[0]
    hot_ref = split.apply(params, z1, reverse=True, eps=0.7 * eps)[0]
    return z1, logp, eps, logabs, back, logp_back, hot, hot_ref

  params = perturb(jit(split.init)(key(1), x), 2, 0.1)
  z1, logp, eps, logabs, back, logp_back, hot, hot_ref = check(params, x)
  assert z1.shape == (2, 4, 4, 2) and eps.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(z1, x[..., :2])
  np.testing.assert_allclose(logp, _std_normal_logprob(eps) + logabs, rtol=0, atol=LOGDET_TOL)
  if learn_prior:
    assert np.all(np.abs(logabs) > 1.0)  # the perturbed prior is not N(0, 1)
  else:
    np.testing.assert_array_equal(eps, x[..., 2:])
  np.testing.assert_allclose(back, x, rtol=0, atol=ROUND_TRIP_TOL)
  np.testing.assert_allclose(logp_back, logp, rtol=0, atol=ROUND_TRIP_TOL)
  np.testing.assert_allclose(hot, hot_ref, rtol=0, atol=ROUND_TRIP_TOL)  # temperature scales eps
  with pytest.raises(ValueError, match='eps'):
    split.apply(params, z1, reverse=True)


# -- dequantisation, preprocessing, nats and bits ---------------------------------------------------


@pytest.mark.parametrize('num_bits', [5, 8])
def test_dequantize_bins(num_bits):
  levels = 2**num_bits
  x = (jnp.arange(levels, dtype=jnp.float64) / (levels - 1)).reshape(1, 1, levels, 1)
  for u in (0.0, 0.5, 1.0 - 1e-9):
    x_cont = dq.dequantize(x, jnp.full(x.shape, u), num_bits)
    np.testing.assert_allclose(x_cont.ravel(), (np.arange(levels) + u) / levels, rtol=1e-15)
    np.testing.assert_array_equal(dq.quantize(x_cont, num_bits), x)
    np.testing.assert_allclose(dq.undo_dequantize(x_cont, jnp.full(x.shape, u), num_bits), x,
                               rtol=0, atol=1e-14)
  with pytest.raises(ValueError, match='num_bits'):
    dq.dequantize(x, x, 0)


@pytest.mark.parametrize('kind', dq.PREPROCESSING)
def test_preprocessing_logdet_and_inverse(kind):
  x = jax.random.uniform(key(0), (2, 3, 3, 2), jnp.float64)

  @jit
  def check(x):
    y, logdet = dq.preprocess(x, kind, alpha=0.05)
    _, logabs = dense_slogdet(lambda v: dq.preprocess(v, kind, 0.05)[0])(x)
    return logdet, logabs, dq.postprocess(y, kind, 0.05)

  logdet, logabs, back = check(x)
  np.testing.assert_allclose(logdet, logabs, rtol=0, atol=LOGDET_TOL)
  np.testing.assert_allclose(back, x, rtol=0, atol=ROUND_TRIP_TOL)
  with pytest.raises(ValueError, match='preprocess'):
    dq.preprocess(x, 'sigmoid')


def test_discrete_nll_of_a_histogram_density_is_exact():
  """For a density constant on each bin, p(x) = 2**(bD) P(k), the bound is tight: the formula
  must return -log P(k) for every k and any dequantisation noise."""
  num_bits, dims = 2, 2
  probs = np.random.default_rng(0).dirichlet(np.ones(16)).reshape(4, 4)  # P(k1, k2)
  k = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing='ij'), -1).reshape(16, 1, 1, 2)
  x = jnp.asarray(k / 3.0)
  u = jax.random.uniform(key(1), x.shape, jnp.float64)
  x_cont = dq.dequantize(x, u, num_bits)
  bins = np.floor(np.asarray(x_cont) * 4).astype(int).reshape(16, 2)
  log_density = np.log(2.0**(num_bits * dims) * probs[bins[:, 0], bins[:, 1]])
  nll = dq.discrete_nll(jnp.asarray(log_density), dims, num_bits)
  np.testing.assert_allclose(nll, -np.log(probs.reshape(-1)), rtol=1e-13)
  np.testing.assert_allclose(dq.bits_per_dim(nll, dims), -np.log2(probs.reshape(-1)) / dims,
                             rtol=1e-13)
  # The uniform density on the cube costs exactly b bits per dimension.
  np.testing.assert_allclose(dq.bits_per_dim(dq.discrete_nll(0.0, 784, 5), 784), 5.0,
                             rtol=1e-15)


# -- the whole flow -----------------------------------------------------------------------------


def _task(permutation, **model):
  c = base_config()
  c.data.update(dict(name='mnist', image_size=8, channels=1, num_bits=5))
  c.model = dict(name='glow', num_levels=2, num_steps=1, hidden_channels=4,
                 permutation=permutation, coupling='affine', kernel_size=3, dilation=1,
                 learn_top=True)
  c.model.update(model)
  c.precision.compute_dtype = 'float64'
  return glow.GlowTask(c)


def _require(permutation):
  try:
    importlib.import_module('nvae_jax.flows.actnorm')
    glow.make_mixers(permutation, 0)
  except ImportError as e:  # the learned mixing layers live in modules of their own
    pytest.skip(f'{permutation}: {e}')


# Variations that each permutation also exercises: preprocessing, actnorm in the coupling net.
_EXTRA = {'reverse': dict(preprocess='logit'), 'shuffle': dict(net_actnorm=True),
          'plu': dict(coupling='additive')}


@pytest.mark.parametrize('permutation', glow.PERMUTATIONS)
def test_whole_flow_nll_matches_dense_jacobian(permutation):
  """nll = -log N(g(x_cont); 0, I) - log|det dg/dx_cont| + D b log 2, where g maps the
  dequantised image to all standardised latents (preprocessing, flow, split and top priors)."""
  _require(permutation)
  task = _task(permutation, **_EXTRA.get(permutation, {}))
  x = jnp.round(jax.random.uniform(key(0), (4, 8, 8, 1), jnp.float64) * 31) / 31
  u = jax.random.uniform(key(3), x.shape, jnp.float64)

  @jit
  def check(variables, x, u):
    def g(x_cont):
      y, _ = dq.preprocess(x_cont, task.preprocess, task.alpha)
      return task.flow.apply(variables, y, method=glow.MultiScaleFlow.forward)[0]

    x_cont = dq.dequantize(x, u, 5)
    sign, logabs = dense_slogdet(g)(x_cont[:2])
    eps = g(x_cont)
    flat_eps = jnp.concatenate([e.reshape(x.shape[0], -1) for e in eps], axis=1)
    back = task._decode(variables, eps, 1.0)  # pylint: disable=protected-access
    return task.nll(variables, x, u), sign, logabs, flat_eps, x_cont, back

  variables = perturb(jit(task.init)(key(1), {'image': x}), 2, 0.05)
  nll, sign, logabs, flat_eps, x_cont, back = check(variables, x, u)
  assert np.all(sign != 0) and flat_eps.shape == (4, 64)
  ref = -_std_normal_logprob(flat_eps[:2]) - logabs + 64 * 5 * math.log(2)
  np.testing.assert_allclose(nll[:2], ref, rtol=0, atol=LOGDET_TOL)
  np.testing.assert_allclose(back, x_cont, rtol=0, atol=ROUND_TRIP_TOL)  # x -> z -> x
