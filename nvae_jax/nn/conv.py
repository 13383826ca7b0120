"""Convolutions of NVAE: weight-normalised conv, plain conv and depthwise conv.

Layouts are NHWC for activations and HWIO for kernels.  Padding is always explicit and symmetric
(``padding=p`` pads p pixels on each side, as PyTorch's ``padding=p``); flax's ``'SAME'`` is never
used because with stride 2 on even sizes it pads (0, 1) and shifts the features.

Weight normalisation (Salimans & Kingma 2016, in NVAE's variant): the effective kernel is

    W~[..., o] = exp(g_o) * W[..., o] / (||W[..., o]|| + 1e-5),

with the norm over (H, W, I) for each output channel o and ``g = log_weight_norm`` of shape [O].
At initialisation ``g_0 = log(||W_0|| + 0.01) + log(weight_init_scale)``, with ``W_0`` drawn as
PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bias likewise).

Every convolution writes its effective float32 kernel into the ``'conv_kernels'`` collection (when
that collection is mutable) so that the spectral regulariser (``nvae_jax.objectives.spectral``)
can see every conv of the model, weight-normalised or not, masked or not.

Depthwise convolutions (``groups == C_in == C_out``) have two implementations behind one switch,
``depthwise_impl``: ``'lax'`` (a grouped ``lax.conv_general_dilated``, right for GPU/TPU) and
``'shift'`` (the sum over the k*k taps of shifted input slices times the per-channel tap weights,
about 3x faster forward+backward on XLA:CPU where grouped convs are very slow).

Inside a loop body (``lax.scan``, see ``nvae_jax.nn.stacked``), XLA:CPU runs a convolution fast
only if it is written in the canonical form (NHWC input, HWIO kernel, NHWC output): its rewrite of
other forms into that one visits the top-level computation only, and autodiff writes both backward
convolutions of a conv in other forms (a kernel with swapped I/O axes; the images as the reduced
axis).  Traced under :func:`loop_body_convs`, a stride-1 dense conv on the CPU backend therefore
uses :func:`_conv_canonical_backward`, whose backward pass writes both convolutions in canonical
form with explicit transposes: the same arithmetic, 30x faster there.  A depthwise conv there
takes the ``'shift'`` implementation whatever ``depthwise_impl`` says (XLA:CPU makes the grouped
conv's kernel gradient a dense C x C convolution in a loop, 100x slower).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nvae_jax import host_init

#: Collection holding every conv's effective kernel (HWIO, float32) after a forward pass.
CONV_KERNELS = 'conv_kernels'
DEPTHWISE_IMPLS = ('lax', 'shift')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def torch_uniform_init(fan_in: int) -> host_init.Uniform:
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = float(1.0 / np.sqrt(fan_in))
  return host_init.Uniform(-bound, bound)


def _safe_norm(w: jax.Array, axis) -> jax.Array:
  """sqrt(sum(w^2)) with a finite (zero) gradient where the norm is exactly 0."""
  sq = jnp.sum(w * w, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def weight_normalize(kernel: jax.Array, log_weight_norm: jax.Array) -> jax.Array:
  """exp(g) * W / (||W|| + 1e-5) per output channel (last axis) of an HWIO kernel."""
  norm = _safe_norm(kernel, axis=tuple(range(kernel.ndim - 1)))
  return kernel * (jnp.exp(log_weight_norm) / (norm + 1e-5))


def initial_log_weight_norm(kernel: jax.Array, scale: float = 1.0) -> jax.Array:
  """g_0 = log(||W_0|| + 0.01) + log(scale), per output channel."""
  norm = _safe_norm(kernel, axis=tuple(range(kernel.ndim - 1)))
  return jnp.log(norm + 1e-2) + np.log(scale)


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
                   dilation: int = 1, impl: str = 'lax') -> jax.Array:
  """Depthwise 2-D convolution.

  out[b, y, x, c] = sum_{i,j} pad(x)[b, s y + d i, s x + d j, c] k[i, j, 0, c].

  Args:
    x: [B, H, W, C].
    kernel: [kh, kw, 1, C] (HWIO with one input channel per group).
    stride, padding, dilation: as PyTorch's (symmetric padding).
    impl: ``'lax'`` (grouped conv) or ``'shift'`` (sum of shifted slices).
  """
  c = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != c:
    raise ValueError(f'depthwise_conv: kernel must be [kh, kw, 1, {c}] for an input with {c} '
                     f'channels, got {kernel.shape}')
  if impl == 'lax' and _in_cpu_loop_body():
    impl = 'shift'  # XLA:CPU turns a grouped conv's kernel gradient in a loop into a dense conv
  if impl == 'lax':
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS, feature_group_count=c)
  if impl != 'shift':
    raise ValueError(f'depthwise_impl: expected one of {DEPTHWISE_IMPLS}, got {impl!r}')
  kh, kw = kernel.shape[:2]
  if stride == 1 and kh == kw and padding <= dilation * (kh - 1):
    return _shift_depthwise(x, kernel, padding, dilation)
  return _shift_taps(x, kernel, stride, padding, dilation)


def _pad_spatial(x, padding: int) -> jax.Array:
  """Zero padding of ``padding`` pixels on each side of H and W of [B, H, W, C]."""
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _shift_taps(x, kernel, stride: int, padding: int, dilation: int) -> jax.Array:
  """The sum over the kernel taps of shifted (strided) input slices times the tap weights."""
  return _taps_of_padded(_pad_spatial(x, padding), kernel, stride, dilation)


def _taps_of_padded(xp, kernel, stride: int, dilation: int) -> jax.Array:
  """``_shift_taps`` of an input that is already padded."""
  kh, kw = kernel.shape[:2]
  ho = (xp.shape[1] - dilation * (kh - 1) - 1) // stride + 1
  wo = (xp.shape[2] - dilation * (kw - 1) - 1) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      r0, c0 = i * dilation, j * dilation
      tap = xp[:, r0:r0 + (ho - 1) * stride + 1:stride, c0:c0 + (wo - 1) * stride + 1:stride, :]
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shift_depthwise(x, kernel, padding: int, dilation: int) -> jax.Array:
  """Stride-1 shift-and-add depthwise conv with a cheaper backward pass on XLA:CPU.

  With k taps per axis, d the dilation, p the padding and q = d (k - 1) - p:
  dx = the same depthwise conv of the output gradient g with the spatially flipped kernel and
  padding q; dW[i, j, c] = sum_{b,y,x} pad_p(x)[b, y + d i, x + d j, c] g[b, y, x, c], the
  cross-correlation of the padded input with g at the k^2 lags (d i, d j).  Autodiff of the tap
  sum computes dW as k^2 separate passes over (B, H, W); here one pass per image computes all
  k^2 sums (``_depthwise_kernel_grad``).  Being a ``custom_vjp``, it has no forward-mode
  derivative (``jax.jacfwd``): use ``impl='lax'`` for that.
  """
  return _shift_taps(x, kernel, 1, padding, dilation)


def _shift_depthwise_fwd(x, kernel, padding, dilation):
  # The padded input is the residual: the kernel gradient reads the buffer the forward pass
  # wrote, where re-padding x made XLA write a second padded copy (about 4 % of the step).
  xp = _pad_spatial(x, padding)
  return _taps_of_padded(xp, kernel, 1, dilation), (xp, kernel)


def _shift_depthwise_bwd(padding, dilation, res, g):
  xp, kernel = res
  k = kernel.shape[0]
  q = dilation * (k - 1) - padding
  dx = _shift_taps(g, kernel[::-1, ::-1], 1, q, dilation)
  dkernel = _depthwise_kernel_grad(xp, g, k, dilation)
  return dx.astype(xp.dtype), dkernel.astype(kernel.dtype)


def _sum_all(a: tuple, b: tuple) -> tuple:
  return tuple(u + v for u, v in zip(a, b))


def _depthwise_kernel_grad(xp, g, k: int, dilation: int,
                           values_per_iteration: int = 2**17) -> jax.Array:
  """dW[i, j, 0, c] = sum_b sum_{y,x} xp[b, y + d i, x + d j, c] g[b, y, x, c], in float32.

  ``xp`` is the padded input.  A loop over the batch; for each image (or a few small ones) one
  variadic reduction over (y, x) produces all k^2 lags, so the image (a few hundred KB) is read
  from cache k^2 times instead of the whole batch from memory.  On XLA:CPU this is 2-4x faster
  than a real-FFT cross-correlation over (H, W) and 14-30x faster than the gradient of XLA's
  grouped convolution (``benchmarks/depthwise_backward.py``).
  """
  b, ho, wo, c = g.shape
  lags = [(dilation * i, dilation * j) for i in range(k) for j in range(k)]
  n = _images_per_iteration(b, ho * wo * c, values_per_iteration)

  def add_images(step, total):
    # Slices of the batch axis, not a reshape: the loop reads the padded input where it lies.
    xb = lax.dynamic_slice_in_dim(xp, step * n, n).astype(jnp.float32)
    gb = lax.dynamic_slice_in_dim(g, step * n, n).astype(jnp.float32)
    products = [xb[:, r:r + ho, s:s + wo, :] * gb for r, s in lags]
    sums = lax.reduce(products, [np.float32(0)] * len(lags), _sum_all, (0, 1, 2))
    return total + jnp.stack(sums)

  total = lax.fori_loop(0, b // n, add_images, jnp.zeros((len(lags), c), jnp.float32))
  return total.reshape(k, k, 1, c)


def _images_per_iteration(batch: int, image_size: int, target: int) -> int:
  """The largest divisor of ``batch`` whose images hold at most ``target`` values (at least 1).

  Small feature maps are batched a few at a time so that the loop's per-iteration cost stays
  small next to the arithmetic.
  """
  fits = [n for n in range(1, batch + 1) if batch % n == 0 and n * image_size <= target]
  return max(fits, default=1)


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


_IN_LOOP_BODY = contextvars.ContextVar('nvae_jax_convs_in_loop_body', default=False)


@contextlib.contextmanager
def loop_body_convs():
  """Marks the convolutions traced inside as parts of a loop body (see the module docstring)."""
  token = _IN_LOOP_BODY.set(True)
  try:
    yield
  finally:
    _IN_LOOP_BODY.reset(token)


def _in_cpu_loop_body() -> bool:
  """Whether the conv being traced is in a loop body (:func:`loop_body_convs`) on XLA:CPU."""
  return _IN_LOOP_BODY.get() and jax.default_backend() == 'cpu'


def _dense_conv(x, kernel, stride: int, padding: int, dilation: int) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_canonical_backward(x, kernel, padding: int, dilation: int) -> jax.Array:
  """A stride-1 dense conv whose backward convolutions are in canonical form.

  With kernel [kh, kw, I, O], dilation d and padding p, q = d (k - 1) - p per axis:
  dx = conv(g, W'), W'[i, j, o, c] = W[kh-1-i, kw-1-j, c, o], padding q, dilation d;
  dW[i, j, c, o] = sum_{b,y,x} pad_p(x)[b, y + d i, x + d j, c] g[b, y, x, o], the conv of
  pad_p(x) as [I, H, W, B] with g as a [Ho, Wo, B, O] kernel at stride d, giving [I, kh, kw, O].
  Being a ``custom_vjp``, it has no forward-mode derivative; it is only used in loop bodies.
  """
  return _dense_conv(x, kernel, 1, padding, dilation)


def _conv_canonical_backward_fwd(x, kernel, padding, dilation):
  return _dense_conv(x, kernel, 1, padding, dilation), (x, kernel)


def _conv_canonical_backward_bwd(padding, dilation, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  qh, qw = dilation * (kh - 1) - padding, dilation * (kw - 1) - padding
  dx = lax.conv_general_dilated(g, flipped, window_strides=(1, 1), padding=[(qh, qh), (qw, qw)],
                                rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS)
  dw = lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
                                window_strides=(dilation, dilation),
                                padding=[(padding, padding)] * 2, dimension_numbers=_DIMS)
  return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(kernel.dtype)


_conv_canonical_backward.defvjp(_conv_canonical_backward_fwd, _conv_canonical_backward_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, groups: int = 1, depthwise_impl: str = 'lax') -> jax.Array:
  """A PyTorch-semantics conv2d in NHWC/HWIO (depthwise convs go through ``depthwise_conv``)."""
  c_in = x.shape[-1]
  if kernel.shape[2] * groups != c_in:
    raise ValueError(f'conv2d: kernel {kernel.shape} with groups={groups} expects '
                     f'{kernel.shape[2] * groups} input channels, got {c_in}')
  if groups > 1 and groups == c_in and kernel.shape[3] == c_in:
    return depthwise_conv(x, kernel, stride=stride, padding=padding, dilation=dilation,
                          impl=depthwise_impl)
  if kernel.shape[:2] == (1, 1) and padding == 0 and groups == 1:
    # A pointwise conv is a matmul over channels (of every stride-th pixel).  As a 2-D matmul,
    # its gradients are plain matmuls too, which XLA:CPU runs without first transposing the
    # activations to channel-major.
    x = x[:, ::stride, ::stride, :]
    y = x.reshape(-1, c_in) @ kernel[0, 0]
    return y.reshape(*x.shape[:-1], kernel.shape[-1])
  if groups == 1 and stride == 1 and _in_cpu_loop_body():
    return _conv_canonical_backward(x, kernel, padding, dilation)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS, feature_group_count=groups)


def record_kernel(module: nn.Module, kernel: jax.Array) -> None:
  """Stores the effective kernel in ``'conv_kernels'`` (no-op unless that collection is mutable)."""
  module.sow(CONV_KERNELS, 'kernel', kernel, init_fn=lambda: None,
             reduce_fn=lambda _, new: new)


class Conv2D(nn.Module):
  """NVAE's ``Conv2D``: optional weight normalisation, optional bias, explicit padding.

  Parameters: ``kernel`` [kh, kw, C_in/groups, features], ``log_weight_norm`` [features] (only
  with ``weight_norm``), ``bias`` [features] (only with ``use_bias``).  Parameters are float32;
  the convolution runs in ``dtype``.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  weight_norm: bool = True
  weight_init_scale: float = 1.0
  depthwise_impl: str = 'lax'
  dtype: Any = jnp.float32

  def effective_kernel(self, c_in: int) -> jax.Array:
    k = self.kernel_size
    if c_in % self.groups or self.features % self.groups:
      raise ValueError(f'{self.name}: groups={self.groups} must divide C_in={c_in} and '
                       f'features={self.features}')
    fan_in = c_in // self.groups * k * k
    kernel = host_init.param(self, 'kernel', torch_uniform_init(fan_in),
                             (k, k, c_in // self.groups, self.features))
    if self.weight_norm:
      g = host_init.param(
          self, 'log_weight_norm', host_init.LogWeightNorm(scale=self.weight_init_scale),
          (self.features,),
          jax_init=lambda _, shape, dtype: initial_log_weight_norm(kernel, self.weight_init_scale))
      kernel = weight_normalize(kernel, g)
    return kernel

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    kernel = self.effective_kernel(c_in)
    record_kernel(self, kernel)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
               padding=self.padding, dilation=self.dilation, groups=self.groups,
               depthwise_impl=self.depthwise_impl)
    if self.use_bias:
      fan_in = c_in // self.groups * self.kernel_size ** 2
      bias = host_init.param(self, 'bias', torch_uniform_init(fan_in), (self.features,))
      y = y + bias.astype(self.dtype)
    return y
