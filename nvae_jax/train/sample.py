"""Sample and reconstruction grids: drawing from a task, laying images out and writing PNGs.

A grid of ``N`` images ``[N, H, W, C]`` in ``[0, 1]`` is laid out row-major on ``rows x cols``
tiles (``cols = ceil(sqrt(N))`` unless given) separated by ``pad`` pixels of ``pad_value``, and
quantised to uint8 as ``round(255 * clip(x, 0, 1))``.  Temperature ``T`` scales the prior's
standard deviations (``T = 1`` is the model's prior); its exact meaning is the task's.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import numpy as np
from PIL import Image

from nvae_jax.train import step as step_lib


def grid_layout(num: int, cols: int | None = None) -> tuple[int, int]:
  """``(rows, cols)`` for ``num`` tiles; ``cols`` defaults to ``ceil(sqrt(num))``."""
  if num < 1:
    raise ValueError(f'num: expected at least one image, got {num}')
  cols = int(cols) if cols else math.ceil(math.sqrt(num))
  if cols < 1:
    raise ValueError(f'cols: expected a positive number of columns, got {cols}')
  return math.ceil(num / cols), cols


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 1,
              pad_value: float = 1.0, scale: int = 1) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images in [0, 1] into one uint8 ``[rows*(sH+pad)-pad, ..., C]`` image.

  ``scale`` repeats every pixel ``scale x scale`` times (nearest neighbour) before tiling, so that
  small images stay visible.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images: expected [N, H, W, C] with C in (1, 3), found {images.shape}')
  if int(scale) < 1:
    raise ValueError(f'scale: expected a positive int, got {scale}')
  if scale > 1:
    images = images.repeat(int(scale), axis=1).repeat(int(scale), axis=2)
  n, h, w, c = images.shape
  rows, cols = grid_layout(n, cols)
  grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), pad_value, np.float32)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = images[i]
  return np.round(255.0 * np.clip(grid, 0.0, 1.0)).astype(np.uint8)


def save_png(path: str, grid: np.ndarray) -> str:
  """Writes a uint8 ``[H, W, C]`` image (C = 1 or 3) as a PNG; returns the path."""
  grid = np.asarray(grid)
  if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[-1] not in (1, 3):
    raise ValueError(f'grid: expected uint8 [H, W, 1 or 3], found {grid.dtype} {grid.shape}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def display_scale(image_side: int, target: int = 32) -> int:
  """The pixel repetition that shows ``image_side``-pixel images at least ``target`` pixels wide."""
  return max(1, -(-int(target) // max(1, int(image_side))))


def write_grid(path: str, images: np.ndarray, cols: int | None = None,
               scale: int | None = None) -> str:
  """``save_png(path, make_grid(images, cols, scale=...))``; ``scale`` defaults to
  :func:`display_scale` of the image height."""
  images = np.asarray(images)
  scale = display_scale(images.shape[1]) if scale is None else scale
  return save_png(path, make_grid(images, cols, scale=scale))


def make_sampler(task, mesh, variables_sharding, num: int, temperature: float) -> Callable:
  """Jitted ``(variables, rng) -> [num, H, W, C]`` samples (replicated on the mesh)."""
  repl = step_lib.replicated(mesh)
  return step_lib.jit_on_mesh(lambda v, r: task.sample(v, r, int(num), float(temperature)),
                              mesh, in_shardings=(variables_sharding, repl), out_shardings=repl)


def make_reconstructor(task, mesh, variables_sharding) -> Callable:
  """Jitted ``(variables, batch, rng) -> reconstructions`` (batch replicated, output replicated)."""
  repl = step_lib.replicated(mesh)
  return step_lib.jit_on_mesh(task.reconstruct, mesh,
                              in_shardings=(variables_sharding, repl, repl), out_shardings=repl)


def pair_rows(originals: np.ndarray, recons: np.ndarray, cols: int | None = None) -> np.ndarray:
  """Interleaves rows of originals and their reconstructions: row 2k originals, 2k+1 recons."""
  if originals.shape != recons.shape:
    raise ValueError(f'recons: expected the shape of the originals {originals.shape}, found '
                     f'{recons.shape}')
  n = originals.shape[0]
  _, cols = grid_layout(n, cols)
  out = []
  for start in range(0, n, cols):
    a, b = originals[start:start + cols], recons[start:start + cols]
    if a.shape[0] < cols:  # pad the last row with blank (white) tiles
      fill = np.ones((cols - a.shape[0],) + a.shape[1:], a.dtype)
      a, b = np.concatenate([a, fill]), np.concatenate([b, fill])
    out += [a, b]
  return np.concatenate(out)


def sample_checkpoint(config, workdir: str, *, output: str = '', task=None) -> dict:
  """``--mode=sample``: a grid of ``config.sample.num`` samples at ``config.sample.temperature``
  from the latest checkpoint (after the task's ``prepare_sampling`` hook; the task reads its
  other ``config.sample.*`` options, e.g. NVAE's output temperature and mode), written to
  ``output`` (default
  ``<workdir>/samples_T<temperature>_step<N>.png``).  Returns ``{'path', 'num', 'temperature',
  'step'}``."""
  # pylint: disable=import-outside-toplevel
  from nvae_jax.data import image_shape
  from nvae_jax.train import build
  from nvae_jax.train import state as state_lib
  run = build.build(config, task)
  state, _, step, shardings = build.restore_latest(run, workdir, image_shape(config.data),
                                                   config.data.batch_size)
  num, temperature = int(config.sample.num), float(config.sample.temperature)
  sampler = make_sampler(run.task, run.mesh, build.variables_sharding(shardings), num,
                         temperature)
  variables = state_lib.variables_of(state)
  rng = state_lib.stream_key(config.seed, state_lib.SAMPLE_STREAM)
  # The ModelTask hook (a no-op by default): NVAE re-estimates its decoder batch-norm statistics
  # at this temperature, with config.sample.readjust_bn_*.
  variables = run.task.prepare_sampling(variables, jax.random.fold_in(rng, 1), temperature,
                                        os.path.join(workdir, 'bn_stats', f'step{step}'))
  images = step_lib.to_host(sampler(variables, rng))
  path = output or os.path.join(workdir, f'samples_T{temperature:g}_step{step}.png')
  if jax.process_index() == 0:
    write_grid(path, images)
  return {'path': path, 'num': num, 'temperature': temperature, 'step': int(step)}
