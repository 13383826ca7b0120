"""Latent groups run as ``lax.scan`` (``model.scan_groups``) against the same groups one by one.

The unrolled network (every child module called in turn) is the independent computation: with
the same variables and the same rng, the scanned network must give the same outputs, gradients,
batch statistics and effective conv kernels, on the posterior walk (training) and on the prior
walk (sampling with BN re-estimation).  The convolution whose backward pass is written out for
loop bodies is checked against autodiff of ``lax.conv_general_dilated``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from nvae_jax.models import build_task
from nvae_jax.models.nvae import NVAE
from nvae_jax.models.nvae.plan import DecoderGroup, EncoderGroup, NVAEArch, group_runs
from nvae_jax.nn import conv as conv_lib
from nvae_jax.nn.conv import CONV_KERNELS
from test_nvae_sampling import tiny_config

SHAPE = (16, 16, 3)
BATCH = 4
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _config(scan: bool):
  c = tiny_config()
  c.model.num_groups_per_scale = 3  # runs of 2 (top scale) and 3 decoder groups
  c.model.num_nf = 1
  c.model.scan_groups = scan
  c.model.depthwise_impl = 'shift'  # what a loop body on CPU uses: the same sums on both sides
  return c


@pytest.fixture(scope='module')
def tasks():
  scanned, unrolled = build_task(_config(True)), build_task(_config(False))
  # The model's own initialisation (residual branches scaled by 0.1, unit BN statistics): random
  # unit-norm filters everywhere make activations of 1e2-1e9, where float32 rounding dominates.
  image = jax.ShapeDtypeStruct((BATCH,) + SHAPE, jnp.float32)
  variables = unrolled.init_host(0, {'image': image})
  variables = {c: variables[c] for c in ('params', 'batch_stats')}
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (BATCH,) + SHAPE) / 255., jnp.float32)
  return scanned, unrolled, variables, x


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def _count_scans(task, variables, x) -> int:
  model = task.model(SHAPE)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, False, rngs={'sample': jax.random.key(0)}))(
      variables)
  return sum(e.primitive.name == 'scan' for e in jaxpr.jaxpr.eqns)


def test_runs_of_two_or_more_groups_are_scanned(tasks):
  scanned, unrolled, variables, x = tasks
  # Encoder: 3 + 2 groups with a combiner; decoder: groups 1-2 and 3-5.
  assert _count_scans(scanned, variables, x) == 4
  assert _count_scans(unrolled, variables, x) == 0


def test_training_pass_equals_unrolled(tasks):
  scanned, unrolled, variables, x = tasks
  variables = dict(variables, spectral=None)

  def run(task):
    def loss(params):
      out, upd = task.forward(dict(variables, params=params), x, True, rng=jax.random.key(3),
                              mutable=('batch_stats', CONV_KERNELS))
      return jnp.mean(out['recon'] + jnp.sum(out['kl_all'], axis=1)), (out, upd)
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  grads_s, (out_s, upd_s) = run(scanned)
  grads_u, (out_u, upd_u) = run(unrolled)
  for k in ('net_out', 'recon', 'log_q', 'log_p', 'kl_all', 'kl_diag'):
    np.testing.assert_allclose(out_s[k], out_u[k], rtol=2e-5, atol=1e-5, err_msg=k)
  assert len(out_s['z']) == len(out_u['z']) == 6
  for zs, zu in zip(out_s['z'], out_u['z']):
    np.testing.assert_allclose(zs, zu, rtol=2e-5, atol=1e-5)
  _assert_trees_close(upd_s['batch_stats'], upd_u['batch_stats'])
  _assert_trees_close(upd_s[CONV_KERNELS], upd_u[CONV_KERNELS])
  # Every batch norm of the scanned groups was updated (the written-back statistics moved).
  before, after = _flat(variables['batch_stats']), _flat(upd_s['batch_stats'])
  assert all(not np.array_equal(before[k], after[k]) for k in before)
  # Gradients: to 1e-6 of the largest gradient entry overall (the biases of convs that feed a
  # batch norm have an exact gradient of 0 and show only round-off), and in every leaf whose
  # entries reach 1e-3 of that, to 1e-4 of the leaf's largest entry (the gradient tolerance of
  # the reference check against the original, tests/test_nvae_reference.py).
  fs, fu = _flat(grads_s), _flat(grads_u)
  assert sorted(fs) == sorted(fu)
  scale = max(np.max(np.abs(a)) for a in fu.values())
  assert max(np.max(np.abs(fs[k] - fu[k])) for k in fu) < 1e-6 * scale
  large = [k for k in fu if np.max(np.abs(fu[k])) > 1e-3 * scale]
  assert len(large) > len(fu) // 2
  worst = max(np.max(np.abs(fs[k] - fu[k])) / np.max(np.abs(fu[k])) for k in large)
  assert worst < 1e-4, worst


def test_prior_pass_and_eval_equal_unrolled(tasks):
  scanned, unrolled, variables, x = tasks

  def run(task):
    model = task.model(SHAPE)
    rngs = {'sample': jax.random.key(4)}

    def f(v):
      logits, upd = model.apply(v, BATCH, 0.7, True, rngs=rngs, method=NVAE.sample_logits,
                                mutable=['batch_stats'])
      out = model.apply(v, x, False, rngs=rngs)
      return logits, upd['batch_stats'], out['log_p'] - out['log_q'] - out['recon']
    return _jit(f, variables)

  for a, b in zip(run(scanned), run(unrolled)):
    _assert_trees_close({'x': a}, {'x': b}, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize('scales,groups,ada,cells', [(1, 4, False, 2), (3, 4, True, 1),
                                                     (2, 3, False, 0)])
def test_group_walks_visit_every_cell_once(scales, groups, ada, cells):
  arch = NVAEArch(image_shape=(32, 32, 3), output_channels=3, num_latent_scales=scales,
                  num_groups_per_scale=groups, ada_groups=ada, num_cell_per_cond_enc=cells,
                  num_cell_per_cond_dec=cells)
  plan = arch.plan()
  for walk, tower, cls in ((arch.encoder_walk(), 'enc_tower', EncoderGroup),
                           (arch.decoder_walk(), 'dec_tower', DecoderGroup)):
    order = []
    for item in walk:
      order += [item] if isinstance(item, int) else list(item.cells) + [item.combiner]
    assert order == list(range(len(plan[tower])))
    for item in walk:
      if isinstance(item, cls):
        assert [plan[tower][i][0] for i in item.cells] == [tower[:3] == 'enc' and 'normal_enc'
                                                           or 'normal_dec'] * len(item.cells)
  dec = arch.decoder_walk()
  assert [g.group for g in dec if isinstance(g, DecoderGroup)] == list(range(arch.num_groups))
  # Runs end at the resolution changes: one run per scale (the top scale without group 0).
  runs = [r for r in group_runs(dec[1:]) if isinstance(r, tuple)]
  top_first = arch.groups_per_scale[::-1]
  assert [len(r) for r in runs] == [n for n in (top_first[0] - 1,) + top_first[1:] if n > 0]
  enc_runs = [r for r in group_runs(arch.encoder_walk()) if isinstance(r, tuple)]
  assert [len(r) for r in enc_runs] == [n for n in (arch.groups_per_scale[:-1] +
                                                    (arch.groups_per_scale[-1] - 1,)) if n > 0]


@pytest.mark.parametrize('k,padding,dilation', [(3, 1, 1), (5, 2, 1), (3, 2, 2), (3, 0, 1)])
def test_loop_body_conv_gradients_equal_autodiff(k, padding, dilation):
  rng = np.random.default_rng(k + padding + dilation)
  x = jnp.asarray(rng.normal(size=(2, 2, 7, 9, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, k, k, 5, 4)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(2,) + jax.eval_shape(
      lambda: conv_lib.conv2d(x[0], w[0], padding=padding, dilation=dilation)).shape), jnp.float32)

  def looped(x, w):
    def body(c, xs):
      with conv_lib.loop_body_convs():
        y = conv_lib.conv2d(xs[0], xs[1], padding=padding, dilation=dilation)
      return c + jnp.sum(y * xs[2]), None
    return lax.scan(body, 0.0, (x, w, ct))[0]

  def reference(x, w):
    return sum(jnp.sum(lax.conv_general_dilated(
        x[i], w[i], (1, 1), [(padding, padding)] * 2, rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) * ct[i]) for i in range(2))

  with jax.default_matmul_precision('highest'):
    got = jax.jit(jax.grad(looped, argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(reference, argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # In the loop every convolution, forward and backward, is in the canonical form; autodiff
  # of the plain conv writes its kernel gradient in another.
  def conv_forms(fn):
    hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, w).as_text()
    return set(re.findall(r'dim_numbers = (\[[^]]*\]x\[[^]]*\]->\[[^]]*\])', hlo))
  assert conv_forms(looped) == {'[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]'}
  assert len(conv_forms(reference)) > 1


def test_convs_outside_loop_bodies_keep_forward_mode():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  jac = jax.jacfwd(lambda a: conv_lib.conv2d(a, w, padding=1))(x)
  assert jac.shape == (1, 4, 4, 2, 1, 4, 4, 2)
