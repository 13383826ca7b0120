"""NVAE against the original implementation's outputs (shared/fixtures/nvae_reference).

Each fixture is replayed once: its weights converted from the original state_dict, its input
and reparameterisation noise, one jitted forward + gradient of nelbo_loss in train mode and four
eval-mode passes for the importance-weighted likelihood.  The test then checks every quantity of ``nvae_jax.convert.check_reference`` against its tolerance (1e-5 relative on the
forward quantities and BN statistics, 1e-4 on gradients; see that module for the metric and for
the few quantities that are zero in exact arithmetic).

Cost control (compilation dominates): XLA backend optimisation level 0 (about half the CPU
compile time of a full optimisation, same float32 semantics) and the lax depthwise conv, which
compiles about 30 % faster than the shift-and-add one at these sizes (its equivalence with the
CPU default shift-and-add conv, values and gradients, is tested in test_nvae_nn.py).
"""

import os

import jax
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


def test_importance_weighted_k1_is_negative_elbo(load):
  """With K = 1 the IW bound is the ELBO of that one sample.  With flows the KL is the one-sample
  estimate log q - log p, so the task's eval-mode nll = -(log p(x|z) + log p(z) - log q(z|x))
  equals its negative ELBO recon + sum_g KL_g, computed from kl_all, up to round-off."""
  fx = load('cifar_tiny_s0')
  variables = dict(fx.eval_variables, spectral=fx.variables['spectral'])
  rng = jax.random.key(3)
  evaluate = cr.jit_compile(lambda r: fx.task.evaluate(variables, {'image': fx.x}, r),
                            FAST_COMPILE, rng)
  metrics = evaluate(rng)
  assert metrics['nll'].shape == (fx.x.shape[0],)
  np.testing.assert_allclose(metrics['nll'], metrics['elbo'], rtol=1e-5)
  # A different key gives a different sample, hence a different value: the comparison is not
  # between two copies of one number.
  other = evaluate(jax.random.key(4))
  assert np.abs(np.asarray(other['nll']) - np.asarray(metrics['nll'])).max() > 1e-3
