"""NVAE against the original implementation's outputs (shared/fixtures/nvae_reference).

Each fixture is replayed once: its weights converted from the original state_dict, its input
and reparameterisation noise, one jitted forward + gradient of nelbo_loss in train mode and four
eval-mode passes for the importance-weighted likelihood.  The test then checks every quantity of
``nvae_jax.convert.check_reference`` against its tolerance (1e-5 relative on the forward
quantities and BN statistics, 1e-4 on gradients; see that module for the metric and for the few
quantities that are zero in exact arithmetic).  The task's own entry points (loss, evaluate,
sample, describe, bfloat16 with remat) run on the cifar_tiny_s0 weights.

Cost control (compilation dominates): XLA backend optimisation level 0 (about half the CPU
compile time of a full optimisation, same float32 semantics) and the lax depthwise conv, which
compiles about 30 % faster than the shift-and-add one at these sizes (its equivalence with the
CPU default shift-and-add conv, values and gradients, is tested in test_nvae_nn.py).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED
from nvae_jax.convert import check_reference as cr

FIXTURES_DIR = os.path.join(SHARED, 'fixtures', 'nvae_reference')
NAMES = ('cifar_tiny_s0', 'cifar_tiny_nonf_gauss_s0', 'mnist_tiny_s0')
FAST_COMPILE = {'xla_backend_optimization_level': 0}
FORWARD = ('logits', 'log_q', 'log_p', 'kl_all', 'kl_diag', 'recon', 'balanced_kl', 'kl_coeffs',
           'alpha_i', 'kl_coeff', 'nelbo_loss', 'norm_loss', 'norm_loss_exact', 'bn_loss',
           'wdn_coeff', 'total_loss', 'iw_log_px')


def _folder(name):
  folder = os.path.join(FIXTURES_DIR, name)
  if not os.path.isdir(folder):
    pytest.skip(f'reference fixture {folder} not available')
  return folder


def _one_sample(config):
  config.eval.num_importance_samples = 1
  config.eval.importance_chunk = 1


@pytest.fixture(scope='module')
def load():
  """Loads (and converts) each fixture once per test process."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = cr.load_fixture(_folder(name), 'lax', config_overrides=_one_sample)
    return cache[name]

  return get


@pytest.mark.parametrize('name', NAMES)
def test_reference_fixture(load, name):
  """Every quantity of one fixture (one test per fixture, so that pytest-xdist never replays a
  fixture twice in two workers)."""
  fx = load(name)
  recs, ok = cr.evaluate_records(cr.run_check(fx, compiler_options=FAST_COMPILE),
                                 tolerance=1e-5, grad_tolerance=1e-4)
  forward = [r['name'] for r in recs if r['kind'] == 'forward']
  assert sorted(forward) == sorted(FORWARD)
  # Running mean and variance of the 58 BN layers of every fixture.
  assert sum(r['kind'] == 'bn_stats' for r in recs) == 2 * 58
  n_params = len(np.load(os.path.join(FIXTURES_DIR, name, 'grads.npz')).files)
  assert sum(r['kind'] == 'grad' for r in recs) == n_params
  failures = [f'{r["name"]}: {r["err"]:.3e} > {r["tol"]:.0e}' for r in recs if not r['ok']]
  assert ok and not failures, failures


def test_task_api_on_fixture(load):
  """The ModelTask entry points on the cifar_tiny_s0 model (weights of the fixture): loss and its
  metrics, the state it returns, evaluate, sample and describe, compiled as one program; then
  the forward pass in bfloat16 with remat'ed cells against the original's float32 numbers.
  (reconstruct and sampling temperatures are covered by test_nvae_sampling.py.)

  evaluate runs with K = 1 importance sample: the IW bound is then the ELBO of that one sample,
  and with flows the KL is the one-sample estimate log q - log p, so nll = -(log p(x|z) + log p(z)
  - log q(z|x)) must equal the negative ELBO recon + sum_g KL_g (from kl_all) up to round-off.
  """
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel
  fx = load('cifar_tiny_s0')
  task, batch = fx.task, {'image': fx.x}
  # A fresh spectral state (no update yet: 40 iterations) from the fixture's vectors.
  variables = dict(fx.variables, spectral=dict(fx.variables['spectral'], calls=jnp.int32(0)))
  eval_variables = dict(fx.eval_variables, spectral=variables['spectral'])
  step = jnp.asarray(cr.GLOBAL_STEP, jnp.int32)

  def run(rng):
    return (task.loss(variables, batch, rng, step), task.evaluate(eval_variables, batch, rng),
            task.sample(variables, rng, 3, 0.8))

  rng = jax.random.key(3)
  (loss, (metrics, state)), ev, samples = cr.jit_compile(run, FAST_COMPILE, rng)(rng)
  io = fx.io
  assert np.isfinite(float(loss))
  for key in ('loss', 'recon', 'kl', 'balanced_kl', 'kl_coeff', 'norm_loss', 'bn_loss', 'nelbo',
              'wdn_coeff') + tuple(f'kl_group_{d}' for d in range(4)):
    assert key in metrics, key
  np.testing.assert_allclose(metrics['kl_coeff'], io['kl_coeff'], rtol=1e-6)
  np.testing.assert_allclose(metrics['wdn_coeff'], io['wdn_coeff'], rtol=1e-6)
  np.testing.assert_allclose(metrics['bn_loss'], io['bn_loss'])
  np.testing.assert_allclose(metrics['loss'], metrics['recon'] + metrics['balanced_kl']
                             + metrics['wdn_coeff'] * (metrics['norm_loss'] + metrics['bn_loss']),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['nelbo'], metrics['recon'] + metrics['kl'], rtol=1e-5)
  np.testing.assert_allclose(sum(metrics[f'kl_group_{d}'] for d in range(4)), metrics['kl'],
                             rtol=1e-5)
  # 40 more power iterations from the fixture's vectors: between the fixture's estimate and the
  # exact sum of top singular values.
  assert float(io['norm_loss']) - 1e-3 <= float(metrics['norm_loss'])
  assert float(metrics['norm_loss']) <= float(io['norm_loss_exact']) + 1e-3
  assert int(state['spectral']['calls']) == 1
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  # The returned BN statistics are the train-mode update (the fixture's, up to the noise).
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(state['batch_stats']), jax.tree.leaves(variables['batch_stats']))]
  assert min(moved) > 0
  # K = 1 with flows: -log w = recon + log q - log p = recon + sum_g KL_g (same sample).
  assert ev['nll'].shape == (fx.x.shape[0],)
  np.testing.assert_allclose(ev['nll'], ev['nelbo'], rtol=1e-5)
  assert samples.shape == (3, 32, 32, 3)
  assert float(samples.min()) >= 0 and float(samples.max()) <= 1
  d = task.describe()
  assert d['inputs'] == (32, 32, 3) and d['outputs'] == (32, 32, 100)
  assert d['latents'] == [(8, 8, 20)] * 2 + [(16, 16, 20)] * 2
  assert d['likelihood'] == {'name': 'logistic_mixture', 'continuous': False}

  config16 = task.config.copy_and_resolve_references()
  config16.precision.compute_dtype = 'bfloat16'
  config16.remat.policy = 'nothing_saveable'
  task16 = build_task(config16)
  fn = lambda: task16.forward(variables, fx.x, True, eps=fx.eps)[0]  # noqa: E731
  out16 = cr.jit_compile(fn, FAST_COMPILE)()
  assert out16['net_out'].dtype == jnp.float32 and out16['kl_all'].dtype == jnp.float32
  np.testing.assert_allclose(out16['recon'], io['recon'], rtol=2e-2)
  np.testing.assert_allclose(np.asarray(out16['kl_all']).sum(1), io['kl_all'].sum(1), rtol=5e-2)
