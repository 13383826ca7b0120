"""NVAE sampling extras: BN re-estimation, its cache, temperatures, encoding, reconstruction.

The re-estimated statistics are checked against the batch-norm inputs recorded (by a flax
method interceptor) during the same train-mode prior passes, reduced with numpy: mean over
(N, H, W) and the unbiased variance.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nvae_jax.config import nvae as nvae_base
from nvae_jax.models.nvae import sampling as ns
from nvae_jax.models import build_task
from nvae_jax.models.nvae import NVAE
from nvae_jax.nn.norm import BatchNorm

T = 0.7
BATCH = 4


def tiny_config(compute_dtype='float32'):
  c = nvae_base.get_config()
  m = c.model
  m.num_channels_enc = m.num_channels_dec = 8
  m.num_preprocess_blocks, m.num_preprocess_cells = 1, 1
  m.num_postprocess_blocks, m.num_postprocess_cells = 1, 1
  m.num_latent_scales, m.num_groups_per_scale = 2, 2
  m.num_cell_per_cond_enc = m.num_cell_per_cond_dec = 1
  m.num_mixture_dec = 2
  c.data.name, c.data.channels = 'cifar10', 3
  c.train.num_steps = 100
  c.eval.num_importance_samples = c.eval.importance_chunk = 1
  c.precision.compute_dtype = compute_dtype
  c.model.depthwise_impl = 'lax'
  return c


def random_variables(task, shape, seed=0):
  """Params and BN statistics drawn with numpy on the task's abstract init (no compilation).

  Kernels ~ N(0, 1/fan_in) with log weight norm 0 (unit-norm filters, as at init), BN scale 1 and
  bias 0, other biases N(0, 0.1^2), ``prior_ftr0`` ~ U[0, 1); training statistics are perturbed
  away from their init values (mean 0, var 1) so that "unchanged" is visible.
  """
  abstract = jax.eval_shape(task.init, jax.random.key(0),
                            {'image': jax.ShapeDtypeStruct((2,) + shape, jnp.float32)})
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(np.float32)
    if name == 'log_weight_norm':
      return np.zeros(leaf.shape, np.float32)
    if name == 'scale':
      return np.ones(leaf.shape, np.float32)
    if name == 'prior_ftr0':
      return rng.uniform(0, 1, leaf.shape).astype(np.float32)
    if name == 'mean':
      return rng.normal(0, 0.3, leaf.shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  return {c: jax.tree_util.tree_map_with_path(draw, abstract[c])
          for c in ('params', 'batch_stats')}


@pytest.fixture(scope='module')
def setup():
  task = build_task(tiny_config())
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (BATCH, 16, 16, 3)) / 255.,
                  jnp.float32)
  return task, random_variables(task, (16, 16, 3)), x


@pytest.fixture(scope='module')
def sample_fn(setup):
  task, v, _ = setup
  return ns.make_sample_fn(task, v, 4)


@pytest.fixture(scope='module')
def encoder(setup):
  task, v, _ = setup
  return ns.make_encoder(task, v, BATCH)


def _record_bn_inputs(task, v, rngs):
  """Per pass: {bn module path: (mean over NHW, unbiased var)} of the BN inputs, by numpy."""
  model = ns.float32_model(task, v)

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == '__call__':
      context.module.sow('intermediates', 'bn_input', args[0])
    return next_fun(*args, **kwargs)

  @jax.jit
  def run(rng):
    with nn.intercept_methods(interceptor):
      _, upd = model.apply(v, BATCH, T, True, rngs={'sample': rng}, method=NVAE.sample_logits,
                           mutable=['batch_stats', 'intermediates'])
    return upd['intermediates']

  out = []
  for r in rngs:
    flat = traverse_util.flatten_dict(jax.device_get(run(r)))
    rec = {}
    for path, (xin,) in flat.items():
      a = np.asarray(xin, np.float64).reshape(-1, xin.shape[-1])
      rec[path[:-1]] = (a.mean(0), a.var(0, ddof=1))
    out.append(rec)
  return out


@pytest.fixture(scope='module')
def recorded(setup):
  task, v, _ = setup
  rng = jax.random.key(5)
  return _record_bn_inputs(task, v, [jax.random.fold_in(rng, i) for i in range(3)])


def _flat(tree):
  return {k: np.asarray(a) for k, a in traverse_util.flatten_dict(tree).items()}


def test_reestimate_equals_batch_statistics(setup, recorded):
  task, v, _ = setup
  rng = jax.random.key(5)
  train = _flat(v['batch_stats'])
  # momentum None: the plain mean over passes of (mean, unbiased var).
  stats, info = ns.reestimate_bn(task, v, rng, T, steps=3, batch=BATCH, momentum=None)
  got = _flat(stats)
  assert info['bn_momentum'] == pytest.approx(0.05, abs=1e-6)
  assert info['skipped'] == 0
  assert info['touched'] == 2 * len(recorded[0]) > 0
  for module in recorded[0]:
    mean = np.mean([r[module][0] for r in recorded], axis=0)
    var = np.mean([r[module][1] for r in recorded], axis=0)
    np.testing.assert_allclose(got[module + ('mean',)], mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got[module + ('var',)], var, rtol=2e-4, atol=2e-5)
  # Layers off the prior path (encoder side) keep their training statistics exactly.
  off_path = [k for k in train if k[:-1] not in recorded[0]]
  assert off_path and any(k[0].startswith('enc_tower') for k in off_path)
  for k in off_path:
    np.testing.assert_array_equal(got[k], train[k])

  # EMA from the training statistics: s2 = 0.9 (0.9 s0 + 0.1 b0) + 0.1 b1.
  stats, _ = ns.reestimate_bn(task, v, rng, T, steps=2, batch=BATCH, momentum=0.1)
  got = _flat(stats)
  for module in recorded[0]:
    for j, leaf in enumerate(('mean', 'var')):
      s0 = train[module + (leaf,)].astype(np.float64)
      want = 0.9 * (0.9 * s0 + 0.1 * recorded[0][module][j]) + 0.1 * recorded[1][module][j]
      np.testing.assert_allclose(got[module + (leaf,)], want, rtol=2e-4, atol=2e-5)


def test_samples_after_reestimation_are_finite_in_unit_interval(setup, sample_fn):
  task, v, _ = setup
  stats, _ = ns.reestimate_bn(task, v, jax.random.key(2), T, steps=4, batch=BATCH)
  v2 = dict(v, batch_stats=stats)
  for output in ('sample', 'mean'):
    sampler = ns.make_temperature_sampler(task, v2, 4, temperature=T, output=output, sample_fn=sample_fn)
    x = np.asarray(sampler(v2, jax.random.key(3)))
    assert x.shape == (4, 16, 16, 3)
    assert np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0


def test_temperatures(setup, sample_fn):
  task, v, _ = setup
  k1, k2 = jax.random.key(10), jax.random.key(11)
  make = lambda **kw: ns.make_temperature_sampler(task, v, 4, sample_fn=sample_fn, **kw)  # noqa: E731
  # Latent t = 0 and the output mean: z is the prior mean path, the same for every rng.
  det = make(temperature=0.0, output='mean')
  np.testing.assert_allclose(det(v, k1), det(v, k2), atol=1e-6)
  # Latent t > 0: different latents, different means.
  hot = make(temperature=1.0, output='mean')
  assert np.max(np.abs(np.asarray(hot(v, k1)) - np.asarray(hot(v, k2)))) > 1e-3
  # Latent t = 0, output t_x = 0: the mixture mode without noise, also deterministic.
  s0 = make(temperature=0.0, output_temperature=0.0, output='sample')
  base = np.asarray(s0(v, k1))
  np.testing.assert_array_equal(base, np.asarray(s0(v, k2)))
  # The pixel noise grows with t_x (it multiplies the logistic scale; dividing would shrink it).
  spread = []
  for tx in (0.3, 1.0):
    s = make(temperature=0.0, output_temperature=tx, output='sample')
    spread.append(np.mean(np.abs(np.asarray(s(v, k1)) - base)))
  assert 0 < spread[0] < spread[1]
  with pytest.raises(ValueError, match='output_temperature'):
    ns.make_temperature_sampler(task, v, 4, output_temperature=-1.0)
  with pytest.raises(ValueError, match='output'):
    ns.make_temperature_sampler(task, v, 4, output='median')


def test_cache_reuse_and_invalidation(setup, tmp_path):
  task, v, _ = setup
  d = str(tmp_path)
  s1, i1 = ns.cached_bn_stats(task, v, jax.random.key(4), T, d, steps=2, batch=BATCH)
  assert not i1['cached'] and os.path.basename(i1['path']) == 'bn_t0.7.npz'
  s2, i2 = ns.cached_bn_stats(task, v, jax.random.key(99), T, d, steps=2, batch=BATCH)
  assert i2['cached']  # a different rng does not matter: the file is reused as is
  jax.tree.map(np.testing.assert_array_equal, s1, s2)
  # Other settings or other parameters: recomputed.
  _, i3 = ns.cached_bn_stats(task, v, jax.random.key(4), T, d, steps=3, batch=BATCH)
  assert not i3['cached']
  p = jax.tree.map(lambda a: a * 1.01, v['params'])
  _, i4 = ns.cached_bn_stats(task, dict(v, params=p), jax.random.key(4), T, d, steps=3,
                             batch=BATCH)
  assert not i4['cached']
  _, i5 = ns.cached_bn_stats(task, v, jax.random.key(4), 1.0, d, steps=2, batch=BATCH)
  assert os.path.basename(i5['path']) == 'bn_t1.npz'


def test_reestimation_runs_in_float32():
  task = build_task(tiny_config('bfloat16'))
  v = jax.eval_shape(task.init, jax.random.key(0),
                     {'image': jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)})
  assert task.model((16, 16, 3)).dtype == jnp.bfloat16
  assert ns.float32_model(task, v).dtype == jnp.float32


def test_encode_and_reconstruct(setup, encoder):
  task, v, x = setup
  z = ns.encode(task, v, x, encoder=encoder)
  shapes = task.arch((16, 16, 3)).latent_shapes()
  assert [tuple(a.shape) for a in z] == [(BATCH,) + s for s in shapes]
  z_again = ns.encode(task, v, x, encoder=encoder)
  jax.tree.map(np.testing.assert_array_equal, z, z_again)
  # The top group has no flows here: z_0 ~ N(mu_0, sigma_0^2) given x alone, so the mean of
  # posterior samples approaches the encoded mean (eval-mode BN, so draws are independent).
  k = 64
  draws = np.stack([np.asarray(ns.encode(task, v, x, rng=jax.random.key(100 + i),
                                         encoder=encoder)[0]) for i in range(k)])
  sem = draws.std(0) / np.sqrt(k)
  assert np.all(np.abs(draws.mean(0) - np.asarray(z[0])) < 5 * sem + 1e-6)
  r = np.asarray(ns.encode_decode(task, v, x, encoder=encoder))
  assert r.shape == x.shape and r.min() >= 0 and r.max() <= 1
  r_noisy = np.asarray(ns.encode_decode(task, v, x, rng=jax.random.key(8), encoder=encoder))
  assert np.any(r_noisy != r)


def test_bad_arguments(setup):
  task, v, _ = setup
  with pytest.raises(ValueError, match='steps'):
    ns.reestimate_bn(task, v, jax.random.key(0), T, steps=0)
  with pytest.raises(ValueError, match='momentum'):
    ns.reestimate_bn(task, v, jax.random.key(0), T, steps=1, momentum=1.5)
  with pytest.raises(ValueError, match='batch'):
    ns.reestimate_bn(task, v, jax.random.key(0), T, steps=1, batch=1)
  with pytest.raises(ValueError, match='temperature'):
    ns.reestimate_bn(task, v, jax.random.key(0), float('nan'), steps=1)


def test_prepare_sampling_hook_uses_the_cache(setup, tmp_path):
  """``--mode=sample`` calls ``task.prepare_sampling``: re-estimated decoder BN stats, cached."""
  task, v, _ = setup
  d = str(tmp_path)
  steps, batch = task.config.sample.readjust_bn_steps, task.config.sample.readjust_bn_batch
  task.config.sample.readjust_bn_steps, task.config.sample.readjust_bn_batch = 2, BATCH
  try:
    prepared = task.prepare_sampling(v, jax.random.key(4), T, d)
    expected, info = ns.cached_bn_stats(task, v, jax.random.key(4), T, d, steps=2, batch=BATCH)
    assert info['cached']  # written by the hook, with the same settings
    jax.tree.map(np.testing.assert_array_equal, prepared['batch_stats'], expected)
    assert prepared['params'] is v['params']
    task.config.sample.readjust_bn_steps = 0
    assert task.prepare_sampling(v, jax.random.key(4), T, d) is v  # 0 steps: training stats
  finally:
    task.config.sample.readjust_bn_steps, task.config.sample.readjust_bn_batch = steps, batch


def test_task_sample_follows_the_config_sample_options(setup, sample_fn):
  """``--mode=sample`` goes through ``task.sample``: its output temperature and mode come from
  ``config.sample.output_temperature`` / ``output_mode`` (the options of the removed sampling
  command line), matching the stand-alone temperature sampler draw for draw."""
  _, v, _ = setup
  rng = jax.random.key(21)
  for mode, tx in (('sample', 0.3), ('mean', 1.0)):
    c = tiny_config()
    c.sample.output_mode, c.sample.output_temperature = mode, tx
    task = build_task(c)
    got = np.asarray(jax.jit(lambda v, r: task.sample(v, r, 4, T))(v, rng))  # noqa: B023
    want = np.asarray(ns.make_temperature_sampler(task, v, 4, temperature=T, output_temperature=tx,
                                                  output=mode, sample_fn=sample_fn)(v, rng))
    np.testing.assert_allclose(np.clip(got, 0, 1), want, atol=1e-5)
  c = tiny_config()
  c.sample.output_mode = 'median'
  with pytest.raises(ValueError, match='sample.output_mode'):
    build_task(c)


def test_prepare_sampling_momentum_from_the_config(setup, tmp_path):
  """``sample.readjust_bn_momentum = 0`` is the plain average of the passes (momentum None)."""
  _, v, _ = setup
  c = tiny_config()
  c.sample.readjust_bn_steps, c.sample.readjust_bn_batch = 2, BATCH
  c.sample.readjust_bn_momentum = 0.0
  task = build_task(c)
  prepared = task.prepare_sampling(v, jax.random.key(4), T, str(tmp_path / 'a'))
  expected, _ = ns.reestimate_bn(task, v, jax.random.key(4), T, steps=2, batch=BATCH,
                                 momentum=None)
  jax.tree.map(np.testing.assert_array_equal, prepared['batch_stats'], expected)
