"""The Glow ModelTask in float32 on a tiny flow, for every permutation.

Checks init, loss and gradients, evaluate, sampling, the x -> z -> x round trip, the latent
shapes, config validation, and that a few optimiser steps lower the loss.  Exactness of the
log-determinants is the business of ``test_flow_blocks_float64.py``.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nvae_jax.config import base_config
from nvae_jax.models import build_task, glow

H, W, C, B = 8, 8, 1, 4
D = H * W * C
# XLA's backend optimisations cost more compile time than these tiny graphs ever run.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def key(seed):
  # 'rbg' keys compile several times faster than threefry ones on CPU.
  return jax.random.key(seed, impl='rbg')


def make_config(permutation='reverse', num_bits=8, **model):
  c = base_config()
  c.data.update(dict(name='mnist', image_size=H, channels=C, num_bits=num_bits))
  fields = dict(name='glow', num_levels=2, num_steps=1, hidden_channels=8,
                permutation=permutation, coupling='affine', kernel_size=3, dilation=1,
                learn_top=True)
  fields.update(model)
  c.model = ml_collections.ConfigDict(fields)
  return c


def quantised_batch(seed, num_bits):
  levels = 2**num_bits - 1
  u = jax.random.uniform(key(seed), (B, H, W, C))
  # Smooth-ish images so the flow has structure to find: a gradient plus noise.
  ramp = jnp.linspace(0.0, 1.0, H)[None, :, None, None]
  return {'image': jnp.round(jnp.clip(0.6 * ramp + 0.4 * u, 0, 1) * levels) / levels}


class Built:
  """A task, its variables and the outputs of one jitted call of every entry point, shared by the
  tests of one permutation (one compile for loss/grads/evaluate/reconstruct, one for sampling)."""

  def __init__(self, permutation):
    self.num_bits = 5 if permutation in ('shuffle', 'qr', 'periodic') else 8
    extra = {'coupling': 'additive'} if permutation == 'plu' else {}
    self.task = task = build_task(make_config(permutation, self.num_bits, **extra))
    self.batch = quantised_batch(0, self.num_bits)
    self.variables = jit(task.init)(key(1), self.batch)
    self.loss_grad = jax.value_and_grad(task.loss, has_aux=True)

    @jit
    def everything(variables, batch):
      rng = key(2)
      return (self.loss_grad(variables, batch, rng, 0), task.evaluate(variables, batch, rng),
              task.evaluate(variables, batch, key(3)),
              task.reconstruct(variables, batch, key(4)))

    self.everything = everything
    self.outputs = everything(self.variables, self.batch)
    self.sample = jit(task.sample, static_argnums=(2,))


_BUILT: dict[str, Built] = {}


def _built(permutation: str) -> Built:
  if permutation not in _BUILT:
    _BUILT[permutation] = Built(permutation)
  return _BUILT[permutation]


@pytest.fixture(scope='module', params=glow.PERMUTATIONS)
def built(request):
  return _built(request.param)


@pytest.fixture(scope='module')
def reverse():
  """The 'reverse' case, for the tests that need one permutation only."""
  yield _built('reverse')
  _BUILT.clear()


def test_loss_grads_and_evaluate(built):
  ((loss, (metrics, state)), grads), out, other, _ = built.outputs
  assert state == {} and built.task.mutable_collections == ()
  assert set(metrics) == {'loss', 'bits_per_dim', 'log_prior', 'logdet'}
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  np.testing.assert_allclose(metrics['bits_per_dim'], loss / (D * math.log(2)), rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert optax.tree.norm(grads) > 0
  # evaluate with the same noise gives the per-example NLL whose mean is the loss.
  assert out['nll'].shape == (B,) and out['nll'].dtype == jnp.float32
  np.testing.assert_allclose(jnp.mean(out['nll']), loss, rtol=1e-6)
  np.testing.assert_allclose(out['bits_per_dim'], out['nll'] / (D * math.log(2)), rtol=1e-6)
  assert not np.allclose(other['nll'], out['nll'])  # other noise, other bound


def test_reconstruct_round_trip(built):
  rec = built.outputs[-1]
  assert rec.shape == (B, H, W, C) and rec.dtype == jnp.float32
  np.testing.assert_allclose(rec, built.batch['image'], rtol=0, atol=1e-4)


def test_sample(built):
  levels = 2**built.num_bits - 1
  x = built.sample(built.variables, key(5), 3, 0.8)
  assert x.shape == (3, H, W, C) and x.dtype == jnp.float32
  assert np.all((x >= 0) & (x <= 1))
  np.testing.assert_allclose(x * levels, np.round(x * levels), atol=1e-4)  # on the data grid
  assert not np.array_equal(x[0], x[1])
  # At temperature 0 every latent is its prior mean: the three noise draws no longer matter.
  cold = built.sample(built.variables, key(6), 3, 0.0)
  np.testing.assert_array_equal(cold[0], cold[1])
  np.testing.assert_array_equal(cold[0], cold[2])


def test_describe_matches_the_latents():
  task = build_task(make_config('reverse'))
  d = task.describe((H, W, C))
  assert d['inputs'] == d['outputs'] == (H, W, C)
  assert d['latents'] == [(4, 4, 2), (2, 2, 8)]
  assert sum(math.prod(s) for s in d['latents']) == D
  assert d['likelihood'] == {'name': 'flow_uniform_dequantization_8bit', 'continuous': False}
  assert glow.latent_shapes((28, 28, 1), 2) == [(14, 14, 2), (7, 7, 8)]
  assert glow.latent_shapes((32, 32, 3), 3) == [(16, 16, 6), (8, 8, 12), (4, 4, 48)]


@pytest.mark.parametrize('field,value,match', [
    ('permutation', 'invconv', 'config.model.permutation'),
    ('coupling', 'spline', 'config.model.coupling'),
    ('num_levels', 0, 'config.model.num_levels'),
    ('kernel_size', 4, 'config.model.kernel_size'),
    ('preprocess', 'dequant', 'config.model.preprocess'),
    ('num_step', 2, 'config.model.num_step: unknown field'),
])
def test_bad_model_config(field, value, match):
  c = make_config()
  with c.unlocked():
    c.model[field] = value
  with pytest.raises(ValueError, match=match):
    build_task(c)


def test_bad_image_shapes():
  task = build_task(make_config('reverse', num_levels=3))  # 8 / 2**3 = 1: fine
  with pytest.raises(ValueError, match='divisible by 2\\*\\*num_levels = 8'):
    task.init(key(0), {'image': jnp.zeros((2, 12, 12, 1))})
  with pytest.raises(ValueError, match='config.data.channels=1'):
    task.init(key(0), {'image': jnp.zeros((2, 8, 8, 3))})


def test_training_lowers_the_loss(reverse):
  built = reverse
  opt = optax.adam(3e-3)

  @jit
  def train_step(params, opt_state, rng):
    (loss, _), grads = built.loss_grad({'params': params}, built.batch, rng, 0)
    updates, opt_state = opt.update(grads['params'], opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = built.variables['params']
  opt_state = opt.init(params)
  losses = []
  for i in range(8):
    params, opt_state, loss = train_step(params, opt_state, key(10 + i))
    losses.append(float(loss))
  # Nats per image, each step with fresh dequantisation noise.
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses


def test_bfloat16_and_remat_keep_the_inverse_exact(reverse):
  """bfloat16 coupling networks under remat: the loss moves by well under 1 %, gradients are
  finite, and x -> z -> x stays exact (the networks see the same inputs in both directions)."""
  built = reverse
  c = make_config('reverse', built.num_bits)
  c.precision.compute_dtype = 'bfloat16'
  c.remat.policy = 'nothing_saveable'
  task = build_task(c)

  @jit
  def run(variables, batch):
    return (jax.value_and_grad(task.loss, has_aux=True)(variables, batch, key(2), 0),
            task.reconstruct(variables, batch, key(4)))

  # Off the zero-initialised outputs, so that the coupling networks matter.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
                           built.variables)
  ((loss, _), grads), rec = run(variables, built.batch)
  loss32 = built.everything(variables, built.batch)[0][0][0]
  assert loss != loss32  # the bfloat16 path really ran
  np.testing.assert_allclose(loss, loss32, rtol=5e-3)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(rec, built.batch['image'], rtol=0, atol=1e-4)
