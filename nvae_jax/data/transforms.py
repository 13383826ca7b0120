"""Image transforms of the input pipeline, in numpy on uint8 NHWC data.

Order applied by the pipeline (geometry on uint8, values last):

1. ``fit``: optional fixed crop box (CelebA64, as NVAE), then a centre crop to a square of the
   shorter side and a bilinear (anti-aliased, PIL) resize to the content size, when a size is asked.
2. ``pad``: ``p`` zero pixels on every side (MNIST 28 -> 32 with p = 2).
3. ``flip``: horizontal flip of the rows selected by the caller.
4. Values, one of
   * ``quantize``: ``x = floor(k / 2**(8 - b)) / (2**b - 1)`` for a uint8 intensity ``k`` and
     ``b = num_bits`` (8 bits: ``k / 255``), as NVAE's ``--num_x_bits``;
   * ``binarize_dynamic``: ``x = 1[u < k / 255]`` with ``u ~ U[0, 1)``, i.e.
     ``x ~ Bernoulli(k / 255)``;
   * ``binarize_threshold``: ``x = 1[k >= 128]`` (``k / 255 > 1/2``).

Outputs are float32 in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def center_square(img: np.ndarray) -> np.ndarray:
  """Crops the central ``s x s`` square, ``s = min(H, W)``; odd excess goes to the bottom/right."""
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top:top + s, left:left + s]


def resize(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a uint8 ``[H, W, C]`` image to ``[size, size, C]`` (PIL, per channel).

  PIL widens the bilinear kernel by the scale factor when shrinking, so downsampling is
  anti-aliased as torchvision's ``Resize`` on PIL images (what NVAE uses).
  """
  if img.shape[0] == size and img.shape[1] == size:
    return img
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]))
                      .resize((size, size), Image.BILINEAR)) for c in range(img.shape[-1])]
  return np.stack(chans, axis=-1)


def fit(img: np.ndarray, size: int, crop_box: Sequence[int] | None = None) -> np.ndarray:
  """Crop box (PIL order: left, upper, right, lower), centre square, resize to ``size``.

  ``size == 0`` returns the image unchanged (native size, no crop).
  """
  if size == 0:
    return img
  if crop_box is not None:
    left, upper, right, lower = crop_box
    img = img[upper:lower, left:right]
  return resize(center_square(img), size)


def pad(images: np.ndarray, p: int) -> np.ndarray:
  """Zero-pads ``[N, H, W, C]`` by ``p`` pixels on each side of H and W."""
  if p == 0:
    return images
  return np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))


def flip(images: np.ndarray, which: np.ndarray) -> np.ndarray:
  """Mirrors left-right the rows of ``[N, H, W, C]`` where the boolean ``which[N]`` is set."""
  if not which.any():
    return images
  out = images.copy()
  out[which] = images[which, :, ::-1]
  return out


def quantize(images: np.ndarray, num_bits: int) -> np.ndarray:
  """uint8 -> float32 ``floor(k / 2**(8 - b)) / (2**b - 1)`` through a 256-entry lookup table."""
  k = np.arange(256)
  table = ((k >> (8 - num_bits)) / (2**num_bits - 1)).astype(np.float32)
  return table[images]


def binarize_dynamic(images: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Bernoulli(k / 255) samples as float32 {0, 1}; ``u`` is uniform [0, 1) of the same size."""
  return (u.reshape(images.shape) < images / 255.0).astype(np.float32)


def binarize_threshold(images: np.ndarray) -> np.ndarray:
  """``1[k >= 128]`` as float32 {0, 1}."""
  return (images >= 128).astype(np.float32)
