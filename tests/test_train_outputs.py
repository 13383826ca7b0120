"""What the platform reports: masked nats/image and bits/dim over a split, and image grids."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nvae_jax.models.base import ModelTaskBase
from nvae_jax.train import evaluate as eval_lib
from nvae_jax.train import sample as sample_lib
from nvae_jax.train import step as step_lib


class _PixelSumTask(ModelTaskBase):
  """nll = 3 * sum of pixels (nats), kl = 1: closed forms to check the reduction against."""

  def evaluate(self, variables, batch, rng):
    x = batch['image']
    nll = 3.0 * jnp.sum(x, axis=(1, 2, 3)) + variables['params']['offset']
    return {'nll': nll, 'kl': jnp.ones_like(nll), 'scalar_ignored': jnp.sum(x)}

  def describe(self, image_shape=None):
    del image_shape
    return {'likelihood': {'name': 'test', 'continuous': True}}


def test_evaluate_split_masks_padding_and_converts_to_bits_per_dim():
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  repl = step_lib.replicated(mesh)
  eval_step = eval_lib.make_eval_step(_PixelSumTask(), mesh, repl)
  rng = np.random.default_rng(0)
  shape = (4, 4, 3)
  images = rng.uniform(size=(21,) + shape).astype(np.float32)  # 21 examples, batches of 8
  batches = []
  for start in range(0, 24, 8):
    img = np.full((8,) + shape, np.nan, np.float32)  # padding rows are NaN: must not leak
    real = images[start:start + 8]
    img[:len(real)] = real
    mask = np.zeros(8, np.float32)
    mask[:len(real)] = 1
    batches.append({'image': img, 'mask': mask})
  variables = {'params': {'offset': jnp.float32(0.5)}}
  report = eval_lib.evaluate_split(eval_step, variables, iter(batches), mesh,
                                   jnp.zeros((2,), jnp.uint32), num_dims=48,
                                   continuous=True, split='test')
  expected = np.mean([3.0 * float(np.sum(im, dtype=np.float64)) + 0.5 for im in images])
  assert report['num_examples'] == 21 and report['split'] == 'test' and report['continuous']
  assert report['nats_per_image'] == pytest.approx(expected, rel=1e-6)
  assert report['bits_per_dim'] == pytest.approx(expected / (math.log(2) * 48), rel=1e-6)
  assert report['num_dims'] == 48
  assert report['kl_per_image'] == pytest.approx(1.0)
  assert 'scalar_ignored_per_image' not in report
  # num_batches limits the pass
  part = eval_lib.evaluate_split(eval_step, variables, iter(batches), mesh,
                                 jnp.zeros((2,), jnp.uint32), num_dims=48,
                                 continuous=True, num_batches=1)
  assert part['num_examples'] == 8


def test_eval_and_image_programs_use_the_platform_compile_options(monkeypatch):
  """The eval step, sampler and reconstructor are compiled with ``compile_options.for_platform``
  (checked by making it return an option XLA rejects)."""
  from nvae_jax import compile_options

  class _Task(_PixelSumTask):
    def sample(self, variables, rng, num, temperature):
      return jnp.zeros((num, 4, 4, 3)) + variables['params']['offset']

    def reconstruct(self, variables, batch, rng):
      return batch['image'] + variables['params']['offset']

  monkeypatch.setattr(compile_options, 'for_platform',
                      lambda platform, program='model': {'xla_no_such_option_for_this_test': True})
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  repl = step_lib.replicated(mesh)
  variables = {'params': {'offset': jnp.float32(0.5)}}
  batch = step_lib.put_batch({'image': np.zeros((8, 4, 4, 3), np.float32),
                              'mask': np.ones(8, np.float32)}, mesh)
  key = jnp.zeros((2,), jnp.uint32)
  for program, args in ((eval_lib.make_eval_step(_Task(), mesh, repl), (variables, batch, key)),
                        (sample_lib.make_sampler(_Task(), mesh, repl, 4, 1.0), (variables, key)),
                        (sample_lib.make_reconstructor(_Task(), mesh, repl),
                         (variables, jax.device_put(dict(batch), repl), key))):
    with pytest.raises(Exception, match='xla_no_such_option_for_this_test'):
      program.lower(*args).compile()


def test_likelihood_dims_of_each_family_and_bad_shapes():
  """D, the denominator of bits/dim: every pixel and channel, except NVAE's padded MNIST whose
  likelihood covers the central 28x28."""
  from nvae_jax.config import nvae as nvae_config  # pylint: disable=import-outside-toplevel
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import testing  # pylint: disable=import-outside-toplevel  # noqa: F401
  mnist = nvae_config.published_config('mnist', 'small')
  assert build_task(mnist).num_dims((32, 32, 1)) == 28 * 28
  assert build_task(nvae_config.published_config('cifar10', 'small')).num_dims((32, 32, 3)) == 3072
  tiny = ml_collections.ConfigDict(mnist.to_dict())
  tiny.model = ml_collections.ConfigDict(dict(name='tiny_test_vae'))
  assert build_task(tiny).num_dims((32, 32, 1)) == 1024
  info = eval_lib.likelihood_info(_PixelSumTask(), (4, 4, 3))
  assert info == {'continuous': True, 'num_dims': 48}
  with pytest.raises(ValueError, match=r'image_shape: expected \(H, W, C\), found \(32, 32\)'):
    eval_lib.likelihood_info(_PixelSumTask(), (32, 32))


def test_nvae_mnist_bits_per_dim_over_784_dims():
  """The padded-MNIST bug: 99.50 nats/image (README's small NVAE) was reported as
  99.50 / (1024 ln 2) = 0.1402 bits/dim; over the 784 dimensions the likelihood covers it is
  99.50 / (784 ln 2) = 0.1831."""
  from nvae_jax.config import nvae as nvae_config  # pylint: disable=import-outside-toplevel
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  nats = 99.50

  class _ConstantNLL(_PixelSumTask):
    def evaluate(self, variables, batch, rng):
      return {'nll': jnp.full(batch['image'].shape[:1], nats, jnp.float32)}

  eval_step = eval_lib.make_eval_step(_ConstantNLL(), mesh, step_lib.replicated(mesh))
  batch = {'image': np.zeros((8, 32, 32, 1), np.float32), 'mask': np.ones(8, np.float32)}
  task = build_task(nvae_config.published_config('mnist', 'small'))
  report = eval_lib.evaluate_split(eval_step, {}, iter([batch]), mesh, jnp.zeros((2,), jnp.uint32),
                                   num_dims=task.num_dims((32, 32, 1)), continuous=False)
  assert report['num_dims'] == 784
  assert report['bits_per_dim'] == pytest.approx(nats / (784 * math.log(2)), rel=1e-6)
  assert round(report['bits_per_dim'], 4) == 0.1831


def test_grid_layout_scale_and_quantisation():
  images = np.zeros((5, 2, 3, 1), np.float32)
  for i in range(5):
    images[i] = i / 4.0
  grid = sample_lib.make_grid(images, pad=1, scale=2)
  assert sample_lib.grid_layout(5) == (2, 3)
  assert grid.shape == (2 * 5 - 1, 3 * 7 - 1, 1) and grid.dtype == np.uint8
  for i in range(5):
    r, c = divmod(i, 3)
    tile = grid[r * 5:r * 5 + 4, c * 7:c * 7 + 6, 0]
    assert np.all(tile == round(255 * i / 4.0)), i
  assert np.all(grid[4, :, 0] == 255) and np.all(grid[5:, 14:, 0] == 255)  # gaps and empty tile
  assert sample_lib.display_scale(8) == 4 and sample_lib.display_scale(28) == 2
  assert sample_lib.display_scale(64) == 1
  with pytest.raises(ValueError, match=r'images: expected \[N, H, W, C\]'):
    sample_lib.make_grid(np.zeros((2, 4, 4, 2)))


def test_pair_rows_interleaves_originals_and_reconstructions():
  originals = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
  recons = originals + 10
  out = sample_lib.pair_rows(originals, recons, cols=3)
  np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 1, 2, 10, 11, 12, 3, 4, 1, 13, 14, 1])
