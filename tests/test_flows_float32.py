"""The invertible convolution layers in float32, at the tolerances a user can rely on.

On 8x8x4 images (batch 4), with parameters perturbed away from their initial values by
N(0, 0.1^2) (0.03 for the periodic kernel), in float32:

* log-det vs the float64 ``slogdet`` of the dense float32 ``jax.jacfwd`` Jacobian (256 x 256):
  |difference| <= 1e-4 * max(1, |log-det|)  (relative 1e-4 on log-dets of size ~10^2);
* inverse log-det == -forward log-det exactly (bitwise);
* round trips x -> y -> x and z -> x -> z: absolute error <= 1e-4 on unit-scale data;
* ActNorm data-dependent init: per-channel mean 0 (atol 1e-5) and std 1 (rtol 5e-5) on the
  initialising batch;
* dtypes: float32 in -> float32 out and log-det; bfloat16 in -> float32 computation and log-det.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvae_jax.flows import ActNorm, Conv1x1, EmergingConv, PeriodicConv

SHAPE = (8, 8, 4)
BATCH = 4

CASES = [
    ('actnorm', ActNorm(), 0.1),
    ('plain', Conv1x1('plain'), 0.1),
    ('plu', Conv1x1('plu'), 0.1),
    ('qr', Conv1x1('qr'), 0.1),
    ('emerging-k3d1', EmergingConv(3, 1), 0.1),
    ('emerging-k5d2-qr', EmergingConv(5, 2, conv1x1_variant='qr'), 0.1),
    ('periodic-k3', PeriodicConv(3), 0.03),
    ('periodic-k5', PeriodicConv(5), 0.03),
]


def _key(seed):
  # 'rbg' keys compile several times faster than threefry ones on CPU; compile time dominates.
  return jax.random.key(seed, impl='rbg')

# XLA's backend optimisations cost more compile time than these tiny graphs ever run.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(fn=None, **kwargs):
  if fn is None:
    return functools.partial(_jit, **kwargs)
  return jax.jit(fn, compiler_options=_FAST_COMPILE, **kwargs)


def _data(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(2.0 * rng.standard_normal((BATCH,) + SHAPE) + 0.5, jnp.float32)
  z = jnp.asarray(rng.standard_normal((BATCH,) + SHAPE), jnp.float32)
  return x, z


@_jit(static_argnums=(0, 1))
def _evaluate(layer, scale, key, x, z):
  k_init, k_perturb = jax.random.split(key)
  variables = layer.init(k_init, x)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(k_perturb, len(leaves))
  variables = jax.tree.unflatten(treedef, [
      p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])

  def fwd(v):
    return layer.apply(variables, v.reshape((1,) + SHAPE))[0].ravel()

  y, ld = layer.apply(variables, x)
  x_rec, ld_back = layer.apply(variables, y, reverse=True)
  x_z, ld_inv = layer.apply(variables, z, reverse=True)
  z_rec, _ = layer.apply(variables, x_z)
  y_bf16, ld_bf16 = layer.apply(variables, x.astype(jnp.bfloat16))
  return dict(y=y, ld=ld, x_rec=x_rec, ld_back=ld_back, ld_inv=ld_inv, z_rec=z_rec,
              jac=jax.jacfwd(fwd)(x[0].ravel()), y_bf16=y_bf16, ld_bf16=ld_bf16)


def test_x64_is_off_here():
  assert jnp.asarray(1.0).dtype == jnp.float32  # the float64 module must not leak x64


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_float32_logdet_and_round_trips(case):
  _, layer, scale = case
  x, z = _data(0)
  out = _evaluate(layer, scale, _key(0), x, z)
  assert out['y'].dtype == jnp.float32 and out['ld'].dtype == jnp.float32
  assert out['y_bf16'].dtype == jnp.float32 and out['ld_bf16'].dtype == jnp.float32
  assert out['ld'].shape == (BATCH,)
  dense = np.linalg.slogdet(np.asarray(out['jac'], np.float64))[1]
  ld = float(out['ld'][0])
  assert abs(ld - dense) <= 1e-4 * max(1.0, abs(dense)), (ld, dense)
  np.testing.assert_array_equal(out['ld_back'], -out['ld'])
  np.testing.assert_array_equal(out['ld_inv'], -out['ld'])
  np.testing.assert_allclose(out['x_rec'], x, rtol=0, atol=1e-4)
  np.testing.assert_allclose(out['z_rec'], z, rtol=0, atol=1e-4)
  np.testing.assert_allclose(out['ld_bf16'], out['ld'], rtol=1e-6)


def test_actnorm_data_dependent_init():
  x, _ = _data(1)
  x = x * jnp.asarray([0.1, 1.0, 3.0, 10.0]) + jnp.asarray([-5.0, 0.0, 2.0, 7.0])
  layer = ActNorm()
  variables = _jit(layer.init)(_key(0), x)
  y, ld = _jit(layer.apply)(variables, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, rtol=5e-5)
  # log-det = H W sum(log scale) = -H W sum(log std) of the initialising batch.
  expected = -SHAPE[0] * SHAPE[1] * np.sum(np.log(np.std(np.asarray(x, np.float64), axis=(0, 1, 2))))
  np.testing.assert_allclose(ld, expected, rtol=1e-5)
  # Identity when asked, and when initialised in the reverse direction.
  for v in (ActNorm(data_init=False).init(_key(0), x),
            layer.init(_key(0), x, reverse=True)):
    np.testing.assert_array_equal(v['params']['bias'], 0.0)
    np.testing.assert_array_equal(v['params']['log_scale'], 0.0)
