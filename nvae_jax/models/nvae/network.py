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

One group's maths (the encoder cells before a combiner, step 3 for d > 0, and its prior-walk
version for sampling) is written once, in ``groups.py``.  With ``scan_groups``, each run of two or
more identical groups (those of one scale) is one ``lax.scan`` over the groups' stacked
variables (``nvae_jax.nn.stacked``); the variable tree below is the same either way.

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

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import host_init, policy
from nvae_jax.distributions import make_output_distribution
from nvae_jax.distributions.latent_normal import LatentNormal, top_prior
from nvae_jax.models.nvae import groups
from nvae_jax.models.nvae.plan import NVAEArch, group_runs
from nvae_jax.nn.activations import elu
from nvae_jax.nn.ar import PairedARCell
from nvae_jax.nn.conv import CONV_KERNELS, DEPTHWISE_IMPLS
from nvae_jax.nn.stacked import scan_children


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
    scan_groups: run each run of two or more identical latent groups (the groups of one scale)
      as one ``lax.scan`` over their stacked variables, so that XLA compiles one group per run
      instead of every group (``nvae_jax.nn.stacked``).  Same variables, same results.
  """
  arch: NVAEArch
  likelihood_name: str = 'bernoulli'
  likelihood_options: tuple = ()
  dtype: Any = jnp.float32
  depthwise_impl: str = 'lax'
  remat_policy: str = 'none'
  scan_groups: bool = True

  def setup(self):
    a = self.arch
    if self.depthwise_impl not in DEPTHWISE_IMPLS:
      raise ValueError(f'depthwise_impl: expected one of {DEPTHWISE_IMPLS}, got '
                       f'{self.depthwise_impl!r}')
    plan = a.plan()
    dt = self.dtype
    make = lambda kind, c: groups.make_cell(  # noqa: E731
        kind, c, a, dt, self.depthwise_impl, self.remat_policy)

    self.prior_ftr0 = host_init.param(self, 'prior_ftr0', host_init.Uniform(0.0, 1.0), a.top_shape)
    self.stem = groups.wn_conv(a.num_channels_enc, 3, dt)
    self.pre_process = [make(k, c) for k, c in plan['pre_process']]
    self.enc_tower = [make(k, c) for k, c in plan['enc_tower']]
    c_top = plan['enc_tower'][-1][1]
    self.enc0 = groups.wn_conv(c_top, 1, dt)
    self.enc_sampler = [groups.wn_conv(2 * a.num_latent_per_group, 3, dt)
                        for _ in plan['enc_sampler']]
    self.dec_sampler = [groups.wn_conv(2 * a.num_latent_per_group, 1, dt)
                        for _ in plan['dec_sampler']]
    self.nf_cells = [PairedARCell(depthwise_impl=self.depthwise_impl, dtype=dt)
                     for _ in range(a.num_groups * a.num_nf)]
    self.dec_tower = [make(k, c) for k, c in plan['dec_tower']]
    self.post_process = [make(k, c) for k, c in plan['post_process']]
    self.image_conditional = groups.wn_conv(a.output_channels, 3, dt)
    self.likelihood = make_output_distribution(self.likelihood_name,
                                               **dict(self.likelihood_options))
    self._plan = plan
    enc_walk, dec_walk = a.encoder_walk(), a.decoder_walk()
    self._enc_runs = group_runs(enc_walk)
    self._top_group, self._dec_runs = dec_walk[0], group_runs(dec_walk[1:])
    # The encoder combiner of decoder group d > 0 is the (d - 1)-th from the top.
    enc_groups = [g for g in enc_walk if not isinstance(g, int)]
    self._enc_combiner_of = tuple(g.combiner for g in reversed(enc_groups))

  # -- helpers --------------------------------------------------------------------------------

  def _noise(self, eps, d: int, shape) -> jax.Array:
    if eps is None:
      return jax.random.normal(self.make_rng('sample'), shape, jnp.float32)
    e = eps[d]
    if tuple(e.shape) != tuple(shape):
      raise ValueError(f'eps[{d}]: expected shape {tuple(shape)}, got {tuple(e.shape)}')
    return jnp.asarray(e, jnp.float32)

  def _flows(self, z: jax.Array, d: int) -> jax.Array:
    for flow in self._flow_cells(d):
      z = flow(z)
    return z

  def _flow_cells(self, d: int) -> list:
    n = self.arch.num_nf
    return self.nf_cells[d * n:(d + 1) * n]

  def _top_state(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.prior_ftr0.astype(self.dtype), (batch,) + self.arch.top_shape)

  def _check_eps(self, eps):
    if eps is None:
      return
    if len(eps) != self.arch.num_groups:
      raise ValueError(f'eps: expected {self.arch.num_groups} noise arrays (one per latent group, '
                       f'decoder order), got {len(eps)}')

  # -- groups: one at a time through the children, or a run as one scan ----------------------

  def _scanned(self, run: tuple) -> bool:
    """Whether a run of groups goes through one ``lax.scan`` (never while initialising: the
    children create their variables by being called)."""
    return self.scan_groups and len(run) > 1 and not self.is_initializing()

  def _updated_collections(self) -> list[str]:
    """The collections a group may write (statistics, effective kernels, sown values)."""
    return [c for c in ('batch_stats', CONV_KERNELS, 'intermediates')
            if self.is_mutable_collection(c)]

  def _scan_policy(self):
    """What the backward pass keeps of a scanned group: the cells' remat policy, else matmul and
    conv outputs (``nvae_jax.nn.stacked``: 0.6x the temporary memory of keeping everything, and
    no slower)."""
    return policy.checkpoint_policy(self.remat_policy) or jax.checkpoint_policies.dots_saveable

  def _group_template(self, step, posterior: bool) -> nn.Module:
    """The unbound stand-in for decoder groups shaped like ``step``."""
    cls = groups.PosteriorGroup if posterior else groups.PriorGroup
    return cls(self.arch, self._plan['dec_tower'][step.combiner][1],
               self._plan['enc_tower'][self._enc_combiner_of[step.group - 1]][1],
               dtype=self.dtype, depthwise_impl=self.depthwise_impl,
               remat_policy=self.remat_policy, parent=None)

  def _group_parts(self, step, posterior: bool) -> groups.GroupParts:
    d = step.group
    base = ([self.dec_tower[i] for i in step.cells], self.dec_sampler[d - 1],
            self.dec_tower[step.combiner])
    if not posterior:
      return groups.GroupParts(*base)
    return groups.GroupParts(*base, self.enc_tower[self._enc_combiner_of[d - 1]],
                             self.enc_sampler[d], self._flow_cells(d))

  def _encoder_run(self, run: tuple, s: jax.Array, train: bool) -> tuple[jax.Array, list]:
    """The cells of a run of encoder groups; returns (s, the feature of each group)."""
    if self._scanned(run) and self.arch.num_cell_per_cond_enc > 0:
      template = groups.EncoderGroup(self.arch, self._plan['enc_tower'][run[0].combiner][1],
                                     dtype=self.dtype, remat_policy=self.remat_policy,
                                     parent=None)
      steps = [{f'cells_{k}': self.enc_tower[i].name for k, i in enumerate(g.cells)}
               for g in run]
      s, feats = scan_children(self, template, steps, s, None, args=(train,),
                               read=('params', 'batch_stats'),
                               mutable=self._updated_collections(), policy=self._scan_policy())
      return s, [feats[i] for i in range(len(run))]
    feats = []
    for g in run:
      for i in g.cells:
        s = self.enc_tower[i](s, train)
      feats.append(s)
    return s, feats

  def _posterior_run(self, run: tuple, s, enc_feats, noise, train: bool):
    """A run of decoder groups on the posterior walk; returns (s, [z], [terms])."""
    feats = [enc_feats[g.group - 1] for g in run]
    if not self._scanned(run):
      zs, terms = [], []
      for g, f, e in zip(run, feats, noise):
        s, z, t = groups.posterior_step(s, f, e, self._group_parts(g, True), train,
                                        self.arch.res_dist)
        zs.append(z)
        terms.append(t)
      return s, zs, terms
    steps = [groups.stand_in_names(self._group_parts(g, True)) for g in run]
    s, (z, t) = scan_children(self, self._group_template(run[0], True), steps, s,
                              (jnp.stack(feats), jnp.stack(noise)), args=(train,),
                              read=('params', 'batch_stats'), mutable=self._updated_collections(),
                              policy=self._scan_policy())
    n = len(run)
    return s, [z[i] for i in range(n)], [jax.tree.map(lambda a, i=i: a[i], t) for i in range(n)]

  def _prior_run(self, run: tuple, s, noise, temperature, train: bool):
    """A run of decoder groups on the prior walk; returns s."""
    if not self._scanned(run):
      for g, e in zip(run, noise):
        s = groups.prior_step(s, e, self._group_parts(g, False), temperature, train)
      return s
    steps = [groups.stand_in_names(self._group_parts(g, False)) for g in run]
    s, _ = scan_children(self, self._group_template(run[0], False), steps, s,
                         jnp.stack(noise), args=(temperature, train),
                         read=('params', 'batch_stats'), mutable=self._updated_collections(),
                         policy=self._scan_policy())
    return s

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
    enc_feats = []
    for run in self._enc_runs:
      if isinstance(run, int):
        s = self.enc_tower[run](s, train)
      else:
        s, feats = self._encoder_run(run, s, train)
        enc_feats += feats
    enc_feats.reverse()

    ftr = elu(self.enc0(elu(s)))
    q = LatentNormal.from_params(self.enc_sampler[0](ftr).astype(jnp.float32))
    z = q.sample(self._noise(eps, 0, shapes[0]))
    log_q_conv = q.log_prob(z)
    z = self._flows(z, 0)
    p = top_prior(z.shape)
    terms = [groups.group_terms(q, p, log_q_conv, p.log_prob(z), with_flows=a.num_nf > 0)]
    zs = [z]

    s = self.dec_tower[self._top_group.combiner](self._top_state(batch), z)
    for run in self._dec_runs:
      if isinstance(run, int):
        s = self.dec_tower[run](s, train)
        continue
      noise = [self._noise(eps, g.group, shapes[g.group]) for g in run]
      s, run_z, run_terms = self._posterior_run(run, s, enc_feats, noise, train)
      zs += run_z
      terms += run_terms

    for cell in self.post_process:
      s = cell(s, train)
    net_out = self.image_conditional(elu(s)).astype(jnp.float32)

    log_q = jnp.zeros((batch,), jnp.float32)
    log_p = jnp.zeros((batch,), jnp.float32)
    for t in terms:
      log_q = log_q + t['log_q']
      log_p = log_p + t['log_p']
    recon = -self.likelihood.log_prob(_crop(net_out, a.crop), _crop(x, a.crop), train)
    return dict(net_out=net_out, recon=recon, log_q=log_q, log_p=log_p,
                kl_all=jnp.stack([t['kl_all'] for t in terms], axis=1),
                kl_diag=jnp.stack([t['kl_diag'] for t in terms]), z=zs)

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
    s = self.dec_tower[self._top_group.combiner](self._top_state(num), z)
    for run in self._dec_runs:
      if isinstance(run, int):
        s = self.dec_tower[run](s, train)
        continue
      noise = [self._noise(eps, g.group, shapes[g.group]) for g in run]
      s = self._prior_run(run, s, noise, temperature, train)
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
