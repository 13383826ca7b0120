"""Exactness of the invertible convolution layers in float64 (x64 enabled for this module only).

For every layer (ActNorm, Conv1x1 plain/plu/qr, EmergingConv k in {3, 5} x dilation in {1, 2},
PeriodicConv k in {3, 5}), on tiny images with odd and even sides (3x5, 4x4, 5x3, 5x5) and 1..5
channels, with randomly perturbed (non-identity) parameters:

* forward log-det == slogdet of the dense ``jax.jacfwd`` Jacobian of the flattened forward map,
  to 1e-9 * max(1, |log-det|) (absolute below 1, relative above);
* log-det of the inverse == minus the forward log-det (1e-12 relative), which with the round
  trips makes it the log-det of the inverse map;
* round trips x -> y -> x and z -> x -> z to 1e-10 (absolute, inputs of unit scale);
* gradients of log-det and of the forward and inverse outputs w.r.t. the parameters against
  finite differences (``jax.test_util.check_grads``, order 1, reverse mode), including the
  complex ``slogdet`` of the periodic convolution and the ``lax.scan`` inverse.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from nvae_jax.flows import ActNorm, Conv1x1, EmergingConv, PeriodicConv


def _key(seed):
  # 'rbg' keys compile several times faster than threefry ones on CPU; compile time dominates.
  return jax.random.key(seed, impl='rbg')

# XLA's backend optimisations cost more compile time than these tiny graphs ever run.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(fn=None, **kwargs):
  if fn is None:
    return functools.partial(_jit, **kwargs)
  return jax.jit(fn, compiler_options=_FAST_COMPILE, **kwargs)


@pytest.fixture(scope='module', autouse=True)
def _enable_x64():
  with jax.enable_x64(True):
    yield


# (id, layer, (H, W, C), perturbation scale of the parameters)
CASES = [
    ('actnorm-3x5x2', ActNorm(), (3, 5, 2), 0.3),
    ('plain-4x4x3', Conv1x1('plain'), (4, 4, 3), 0.3),
    ('plu-5x3x4', Conv1x1('plu'), (5, 3, 4), 0.3),
    ('qr-3x5x5', Conv1x1('qr'), (3, 5, 5), 0.3),
    ('qr-4x4x1', Conv1x1('qr'), (4, 4, 1), 0.3),
    ('emerging-k3d1-3x5x3', EmergingConv(3, 1), (3, 5, 3), 0.3),
    ('emerging-k3d2-4x4x2-plu', EmergingConv(3, 2, conv1x1_variant='plu'), (4, 4, 2), 0.3),
    ('emerging-k5d1-5x3x2-qr', EmergingConv(5, 1, conv1x1_variant='qr'), (5, 3, 2), 0.3),
    ('emerging-k5d2-5x5x2', EmergingConv(5, 2), (5, 5, 2), 0.3),
    ('emerging-k5d2-3x5x1-no1x1', EmergingConv(5, 2, use_1x1=False), (3, 5, 1), 0.3),
    ('periodic-k3-4x4x3', PeriodicConv(3), (4, 4, 3), 0.1),
    ('periodic-k5-3x5x2', PeriodicConv(5), (3, 5, 2), 0.1),  # k > H: wrapped taps alias
    ('periodic-k5-5x3x4', PeriodicConv(5), (5, 3, 4), 0.1),  # k > W
]

BATCH = 2


def _perturb(variables, key, scale):
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  leaves = [p.astype(jnp.float64) + scale * jax.random.normal(k, p.shape, jnp.float64)
            for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _data(shape, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(1.5 * rng.standard_normal((BATCH,) + shape) + 0.5)
  z = jnp.asarray(rng.standard_normal((BATCH,) + shape))
  return x, z


def _init_variables(layer, scale, key, x):
  """Initialised (ActNorm: from x) then randomly perturbed float64 variables."""
  k_init, k_perturb = jax.random.split(key)
  return _perturb(layer.init(k_init, x), k_perturb, scale)


_init = _jit(_init_variables, static_argnums=(0, 1))


@_jit(static_argnums=(0, 1))
def _evaluate(layer, scale, key, x, z):
  variables = _init_variables(layer, scale, key, x)

  def fwd(v):
    return layer.apply(variables, v.reshape((1,) + x.shape[1:]))[0].ravel()

  y, ld = layer.apply(variables, x)
  x_rec, ld_back = layer.apply(variables, y, reverse=True)
  x_z, ld_inv = layer.apply(variables, z, reverse=True)
  z_rec, _ = layer.apply(variables, x_z)
  dense = jnp.linalg.slogdet(jax.jacfwd(fwd)(x[0].ravel()))[1]
  return dict(y=y, ld=ld, x_rec=x_rec, ld_back=ld_back, ld_inv=ld_inv, z_rec=z_rec, dense=dense)


def _close_logdet(actual, expected, tol=1e-9):
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * max(1.0, abs(float(expected))))


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_logdet_and_round_trips(case):
  _, layer, shape, scale = case
  x, z = _data(shape, 0)
  out = _evaluate(layer, scale, _key(0), x, z)
  assert out['y'].dtype == jnp.float64 and out['ld'].dtype == jnp.float64
  assert out['ld'].shape == (BATCH,)
  # The parameters really are away from the identity.
  assert float(jnp.max(jnp.abs(out['y'] - x))) > 0.1
  _close_logdet(out['ld'][0], out['dense'])
  np.testing.assert_allclose(out['ld'], out['ld'][0])  # data independent, broadcast to [batch]
  # The inverse's log-det is minus the forward one: with the round trips below, this makes it
  # the slogdet of the inverse's Jacobian too.
  np.testing.assert_allclose(out['ld_back'], -out['ld'], rtol=1e-12, atol=0)
  np.testing.assert_allclose(out['ld_inv'], -out['ld'], rtol=1e-12, atol=0)
  np.testing.assert_allclose(out['x_rec'], x, rtol=0, atol=1e-10)
  np.testing.assert_allclose(out['z_rec'], z, rtol=0, atol=1e-10)


# Gradient checks (each costs a forward+backward compile) on the non-trivial paths: the plain
# slogdet, PLU and QR 1x1s inside the emerging layers, the scan inverse with k = 3 and 5 and
# dilation 1 and 2, the complex slogdet and per-frequency solve of the periodic convolution.
# ActNorm's gradients are those of an elementwise affine map.
GRAD_CASES = [CASES[i] for i in (5, 6, 7, 11)]


@pytest.mark.parametrize('case', GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_parameter_gradients(case):
  _, layer, shape, scale = case
  x, z = _data(shape, 1)
  variables = _init(layer, scale, _key(1), x)
  flat, unravel = ravel_pytree(variables)
  w_y, w_x = _data(shape, 2)

  @jax.jit
  def objective(p):
    v = unravel(p)
    y, ld = layer.apply(v, x)
    x_inv, _ = layer.apply(v, z, reverse=True)
    return ld[0] + jnp.sum(y * w_y) + jnp.sum(x_inv * w_x)

  check_grads(objective, (flat,), order=1, modes=['rev'], eps=1e-6, atol=1e-6, rtol=1e-6)
