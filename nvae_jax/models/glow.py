"""Glow-style multi-scale flow (Kingma & Dhariwal 2018) with the permutations of Hoogeboom et al. 2019.

Architecture (``L = config.model.num_levels`` levels of ``K = config.model.num_steps`` steps):

    y = g(x_cont)                                    preprocessing (dequantize.preprocess)
    for level l = 1 .. L:
      y = squeeze2d(y)                               [H, W, C] -> [H/2, W/2, 4C]
      y = step_K o ... o step_1 (y)                  step = actnorm -> mixing -> coupling
      if l < L: y, eps_l = split(y)                  half the channels leave under N(mu(y), sigma(y))
    eps_L = (y - mu_top) / sigma_top                 top prior: learned per-position N (learn_top) or N(0, 1)

The mixing layer is ``config.model.permutation``:

=============  ===============================================================================
``reverse``    reverse the channel order (Real NVP / Glow ``flow_permutation=0``)
``shuffle``    a fixed random channel permutation per step (Glow 1)
``conv1x1``    invertible 1x1 convolution, plain parameterisation (Glow 2)
``plu``        1x1 convolution, W = P L (U + diag(s exp(log_s)))
``qr``         1x1 convolution, W = Q R with Householder Q (Hoogeboom et al.)
``emerging``   1x1 conv (plain) followed by the emerging k x k convolution (emerging ``3``),
               both inside :class:`nvae_jax.flows.emerging.EmergingConv`
``periodic``   periodic (Fourier) k x k convolution alone (emerging ``4``)
=============  ===============================================================================

Likelihood.  With ``log p(x_cont) = sum_l log p(z2_l | z1_l) + log p_top(z_L) + sum log|det J|``
(flow and preprocessing log-dets), the per-example NLL of the ``b``-bit data in nats is
``-log p(x_cont) + D b log 2`` and bits/dim is that over ``D log 2``
(:mod:`nvae_jax.flows.dequantize`, where the bound is derived).  Inputs are batches of
``[B, H, W, C]`` float32 images in [0, 1] quantised to ``config.data.num_bits`` (binarised data
counts as 1 bit); ``H`` and ``W`` must be divisible by ``2**L``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import policy
from nvae_jax.flows import dequantize as dq
from nvae_jax.flows.coupling import AdditiveCoupling, AffineCoupling, accum_dtype
from nvae_jax.flows.permutations import Reverse, Shuffle
from nvae_jax.flows.split import Split, standard_normal_logprob
from nvae_jax.flows.squeeze import squeeze2d, unsqueeze2d
from nvae_jax.models.base import ModelTaskBase, register

PERMUTATIONS = ('reverse', 'shuffle', 'conv1x1', 'plu', 'qr', 'emerging', 'periodic')
COUPLINGS = ('affine', 'additive')
MODEL_FIELDS = ('name', 'num_levels', 'num_steps', 'hidden_channels', 'permutation', 'coupling',
                'kernel_size', 'dilation', 'learn_top', 'learn_split_prior', 'net_actnorm',
                'preprocess', 'logit_alpha')


def make_mixers(permutation: str, index: int, kernel_size: int = 3, dilation: int = 1):
  """The mixing layers of flow step ``index`` for ``permutation`` (a list, applied in order)."""
  if permutation == 'reverse':
    return [Reverse()]
  if permutation == 'shuffle':
    return [Shuffle(seed=index)]
  # The learned mixing layers live in their own modules; import them only when asked for.
  # pylint: disable=import-outside-toplevel
  if permutation in ('conv1x1', 'plu', 'qr'):
    from nvae_jax.flows.conv1x1 import Conv1x1
    return [Conv1x1(variant={'conv1x1': 'plain'}.get(permutation, permutation))]
  if permutation == 'emerging':
    from nvae_jax.flows.emerging import EmergingConv
    # EmergingConv applies the paper's plain 1x1 conv itself (use_1x1=True) before its two
    # masked k x k convolutions.
    return [EmergingConv(kernel_size=kernel_size, dilation=dilation, use_1x1=True,
                         conv1x1_variant='plain')]
  if permutation == 'periodic':
    from nvae_jax.flows.periodic import PeriodicConv
    return [PeriodicConv(kernel_size=kernel_size)]
  raise ValueError(f'config.model.permutation: expected one of {PERMUTATIONS}, got '
                   f'{permutation!r}')


class FlowStep(nn.Module):
  """One step: actnorm -> mixing -> coupling; ``y, logdet = step(x, reverse)``."""
  index: int
  permutation: str = 'conv1x1'
  coupling: str = 'affine'
  hidden: int = 512
  kernel_size: int = 3
  dilation: int = 1
  net_actnorm: bool = False
  dtype: Any = None

  def setup(self):
    from nvae_jax.flows.actnorm import ActNorm  # pylint: disable=import-outside-toplevel
    self.actnorm = ActNorm()
    self.mixers = make_mixers(self.permutation, self.index, self.kernel_size, self.dilation)
    cls = {'affine': AffineCoupling, 'additive': AdditiveCoupling}[self.coupling]
    self.couple = cls(hidden=self.hidden, actnorm=self.net_actnorm, dtype=self.dtype)

  def __call__(self, x: jax.Array, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    layers = [self.actnorm, *self.mixers, self.couple]
    if reverse:
      layers = layers[::-1]
    logdet = jnp.zeros(x.shape[:1], accum_dtype(x))
    for layer in layers:
      x, ld = layer(x, reverse=reverse)
      logdet = logdet + ld
    return x, logdet


class TopPrior(nn.Module):
  """Prior of the last level: ``N(mu, sigma)`` with learned per-position ``mu``, ``log sigma``
  (zero-initialised, ``learn=True``) or ``N(0, 1)``.  Returns ``(eps, log p(z))`` forward and
  ``(z, log p(z))`` in reverse (``z = mu + temperature * sigma * eps``)."""
  learn: bool = True

  @nn.compact
  def __call__(self, z: jax.Array, reverse: bool = False, temperature: float = 1.0):
    acc = accum_dtype(z)
    if self.learn:
      ms = self.param('mean_logs', nn.initializers.zeros, (*z.shape[1:-1], 2 * z.shape[-1]),
                      jnp.float32).astype(acc)
      mu, logs = ms[..., :z.shape[-1]], ms[..., z.shape[-1]:]
    else:
      mu = logs = jnp.zeros(z.shape[1:], acc)
    sum_logs = jnp.sum(logs)
    z = z.astype(acc)
    if not reverse:
      eps = (z - mu) * jnp.exp(-logs)
      return eps, standard_normal_logprob(eps) - sum_logs
    return mu + temperature * jnp.exp(logs) * z, standard_normal_logprob(temperature * z) - sum_logs


def latent_shapes(image_shape: Sequence[int], num_levels: int) -> list[tuple[int, int, int]]:
  """Per-example shapes of ``eps_1, ..., eps_L`` (the split-off halves, then the top)."""
  h, w, c = image_shape
  if h % 2**num_levels or w % 2**num_levels:
    raise ValueError(f'glow: image height and width must be divisible by 2**num_levels = '
                     f'{2**num_levels} (config.model.num_levels={num_levels}), got image shape '
                     f'{tuple(image_shape)}')
  shapes = []
  for level in range(num_levels):
    h, w, c = h // 2, w // 2, 4 * c
    if level < num_levels - 1:
      shapes.append((h, w, c - c // 2))
      c = c // 2
  shapes.append((h, w, c))
  return shapes


class MultiScaleFlow(nn.Module):
  """The flow ``y -> (eps_1, ..., eps_L)`` of the module docstring.

  ``forward(y) -> (eps_list, log_prior [B], logdet [B])`` with ``log p(y) = log_prior + logdet``;
  ``inverse(eps_list, temperature) -> y``.  Attributes mirror ``config.model``.
  """
  num_levels: int = 3
  num_steps: int = 32
  hidden: int = 512
  permutation: str = 'conv1x1'
  coupling: str = 'affine'
  kernel_size: int = 3
  dilation: int = 1
  learn_top: bool = True
  learn_split_prior: bool = True
  net_actnorm: bool = False
  dtype: Any = None
  remat_policy: str = 'none'

  def setup(self):
    step_cls = policy.remat(FlowStep, self.remat_policy, static_argnums=(2,))
    self.steps = [
        step_cls(index=i, permutation=self.permutation, coupling=self.coupling,
                 hidden=self.hidden, kernel_size=self.kernel_size, dilation=self.dilation,
                 net_actnorm=self.net_actnorm, dtype=self.dtype)
        for i in range(self.num_levels * self.num_steps)]
    self.splits = [Split(learn_prior=self.learn_split_prior, dtype=self.dtype)
                   for _ in range(self.num_levels - 1)]
    self.top = TopPrior(learn=self.learn_top)

  def _level_steps(self, level: int):
    return self.steps[level * self.num_steps:(level + 1) * self.num_steps]

  def forward(self, y: jax.Array):
    acc = accum_dtype(y)
    logdet = jnp.zeros(y.shape[:1], acc)
    log_prior = jnp.zeros(y.shape[:1], acc)
    eps_list = []
    for level in range(self.num_levels):
      y = squeeze2d(y)
      for step in self._level_steps(level):
        y, ld = step(y, False)
        logdet = logdet + ld
      if level < self.num_levels - 1:
        y, lp, eps = self.splits[level](y)
        log_prior = log_prior + lp
        eps_list.append(eps)
    eps, lp = self.top(y)
    eps_list.append(eps.astype(y.dtype))
    return eps_list, log_prior + lp, logdet

  def inverse(self, eps_list: Sequence[jax.Array], temperature: float = 1.0) -> jax.Array:
    if len(eps_list) != self.num_levels:
      raise ValueError(f'MultiScaleFlow.inverse: expected {self.num_levels} latents (one per '
                       f'level), got {len(eps_list)}')
    y, _ = self.top(eps_list[-1], reverse=True, temperature=temperature)
    y = y.astype(eps_list[-1].dtype)
    for level in reversed(range(self.num_levels)):
      if level < self.num_levels - 1:
        y, _ = self.splits[level](y, reverse=True, eps=eps_list[level], temperature=temperature)
      for step in reversed(self._level_steps(level)):
        y, _ = step(y, True)
      y = unsqueeze2d(y)
    return y


def _get(cfg, name, default):
  return cfg.get(name, default) if hasattr(cfg, 'get') else getattr(cfg, name, default)


def _check_int(value, field: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{field}: expected an int >= {minimum}, got {value!r}')
  return value


def _check_choice(value, field: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f'{field}: expected one of {tuple(choices)}, got {value!r}')
  return value


@register('glow')
class GlowTask(ModelTaskBase):
  """The :class:`nvae_jax.models.base.ModelTask` of the multi-scale flow (module docstring).

  ``config.model`` fields: ``num_levels``, ``num_steps``, ``hidden_channels``, ``permutation``
  (one of :data:`PERMUTATIONS`), ``coupling`` (``affine``/``additive``), ``kernel_size`` and
  ``dilation`` (emerging/periodic), ``learn_top``; optional ``learn_split_prior`` (True),
  ``net_actnorm`` (False), ``preprocess`` (``center``/``logit``), ``logit_alpha`` (0.05).
  Compute dtype from ``config.precision.compute_dtype``, remat from ``config.remat.policy``.
  """
  mutable_collections: tuple[str, ...] = ()

  def __init__(self, config):
    m = config.model
    self.config = config
    unknown = sorted(set(m.keys()) - set(MODEL_FIELDS))
    if unknown:
      raise ValueError(f'config.model.{unknown[0]}: unknown field for model glow; expected '
                       f'fields among {MODEL_FIELDS} (found unknown fields {unknown})')
    self.num_levels = _check_int(m.num_levels, 'config.model.num_levels', 1)
    num_steps = _check_int(m.num_steps, 'config.model.num_steps', 1)
    hidden = _check_int(m.hidden_channels, 'config.model.hidden_channels', 1)
    permutation = _check_choice(m.permutation, 'config.model.permutation', PERMUTATIONS)
    coupling = _check_choice(m.coupling, 'config.model.coupling', COUPLINGS)
    kernel_size = _check_int(_get(m, 'kernel_size', 3), 'config.model.kernel_size', 1)
    if kernel_size % 2 == 0:
      raise ValueError(f'config.model.kernel_size: expected an odd int, got {kernel_size}')
    dilation = _check_int(_get(m, 'dilation', 1), 'config.model.dilation', 1)
    if permutation == 'emerging' and dilation not in (1, 2):
      raise ValueError(f'config.model.dilation: the emerging convolution supports 1 or 2, got '
                       f'{dilation}')
    self.preprocess = _check_choice(_get(m, 'preprocess', 'center'), 'config.model.preprocess',
                                    dq.PREPROCESSING)
    self.alpha = float(_get(m, 'logit_alpha', 0.05))
    if self.preprocess == 'logit' and not 0.0 < self.alpha < 0.5:
      raise ValueError(f'config.model.logit_alpha: expected a value in (0, 0.5), got '
                       f'{self.alpha!r}')
    binarize = _get(config.data, 'binarize', 'none')
    self.num_bits = 1 if binarize != 'none' else _check_int(config.data.num_bits,
                                                               'config.data.num_bits', 1)
    self.flow = MultiScaleFlow(
        num_levels=self.num_levels, num_steps=num_steps, hidden=hidden, permutation=permutation,
        coupling=coupling, kernel_size=kernel_size, dilation=dilation,
        learn_top=bool(m.learn_top), learn_split_prior=bool(_get(m, 'learn_split_prior', True)),
        net_actnorm=bool(_get(m, 'net_actnorm', False)),
        dtype=policy.compute_dtype(config.precision.compute_dtype),
        remat_policy=config.remat.policy)
    policy.checkpoint_policy(config.remat.policy)  # validate the name now, not at trace time
    self._input_shape = None  # set by init from the batch

  # -- shapes -----------------------------------------------------------------------------------

  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model's images, as seen by ``init`` (the model does not read the data
    config: the platform's ``init`` call, or ``describe(image_shape)``, gives it)."""
    if self._input_shape is None:
      raise ValueError('glow: the input shape is unknown; call init first (or pass image_shape '
                       'to describe)')
    return self._input_shape

  def _check_batch(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"glow: batch['image'] must be [B, H, W, C], got shape {x.shape}")
    if x.shape[-1] != self.config.data.channels:
      raise ValueError(f"glow: batch['image'] has {x.shape[-1]} channels, expected "
                       f'config.data.channels={self.config.data.channels}')
    latent_shapes(x.shape[1:], self.num_levels)

  # -- the density --------------------------------------------------------------------------------

  def _noise(self, rng: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.uniform(rng, x.shape, accum_dtype(x))

  def _encode(self, variables, x: jax.Array, u: jax.Array):
    """Returns ``(eps_list, log p(x_cont) [B], log_prior [B], logdet [B])``."""
    x_cont = dq.dequantize(x, u, self.num_bits)
    y, pre_ld = dq.preprocess(x_cont, self.preprocess, self.alpha)
    eps, log_prior, logdet = self.flow.apply(variables, y, method=MultiScaleFlow.forward)
    logdet = logdet + pre_ld
    return eps, log_prior + logdet, log_prior, logdet

  def _decode(self, variables, eps_list, temperature) -> jax.Array:
    y = self.flow.apply(variables, eps_list, temperature, method=MultiScaleFlow.inverse)
    return dq.postprocess(y, self.preprocess, self.alpha)

  def nll(self, variables, x: jax.Array, u: jax.Array) -> jax.Array:
    """Per-example NLL in nats of the discrete data for dequantisation noise ``u``."""
    _, log_density, _, _ = self._encode(variables, x, u)
    return dq.discrete_nll(log_density, math.prod(x.shape[1:]), self.num_bits)

  # -- the ModelTask protocol ---------------------------------------------------------------------

  def init(self, rng, batch):
    x = batch['image']
    self._check_batch(x)
    self._input_shape = tuple(int(s) for s in x.shape[1:])
    params_rng, noise_rng = jax.random.split(rng)
    x_cont = dq.dequantize(x, self._noise(noise_rng, x), self.num_bits)
    y, _ = dq.preprocess(x_cont, self.preprocess, self.alpha)
    # Actnorm layers initialise from the statistics of this batch (data-dependent init).
    variables = self.flow.init({'params': params_rng}, y, method=MultiScaleFlow.forward)
    return {'params': variables['params']}

  def loss(self, variables, batch, rng, step):
    del step
    x = batch['image']
    self._check_batch(x)
    _, log_density, log_prior, logdet = self._encode(variables, x, self._noise(rng, x))
    num_dims = math.prod(x.shape[1:])
    nll = dq.discrete_nll(log_density, num_dims, self.num_bits)
    loss = jnp.mean(nll).astype(jnp.float32)
    metrics = {'loss': loss,
               'bits_per_dim': jnp.mean(dq.bits_per_dim(nll, num_dims)).astype(jnp.float32),
               'log_prior': jnp.mean(log_prior).astype(jnp.float32),
               'logdet': jnp.mean(logdet).astype(jnp.float32)}
    return loss, (metrics, {})

  def evaluate(self, variables, batch, rng):
    x = batch['image']
    self._check_batch(x)
    nll = self.nll(variables, x, self._noise(rng, x))
    return {'nll': nll.astype(jnp.float32),
            'bits_per_dim': dq.bits_per_dim(nll, math.prod(x.shape[1:])).astype(jnp.float32)}

  def sample(self, variables, rng, num, temperature):
    shapes = latent_shapes(self.image_shape(), self.num_levels)
    rngs = jax.random.split(rng, len(shapes))
    eps = [jax.random.normal(r, (num, *s), jnp.float32) for r, s in zip(rngs, shapes)]
    x_cont = self._decode(variables, eps, temperature)
    return dq.quantize(x_cont, self.num_bits).astype(jnp.float32)

  def reconstruct(self, variables, batch, rng):
    """``x -> z -> x`` with dequantisation noise from ``rng``, undone without rounding, so the
    result equals ``batch['image']`` up to the flow's numerical inversion error."""
    x = batch['image']
    self._check_batch(x)
    u = self._noise(rng, x)
    eps, _, _, _ = self._encode(variables, x, u)
    x_cont = self._decode(variables, eps, 1.0)
    return jnp.clip(dq.undo_dequantize(x_cont, u, self.num_bits), 0.0, 1.0).astype(jnp.float32)

  def image_size_multiple(self):
    """One squeeze (a halving of H and W) per level."""
    return 2 ** self.num_levels, f'2^model.num_levels={self.num_levels} (one squeeze per level)'

  def describe(self, image_shape=None):
    shape = self.image_shape() if image_shape is None else tuple(int(s) for s in image_shape)
    return {'inputs': shape, 'outputs': shape,
            'latents': latent_shapes(shape, self.num_levels),
            'likelihood': {'name': f'flow_uniform_dequantization_{self.num_bits}bit',
                           'continuous': False}}
