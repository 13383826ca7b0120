"""Random-access image sources: TFDS, scikit-learn digits, image folders, npz files, arrays.

A source is an indexable split: ``len(source)`` examples, ``source.read(indices)`` returns their
uint8 ``[H, W, C]`` images (a list, or one array when all have one size), ``source.native_shape``
is ``(H, W, C)`` with ``None`` for sizes that vary between images, and ``source.crop_box`` an
optional fixed crop applied before resizing.

Splits of the local sources (TFDS splits are TFDS's own, slicing included):

* ``digits``: scikit-learn's bundled 1797 8x8 digits; ``train`` = the first 1500, ``test`` = the
  remaining 297, ``all`` = every one.  Intensities 0..16 are scaled to ``round(v * 255 / 16)``.
* ``folder``: every ``.png``/``.jpg``/``.jpeg`` file under ``data_dir`` (recursive), sorted by the
  relative POSIX path ``r``; ``r`` is in ``test`` iff ``int.from_bytes(sha256(r)[:8], 'big') % 10 ==
  0`` (about 10 %, stable when files are added or removed), otherwise in ``train``; ``all`` = every
  file.
* ``npz``: the images array of the file (key ``images``, or ``data.npz_key`` when the config has
  it, or else the only uint8 4-D array); ``train`` = the first ``n - n // 10`` rows, ``test`` = the
  last ``n // 10``, ``all`` = every row.

Any local split name takes a Python-style slice with integers or percentages of that split:
``train[:1000]``, ``all[90%:]``, ``test[-50:]``.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from typing import Any, Sequence

import numpy as np

from nvae_jax.errors import DataError, DataNotFoundError

# NVAE's CelebA64 crop (datasets.py, CropCelebA64): PIL box (left, upper, right, lower) = 148x148.
CELEBA_CROP_BOX = (15, 40, 163, 188)
LOCAL_SOURCES = ('digits', 'folder', 'npz')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
DIGITS_TRAIN = 1500

_SPLIT_RE = re.compile(r'^(\w+)(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$')


def _bound(text: str | None, n: int) -> int | None:
  if text is None:
    return None
  if text.endswith('%'):
    pct = int(text[:-1])
    return (abs(pct) * n // 100) * (1 if pct >= 0 else -1)
  return int(text)


def select_split(split: str, bases: dict[str, np.ndarray], what: str) -> np.ndarray:
  """Indices of ``split`` (a base name with an optional slice) among ``bases`` of a local source."""
  m = _SPLIT_RE.match(split.strip())
  if m is None or m.group(1) not in bases:
    raise DataError(f'split {split!r} of {what}: expected one of {sorted(bases)}, optionally '
                     f"sliced like 'train[:90%]' or 'all[1000:]'")
  base = bases[m.group(1)]
  lo, hi = _bound(m.group(2), len(base)), _bound(m.group(3), len(base))
  return base[slice(lo, hi)]


def check_images(images: Any, channels: int, what: str) -> np.ndarray:
  """Validates a uint8 ``[N, H, W, C]`` array with ``C == channels``; returns it as an ndarray."""
  images = np.asarray(images)
  if images.ndim != 4:
    hint = ' (add a channel axis: images[..., None])' if images.ndim == 3 else ''
    raise DataError(f'{what}: images must be a 4-D uint8 array [N, H, W, C]; found rank '
                     f'{images.ndim} with shape {images.shape}{hint}')
  if images.dtype != np.uint8:
    raise DataError(f'{what}: pixels must be uint8 in 0..255; found dtype {images.dtype} '
                     '(convert explicitly, e.g. np.round(x * 255).astype(np.uint8))')
  if images.shape[-1] != channels:
    raise DataError(f'{what}: data.channels={channels} but the images have '
                     f'{images.shape[-1]} channels (shape {images.shape})')
  return images


class ArraySource:
  """In-memory uint8 ``[N, H, W, C]`` images (all of one size)."""

  crop_box = None

  def __init__(self, images: np.ndarray, channels: int, what: str = 'arrays'):
    self.images = check_images(images, channels, what)
    self.native_shape = tuple(int(d) for d in self.images.shape[1:])
    self.description = what

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: np.ndarray) -> np.ndarray:
    return self.images[indices]


# ----------------------------------------------------------------------------- digits

def _digits_images() -> np.ndarray:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  v = load_digits().images  # float64 [1797, 8, 8] with integer values 0..16
  return np.round(v * (255.0 / 16.0)).astype(np.uint8)[..., None]


def digits_source(split: str, channels: int) -> ArraySource:
  images = _digits_images()
  n = len(images)
  bases = {'train': np.arange(DIGITS_TRAIN), 'test': np.arange(DIGITS_TRAIN, n),
           'all': np.arange(n)}
  idx = select_split(split, bases, 'data.name=digits')
  return ArraySource(images[idx], channels, f'digits split {split!r}')


# ----------------------------------------------------------------------------- npz

def npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of every array in an ``.npz`` file, from the headers only."""
  if not os.path.isfile(path):
    raise DataNotFoundError(f'data.data_dir: npz file {path!r} does not exist (data.name=npz '
                            'takes the path of an .npz file in data.data_dir)')
  out = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for member in zf.namelist():
        if not member.endswith('.npy'):
          continue
        with zf.open(member) as f:
          version = np.lib.format.read_magic(f)
          read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read_header(f)
        out[member[:-4]] = (tuple(shape), np.dtype(dtype))
  except (zipfile.BadZipFile, ValueError) as e:
    raise DataError(f'data.data_dir: {path!r} is not a readable .npz file: {e}') from e
  return out


def npz_key(path: str, key: str = '') -> str:
  """The images key: ``key`` if given, else ``images``, else the only uint8 4-D array."""
  headers = npz_headers(path)
  listing = ', '.join(f'{k}: {d} {s}' for k, (s, d) in headers.items())
  if key:
    if key not in headers:
      raise DataError(f'data.npz_key={key!r} is not in {path!r}; it holds {listing}')
    return key
  if 'images' in headers:
    return 'images'
  candidates = [k for k, (s, d) in headers.items() if d == np.uint8 and len(s) == 4]
  if len(candidates) != 1:
    raise DataError(f'{path!r}: cannot tell which array holds the images: expected a key '
                     f"'images' or exactly one uint8 4-D array, found {len(candidates)} among "
                     f'{listing}; set data.npz_key')
  return candidates[0]


def npz_source(path: str, split: str, channels: int, key: str = '') -> ArraySource:
  key = npz_key(path, key)
  with np.load(path) as f:
    images = f[key]
  what = f'npz {path!r} key {key!r}'
  check_images(images, channels, what)
  n = len(images)
  n_test = n // 10
  bases = {'train': np.arange(n - n_test), 'test': np.arange(n - n_test, n), 'all': np.arange(n)}
  idx = select_split(split, bases, what)
  return ArraySource(images[idx], channels, f'{what} split {split!r}')


# ----------------------------------------------------------------------------- folder

def folder_in_test(relpath: str) -> bool:
  """The folder split rule: sha256 of the relative POSIX path, first 8 bytes mod 10 == 0."""
  h = hashlib.sha256(relpath.encode('utf-8')).digest()
  return int.from_bytes(h[:8], 'big') % 10 == 0


def list_images(folder: str) -> list[str]:
  """Relative POSIX paths of the png/jpg files under ``folder``, sorted."""
  if not os.path.isdir(folder):
    raise DataNotFoundError(f'data.data_dir: image folder {folder!r} does not exist '
                            '(data.name=folder takes a directory of png/jpg files)')
  out = []
  for root, _, files in os.walk(folder):
    for name in files:
      if name.lower().endswith(IMAGE_SUFFIXES):
        out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
  if not out:
    raise DataError(f'data.data_dir: image folder {folder!r} holds no {"/".join(IMAGE_SUFFIXES)} '
                     'files (searched recursively)')
  return sorted(out)


class FolderSource:
  """Image files decoded with PIL to grayscale (channels=1) or RGB (channels=3)."""

  crop_box = None

  def __init__(self, folder: str, split: str, channels: int):
    if channels not in (1, 3):
      raise DataError(f'data.channels={channels}: an image folder is read as grayscale (1) or '
                       'RGB (3)')
    files = list_images(folder)
    test = np.array([folder_in_test(f) for f in files])
    bases = {'train': np.flatnonzero(~test), 'test': np.flatnonzero(test),
             'all': np.arange(len(files))}
    what = f'image folder {folder!r}'
    idx = select_split(split, bases, what)
    if len(idx) == 0:
      raise DataError(f'split {split!r} of {what} is empty ({len(files)} files in all; the test '
                       'split takes the files whose sha256(relative path) % 10 == 0)')
    self.folder = folder
    self.files = [files[i] for i in idx]
    self.mode = 'L' if channels == 1 else 'RGB'
    self.native_shape = (None, None, channels)
    self.description = f'{what} split {split!r}'

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices: np.ndarray) -> list[np.ndarray]:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    out = []
    for i in indices:
      path = os.path.join(self.folder, self.files[i])
      try:
        with Image.open(path) as im:
          arr = np.asarray(im.convert(self.mode))
      except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DataError(f'cannot read image file {path!r}: {type(e).__name__}: {e}') from e
      out.append(arr.reshape(arr.shape[0], arr.shape[1], -1))
    return out


# ----------------------------------------------------------------------------- TFDS

def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def _unknown_dataset(name: str) -> DataError:
  return DataError(f'data.name={name!r} is neither a TFDS dataset nor one of the local sources '
                    f'{LOCAL_SOURCES}')


def _not_prepared(name: str, split: str, data_dir: str, err: Exception) -> DataNotFoundError:
  where = (repr(data_dir) if data_dir
           else 'the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)')
  return DataNotFoundError(
      f'TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir {where} and '
      f'data.download is False ({type(err).__name__}: {err}). Prepare it in array_record format '
      f'on a machine with network access, e.g. `tfds build {name} --file_format=array_record '
      '--data_dir=DIR` (mnist, binarized_mnist and cifar10 need TensorFlow for that step only), '
      'copy DIR here and pass --config.data.data_dir=DIR; or set --config.data.download=True '
      'where the network is reachable.')


def tfds_image_shape(name: str, data_dir: str) -> tuple[int | None, int | None, int | None]:
  """The ``image`` feature shape from the builder's info (no data is read)."""
  tfds = _tfds()
  kwargs = {'data_dir': data_dir, 'file_format': 'array_record'} if data_dir else {}
  try:
    info = tfds.builder(name, **kwargs).info
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_dataset(name) from None
  if 'image' not in info.features:
    raise DataError(f'TFDS dataset {name!r} has no image feature; its features are '
                     f'{list(info.features)}')
  return tuple(info.features['image'].shape)


class TfdsSource:
  """A TFDS split read through ``tfds.data_source`` (array_record, random access, no TF)."""

  def __init__(self, name: str, split: str, data_dir: str, download: bool, channels: int):
    tfds = _tfds()
    shape = tfds_image_shape(name, data_dir)
    if shape[-1] != channels:
      raise DataError(f'data.channels={channels} but TFDS dataset {name!r} has images of shape '
                       f'{shape}')
    kwargs = dict(split=split, data_dir=data_dir or None, download=download)
    if data_dir:  # without it data_source would pick the tfrecord format and fail
      kwargs['builder_kwargs'] = {'file_format': 'array_record'}
    try:
      self.ds = tfds.data_source(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown_dataset(name) from None
    except (KeyError, FileNotFoundError, AssertionError) as e:
      raise _not_prepared(name, split, data_dir, e) from e
    except ValueError as e:
      raise DataError(f'split {split!r} of TFDS dataset {name!r}: {e}') from e
    base = name.split('/')[0]
    self.binary = base == 'binarized_mnist'  # stored as {0, 1}
    self.crop_box = CELEBA_CROP_BOX if base == 'celeb_a' else None
    self.native_shape = shape
    self.description = f'TFDS {name!r} split {split!r}'
    self._batched_reads = hasattr(self.ds, '__getitems__')

  def __len__(self) -> int:
    return len(self.ds)

  def _examples(self, indices: Sequence[int]) -> list[dict]:
    keys = [int(i) for i in indices]
    if self._batched_reads:
      try:
        return self.ds.__getitems__(keys)  # one array_record call: about 2x faster than ds[i]
      except TypeError:  # tfds.testing.mock_data's source lacks the batched read
        self._batched_reads = False
    return [self.ds[i] for i in keys]

  def read(self, indices: Sequence[int]) -> list[np.ndarray]:
    out = []
    for i, ex in zip(indices, self._examples(indices)):
      img = np.asarray(ex['image'])
      if img.dtype != np.uint8 or img.ndim != 3:
        raise DataError(f'{self.description} example {int(i)}: expected a uint8 [H, W, C] image, '
                         f'found {img.dtype} {img.shape}')
      out.append(np.where(img > 0, np.uint8(255), np.uint8(0)) if self.binary else img)
    return out


# ----------------------------------------------------------------------------- dispatch

def open_source(data: Any, split: str):
  """The source named by ``data.name`` for ``split`` (``data`` is ``config.data``)."""
  name, data_dir, channels = data.name, data.data_dir, data.channels
  if name == 'digits':
    return digits_source(split, channels)
  if name == 'npz':
    return npz_source(_need_dir(data), split, channels, data.get('npz_key', '') or '')
  if name == 'folder':
    return FolderSource(_need_dir(data), split, channels)
  return TfdsSource(name, split, data_dir, bool(data.download), channels)


def native_shape(data: Any) -> tuple[int | None, int | None, int | None]:
  """``(H, W, C)`` of the raw images of ``data.name`` (None where sizes vary), reading no pixels."""
  name = data.name
  if name == 'digits':
    return (8, 8, 1)
  if name == 'npz':
    path = _need_dir(data)
    shape, _ = npz_headers(path)[npz_key(path, data.get('npz_key', '') or '')]
    return tuple(shape[1:]) if len(shape) == 4 else tuple(shape)
  if name == 'folder':
    return (None, None, data.channels)
  return tfds_image_shape(name, data.data_dir)


def _need_dir(data: Any) -> str:
  if not data.data_dir:
    raise DataError(f"data.data_dir is empty; data.name={data.name!r} needs it "
                     '(the image folder or the .npz path)')
  return data.data_dir
