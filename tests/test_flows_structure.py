"""Structure of the invertible convolutions, against independent constructions (float32).

* The autoregressive convolution L (and its mirror R) equals a dense matrix built by brute-force
  loops from the kernel definition, and in the documented order (L: pixels in reverse raster order,
  channels ascending; R: raster order, channels descending) that matrix is lower triangular with
  diagonal exp(log_diag) repeated H W times, although the raw kernels (masked entries included)
  are random.
* The periodic convolution equals ``jnp.pad(mode='wrap')`` + ``lax.conv_general_dilated`` for odd
  and even sizes and k in {3, 5} (also k > H), and its rfft-plus-symmetry log-det equals the sum
  over the full ``fft2`` spectrum of the spatially flipped, top-left-placed kernel.
* The wavefront scan inverse of EmergingConv equals ``jnp.linalg.solve`` of the dense Jacobian and
  ``naive_inverse`` (k in {3, 5}, dilation in {1, 2}).
* Bad input raises a ValueError naming the argument, the expected and the found value.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nvae_jax.flows import ActNorm, Conv1x1, EmergingConv, PeriodicConv, naive_inverse
from nvae_jax.flows.emerging import ar_kernel
from nvae_jax.flows.periodic import spectrum_logdet, kernel_spectrum


def _key(seed):
  # 'rbg' keys compile several times faster than threefry ones on CPU; compile time dominates.
  return jax.random.key(seed, impl='rbg')

# XLA's backend optimisations cost more compile time than these tiny graphs ever run.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(fn=None, **kwargs):
  if fn is None:
    return functools.partial(_jit, **kwargs)
  return jax.jit(fn, compiler_options=_FAST_COMPILE, **kwargs)


def _randomise(variables, seed, scale=1.0):
  """Adds N(0, scale^2) to every parameter (works on ``jax.eval_shape`` structs too, as zeros)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(np.zeros(p.shape) if isinstance(p, jax.ShapeDtypeStruct) else p)
      + jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), variables)


def _dense_ar(kernel, h, w, dilation):
  """Brute-force matrix A[(i,j,o), (i',j',c)] of L(x; Q), straight from its definition."""
  size, _, c, _ = kernel.shape
  a = np.zeros((h, w, c, h, w, c))
  for i in range(h):
    for j in range(w):
      for p in range(size):
        for q in range(size):
          ii, jj = i + p * dilation, j + q * dilation
          if ii < h and jj < w:
            a[i, j, :, ii, jj, :] += kernel[p, q].T  # [o, c] = Q[p, q, c, o]
  return a.reshape(h * w * c, h * w * c)


def _order(h, w, c, reverse_raster, channels_descending):
  """Flat NHWC indices listed in the stated solve order."""
  pixels = [(i, j) for i in range(h) for j in range(w)]
  if reverse_raster:
    pixels = pixels[::-1]
  channels = list(range(c))[::-1] if channels_descending else list(range(c))
  return np.array([(i * w + j) * c + ch for i, j in pixels for ch in channels])


@_jit(static_argnums=0)
def _jacobian(layer, variables, x):
  f = lambda v: layer.apply(variables, v.reshape(x.shape))[0].ravel()
  return jax.jacfwd(f)(x.ravel())


@pytest.mark.parametrize('k,d,shape', [(3, 1, (4, 5, 3)), (5, 2, (5, 5, 2))])
@pytest.mark.parametrize('which', ['L', 'R'])
def test_autoregressive_conv_is_triangular(k, d, shape, which):
  h, w, c = shape
  layer = EmergingConv(k, d, use_1x1=False)
  x = jnp.zeros((1,) + shape, jnp.float32)
  params = _randomise(jax.eval_shape(layer.init, _key(0), x), seed=1)['params']
  # Keep one of the two masked convolutions: the other becomes the identity (raw 0, log_diag 0).
  keep, drop = ('1', '2') if which == 'L' else ('2', '1')
  params = dict(params, bias=jnp.zeros(c), **{f'kernel_{drop}': jnp.zeros_like(params['kernel_1']),
                                               f'log_diag_{drop}': jnp.zeros(c)})
  jac = np.asarray(_jacobian(layer, {'params': params}, x), np.float64)

  kernel = np.asarray(ar_kernel(params[f'kernel_{keep}'], params[f'log_diag_{keep}']))
  if which == 'L':
    expected = _dense_ar(kernel, h, w, d)
  else:  # R = F L F, F reversing height, width and channels.
    flip = _order(h, w, c, reverse_raster=True, channels_descending=True)
    expected = _dense_ar(kernel, h, w, d)[np.ix_(flip, flip)]
  np.testing.assert_allclose(jac, expected, rtol=1e-6, atol=1e-6)

  order = _order(h, w, c, reverse_raster=(which == 'L'), channels_descending=(which == 'R'))
  tri = jac[np.ix_(order, order)]
  assert np.all(np.triu(tri, 1) == 0), 'not lower triangular in the stated order'
  assert np.count_nonzero(np.tril(tri, -1)) > tri.shape[0]  # a genuine k x k receptive field
  # For R, channel o of a pixel carries log_diag_2[C-1-o], and the order lists o descending.
  diag = np.exp(np.asarray(params[f'log_diag_{keep}'], np.float64))
  np.testing.assert_allclose(np.diagonal(tri), np.tile(diag, h * w), rtol=1e-6)


def _wrap_conv(x, kernel, bias):
  pad = (kernel.shape[0] - 1) // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='wrap')
  return lax.conv_general_dilated(xp, kernel, (1, 1), 'VALID',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST) + bias


@pytest.mark.parametrize('k,shape', [(3, (4, 6, 3)), (3, (5, 5, 2)), (5, (3, 4, 2)),
                                     (5, (6, 7, 3))])
def test_periodic_equals_wrap_padded_conv(k, shape):
  layer = PeriodicConv(k)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + shape), jnp.float32)
  variables = _randomise(jax.eval_shape(layer.init, _key(0), x), seed=2, scale=0.3)
  y, _ = _jit(layer.apply)(variables, x)
  p = variables['params']
  np.testing.assert_allclose(y, _wrap_conv(x, p['kernel'], p['bias']), rtol=0, atol=2e-5)


@pytest.mark.parametrize('h,w', [(4, 6), (5, 5), (6, 7)])
def test_periodic_rfft_logdet_equals_full_spectrum(h, w):
  k, c = 3, 3
  kernel = np.random.default_rng(3).standard_normal((k, k, c, c))
  ours = spectrum_logdet(kernel_spectrum(jnp.asarray(kernel, jnp.float32), h, w), w)
  # Independent placement: flipped kernel at the top-left.  This shifts the output, which
  # multiplies each det by a unit-modulus phase and leaves log|det| unchanged.
  grid = np.zeros((h, w, c, c))
  grid[:k, :k] = kernel[::-1, ::-1]
  full = np.fft.fft2(grid, axes=(0, 1))
  reference = np.sum(np.linalg.slogdet(full)[1])
  np.testing.assert_allclose(float(ours), reference, rtol=2e-6)


@_jit(static_argnums=0)
def _inverses(layer, variables, y):
  """Wavefront inverse, naive inverse, dense Jacobian and offset f(0) of the affine layer."""
  x_scan, _ = layer.apply(variables, y, reverse=True)
  x_naive, _ = naive_inverse(layer, variables, y)
  f = lambda v: layer.apply(variables, v.reshape((1,) + y.shape[1:]))[0].ravel()
  zero = jnp.zeros(y[0].size, y.dtype)
  return x_scan, x_naive, jax.jacfwd(f)(zero), f(zero)


@pytest.mark.parametrize('k,d,shape', [(3, 1, (5, 4, 3)), (3, 2, (4, 6, 2)), (5, 2, (5, 5, 2))])
def test_scan_inverse_equals_dense_solve_and_naive(k, d, shape):
  layer = EmergingConv(k, d)
  y = jnp.asarray(np.random.default_rng(4).standard_normal((2,) + shape), jnp.float32)
  variables = _randomise(_jit(layer.init)(_key(0), y), seed=5, scale=0.3)
  x_scan, x_naive, jac, offset = _inverses(layer, variables, y)
  # The layer is affine, y = J x + f(0): solve densely in float64.
  rhs = np.asarray(y, np.float64).reshape(2, -1) - np.asarray(offset, np.float64)
  dense = np.linalg.solve(np.asarray(jac, np.float64), rhs.T).T
  scale = np.max(np.abs(dense))
  np.testing.assert_allclose(np.asarray(x_scan).reshape(2, -1), dense, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(x_naive, x_scan, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize('make,message', [
    (lambda: EmergingConv(kernel_size=4), 'EmergingConv.kernel_size: expected an odd integer'),
    (lambda: EmergingConv(kernel_size=0), 'EmergingConv.kernel_size: expected an odd integer'),
    (lambda: EmergingConv(dilation=3), r'EmergingConv.dilation: expected one of \(1, 2\), got 3'),
    (lambda: EmergingConv(conv1x1_variant='lu'), 'EmergingConv.conv1x1_variant'),
    (lambda: EmergingConv(inverse_algorithm='fast'), 'EmergingConv.inverse_algorithm'),
    (lambda: PeriodicConv(kernel_size=2), 'PeriodicConv.kernel_size: expected an odd integer'),
    (lambda: Conv1x1('lu'), r"Conv1x1.variant: expected one of \('plain', 'plu', 'qr'\)"),
])
def test_bad_hyper_parameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize('layer', [ActNorm(), Conv1x1('qr'), EmergingConv(), PeriodicConv()],
                         ids=lambda l: type(l).__name__)
def test_bad_inputs(layer):
  name = type(layer).__name__
  with pytest.raises(ValueError, match=rf'{name}: x must be a rank-4 NHWC .* got shape \(4, 4, 2\)'):
    layer.init(_key(0), jnp.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match=rf'{name}: x must have a floating dtype, got int32'):
    layer.init(_key(0), jnp.zeros((1, 4, 4, 2), jnp.int32))
