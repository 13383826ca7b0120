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

The platform's wrapper (loss, evaluation, sampling) is :class:`NVAETask` in ``task.py``.
"""

from __future__ import annotations


from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import host_init
from nvae_jax import policy
from nvae_jax.distributions import make_output_distribution
from nvae_jax.distributions.latent_normal import LatentNormal, split_params, top_prior
from nvae_jax.models.nvae.plan import EXPANSION_DEC, EXPANSION_POST, NVAEArch
from nvae_jax.nn.activations import elu
from nvae_jax.nn.ar import PairedARCell
from nvae_jax.nn.cells import DecCombiner, EncCombiner, MBConvCell, ResBNSwishCell
from nvae_jax.nn.conv import DEPTHWISE_IMPLS, Conv2D


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

    self.prior_ftr0 = host_init.param(self, 'prior_ftr0', host_init.Uniform(0.0, 1.0), a.top_shape)
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

  def sample_logits(self, num: int, temperature: float = 1.0, train: bool = False,
                    eps: Optional[Sequence[jax.Array]] = None) -> jax.Array:
    """The output distribution's parameters ("logits", ``net_out`` [num, H, W, K]) for latents
    drawn from the prior at temperature t; ``output_sample``/``output_mean`` turn them into images.

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
