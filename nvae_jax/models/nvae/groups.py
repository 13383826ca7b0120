"""NVAE's latent groups: the maths of one group, and modules that run a group with any variables.

One decoder group d > 0 (posterior walk, training and evaluation)::

    s <- cells(s)                                  num_cell_per_cond_dec MBConv cells
    (mu_p, log_sigma_p) = dec_sampler(ELU(s))      the prior's raw parameters
    f = enc_combiner(enc_feature_d, s)             enc_feature_d + conv1x1(s)
    (mu_q, log_sigma_q) = enc_sampler(f)           the posterior's (residual with res_dist)
    q = N(mu_p + mu_q, log_sigma_p + log_sigma_q)  or N(mu_q, log_sigma_q) without res_dist
    z = mu_q' + sigma_q' eps;  log q(z) before the flows;  z <- flows(z)
    p = N(mu_p, log_sigma_p);  KL = log q - log p (flows) or the analytic KL
    s <- combiner(s, z)                            conv1x1(concat[s, z])

The prior walk (sampling) keeps the cells, the dec sampler (at temperature t) and the combiner.

:func:`posterior_step` and :func:`prior_step` take the group's modules as :class:`GroupParts`:
the network's own children (``network.py``), or the submodules of :class:`PosteriorGroup` /
:class:`PriorGroup` / :class:`EncoderGroup`, unbound stand-ins that ``nvae_jax.nn.stacked``
runs over the stacked variables of a run of identical groups (one compiled group per run).
:func:`make_cell` builds every tower cell, for the network and the stand-ins alike.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvae_jax import policy
from nvae_jax.distributions.latent_normal import LatentNormal, split_params
from nvae_jax.models.nvae.plan import EXPANSION_DEC, EXPANSION_POST, NVAEArch
from nvae_jax.nn.activations import elu
from nvae_jax.nn.ar import PairedARCell
from nvae_jax.nn.cells import DecCombiner, EncCombiner, MBConvCell, ResBNSwishCell
from nvae_jax.nn.conv import Conv2D


def make_cell(kind: str, channels: int, arch: NVAEArch, dtype, depthwise_impl: str,
              remat_policy: str) -> nn.Module:
  """The cell (or combiner) of a ``plan()`` entry (kind, output channels)."""
  if kind in ('normal_pre', 'normal_enc', 'down_pre', 'down_enc'):
    cell = policy.remat(ResBNSwishCell, remat_policy, static_argnums=(2,))
    return cell(channels, stride=1 if kind.startswith('normal') else 2, use_se=arch.use_se,
                dtype=dtype)
  if kind == 'combiner_enc':
    return EncCombiner(channels, dtype=dtype)
  if kind == 'combiner_dec':
    return DecCombiner(channels, dtype=dtype)
  cell = policy.remat(MBConvCell, remat_policy, static_argnums=(2,))
  ex = EXPANSION_DEC if kind.endswith('_dec') else EXPANSION_POST
  return cell(channels, ex, upsample=kind.startswith('up_'), use_se=arch.use_se,
              depthwise_impl=depthwise_impl, dtype=dtype)


def wn_conv(channels: int, kernel_size: int, dtype) -> Conv2D:
  """A weight-normalised conv with bias and 'same' padding (stem, samplers, enc0, output)."""
  return Conv2D(channels, kernel_size, padding=(kernel_size - 1) // 2, use_bias=True, dtype=dtype)


class GroupParts(NamedTuple):
  """The modules of one decoder group (the prior walk uses cells, dec_sampler and combiner)."""
  cells: Sequence[Callable]
  dec_sampler: Callable
  combiner: Callable
  enc_combiner: Callable = None
  enc_sampler: Callable = None
  flows: Sequence[Callable] = ()


def stand_in_names(parts: GroupParts) -> dict[str, str]:
  """{stand-in submodule name (:class:`PosteriorGroup`, :class:`PriorGroup`): the name of the
  module of ``parts`` it stands for}."""
  names = {f'cells_{k}': cell.name for k, cell in enumerate(parts.cells)}
  names.update(dec_sampler=parts.dec_sampler.name, combiner=parts.combiner.name)
  if parts.enc_combiner is not None:
    names.update(enc_combiner=parts.enc_combiner.name, enc_sampler=parts.enc_sampler.name)
  names.update({f'flows_{n}': flow.name for n, flow in enumerate(parts.flows)})
  return names


def group_terms(q: LatentNormal, p: LatentNormal, log_q: jax.Array, log_p: jax.Array,
                with_flows: bool) -> dict[str, jax.Array]:
  """A group's contribution: ``kl_all`` [B], ``kl_diag`` [L] (batch mean of the per-channel KL
  summed over H, W), ``log_q``, ``log_p`` [B].  The KL is log q - log p with flows (one-sample),
  else analytic."""
  kl = log_q - log_p if with_flows else q.kl(p)
  return dict(kl_all=jnp.sum(kl, axis=(1, 2, 3)),
              kl_diag=jnp.mean(jnp.sum(kl, axis=(1, 2)), axis=0),
              log_q=jnp.sum(log_q, axis=(1, 2, 3)), log_p=jnp.sum(log_p, axis=(1, 2, 3)))


def posterior_step(s: jax.Array, enc_feature: jax.Array, noise: jax.Array, parts: GroupParts,
                   train: bool, res_dist: bool) -> tuple[jax.Array, jax.Array, dict]:
  """One decoder group d > 0 on the posterior walk (module docstring); returns (s, z, terms)."""
  for cell in parts.cells:
    s = cell(s, train)
  mu_p, ls_p = split_params(parts.dec_sampler(elu(s)).astype(jnp.float32))
  ftr = parts.enc_combiner(enc_feature, s)
  mu_q, ls_q = split_params(parts.enc_sampler(ftr).astype(jnp.float32))
  q = LatentNormal.from_raw(mu_p + mu_q, ls_p + ls_q) if res_dist else \
      LatentNormal.from_raw(mu_q, ls_q)
  z = q.sample(noise)
  log_q = q.log_prob(z)
  for flow in parts.flows:
    z = flow(z)
  p = LatentNormal.from_raw(mu_p, ls_p)
  terms = group_terms(q, p, log_q, p.log_prob(z), with_flows=bool(parts.flows))
  return parts.combiner(s, z), z, terms


def prior_step(s: jax.Array, noise: jax.Array, parts: GroupParts, temperature, train: bool
               ) -> jax.Array:
  """One decoder group d > 0 on the prior walk: z ~ N(mu_p, (sigma_p t)^2)."""
  for cell in parts.cells:
    s = cell(s, train)
  p = LatentNormal.from_params(parts.dec_sampler(elu(s)).astype(jnp.float32), temperature)
  return parts.combiner(s, p.sample(noise))


class _GroupModule(nn.Module):
  """Stand-in submodules for one decoder group: ``cells_k``, ``dec_sampler``, ``combiner`` and,
  with ``posterior``, ``enc_combiner``, ``enc_sampler``, ``flows_n``."""
  arch: NVAEArch
  channels: int
  enc_channels: int
  posterior: bool = True
  dtype: Any = jnp.float32
  depthwise_impl: str = 'lax'
  remat_policy: str = 'none'

  def setup(self):
    a, dt = self.arch, self.dtype
    self.cells = [make_cell('normal_dec', self.channels, a, dt, self.depthwise_impl,
                            self.remat_policy) for _ in range(a.num_cell_per_cond_dec)]
    self.dec_sampler = wn_conv(2 * a.num_latent_per_group, 1, dt)
    self.combiner = DecCombiner(self.channels, dtype=dt)
    if self.posterior:
      self.enc_combiner = EncCombiner(self.enc_channels, dtype=dt)
      self.enc_sampler = wn_conv(2 * a.num_latent_per_group, 3, dt)
      self.flows = [PairedARCell(depthwise_impl=self.depthwise_impl, dtype=dt)
                    for _ in range(a.num_nf)]

  def parts(self) -> GroupParts:
    if not self.posterior:
      return GroupParts(self.cells, self.dec_sampler, self.combiner)
    return GroupParts(self.cells, self.dec_sampler, self.combiner, self.enc_combiner,
                      self.enc_sampler, self.flows)


class PosteriorGroup(_GroupModule):
  """``(s, (enc_feature, noise), train) -> (s, (z, terms))``: :func:`posterior_step`."""

  def __call__(self, s, inputs, train: bool):
    enc_feature, noise = inputs
    s, z, terms = posterior_step(s, enc_feature, noise, self.parts(), train, self.arch.res_dist)
    return s, (z, terms)


class PriorGroup(_GroupModule):
  """``(s, noise, temperature, train) -> (s, None)``: :func:`prior_step`."""
  posterior: bool = False

  def __call__(self, s, noise, temperature, train: bool):
    return prior_step(s, noise, self.parts(), temperature, train), None


class EncoderGroup(nn.Module):
  """``(s, None, train) -> (s, s)``: the ``num_cell_per_cond_enc`` cells ``cells_k`` of one
  encoder group; the output is also the feature its combiner keeps."""
  arch: NVAEArch
  channels: int
  dtype: Any = jnp.float32
  remat_policy: str = 'none'

  def setup(self):
    self.cells = [make_cell('normal_enc', self.channels, self.arch, self.dtype, 'lax',
                            self.remat_policy) for _ in range(self.arch.num_cell_per_cond_enc)]

  def __call__(self, s, unused, train: bool):
    del unused
    for cell in self.cells:
      s = cell(s, train)
    return s, s
