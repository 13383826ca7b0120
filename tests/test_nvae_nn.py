"""NVAE building blocks against independent computations (numpy formulas, dense Jacobians, SVD)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvae_jax import nn as nvnn
from nvae_jax import objectives
from nvae_jax.distributions.latent_normal import LatentNormal, top_prior


def _np_conv(x, w, stride, pad, groups=1):
  """Direct NHWC/HWIO convolution with symmetric padding, by explicit loops over taps."""
  b, h, wd, cin = x.shape
  kh, kw, cig, cout = w.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((b, ho, wo, cout))
  cog = cout // groups
  for o in range(cout):
    g = o // cog
    for i, j in itertools.product(range(kh), range(kw)):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride,
                 g * cig:(g + 1) * cig]
      out[..., o] += patch @ w[i, j, :, o]
  return out


@pytest.mark.parametrize('stride,padding,dilation', [(1, 2, 1), (2, 2, 1), (1, 4, 2), (1, 0, 1),
                                                     (1, 3, 2)])
def test_depthwise_shift_equals_lax(stride, padding, dilation):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 9, 8, 6))
  k = jax.random.normal(kk, (5, 5, 1, 6))
  ct = None

  def f(impl):
    def g(x, k):
      return nvnn.depthwise_conv(x, k, stride=stride, padding=padding, dilation=dilation,
                                 impl=impl)
    return jax.jit(g)

  y_lax = f('lax')(x, k)
  y_shift = f('shift')(x, k)
  np.testing.assert_allclose(y_shift, y_lax, rtol=1e-5, atol=1e-5)
  # Also against the explicit loop (dilation 1).
  if dilation == 1:
    np.testing.assert_allclose(y_lax, _np_conv(np.asarray(x, np.float64), np.asarray(k), stride,
                                               padding, groups=6), rtol=1e-4, atol=1e-4)
  ct = jax.random.normal(kg, y_lax.shape)
  grads = {impl: jax.jit(jax.grad(lambda *a: jnp.sum(f(impl)(*a) * ct), argnums=(0, 1)))(x, k)
           for impl in ('lax', 'shift')}
  for g_shift, g_lax in zip(grads['shift'], grads['lax']):
    np.testing.assert_allclose(g_shift, g_lax, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('values_per_iteration', [1, 2 * 9 * 8 * 6, 10**6])
def test_depthwise_kernel_grad_in_image_chunks(values_per_iteration):
  """dW is the same whether the loop takes one image, two, or the whole batch per iteration."""
  from nvae_jax.nn import conv
  kx, kg = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (6, 9, 8, 6))
  g = jax.random.normal(kg, (6, 9, 8, 6))
  k = jnp.zeros((5, 5, 1, 6))
  want = jax.grad(lambda k: jnp.sum(nvnn.depthwise_conv(x, k, padding=2, impl='lax') * g))(k)
  xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  got = conv._depthwise_kernel_grad(xp, g, 5, 1, values_per_iteration)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert conv._images_per_iteration(6, 9 * 8 * 6, values_per_iteration) == {
      1: 1, 2 * 9 * 8 * 6: 2, 10**6: 6}[values_per_iteration]


def test_depthwise_rejects_bad_kernel_and_impl():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match='kernel must be'):
    nvnn.depthwise_conv(x, jnp.zeros((3, 3, 1, 4)))
  with pytest.raises(ValueError, match='depthwise_impl'):
    nvnn.depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), impl='fft')


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv2d_is_the_conv_with_its_gradients(stride):
  """A 1x1 conv2d (computed as a matmul over channels) equals the explicit loop and lax's conv.

  The input has an odd height, so stride 2 keeps rows 0, 2, 4 as PyTorch does.
  """
  kx, kk, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 5, 4, 6))
  k = jax.random.normal(kk, (1, 1, 6, 7))
  y = nvnn.conv2d(x, k, stride=stride)
  np.testing.assert_allclose(y, _np_conv(np.asarray(x, np.float64), np.asarray(k), stride, 0),
                             rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(kg, y.shape)

  def lax_conv(x, k, stride):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), [(0, 0)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k, stride=stride) * ct), argnums=(0, 1))(x, k)
           for f in (nvnn.conv2d, lax_conv)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weight_norm_conv_formula_and_init():
  """W~ = exp(g) W / (||W|| + 1e-5), g_0 = log(||W_0|| + 0.01); stride 2 with symmetric pad 1."""
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), np.float64)
  conv = nvnn.Conv2D(5, 3, stride=2, padding=1, use_bias=True)
  v = conv.init(jax.random.key(2), jnp.asarray(x, jnp.float32))
  p = jax.tree.map(np.asarray, v['params'])
  w = p['kernel'].astype(np.float64)
  norm = np.sqrt((w ** 2).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(p['log_weight_norm'], np.log(norm + 0.01), rtol=1e-6)
  # A different g than the init, so that the formula is exercised.
  g = p['log_weight_norm'] + np.linspace(-0.5, 0.5, 5)
  p['log_weight_norm'] = g.astype(np.float32)
  w_eff = np.exp(g) * w / (norm + 1e-5)
  y = conv.apply({'params': p}, jnp.asarray(x, jnp.float32))
  ref = _np_conv(x, w_eff, 2, 1) + p['bias']
  assert y.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # The init draws PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  assert np.abs(w).max() <= 1 / np.sqrt(27)
  # The effective kernel is recorded for the spectral regulariser.
  _, st = conv.apply({'params': p}, jnp.asarray(x, jnp.float32), mutable=[nvnn.CONV_KERNELS])
  np.testing.assert_allclose(st[nvnn.CONV_KERNELS]['kernel'], w_eff, rtol=1e-5, atol=1e-7)


def test_weight_norm_zero_kernel_has_finite_gradient():
  w = jnp.zeros((1, 1, 2, 3)).at[..., 0].set(1.0)
  grad = jax.grad(lambda w: jnp.sum(nvnn.weight_normalize(w, jnp.zeros(3))))(w)
  assert np.all(np.isfinite(grad))


def _np_align_corners_2x(a):
  """Bilinear x2 with align_corners=True along axes 1 and 2, from the spec's formula."""
  def axis(a, ax):
    n = a.shape[ax]
    out = []
    for i in range(2 * n):
      p = i * (n - 1) / (2 * n - 1)
      i0 = int(np.floor(p))
      i1 = min(i0 + 1, n - 1)
      f = p - i0
      out.append((1 - f) * np.take(a, i0, axis=ax) + f * np.take(a, i1, axis=ax))
    return np.stack(out, axis=ax)
  return axis(axis(a, 1), 2)


@pytest.mark.parametrize('h,w', [(4, 4), (3, 5), (1, 2)])
def test_bilinear_align_corners(h, w):
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, h, w, 3)), np.float64)
  y = nvnn.upsample_bilinear2x_align_corners(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, _np_align_corners_2x(x), rtol=1e-5, atol=1e-6)
  # Corners coincide with the input corners (the defining property of align_corners).
  np.testing.assert_allclose(y[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]],
                             rtol=1e-6)
  near = nvnn.upsample_nearest2x(jnp.asarray(x))
  np.testing.assert_array_equal(near[:, 1::2, ::2], x)


def test_batch_norm_pytorch_semantics():
  x = np.asarray(jax.random.normal(jax.random.key(4), (4, 3, 5, 6)) * 2.0 + 1.0, np.float64)
  bn = nvnn.BatchNorm()
  v = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), True)
  scale = np.linspace(0.5, 1.5, 6)
  bias = np.linspace(-1, 1, 6)
  stats = {'mean': np.linspace(-0.2, 0.2, 6), 'var': np.linspace(0.5, 2.0, 6)}
  variables = {'params': {'scale': scale.astype(np.float32), 'bias': bias.astype(np.float32)},
               'batch_stats': {k: s.astype(np.float32) for k, s in stats.items()}}
  y, upd = bn.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=['batch_stats'])
  n = 4 * 3 * 5
  mean = x.reshape(n, 6).mean(0)
  var_b = x.reshape(n, 6).var(0)  # biased: used to normalise
  var_u = x.reshape(n, 6).var(0, ddof=1)  # unbiased: used for the running average
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var_b + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.95 * stats['mean'] + 0.05 * mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.95 * stats['var'] + 0.05 * var_u,
                             rtol=1e-5)
  y_eval = bn.apply(variables, jnp.asarray(x, jnp.float32), False)
  np.testing.assert_allclose(
      y_eval, (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * scale + bias, rtol=1e-5,
      atol=1e-5)
  with pytest.raises(ValueError, match='more than one value per channel'):
    bn.apply(variables, jnp.zeros((1, 1, 1, 6)), True, mutable=['batch_stats'])


def _raster_index(h, w, c, mirror):
  """Position of element (y, x, ch) in the autoregressive order (pixel-major, then channel)."""
  pix = np.arange(h * w).reshape(h, w)
  if mirror:
    pix = pix[::-1, ::-1]
  return (pix[:, :, None] * c + np.arange(c)[None, None, :]).ravel()


@pytest.mark.parametrize('mirror', [False, True])
def test_ar_cell_jacobian_is_unit_triangular(mirror):
  h, w, c = 4, 4, 3
  cell = nvnn.ARCell(mirror=mirror)
  z = jax.random.normal(jax.random.key(5), (1, h, w, c))
  v = cell.init(jax.random.key(6), z)
  # Larger mu weights than the 0.1 init, so that every allowed dependence is clearly visible.
  v['params']['mu']['log_weight_norm'] = v['params']['mu']['log_weight_norm'] + 3.0
  f = lambda z: cell.apply(v, z.reshape(1, h, w, c)).ravel()  # noqa: E731
  jac = np.asarray(jax.jit(jax.jacfwd(f))(z.ravel()))
  order = _raster_index(h, w, c, mirror)
  perm = np.argsort(order)  # element indices sorted by AR position
  j = jac[np.ix_(perm, perm)]
  np.testing.assert_allclose(np.diag(j), 1.0, atol=1e-6)
  assert np.abs(np.triu(j, 1)).max() < 1e-6
  # The masks are not trivially empty: the previous channel of the same pixel and every channel
  # of the previous pixel in the row (next one when mirrored) matter.
  idx = lambda y, x, ch: (y * w + x) * c + ch  # noqa: E731
  for y, x in itertools.product(range(h), range(w)):
    for ch in range(1, c):
      assert abs(jac[idx(y, x, ch), idx(y, x, ch - 1)]) > 1e-4
    xn = x + 1 if mirror else x - 1
    if 0 <= xn < w:
      assert np.abs(jac[idx(y, x, 0), [idx(y, xn, k) for k in range(c)]]).min() > 1e-4


def test_paired_ar_cell_is_volume_preserving():
  z = jax.random.normal(jax.random.key(7), (1, 3, 3, 2))
  cell = nvnn.PairedARCell()
  v = cell.init(jax.random.key(8), z)
  jac = jax.jit(jax.jacfwd(lambda a: cell.apply(v, a.reshape(z.shape)).ravel()))(z.ravel())
  sign, logdet = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign == 1 and abs(logdet) < 1e-5
  assert np.abs(np.asarray(jac) - np.eye(jac.shape[0])).max() > 1e-4  # not the identity


def test_ar_channel_masks():
  # C_out = 2 C_in, zero diagonal: output block i sees input channels < i.
  m = nvnn.ar_channel_mask(3, 6, 1, zero_diag=True).T  # [C_out, C_in]
  np.testing.assert_array_equal(m, np.repeat(np.tril(np.ones((3, 3)), -1), 2, axis=0))
  m = nvnn.ar_channel_mask(3, 6, 1, zero_diag=False).T
  np.testing.assert_array_equal(m, np.repeat(np.tril(np.ones((3, 3))), 2, axis=0))
  # C_in = 2 C_out: output i sees input blocks <= i.
  m = nvnn.ar_channel_mask(6, 3, 1, zero_diag=False).T
  np.testing.assert_array_equal(m, np.repeat(np.tril(np.ones((3, 3))), 2, axis=1))
  full = nvnn.ar_conv_mask(3, 2, 4, 1, zero_diag=True, mirror=True)
  np.testing.assert_array_equal(full, nvnn.ar_conv_mask(3, 2, 4, 1, True, False)[::-1, ::-1])


def _np_power_iteration(m, u, v, n):
  nrm = lambda a: a / max(np.linalg.norm(a), 1e-3)  # noqa: E731
  for _ in range(n):
    v = nrm(u @ m)
    u = nrm(m @ v)
  return u, v, u @ m @ v


def test_spectral_power_iteration_and_gradient():
  k = jax.random.normal(jax.random.key(9), (3, 3, 4, 5))
  kernels = {'a': {'kernel': k}, 'b': {'c': {'kernel': 2 * k}}, 'd': {'kernel': k[:1, :1]}}
  assert objectives.conv_groups(kernels) == {'o5_i36': [('a',), ('b', 'c')], 'o5_i4': [('d',)]}
  state = objectives.init_spectral_state(kernels, jax.random.key(10))
  assert state['u']['o5_i36'].shape == (2, 5) and state['v']['o5_i36'].shape == (2, 36)
  np.testing.assert_allclose(np.linalg.norm(state['v']['o5_i4'], axis=1), 1, rtol=1e-6)
  fn = jax.jit(objectives.spectral_loss)
  loss, state1, sigmas = fn(kernels, state)
  assert int(state1['calls']) == 1
  # Matrices in PyTorch's layout; v maps to the module's (kh, kw, I) columns.
  mat = np.asarray(k, np.float64).transpose(3, 2, 0, 1).reshape(5, -1)
  mat_1x1 = np.asarray(k[0, 0], np.float64).T
  to_torch = lambda v: np.asarray(v, np.float64).reshape(3, 3, 4).transpose(2, 0, 1).ravel()  # noqa
  # First call: 40 iterations from the stored vectors, as an independent numpy loop.
  u0, v0 = np.asarray(state['u']['o5_i36'][0]), to_torch(state['v']['o5_i36'][0])
  u_np, v_np, s_np = _np_power_iteration(mat, u0, v0, 40)
  np.testing.assert_allclose(float(sigmas['o5_i36'][0]), s_np, rtol=1e-5)
  np.testing.assert_allclose(state1['u']['o5_i36'][0], u_np, atol=1e-5)
  np.testing.assert_allclose(to_torch(state1['v']['o5_i36'][0]), v_np, atol=1e-5)
  # Later calls: 4 iterations each; the estimate approaches the top singular value from below.
  _, state2, sigmas2 = fn(kernels, state1)
  _, _, s_np2 = _np_power_iteration(mat, u_np, v_np, 4)
  np.testing.assert_allclose(float(sigmas2['o5_i36'][0]), s_np2, rtol=1e-5)
  for _ in range(20):
    loss, state2, _ = fn(kernels, state2)
  s_max = np.linalg.svd(mat, compute_uv=False)[0]
  s_max_1x1 = np.linalg.svd(mat_1x1, compute_uv=False)[0]
  np.testing.assert_allclose(float(loss), 3 * s_max + s_max_1x1, rtol=1e-4)
  # d sigma / dM = u v^T (the vectors are constants).
  one = {'a': {'kernel': k}}
  st = {'u': {'o5_i36': state1['u']['o5_i36'][:1]}, 'v': {'o5_i36': state1['v']['o5_i36'][:1]},
        'calls': 1}
  grad = jax.grad(lambda kk: objectives.spectral_loss({'a': {'kernel': kk}}, st,
                                                      num_iters=0)[0])(k)
  uv = np.outer(state1['u']['o5_i36'][0], to_torch(state1['v']['o5_i36'][0]))
  np.testing.assert_allclose(grad, uv.reshape(5, 4, 3, 3).transpose(2, 3, 1, 0), rtol=1e-5,
                             atol=1e-7)
  with pytest.raises(ValueError, match='does not match the model convs'):
    objectives.spectral_loss(one, state)


def test_kl_balance_alpha_and_warmup():
  np.testing.assert_array_equal(objectives.kl_balance_alpha([2, 2]), [1, 1, 4, 4])
  np.testing.assert_array_equal(objectives.kl_balance_alpha([10, 5]), [1] * 5 + [2] * 10)
  np.testing.assert_array_equal(objectives.kl_balance_alpha([20, 10, 5]),
                                [1] * 5 + [2] * 10 + [4] * 20)
  beta = [float(objectives.kl_coeff(s, 1000, 0.3, 1e-4, 1e-4)) for s in (0, 150, 300, 900)]
  np.testing.assert_allclose(beta, [1e-4, (150 - 0.1) / 300, (300 - 0.1) / 300, 1.0], rtol=1e-6)
  kl = jnp.asarray([[1.0, 4.0], [3.0, 0.0]])
  bal, gamma, _ = objectives.kl_balance(kl, jnp.float32(0.5), np.array([1.0, 4.0]))
  k = np.abs(np.asarray(kl)).mean(0) + 0.01
  g = 2 * (k / [1, 4]) / (k / [1, 4]).sum()
  np.testing.assert_allclose(gamma, g, rtol=1e-6)
  np.testing.assert_allclose(bal, 0.5 * (np.asarray(kl) @ g), rtol=1e-6)
  plain, gamma1, _ = objectives.kl_balance(kl, jnp.float32(1.0), np.array([1.0, 4.0]))
  np.testing.assert_allclose(plain, [5.0, 3.0])
  np.testing.assert_array_equal(gamma1, [1.0, 1.0])


def test_latent_normal_kl_and_density():
  mu_raw = jnp.asarray([0.3, -7.0, 12.0])
  ls_raw = jnp.asarray([-1.0, 0.5, 2.5])
  q = LatentNormal.from_raw(mu_raw, ls_raw)
  np.testing.assert_allclose(q.mu, 5 * np.tanh(np.asarray(mu_raw) / 5), rtol=1e-6)
  np.testing.assert_allclose(q.sigma, np.exp(5 * np.tanh(np.asarray(ls_raw) / 5)) + 0.01,
                             rtol=1e-6)
  p = top_prior((3,))
  np.testing.assert_allclose(p.sigma, 1.01)
  # Analytic KL against a quadrature of q log(q/p).
  zs = np.linspace(-150, 150, 600001)
  for i in range(3):
    qm, qs, pm, ps = (float(a[i]) for a in (q.mu, q.sigma, p.mu, p.sigma))
    lq = -0.5 * ((zs - qm) / qs) ** 2 - np.log(qs) - 0.5 * np.log(2 * np.pi)
    lp = -0.5 * ((zs - pm) / ps) ** 2 - np.log(ps) - 0.5 * np.log(2 * np.pi)
    kl = np.trapezoid(np.exp(lq) * (lq - lp), zs)
    np.testing.assert_allclose(float(q.kl(p)[i]), kl, rtol=1e-4)
  z = jnp.asarray([0.1, 0.2, 0.3])
  np.testing.assert_allclose(q.log_prob(z), -0.5 * ((z - q.mu) / q.sigma) ** 2 - np.log(q.sigma)
                             - 0.5 * np.log(2 * np.pi), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Configuration errors of the NVAE ModelTask (no compilation; the task itself is exercised on a
# reference fixture in test_nvae_reference.py).

def _tiny_config():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from nvae_jax.config import schema as common  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.model = ml_collections.ConfigDict(dict(
      name='nvae', num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1,
      num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1,
      num_latent_scales=2, num_groups_per_scale=1, num_latent_per_group=4,
      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, ada_groups=False, min_groups_per_scale=1,
      use_se=True, res_dist=True, num_nf=1, num_mixture_dec=10, decoder='auto',
      faithful_dml=False, kl_anneal_portion=0.3, kl_const_portion=1e-4, kl_const_coeff=1e-4,
      weight_decay_norm=1e-2, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True,
      depthwise_impl='lax', total_steps=0))
  c.data.update(name='mnist', channels=1, image_size=16, pad=2, binarize='dynamic')
  c.train.num_steps = 100
  return c


def test_task_config_errors():
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel
  c = _tiny_config()
  c.model.depthwise_impl = 'auto'
  assert build_task(c).depthwise == ('shift' if jax.default_backend() == 'cpu' else 'lax')
  c.model.depthwise_impl = 'fft'
  with pytest.raises(ValueError, match='model.depthwise_impl'):
    build_task(c)
  c = _tiny_config()
  del c.model['num_nf']
  with pytest.raises(ValueError, match='config.model.num_nf'):
    build_task(c)
  c = _tiny_config()
  c.eval.num_importance_samples = 4
  c.eval.importance_chunk = 3
  with pytest.raises(ValueError, match='importance_chunk'):
    build_task(c)
  task = build_task(_tiny_config())
  with pytest.raises(ValueError, match='divisible'):
    task.arch((18, 18, 1))
  with pytest.raises(ValueError, match=r'x: expected \[B, 16, 16, 1\]'):
    jax.eval_shape(lambda: task.model((16, 16, 1)).init(
        {'params': jax.random.key(0), 'sample': jax.random.key(1)}, jnp.zeros((2, 16, 16, 3)),
        True))


# ---------------------------------------------------------------------------------------------
# Host (numpy) initialisation against flax's own initialisers.

def _check_init_family(params, kernels, where):
  """Uniform(+-1/sqrt(fan_in)) weights and biases, BN ones/zeros, and g = log(||W M|| + 0.01)
  + log(scale) with the mask M read off the effective kernel's zero pattern (flax's ``kernels``)
  and scale 0.1 for the AR cells' ``mu`` convs."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(params)
  kernels = traverse_util.flatten_dict(kernels)
  for path, v in flat.items():
    v = np.asarray(v)
    mod = path[:-1]
    if path[-1] == 'kernel' and v.size >= 64:
      bound = 1 / np.sqrt(np.prod(v.shape[:-1]))
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, (where, path)
      assert abs(v.mean()) < 0.25 * bound, (where, path)
    elif path[-1] == 'bias' and mod + ('kernel',) in flat:
      bound = 1 / np.sqrt(np.prod(flat[mod + ('kernel',)].shape[:-1]))
      assert np.abs(v).max() <= bound, (where, path)
    elif path[-1] == 'scale':
      np.testing.assert_array_equal(v, 1.0)
    elif path[-1] == 'bias':
      np.testing.assert_array_equal(v, 0.0)
    elif path[-1] == 'log_weight_norm':
      mask = np.asarray(kernels[mod + ('kernel',)]) != 0
      w = np.asarray(flat[mod + ('kernel',)], np.float64) * mask
      scale = 0.1 if mod[-1] == 'mu' else 1.0
      expected = np.log(np.sqrt(np.sum(w * w, axis=(0, 1, 2))) + 0.01) + np.log(scale)
      np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6, err_msg=str((where, path)))


@pytest.mark.parametrize('module,shape', [
    (nvnn.PairedARCell(depthwise_impl='shift'), (2, 6, 6, 4)),
    (nvnn.ResBNSwishCell(8, stride=2), (2, 6, 6, 4)),
    (nvnn.MBConvCell(4, 3, upsample=True, depthwise_impl='shift'), (2, 4, 4, 8)),
])
def test_host_init_has_the_flax_init_distributions(module, shape):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from nvae_jax import host_init  # pylint: disable=import-outside-toplevel
  x = jnp.zeros(shape)
  args = (module, x, True) if not isinstance(module, nvnn.PairedARCell) else (module, x)
  init = lambda key, x: args[0].init(key, x, *args[2:])  # noqa: E731
  ref = jax.jit(init)(jax.random.key(0), x)
  cols = ('params', 'batch_stats') if 'batch_stats' in ref else ('params',)
  host, abstract = host_init.initialise(init, 7, cols, jax.random.key(0), x)
  for col in cols:
    ref_flat = traverse_util.flatten_dict(ref[col])
    host_flat = traverse_util.flatten_dict(host[col])
    assert sorted(ref_flat) == sorted(host_flat)
    for path, v in ref_flat.items():
      assert host_flat[path].shape == v.shape and host_flat[path].dtype == v.dtype, path
  if 'batch_stats' in host:
    for path, v in traverse_util.flatten_dict(host['batch_stats']).items():
      np.testing.assert_array_equal(v, 0.0 if path[-1] == 'mean' else 1.0)
  _check_init_family(ref['params'], ref['conv_kernels'], 'flax')   # the check itself is right
  _check_init_family(host['params'], ref['conv_kernels'], 'host')
  again, _ = host_init.initialise(init, 7, cols, jax.random.key(0), x)
  other, _ = host_init.initialise(init, 8, cols, jax.random.key(0), x)
  leaves = [np.asarray(a) for a in jax.tree.leaves(host['params'])]
  assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(again['params'])))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other['params'])))


def test_task_init_host_matches_the_init_tree():
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel
  task = build_task(_tiny_config())
  spec = {'image': jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)}
  abstract = jax.eval_shape(task.init, jax.random.key(0), spec)
  host = task.init_host(0, spec)
  assert jax.tree.structure(abstract) == jax.tree.structure(host)
  for a, h in zip(jax.tree.leaves(abstract), jax.tree.leaves(host)):
    assert a.shape == h.shape and a.dtype == h.dtype
  for key, u in host['spectral']['u'].items():
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(host['spectral']['v'][key], axis=-1), 1.0,
                               rtol=1e-5)


def test_fresh_state_has_the_abstract_states_tree_shapes_and_shardings():
  """``build.init_state`` traces the host init once and takes the shardings from the drawn
  state; a checkpoint is restored into ``build.abstract_state`` (the jax init's shapes), so the
  two must agree leaf by leaf."""
  from nvae_jax.train import build  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  config = _tiny_config()
  config.data.batch_size = n = jax.device_count()
  run = build.build(config)
  batch = step_lib.put_batch({'image': np.zeros((n, 16, 16, 1), np.float32),
                              'mask': np.ones((n,), np.float32)}, run.mesh)
  abstract, abstract_shardings = build.abstract_state(run, build.batch_spec((16, 16, 1), n))
  state, shardings = build.init_state(run, batch)
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_shardings)
  for a, s, sh, ash in zip(jax.tree.leaves(abstract), jax.tree.leaves(state),
                           jax.tree.leaves(shardings), jax.tree.leaves(abstract_shardings)):
    assert (a.shape, a.dtype) == (s.shape, s.dtype)
    assert sh == ash and s.sharding == ash
