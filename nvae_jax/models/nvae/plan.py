"""The static NVAE architecture: the original's arguments plus the image geometry.

:class:`NVAEArch` holds every shape decision of the model (channels per scale, groups per scale,
latent shapes, the cell lists in the original's construction order) so that the network
(``network.py``), the task (``task.py``) and the converter all read one plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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

  def encoder_walk(self) -> list:
    """``enc_tower`` by latent groups: :class:`EncoderGroup` for every group whose feature a
    combiner keeps (its cells, then the combiner), a bare index for any other cell (the
    ``down_enc`` cells and the cells of the last group, which has no combiner)."""
    walk, cells = [], []
    for i, (kind, _) in enumerate(self.plan()['enc_tower']):
      if kind == 'normal_enc':
        cells.append(i)
      elif kind == 'combiner_enc':
        walk.append(EncoderGroup(tuple(cells), i))
        cells = []
      else:
        walk += cells + [i]
        cells = []
    return walk + cells

  def decoder_walk(self) -> list:
    """``dec_tower`` by latent groups, top first: :class:`DecoderGroup` for every group (its
    cells, then its combiner; group 0 has no cells), a bare index for the ``up_dec`` cells."""
    walk, cells, group = [], [], 0
    for i, (kind, _) in enumerate(self.plan()['dec_tower']):
      if kind == 'normal_dec':
        cells.append(i)
      elif kind == 'combiner_dec':
        walk.append(DecoderGroup(group, tuple(cells), i))
        cells, group = [], group + 1
      else:
        walk.append(i)
    return walk


@dataclasses.dataclass(frozen=True)
class EncoderGroup:
  """One encoder group: its cells and the combiner that keeps its feature (``enc_tower``
  indices)."""
  cells: tuple[int, ...]
  combiner: int


@dataclasses.dataclass(frozen=True)
class DecoderGroup:
  """Latent group ``group`` of the decoder: its cells and its combiner (``dec_tower`` indices)."""
  group: int
  cells: tuple[int, ...]
  combiner: int


def group_runs(walk: list) -> list:
  """Consecutive groups of a walk joined into tuples (runs of identically shaped groups: a
  bare cell index, which changes the resolution, ends a run)."""
  out = []
  for item in walk:
    if isinstance(item, int):
      out.append(item)
    elif out and isinstance(out[-1], tuple):
      out[-1] += (item,)
    else:
      out.append((item,))
  return out
