"""Tests of the sigma-VAE conv VAE (nvae_jax.models.conv_vae) on tiny 16x16 inputs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from nvae_jax.config import base_config
from nvae_jax.models import build_task
from nvae_jax.models import conv_vae

B, H, W, C, L = 4, 16, 16, 1, 4


def _key(i):
  # rbg keys: XLA:CPU compiles threefry random bits several times slower (jit(init) 4x), and the
  # library does not depend on the key implementation.
  return jax.random.key(i, impl='rbg')


def _config(decoder, **model):
  c = base_config()
  c.model.name = 'conv_vae'
  c.model.decoder = decoder
  c.model.latent_dim = L
  c.model.channels = (4, 8, 8)
  c.model.num_mixture = 2
  for k, v in model.items():
    c.model[k] = v
  c.data.channels = C
  c.data.num_bits = 5 if decoder == 'categorical' else 8
  return c


def _batch(decoder):
  bits = 5 if decoder == 'categorical' else 8
  x = np.random.default_rng(0).integers(0, 2 ** bits, (B, H, W, C)) / (2 ** bits - 1)
  if decoder == 'bernoulli':
    x = np.round(x)
  return {'image': jnp.asarray(x, jnp.float32), 'label': jnp.zeros((B,), jnp.int32)}


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def optimal():
  """gaussian_optimal (the stateful decoder): task, batch, variables after init."""
  c = _config('gaussian_optimal')
  c.eval.num_importance_samples = 4
  c.eval.importance_chunk = 2
  task = build_task(c)
  batch = _batch('gaussian_optimal')
  return task, batch, jax.jit(task.init)(_key(0), batch), c


def test_optimal_sigma_task_loss_state_and_describe(optimal):
  task, batch, variables, _ = optimal
  assert task.mutable_collections == ('batch_stats',)
  assert set(variables) == {'params', 'batch_stats'}
  assert float(variables['batch_stats']['likelihood']['avg_weight']) == 0.0
  params = variables['params']
  assert params['head']['kernel'].shape == (H // 4 * W // 4 * 8, 2 * L)
  assert params['dec_in']['kernel'].shape == (L, H // 4 * W // 4 * 8)
  assert params['dec_2']['kernel'].shape[-1] == 1
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))

  def f(p, state):
    return task.loss({'params': p, **state}, batch, _key(1), jnp.int32(0))

  (loss, (metrics, new_state)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
      params, {'batch_stats': variables['batch_stats']})
  assert set(metrics) == {'loss', 'recon', 'kl', 'nelbo', 'sigma'}
  assert _finite((loss, metrics, grads)) and loss.shape == ()
  np.testing.assert_allclose(metrics['nelbo'], metrics['recon'] + metrics['kl'], rtol=1e-6)
  np.testing.assert_allclose(loss, metrics['recon'] + metrics['kl'], rtol=1e-6)  # beta = 1
  # The reported sigma is the optimal one for this batch (softclipped at -6), and the running
  # average of the MSE starts there.
  stats_ = new_state['batch_stats']['likelihood']
  mse = float(stats_['mse_avg'] / stats_['avg_weight'])
  np.testing.assert_allclose(float(metrics['sigma']),
                             math.exp(-6 + np.logaddexp(0, 0.5 * math.log(mse) + 6)), rtol=1e-5)
  assert task.describe() == {
      'inputs': (H, W, C), 'latents': [(L,)], 'outputs': (H, W, 1),
      'likelihood': {'name': 'gaussian_optimal', 'continuous': True}, 'beta': 1.0,
      'sample_output': 'mean'}


def test_evaluate_matches_an_independent_importance_weighted_bound(optimal):
  task, batch, variables, config = optimal
  out = jax.jit(task.evaluate)(variables, batch, _key(5))
  assert set(out) == {'nll', 'nelbo', 'recon', 'kl'}
  assert all(v.shape == (B,) and v.dtype == jnp.float32 for v in out.values())
  np.testing.assert_allclose(out['nelbo'], out['recon'] + out['kl'], rtol=1e-6)
  # Recompute the K = 4 bound from the same noise, one sample at a time, with scipy densities.
  _, rng_iw = jax.random.split(_key(5))
  eps = np.asarray(jax.random.normal(rng_iw, (2, 2, B, L))).reshape(4, B, L)
  module = task._module((H, W, C))  # pylint: disable=protected-access
  mu, log_sigma = (np.asarray(a, np.float64) for a in
                   module.apply(variables, batch['image'], method=conv_vae.ConvVAE.encode))

  @jax.jit
  def log_px_given(z):
    net = module.apply(variables, z, method=conv_vae.ConvVAE.decode)
    return module.apply(variables, net, batch['image'], False,
                        method=lambda m, n, x, t: m.likelihood.log_prob(n, x, t))

  log_w = []
  for e in eps:
    z = mu + np.exp(log_sigma) * e
    log_px = log_px_given(jnp.asarray(z, jnp.float32))
    log_w.append(np.asarray(log_px, np.float64) + stats.norm.logpdf(z).sum(-1)
                 - stats.norm.logpdf(z, mu, np.exp(log_sigma)).sum(-1))
  ref = -(special.logsumexp(np.stack(log_w), axis=0) - math.log(4))
  np.testing.assert_allclose(out['nll'], ref, rtol=1e-5)
  # The chunking does not change the bound.
  config.eval.importance_chunk = 4
  out4 = jax.jit(build_task(config).evaluate)(variables, batch, _key(5))
  np.testing.assert_allclose(out4['nll'], out['nll'], rtol=1e-6)


def test_sample_and_reconstruct(optimal):
  task, batch, variables, _ = optimal
  s = jax.jit(task.sample, static_argnums=(2, 3))(variables, _key(3), 3, 0.8)
  assert s.shape == (3, H, W, C) and s.dtype == jnp.float32
  assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
  r = jax.jit(task.reconstruct)(variables, batch, _key(3))
  assert r.shape == (B, H, W, C) and float(r.min()) >= 0.0 and float(r.max()) <= 1.0


@pytest.mark.parametrize('decoder', [
    'bernoulli', 'gaussian_fixed', 'gaussian_shared', 'gaussian_optimal_per_image',
    'gaussian_per_pixel', 'categorical', 'logistic_mixture', 'nvae_normal'])
def test_every_decoder_trains(decoder):
  """Loss and gradients of each decoder; init is checked by shape (compiling it is the costly
  part, and test_optimal_sigma_task_loss_state_and_describe runs it once)."""
  config = _config(decoder, beta=0.5)
  if decoder == 'logistic_mixture':  # one decoder also covers the bfloat16 compute path
    config.precision.compute_dtype = 'bfloat16'
  task = build_task(config)
  batch = _batch(decoder)
  shapes = jax.eval_shape(task.init, _key(0), batch)
  assert set(shapes) == {'params', *task.mutable_collections}
  k = task.likelihood.num_channels(C)
  assert shapes['params']['dec_2']['kernel'].shape[-1] == k
  rng = np.random.default_rng(0)
  # Random weights of the usual 1/sqrt(fan-in) scale (numpy: no compiled random init).
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(max(np.prod(s.shape[:-1]), 1)),
                            s.dtype), shapes.pop('params'))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def f(p):
    return task.loss({'params': p, **variables}, batch, _key(1), jnp.int32(0))

  (loss, (metrics, new_state)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  assert _finite((loss, metrics, grads))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((loss, metrics, grads)))
  np.testing.assert_allclose(loss, metrics['recon'] + 0.5 * metrics['kl'], rtol=1e-6)
  assert set(new_state) == set(task.mutable_collections)
  assert ('sigma' in metrics) == decoder.startswith(('gaussian', 'nvae'))
  if decoder == 'gaussian_shared':
    assert float(jnp.abs(grads['likelihood']['log_sigma'])) > 0


def test_config_errors():
  with pytest.raises(ValueError, match='model.decoder'):
    build_task(_config('gaussian'))
  with pytest.raises(ValueError, match='model.latent_sizes'):
    build_task(_config('bernoulli', latent_sizes=3))
  c = _config('bernoulli')
  c.eval.num_importance_samples = 6
  c.eval.importance_chunk = 4
  with pytest.raises(ValueError, match='eval.importance_chunk'):
    build_task(c)
  task = build_task(_config('gaussian_fixed'))
  with pytest.raises(ValueError, match='divisible by 4'):
    jax.eval_shape(task.init, _key(0), {'image': jnp.zeros((1, 18, 16, 1))})


def test_subpixel_upsampling_equals_the_transposed_convolution():
  """Upsample2x (3x3 conv + depth-to-space) against lax.conv_transpose with the same weights,
  values and gradients, on odd sizes; and its parameters are those of nn.ConvTranspose."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 3)), jnp.float32)
  up = conv_vae.Upsample2x(4)
  variables = up.init(_key(0), x)
  ct_shapes = jax.eval_shape(
      lambda: nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding='SAME').init(
          _key(0), x))
  assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, ct_shapes)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 3, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  params = {'params': {'kernel': kernel, 'bias': bias}}

  def ours(k, b, x):
    return up.apply({'params': {'kernel': k, 'bias': b}}, x)

  def transposed(k, b, x):
    return jax.lax.conv_transpose(x, k, (2, 2), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b

  y = up.apply(params, x)
  assert y.shape == (2, 10, 6, 4)
  np.testing.assert_allclose(y, transposed(kernel, bias, x), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(kernel, bias, x)
  g_ref = jax.grad(lambda *a: jnp.sum(transposed(*a) * cot), argnums=(0, 1, 2))(kernel, bias, x)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match='4, 4, in, out'):
    conv_vae.subpixel_kernel(jnp.zeros((3, 3, 1, 1)))


def test_subpixel_and_transpose_decoders_are_the_same_model(optimal):
  """The whole ConvVAE with either up-sampling: same parameter tree, same decoder output."""
  task, _, variables, _ = optimal
  fast = task._module((H, W, C))  # pylint: disable=protected-access
  slow = fast.clone(upsample='transpose')
  z = jnp.asarray(np.random.default_rng(1).normal(size=(3, L)), jnp.float32)
  shapes = jax.eval_shape(lambda: slow.init(_key(0), jnp.zeros((1, H, W, C)), jnp.zeros((1, L)), True))
  assert (jax.tree.map(lambda a: a.shape, shapes['params'])
          == jax.tree.map(lambda a: a.shape, variables['params']))
  out_fast = fast.apply(variables, z, method=conv_vae.ConvVAE.decode)
  out_slow = slow.apply(variables, z, method=conv_vae.ConvVAE.decode)
  np.testing.assert_allclose(out_fast, out_slow, rtol=1e-5, atol=1e-5)


def test_optimal_sigma_stop_gradient_leaves_the_gradient_unchanged():
  """sigma^2 = MSE maximises the Gaussian likelihood, so d loss / d sigma = 0 there (envelope
  theorem): stopping the gradient through sigma changes nothing unless softclip moves sigma."""
  batch = _batch('gaussian_optimal')
  grads = []
  for stop in (False, True):
    task = build_task(_config('gaussian_optimal', sigma_stop_gradient=stop, log_sigma_min=None))
    shapes = jax.eval_shape(task.init, _key(0), batch)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(max(np.prod(s.shape[:-1]), 1)),
                              s.dtype), shapes['params'])
    state = {'batch_stats': jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                         shapes['batch_stats'])}
    grads.append(jax.jit(jax.grad(
        lambda p, t=task, s=state: t.loss({'params': p, **s}, batch, _key(1), jnp.int32(0))[0]))(
            params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize('relu', [False, True])
def test_decoder_input_relu_option(optimal, relu):
  """model.dec_in_relu: the decoder equals dense -> [ReLU] -> reshape -> up-sampling layers,
  recomputed here layer by layer from the same parameters (the reference code has no ReLU)."""
  task, _, variables, c = optimal
  c2 = _config('gaussian_optimal', dec_in_relu=relu)
  module = build_task(c2)._module((H, W, C))  # pylint: disable=protected-access
  assert module.dec_in_relu is relu
  z = jax.random.normal(_key(3), (3, L))
  out = module.apply(variables, z, method=conv_vae.ConvVAE.decode)
  p = variables['params']
  h = z @ p['dec_in']['kernel'] + p['dec_in']['bias']
  assert bool(jnp.any(h < 0)) and bool(jnp.any(h > 0))  # the ReLU makes a difference here
  h = jax.nn.relu(h) if relu else h
  h = h.reshape((3, H // 4, W // 4, 8))
  layers = [conv_vae.Upsample2x(8, name='dec_0'), conv_vae.Upsample2x(4, name='dec_1'),
            nn.ConvTranspose(module.likelihood.num_channels(C), (3, 3), padding='SAME')]
  for i, layer in enumerate(layers):
    h = layer.apply({'params': p[f'dec_{i}']}, h)
    h = jax.nn.relu(h) if i < 2 else h
  np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)
  # The sigma-VAE configs follow the reference code; configs without the field keep the ReLU.
  assert build_task(c).dec_in_relu is True and c2.model.dec_in_relu is relu
  from nvae_jax.config.conv_vae import model_config  # pylint: disable=import-outside-toplevel
  assert model_config().dec_in_relu is False
