"""NVAE (Vahdat & Kautz 2020): the hierarchical VAE, faithful to the original implementation.

The model takes images x in [0, 1], NHWC (MNIST padded 28 -> 32 by the data pipeline; the
likelihood is then taken over the central crop), and the stem sees 2x - 1.  See
``shared/docs/nvae_spec.md`` §1 for the architecture; the names below follow the original
modules, so that an original ``state_dict`` maps onto the flax tree one to one
(``nvae_jax.convert.from_torch_names``).

Forward pass (train and eval), with G latent groups visited top (lowest resolution) first:

1. ``stem`` (WN conv 3x3) on 2x - 1, then the ``pre_process`` cells and the ``enc_tower``; the
   encoder combiners are not applied there, the feature at each of them is stored.
2. ``enc0`` = ELU -> WN conv 1x1 -> ELU on the last encoder feature; the top posterior is
   q_0 = N(enc_sampler_0(.)) and the top prior N(0, 1.01^2).
3. The decoder starts from the learned ``prior_ftr0`` and walks ``dec_tower``: before each group
   d > 0 come ``num_cell_per_cond_dec`` MBConv cells; then the prior parameters
   dec_sampler_{d-1}(ELU(s)), the encoder combiner enc_feature + conv(s), the posterior residual
   enc_sampler_d(.) (added to the prior's raw parameters with ``res_dist``), z = mu + sigma eps,
   the flows (``nf_cells``, posterior only, volume preserving) and s = DecCombiner(s, z).
4. ``post_process`` cells, ``image_conditional`` = ELU -> WN conv 3x3 -> the likelihood's
   parameters (``net_out``).

KL per group: the analytic Gaussian KL without flows, the one-sample estimate
log q(z_0) - log p(z_K) with flows.

Variable tree (``N`` is the index of the original ModuleList, in construction order):

* params
  * ``prior_ftr0`` [h_top, w_top, C_dec m_top]
  * ``stem``, ``enc0``, ``image_conditional``, ``enc_sampler_N`` (N = group d),
    ``dec_sampler_N`` (N = d - 1): ``Conv2D`` (``kernel`` HWIO, ``log_weight_norm`` [O],
    ``bias`` [O])
  * ``pre_process_N``, ``enc_tower_N`` (cells: ``ResBNSwishCell``; combiners: ``EncCombiner``
    with ``conv``), ``dec_tower_N`` (cells: ``MBConvCell``; combiners: ``DecCombiner`` with
    ``conv``), ``post_process_N`` (``MBConvCell``): see ``nvae_jax.nn.cells`` for the inside.
  * ``nf_cells_N`` (N = d * num_nf + n): ``cell1``/``cell2`` with ``conv_z0``, ``conv_z2``, ``mu``
    (``nvae_jax.nn.ar``).
  * ``likelihood``: parameters of the output distribution, if it has any.
* batch_stats: ``mean``, ``var`` of every ``BatchNorm`` at the same paths (``bn_*``).
* spectral (owned by :class:`NVAETask`, not the module): power-iteration vectors ``u`` [n, rows],
  ``v`` [n, cols] per group of equally shaped conv matrices (key ``o<rows>_i<cols>``, convs in
  sorted module-path order) and ``calls`` (see ``nvae_jax.objectives.spectral``).
* conv_kernels (transient, only when requested as mutable): the effective kernel of every conv.

:class:`NVAETask` (registered as ``'nvae'``) wraps the module for the training platform: KL
warm-up and balancing, spectral and BN regularisation (``nvae_jax.objectives``), importance-
weighted evaluation and sampling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nvae_jax import policy
from nvae_jax.distributions import make_output_distribution
from nvae_jax.distributions.latent_normal import LatentNormal, split_params, top_prior
from nvae_jax.models.base import register
from nvae_jax.nn.activations import elu
from nvae_jax.nn.ar import PairedARCell
from nvae_jax.nn.cells import DecCombiner, EncCombiner, MBConvCell, ResBNSwishCell
from nvae_jax.nn.conv import CONV_KERNELS, DEPTHWISE_IMPLS, Conv2D
from nvae_jax import objectives

CHANNEL_MULT = 2
EXPANSION_DEC = 6
EXPANSION_POST = 3


def groups_per_scale(num_scales: int, num_groups: int, ada_groups: bool,
                     min_groups: int = 1) -> tuple[int, ...]:
  """Groups per scale, highest resolution first: n everywhere, or halved per scale with ada
  groups (g_{s+1} = max(min_groups, floor(g_s / 2)))."""
  g, n = [], num_groups
  for _ in range(num_scales):
    g.append(n)
    if ada_groups:
      n = max(min_groups, n // 2)
  return tuple(g)


@dataclasses.dataclass(frozen=True)
class NVAEArch:
  """The static architecture: the original's arguments plus the image geometry.

  ``image_shape`` is (H, W, C) of the model input; ``output_channels`` the channels of
  ``net_out``; ``crop`` the pixels removed on each side before the likelihood (2 for MNIST).
  """
  image_shape: tuple[int, int, int]
  output_channels: int
  num_channels_enc: int = 32
  num_channels_dec: int = 32
  num_preprocess_blocks: int = 2
  num_preprocess_cells: int = 3
  num_postprocess_blocks: int = 2
  num_postprocess_cells: int = 3
  num_latent_scales: int = 1
  num_groups_per_scale: int = 10
  num_latent_per_group: int = 20
  num_cell_per_cond_enc: int = 2
  num_cell_per_cond_dec: int = 2
  ada_groups: bool = False
  min_groups_per_scale: int = 1
  use_se: bool = True
  res_dist: bool = True
  num_nf: int = 0
  crop: int = 0

  def __post_init__(self):
    positive = ('num_channels_enc', 'num_channels_dec', 'num_preprocess_blocks',
                'num_preprocess_cells', 'num_postprocess_blocks', 'num_postprocess_cells',
                'num_latent_scales', 'num_groups_per_scale', 'num_latent_per_group',
                'min_groups_per_scale', 'output_channels')
    for f in positive:
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f'model.{f}: expected a positive int, got {v!r}')
    for f in ('num_cell_per_cond_enc', 'num_cell_per_cond_dec', 'num_nf', 'crop'):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f'model.{f}: expected a non-negative int, got {v!r}')
    if self.num_latent_scales == 1 and self.num_groups_per_scale == 1:
      raise ValueError('model: the vanilla-VAE special case (num_latent_scales=1 and '
                       'num_groups_per_scale=1) of the original is not implemented; use at least '
                       '2 groups')
    if len(self.image_shape) != 3:
      raise ValueError(f'image_shape: expected (H, W, C), got {self.image_shape}')
    h, w, _ = self.image_shape
    f = self.total_downsampling
    if h % f or w % f:
      raise ValueError(f'image_shape: H and W must be divisible by 2^(num_preprocess_blocks + '
                       f'num_latent_scales - 1) = {f}, got {h}x{w}')
    if 2 * self.crop >= min(h, w):
      raise ValueError(f'crop: {self.crop} pixels per side leave nothing of a {h}x{w} image')

  @property
  def total_downsampling(self) -> int:
    return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

  @property
  def groups_per_scale(self) -> tuple[int, ...]:
    """Groups per scale from the highest resolution to the lowest (encoder order)."""
    return groups_per_scale(self.num_latent_scales, self.num_groups_per_scale, self.ada_groups,
                            self.min_groups_per_scale)

  @property
  def num_groups(self) -> int:
    return sum(self.groups_per_scale)

  @property
  def top_shape(self) -> tuple[int, int, int]:
    """Shape of ``prior_ftr0``: (h_top, w_top, C_dec m_top)."""
    h, w, _ = self.image_shape
    f = self.total_downsampling
    return (h // f, w // f, self.num_channels_dec * f)

  def latent_shapes(self) -> list[tuple[int, int, int]]:
    """(h, w, L) of every group, in decoder order (top first)."""
    h, w, _ = self.top_shape
    shapes = []
    for s, n in enumerate(self.groups_per_scale[::-1]):
      shapes += [(h * 2 ** s, w * 2 ** s, self.num_latent_per_group)] * n
    return shapes

  def plan(self) -> dict[str, list[tuple[str, int]]]:
    """The cell lists in the original's construction order: (kind, output channels).

    Kinds: ``normal_pre``, ``down_pre``, ``normal_enc``, ``down_enc``, ``combiner_enc``,
    ``normal_dec``, ``up_dec``, ``combiner_dec``, ``up_post``, ``normal_post``.  The ``plan`` also
    lists the channel counts of ``enc_sampler`` (encoder side, per group) and ``dec_sampler``.
    """
    ce, cd = self.num_channels_enc, self.num_channels_dec
    pre, mult = [], 1
    for _ in range(self.num_preprocess_blocks):
      for c in range(self.num_preprocess_cells):
        if c == self.num_preprocess_cells - 1:
          pre.append(('down_pre', ce * mult * CHANNEL_MULT))
          mult *= CHANNEL_MULT
        else:
          pre.append(('normal_pre', ce * mult))
    enc, gps = [], self.groups_per_scale
    for s in range(self.num_latent_scales):
      for g in range(gps[s]):
        enc += [('normal_enc', ce * mult)] * self.num_cell_per_cond_enc
        if not (s == self.num_latent_scales - 1 and g == gps[s] - 1):
          enc.append(('combiner_enc', ce * mult))
      if s < self.num_latent_scales - 1:
        enc.append(('down_enc', ce * mult * CHANNEL_MULT))
        mult *= CHANNEL_MULT
    enc_sampler, dec_sampler, dec = [], [], []
    for s in range(self.num_latent_scales):
      for g in range(gps[self.num_latent_scales - s - 1]):
        enc_sampler.append(('enc_sampler', ce * mult))
        if not (s == 0 and g == 0):
          dec_sampler.append(('dec_sampler', cd * mult))
          dec += [('normal_dec', cd * mult)] * self.num_cell_per_cond_dec
        dec.append(('combiner_dec', cd * mult))
      if s < self.num_latent_scales - 1:
        dec.append(('up_dec', cd * mult // CHANNEL_MULT))
        mult //= CHANNEL_MULT
    post = []
    for _ in range(self.num_postprocess_blocks):
      for c in range(self.num_postprocess_cells):
        if c == 0:
          post.append(('up_post', cd * mult // CHANNEL_MULT))
          mult //= CHANNEL_MULT
        else:
          post.append(('normal_post', cd * mult))
    return dict(pre_process=pre, enc_tower=enc, enc_sampler=enc_sampler,
                dec_sampler=dec_sampler, dec_tower=dec, post_process=post)


def _uniform01(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype)


def _crop(a: jax.Array, c: int) -> jax.Array:
  return a if c == 0 else a[:, c:-c, c:-c, :]


class NVAE(nn.Module):
  """The NVAE network (see the module docstring).

  Attributes:
    arch: the static architecture.
    likelihood_name, likelihood_options: the output distribution
      (``make_output_distribution(name, **dict(options))``).
    dtype: compute dtype of convolutions and activations (parameters stay float32; latent
      densities and the likelihood are float32).
    depthwise_impl: ``'lax'`` or ``'shift'`` (see ``nvae_jax.nn.conv``).
    remat_policy: ``'none'`` or a ``jax.checkpoint_policies`` name applied to every cell.
  """
  arch: NVAEArch
  likelihood_name: str = 'bernoulli'
  likelihood_options: tuple = ()
  dtype: Any = jnp.float32
  depthwise_impl: str = 'lax'
  remat_policy: str = 'none'

  def setup(self):
    a = self.arch
    if self.depthwise_impl not in DEPTHWISE_IMPLS:
      raise ValueError(f'depthwise_impl: expected one of {DEPTHWISE_IMPLS}, got '
                       f'{self.depthwise_impl!r}')
    plan = a.plan()
    dt, dw = self.dtype, self.depthwise_impl
    res_cell = policy.remat(ResBNSwishCell, self.remat_policy, static_argnums=(2,))
    mb_cell = policy.remat(MBConvCell, self.remat_policy, static_argnums=(2,))
    wn = lambda c, k: Conv2D(c, k, padding=(k - 1) // 2, use_bias=True, dtype=dt)  # noqa: E731

    def make(kind, c):
      if kind in ('normal_pre', 'normal_enc'):
        return res_cell(c, stride=1, use_se=a.use_se, dtype=dt)
      if kind in ('down_pre', 'down_enc'):
        return res_cell(c, stride=2, use_se=a.use_se, dtype=dt)
      if kind == 'combiner_enc':
        return EncCombiner(c, dtype=dt)
      if kind == 'combiner_dec':
        return DecCombiner(c, dtype=dt)
      ex = EXPANSION_DEC if kind.endswith('_dec') else EXPANSION_POST
      return mb_cell(c, ex, upsample=kind.startswith('up_'), use_se=a.use_se,
                     depthwise_impl=dw, dtype=dt)

    self.prior_ftr0 = self.param('prior_ftr0', _uniform01, a.top_shape, jnp.float32)
    self.stem = wn(a.num_channels_enc, 3)
    self.pre_process = [make(k, c) for k, c in plan['pre_process']]
    self.enc_tower = [make(k, c) for k, c in plan['enc_tower']]
    c_top = plan['enc_tower'][-1][1]
    self.enc0 = wn(c_top, 1)
    self.enc_sampler = [wn(2 * a.num_latent_per_group, 3) for _ in plan['enc_sampler']]
    self.dec_sampler = [wn(2 * a.num_latent_per_group, 1) for _ in plan['dec_sampler']]
    self.nf_cells = [PairedARCell(depthwise_impl=dw, dtype=dt)
                     for _ in range(a.num_groups * a.num_nf)]
    self.dec_tower = [make(k, c) for k, c in plan['dec_tower']]
    self.post_process = [make(k, c) for k, c in plan['post_process']]
    self.image_conditional = wn(a.output_channels, 3)
    self.likelihood = make_output_distribution(self.likelihood_name,
                                               **dict(self.likelihood_options))
    self._dec_kinds = tuple(k for k, _ in plan['dec_tower'])
    self._enc_kinds = tuple(k for k, _ in plan['enc_tower'])

  # -- helpers --------------------------------------------------------------------------------

  def _noise(self, eps, d: int, shape) -> jax.Array:
    if eps is None:
      return jax.random.normal(self.make_rng('sample'), shape, jnp.float32)
    e = eps[d]
    if tuple(e.shape) != tuple(shape):
      raise ValueError(f'eps[{d}]: expected shape {tuple(shape)}, got {tuple(e.shape)}')
    return jnp.asarray(e, jnp.float32)

  def _flows(self, z: jax.Array, d: int) -> jax.Array:
    for n in range(self.arch.num_nf):
      z = self.nf_cells[d * self.arch.num_nf + n](z)
    return z

  def _top_state(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.prior_ftr0.astype(self.dtype), (batch,) + self.arch.top_shape)

  def _check_eps(self, eps):
    if eps is None:
      return
    if len(eps) != self.arch.num_groups:
      raise ValueError(f'eps: expected {self.arch.num_groups} noise arrays (one per latent group, '
                       f'decoder order), got {len(eps)}')

  # -- forward --------------------------------------------------------------------------------

  def __call__(self, x: jax.Array, train: bool, eps: Optional[Sequence[jax.Array]] = None
               ) -> dict[str, Any]:
    """Encodes, samples the posterior, decodes and evaluates the likelihood.

    Args:
      x: [B, H, W, C] images in [0, 1].
      train: batch statistics in BN (True) or running statistics (False).
      eps: optional standard-normal noise per group in decoder order, [B, h_d, w_d, L] each;
        drawn from the ``'sample'`` rng stream when omitted.

    Returns a dict: ``net_out`` [B, H, W, K] (float32), ``recon`` [B] (-log p(x|z), nats, over
    the cropped image), ``log_q``, ``log_p`` [B] (summed over groups and elements), ``kl_all``
    [B, G], ``kl_diag`` [G, L] (batch mean of the per-channel KL summed over H, W), ``z`` (list
    of the posterior latents after the flows).
    """
    a = self.arch
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(a.image_shape):
      raise ValueError(f'x: expected [B, {", ".join(map(str, a.image_shape))}] images, got '
                       f'{tuple(x.shape)}')
    batch = x.shape[0]
    self._check_eps(eps)
    shapes = [(batch,) + s for s in a.latent_shapes()]

    s = self.stem((2.0 * x - 1.0).astype(self.dtype))
    for cell in self.pre_process:
      s = cell(s, train)
    enc_feats, enc_combiners = [], []
    for kind, cell in zip(self._enc_kinds, self.enc_tower):
      if kind == 'combiner_enc':
        enc_feats.append(s)
        enc_combiners.append(cell)
      else:
        s = cell(s, train)
    enc_feats.reverse()
    enc_combiners.reverse()

    ftr = elu(self.enc0(elu(s)))
    q = LatentNormal.from_params(self.enc_sampler[0](ftr).astype(jnp.float32))
    z = q.sample(self._noise(eps, 0, shapes[0]))
    log_q_conv = q.log_prob(z)
    z = self._flows(z, 0)
    p = top_prior(z.shape)
    groups = [(q, p, log_q_conv, p.log_prob(z))]
    zs = [z]

    s = self._top_state(batch)
    d = 0
    for kind, cell in zip(self._dec_kinds, self.dec_tower):
      if kind != 'combiner_dec':
        s = cell(s, train)
        continue
      if d > 0:
        mu_p, ls_p = split_params(self.dec_sampler[d - 1](elu(s)).astype(jnp.float32))
        ftr = enc_combiners[d - 1](enc_feats[d - 1], s)
        mu_q, ls_q = split_params(self.enc_sampler[d](ftr).astype(jnp.float32))
        if a.res_dist:
          q = LatentNormal.from_raw(mu_p + mu_q, ls_p + ls_q)
        else:
          q = LatentNormal.from_raw(mu_q, ls_q)
        z = q.sample(self._noise(eps, d, shapes[d]))
        log_q_conv = q.log_prob(z)
        z = self._flows(z, d)
        p = LatentNormal.from_raw(mu_p, ls_p)
        groups.append((q, p, log_q_conv, p.log_prob(z)))
        zs.append(z)
      s = cell(s, z)
      d += 1

    for cell in self.post_process:
      s = cell(s, train)
    net_out = self.image_conditional(elu(s)).astype(jnp.float32)

    kl_all, kl_diag = [], []
    log_q = jnp.zeros((batch,), jnp.float32)
    log_p = jnp.zeros((batch,), jnp.float32)
    for q, p, lq, lp in groups:
      kl_per_var = lq - lp if a.num_nf > 0 else q.kl(p)
      kl_diag.append(jnp.mean(jnp.sum(kl_per_var, axis=(1, 2)), axis=0))
      kl_all.append(jnp.sum(kl_per_var, axis=(1, 2, 3)))
      log_q = log_q + jnp.sum(lq, axis=(1, 2, 3))
      log_p = log_p + jnp.sum(lp, axis=(1, 2, 3))
    recon = -self.likelihood.log_prob(_crop(net_out, a.crop), _crop(x, a.crop), train)
    return dict(net_out=net_out, recon=recon, log_q=log_q, log_p=log_p,
                kl_all=jnp.stack(kl_all, axis=1), kl_diag=jnp.stack(kl_diag), z=zs)

  def sample(self, num: int, temperature: float = 1.0, train: bool = False,
             eps: Optional[Sequence[jax.Array]] = None) -> jax.Array:
    """Decoder output ``net_out`` [num, H, W, K] for latents drawn from the prior at temperature t.

    z_0 ~ N(0, (1.01 t)^2), z_d ~ N(mu_p, (sigma_p t)^2); no encoder and no flows.  With
    ``train=True`` batch norm uses (and, when mutable, updates) batch statistics, which is how
    BN statistics are re-estimated for sampling.
    """
    a = self.arch
    shapes = [(num,) + s for s in a.latent_shapes()]
    self._check_eps(eps)
    z = top_prior(shapes[0], temperature=temperature).sample(self._noise(eps, 0, shapes[0]))
    s = self._top_state(num)
    d = 0
    for kind, cell in zip(self._dec_kinds, self.dec_tower):
      if kind != 'combiner_dec':
        s = cell(s, train)
        continue
      if d > 0:
        p = LatentNormal.from_params(self.dec_sampler[d - 1](elu(s)).astype(jnp.float32),
                                     temperature)
        z = p.sample(self._noise(eps, d, shapes[d]))
      s = cell(s, z)
      d += 1
    for cell in self.post_process:
      s = cell(s, train)
    return self.image_conditional(elu(s)).astype(jnp.float32)

  def output_sample(self, net_out: jax.Array, rng: jax.Array, temperature: float = 1.0):
    """A draw from the output distribution, [B, H, W, C] in [0, 1] (full, uncropped size)."""
    return self.likelihood.sample(net_out, rng, temperature)

  def output_mean(self, net_out: jax.Array) -> jax.Array:
    """The output distribution's mean, [B, H, W, C] in [0, 1]."""
    return self.likelihood.mean(net_out)


def importance_weighted_nll(log_w: jax.Array) -> jax.Array:
  """-log p^(x) = -(logsumexp_k log w_k - log K) from log weights [K, B]."""
  k = log_w.shape[0]
  return -(jax.nn.logsumexp(log_w, axis=0) - math.log(k))


# ---------------------------------------------------------------------------------------------
# The ModelTask.

_MODEL_FIELDS = ('num_channels_enc', 'num_channels_dec', 'num_preprocess_blocks',
                 'num_preprocess_cells', 'num_postprocess_blocks', 'num_postprocess_cells',
                 'num_latent_scales', 'num_groups_per_scale', 'num_latent_per_group',
                 'num_cell_per_cond_enc', 'num_cell_per_cond_dec', 'ada_groups',
                 'min_groups_per_scale', 'use_se', 'res_dist', 'num_nf')
_TASK_DEFAULTS = dict(num_mixture_dec=10, decoder='auto', faithful_dml=False,
                      kl_anneal_portion=0.3, kl_const_portion=1e-4, kl_const_coeff=1e-4,
                      weight_decay_norm=0.0, weight_decay_norm_init=10.0,
                      weight_decay_norm_anneal=False, depthwise_impl='auto', total_steps=0)


def _get(cfg, name, default=None):
  return cfg[name] if name in cfg else default


def resolve_depthwise_impl(name: str) -> str:
  """``auto`` -> ``shift`` on CPU, ``lax`` on accelerators."""
  if name == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'lax'
  if name not in DEPTHWISE_IMPLS:
    raise ValueError(f'model.depthwise_impl: expected "auto" or one of {DEPTHWISE_IMPLS}, '
                     f'got {name!r}')
  return name


def likelihood_from_config(config) -> tuple[str, tuple]:
  """(name, options) of the output distribution for ``config.model.decoder``.

  ``auto``: Bernoulli for binarised data, the discretized logistic mixture for
  ``num_mixture_dec > 1`` (``faithful_dml`` selects the original's quirks) and NVAE's Normal
  decoder for ``num_mixture_dec == 1``; any other value is a name of the output-distribution
  registry.
  """
  m, data = config.model, config.data
  name = _get(m, 'decoder', 'auto')
  mix = int(_get(m, 'num_mixture_dec', 10))
  bits = int(_get(data, 'num_bits', 8))
  if name == 'auto':
    if _get(data, 'binarize', 'none') != 'none':
      name = 'bernoulli'
    elif mix > 1:
      name = 'logistic_mixture'
    elif mix == 1:
      name = 'nvae_normal'
    else:
      raise ValueError(f'model.num_mixture_dec: expected a positive int, got {mix}')
  if name == 'logistic_mixture':
    opts = dict(num_mixture=mix, num_bits=bits, faithful=bool(_get(m, 'faithful_dml', False)))
  elif name == 'categorical':
    opts = dict(num_bits=bits)
  else:
    opts = {}
  return name, tuple(sorted(opts.items()))


@register('nvae')
class NVAETask:
  """NVAE for the training platform (``nvae_jax.models.base.ModelTask``).

  ``config.model`` fields are named as the original command-line arguments (see
  ``configs/nvae_base.py``); ``total_steps`` (the KL warm-up horizon N) defaults to
  ``config.train.num_steps`` when 0.  The image geometry is read from the batch (and from the
  variables in ``sample``), so one task serves any input size.

  Loss = mean_b(recon_b + beta balanced_KL_b) + lambda (L_SR + L_BN); metrics: ``loss``,
  ``recon``, ``kl``, ``balanced_kl``, ``kl_coeff``, ``norm_loss``, ``bn_loss``, ``wdn_coeff``,
  ``elbo`` (negative ELBO, nats), ``kl_group_<d>``.
  """

  mutable_collections = ('batch_stats', 'spectral')

  def __init__(self, config):
    self.config = config
    m = config.model
    for f in _MODEL_FIELDS:
      if f not in m:
        raise ValueError(f'config.model.{f}: missing (NVAE needs the original arguments; see '
                         'configs/nvae_base.py)')
    self.hparams = {f: m[f] for f in _MODEL_FIELDS}
    for f, v in _TASK_DEFAULTS.items():
      setattr(self, f, _get(m, f, v))
    total = int(self.total_steps or config.train.num_steps)
    if total <= 0:
      raise ValueError(f'config.model.total_steps / config.train.num_steps: expected a positive '
                       f'number of steps for the KL warm-up, got {total}')
    self.total_steps = total
    self.likelihood_name, self.likelihood_options = likelihood_from_config(config)
    self.dtype = policy.compute_dtype(config.precision.compute_dtype)
    self.remat_policy = config.remat.policy
    policy.checkpoint_policy(self.remat_policy)  # validates the name
    self.depthwise = resolve_depthwise_impl(self.depthwise_impl)
    self.crop = int(_get(config.data, 'pad', 0))
    self.num_importance = int(config.eval.num_importance_samples)
    self.importance_chunk = int(_get(config.eval, 'importance_chunk', 1)) or self.num_importance
    if self.num_importance < 1 or self.num_importance % self.importance_chunk:
      raise ValueError(f'config.eval: num_importance_samples={self.num_importance} must be a '
                       f'positive multiple of importance_chunk={self.importance_chunk}')
    self._models: dict[tuple, NVAE] = {}

  # -- construction ---------------------------------------------------------------------------

  def arch(self, image_shape) -> NVAEArch:
    dist = make_output_distribution(self.likelihood_name, **dict(self.likelihood_options))
    out_c = dist.num_channels(int(image_shape[-1]))
    return NVAEArch(image_shape=tuple(int(s) for s in image_shape), output_channels=out_c,
                    crop=self.crop, **self.hparams)

  def model(self, image_shape) -> NVAE:
    """The flax module for images of shape (H, W, C)."""
    key = tuple(int(s) for s in image_shape)
    if key not in self._models:
      self._models[key] = NVAE(self.arch(key), self.likelihood_name, self.likelihood_options,
                               dtype=self.dtype, depthwise_impl=self.depthwise,
                               remat_policy=self.remat_policy)
    return self._models[key]

  def _image_shape_from_variables(self, variables) -> tuple[int, int, int]:
    h, w, _ = variables['params']['prior_ftr0'].shape
    c = variables['params']['stem']['kernel'].shape[2]
    f = 2 ** (self.hparams['num_preprocess_blocks'] + self.hparams['num_latent_scales'] - 1)
    return (h * f, w * f, c)

  @staticmethod
  def _images(batch) -> jax.Array:
    x = batch['image']
    if x.ndim != 4:
      raise ValueError(f"batch['image']: expected [B, H, W, C], got shape {tuple(x.shape)}")
    return jnp.asarray(x, jnp.float32)

  def alpha(self) -> np.ndarray:
    """The KL-balancing alpha per group (decoder order)."""
    h = self.hparams
    return objectives.kl_balance_alpha(groups_per_scale(
        h['num_latent_scales'], h['num_groups_per_scale'], h['ada_groups'],
        h['min_groups_per_scale']))

  # -- ModelTask ------------------------------------------------------------------------------

  def init(self, rng, batch):
    x = self._images(batch)
    model = self.model(x.shape[1:])
    k_param, k_sample, k_sr = jax.random.split(rng, 3)
    variables = dict(model.init({'params': k_param, 'sample': k_sample}, x, True))
    kernels = variables.pop(CONV_KERNELS)
    variables.pop('intermediates', None)
    variables.setdefault('batch_stats', {})
    variables['spectral'] = objectives.init_spectral_state(kernels, k_sr)
    return variables

  def forward(self, variables, x, train: bool, rng=None, eps=None, mutable=()):
    """``NVAE.__call__`` with the task's module; returns (outputs, updated collections)."""
    model = self.model(x.shape[1:])
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    rngs = {'sample': rng} if rng is not None else {}
    out, upd = model.apply(v, x, train, eps, rngs=rngs, mutable=list(mutable))
    return out, upd

  def objective(self, variables, x, rng, step, eps=None, spectral_iters=None):
    """The training loss and everything it is made of (used by ``loss`` and the reference check).

    Returns (loss, aux) with aux holding the model outputs and ``beta``, ``gamma``, ``alpha``,
    ``balanced_kl`` [B], ``nelbo_loss``, ``norm_loss``, ``bn_loss``, ``wdn_coeff`` and the
    updated ``batch_stats`` and ``spectral`` state.
    """
    out, upd = self.forward(variables, x, True, rng=rng, eps=eps,
                            mutable=('batch_stats', CONV_KERNELS, 'intermediates'))
    beta = objectives.kl_coeff(step, self.total_steps, self.kl_anneal_portion,
                               self.kl_const_portion, self.kl_const_coeff)
    alpha = self.alpha()
    balanced_kl, gamma, kl_vals = objectives.kl_balance(out['kl_all'], beta, alpha)
    nelbo_loss = jnp.mean(out['recon'] + balanced_kl)
    norm_loss, spectral, _ = objectives.spectral_loss(
        upd[CONV_KERNELS], variables['spectral'], spectral_iters)
    bn_loss = objectives.batchnorm_loss(variables['params'], variables.get('batch_stats', {}))
    wdn = objectives.regularizer_weight(beta, self.weight_decay_norm,
                                        self.weight_decay_norm_anneal,
                                        self.weight_decay_norm_init)
    loss = nelbo_loss + wdn * (norm_loss + bn_loss)
    aux = dict(out=out, beta=beta, gamma=gamma, alpha=alpha, kl_vals=kl_vals,
               balanced_kl=balanced_kl, nelbo_loss=nelbo_loss, norm_loss=norm_loss,
               bn_loss=bn_loss, wdn_coeff=wdn, conv_kernels=upd[CONV_KERNELS],
               batch_stats=upd.get('batch_stats', {}), spectral=spectral)
    return loss, aux

  def loss(self, variables, batch, rng, step):
    x = self._images(batch)
    loss, aux = self.objective(variables, x, rng, step)
    out = aux['out']
    kl = jnp.sum(out['kl_all'], axis=1)
    metrics = dict(loss=loss, recon=jnp.mean(out['recon']), kl=jnp.mean(kl),
                   balanced_kl=jnp.mean(aux['balanced_kl']), kl_coeff=aux['beta'],
                   norm_loss=aux['norm_loss'], bn_loss=aux['bn_loss'],
                   wdn_coeff=aux['wdn_coeff'], elbo=jnp.mean(out['recon'] + kl))
    for d in range(out['kl_all'].shape[1]):
      metrics[f'kl_group_{d}'] = aux['kl_vals'][d]
    new_state = {'batch_stats': aux['batch_stats'], 'spectral': aux['spectral']}
    return loss, (metrics, new_state)

  def evaluate(self, variables, batch, rng):
    """Eval-mode (running BN statistics) negative ELBO and importance-weighted NLL.

    K = ``config.eval.num_importance_samples`` posterior samples per image, drawn
    ``importance_chunk`` at a time (the batch is tiled chunk times) under ``lax.map``:
    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),  nll = -(logsumexp_k log w_k - log K),
    elbo = mean_k (recon_k + sum_g KL_g,k) (negative ELBO, nats).
    """
    x = self._images(batch)
    b = x.shape[0]
    chunk, k = self.importance_chunk, self.num_importance
    xt = jnp.tile(x, (chunk, 1, 1, 1))

    def one(key):
      out, _ = self.forward(variables, xt, False, rng=key)
      log_w = -out['recon'] - out['log_q'] + out['log_p']
      nelbo = out['recon'] + jnp.sum(out['kl_all'], axis=1)
      return log_w.reshape(chunk, b), nelbo.reshape(chunk, b), out['recon'].reshape(chunk, b)

    log_w, nelbo, recon = lax.map(one, jax.random.split(rng, k // chunk))
    log_w = log_w.reshape(k, b)
    return dict(nll=importance_weighted_nll(log_w), elbo=jnp.mean(nelbo.reshape(k, b), axis=0),
                recon=jnp.mean(recon.reshape(k, b), axis=0))

  def sample(self, variables, rng, num, temperature):
    shape = self._image_shape_from_variables(variables)
    model = self.model(shape)
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    k_z, k_x = jax.random.split(rng)
    net_out = model.apply(v, num, temperature, False, rngs={'sample': k_z}, method=NVAE.sample)
    if self.likelihood_name == 'bernoulli':
      # The original shows Bernoulli means for binary data, and draws pixels otherwise.
      return model.apply(v, net_out, method=NVAE.output_mean)
    return model.apply(v, net_out, k_x, 1.0, method=NVAE.output_sample)

  def prepare_sampling(self, variables, rng, temperature, cache_dir):
    """Decoder BN statistics re-estimated at ``temperature`` (``nvae_jax.nvae_sampling``), cached
    as ``cache_dir/bn_t<t>.npz``; ``config.sample.readjust_bn_steps = 0`` keeps the training ones."""
    steps = int(self.config.sample.get('readjust_bn_steps', 0))
    if steps <= 0 or 'batch_stats' not in variables:
      return variables
    from nvae_jax import nvae_sampling  # pylint: disable=import-outside-toplevel
    stats, _ = nvae_sampling.cached_bn_stats(
        self, variables, rng, temperature, cache_dir, steps=steps,
        batch=int(self.config.sample.get('readjust_bn_batch', 16)))
    return {**variables, 'batch_stats': stats}

  def reconstruct(self, variables, batch, rng):
    x = self._images(batch)
    out, _ = self.forward(variables, x, False, rng=rng)
    model = self.model(x.shape[1:])
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    return model.apply(v, out['net_out'], method=NVAE.output_mean)

  def describe(self):
    from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
    shape = tuple(image_shape(self.config.data))
    arch = self.arch(shape)
    dist = make_output_distribution(self.likelihood_name, **dict(self.likelihood_options))
    return {'inputs': shape, 'latents': arch.latent_shapes(),
            'outputs': shape[:2] + (arch.output_channels,),
            'likelihood': {'name': self.likelihood_name,
                           'continuous': bool(getattr(dist, 'continuous', False))}}
