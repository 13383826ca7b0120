"""The input pipeline: deterministic, host-sharded, exactly resumable batches of images.

``make_pipeline(config.data, split, train=..., seed=...)`` returns a :class:`Pipeline`, an iterator
of ``{'image': float32 [B, H, W, C] in [0, 1], 'mask': float32 [B]}`` with ``B`` the per-host batch
(``batch_size`` or ``eval_batch_size`` divided by ``process_count``).

Order and sharding (``n`` examples in the split, ``P`` hosts, host ``p``, global batch ``G``,
per-host batch ``B = G / P``).  The stream of *global* batches does not depend on ``P``: host ``p``
gets rows ``[p B, (p + 1) B)`` of every global batch, so the hosts' rows are disjoint and equally
many, their concatenation in host order is the global batch, and a 1-host run sees exactly the
batches of an 8-host run.

* ``train=True``: an infinite stream of epochs.  Epoch ``e`` visits the split in the order
  ``perm_e = permutation(key(seed, SHUFFLE, e), n)`` (see :mod:`hashrng`); global batch ``s`` is
  ``perm_e[s G:(s + 1) G]`` for ``s < n // G`` (the remainder is dropped).  ``mask`` is all ones.
* ``train=False``: one pass in split order: global batch ``s`` is examples ``[s G, (s + 1) G)``
  for ``s < ceil(n / G)``; rows past ``n`` are zeros with ``mask = 0``, so shapes stay static,
  every host yields the same number of batches, and the ``mask = 1`` rows of all hosts together
  are every example exactly once.  Then ``StopIteration`` (``reset()`` restarts).

Randomness is a pure function of the example's index ``i`` in the split: a flip (``train`` and
``data.random_flip``) when ``uniform(key(seed, FLIP, e, i)) < 1/2``, and dynamic binarisation
``x = 1[u < k / 255]`` with ``u`` from ``key(seed, BINARIZE, e, i)`` in training and from
``key(seed, EVAL_BINARIZE, 0, i)`` in evaluation (one fixed binarisation of the eval split per
seed).  So batch ``(e, step)`` depends on nothing else, and ``get_state()`` = ``{epoch, step}``
(plus a fingerprint of the setup that ``set_state`` checks) resumes exactly, even on a different
number of hosts with the same global batch.

Transforms (:mod:`transforms`), on uint8 then to float32: crop/resize the content to
``image_size - 2 pad`` (when ``image_size > 0``), zero-pad by ``pad``, flip, then quantise to
``num_bits`` (``floor(k / 2**(8 - b)) / (2**b - 1)``) or binarise (``binarize`` = ``dynamic`` or
``threshold``, values {0, 1}).  The final image is ``image_size`` square, or the native size plus
``2 pad`` when ``image_size == 0``.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any

import numpy as np

from nvae_jax.data import hashrng
from nvae_jax.data import sources as sources_lib
from nvae_jax.data import transforms
from nvae_jax.errors import DataError

BINARIZE_MODES = ('none', 'dynamic', 'threshold')
_MIN_ROWS_PER_WORKER = 16  # smaller batches are read in the calling thread
_STATE_FINGERPRINT = ('train', 'seed', 'split', 'split_size', 'global_batch_size')


def _positive_int(data: Any, field: str, minimum: int = 1) -> int:
  value = data[field]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f'data.{field}: expected an int >= {minimum}, found {value!r}')
  return int(value)


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count})')
  return int(process_index), int(process_count)


def _check_common(data: Any) -> None:
  """Validates the value/geometry fields shared by every source."""
  _positive_int(data, 'channels')
  _positive_int(data, 'image_size', 0)
  _positive_int(data, 'pad', 0)
  bits = _positive_int(data, 'num_bits')
  if bits > 8:
    raise DataError(f'data.num_bits: expected 1..8 (8 or 5 in NVAE), found {bits}')
  if data.binarize not in BINARIZE_MODES:
    raise DataError(f'data.binarize: expected one of {BINARIZE_MODES}, found {data.binarize!r}')
  if data.binarize != 'none' and bits != 8:
    raise DataError(f'data.num_bits={bits} has no meaning with data.binarize={data.binarize!r} '
                     '(binary data); leave num_bits at 8')


def _geometry(native: tuple, data: Any, what: str) -> tuple[int, tuple[int, int, int]]:
  """``(content_size, final_shape)``; content_size 0 means: keep the native size."""
  channels, size, p = data.channels, data.image_size, data.pad
  if len(native) != 3:
    raise DataError(f'{what}: images must be [H, W, C]; found shape {tuple(native)}')
  if native[-1] is not None and native[-1] != channels:
    raise DataError(f'data.channels={channels} but {what} has images of shape {tuple(native)}')
  if size > 0:
    content = size - 2 * p
    if content < 1:
      raise DataError(f'data.image_size={size} leaves no room for data.pad={p} on each side '
                       f'(need image_size > 2 * pad)')
    return content, (size, size, channels)
  if native[0] is None or native[1] is None:
    raise DataError(f'data.image_size=0 keeps the native size, but {what} has images of varying '
                     f'size {tuple(native)}; set data.image_size '
                     '(e.g. --config.data.image_size=32)')
  return 0, (native[0] + 2 * p, native[1] + 2 * p, channels)


def image_shape(data_config: Any) -> tuple[int, int, int]:
  """Final ``(H, W, C)`` of ``config.data``'s images after crop/resize and pad (reads no pixels)."""
  _check_common(data_config)
  if data_config.name == 'folder' and data_config.image_size == 0:
    raise DataError('data.image_size=0 keeps the native size, but data.name=folder has images '
                     'of varying size; set data.image_size (e.g. --config.data.image_size=64)')
  native = sources_lib.native_shape(data_config)
  return _geometry(native, data_config, f'data.name={data_config.name!r}')[1]


class Pipeline:
  """Iterator of batches over one split of one source; see the module docstring.

  Attributes:
    num_examples: this host's share of the split: ``n // P`` in training (each epoch visits
      ``batches_per_epoch * batch_size`` of them, the shuffled remainder being dropped), and its
      ``mask = 1`` rows of the pass in evaluation.
    batches_per_epoch: batches per epoch (training) or in the single pass (evaluation).
    batch_size: rows per batch on this host; ``global_batch_size`` over all hosts.
    split_size: examples in the whole split.
    image_shape: ``(H, W, C)`` of every image.
  """

  def __init__(self, source: Any, data: Any, split: str, *, train: bool, seed: int,
               process_index: int, process_count: int, num_workers: int | None = None):
    _check_common(data)
    field = 'batch_size' if train else 'eval_batch_size'
    global_batch = _positive_int(data, field)
    if global_batch % process_count:
      raise DataError(f'data.{field}={global_batch} is not divisible by process_count='
                       f'{process_count}')
    self.source = source
    self.split = split
    self.train = bool(train)
    self.seed = int(seed)
    self.process_index, self.process_count = process_index, process_count
    self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    self.global_batch_size = global_batch
    self.batch_size = global_batch // process_count
    self._content, self.image_shape = _geometry(source.native_shape, data, source.description)
    self._pad = data.pad
    self._num_bits = data.num_bits
    self._binarize = data.binarize
    self._flip = bool(data.random_flip) and self.train

    n = len(source)
    if n == 0:
      raise DataError(f'{source.description} is empty')
    self.split_size = n
    if self.train:
      self.num_examples = n // process_count
      self.batches_per_epoch = n // global_batch
      if self.batches_per_epoch == 0:
        raise DataError(f'{source.description} has {n} examples: fewer than one batch of '
                         f'data.{field}={global_batch}')
    else:
      self.batches_per_epoch = math.ceil(n / global_batch)
      first = np.arange(self.batches_per_epoch) * global_batch + process_index * self.batch_size
      self.num_examples = int(np.clip(n - first, 0, self.batch_size).sum())
    self._perm_epoch, self._perm = -1, None
    self._epoch, self._step = 0, 0

  # ------------------------------------------------------------------ iteration and state

  def __iter__(self) -> 'Pipeline':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.train and self._step >= self.batches_per_epoch:
      raise StopIteration
    batch = self.batch_at(self._epoch, self._step)
    self._step += 1
    if self.train and self._step == self.batches_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def reset(self) -> None:
    """Back to the first batch (epoch 0)."""
    self._epoch, self._step = 0, 0

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next batch is ``batch_at(epoch, step)``."""
    return {'epoch': self._epoch, 'step': self._step, 'train': self.train, 'seed': self.seed,
            'split': self.split, 'split_size': self.split_size,
            'global_batch_size': self.global_batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at ``state`` from :meth:`get_state` of a pipeline built the same way."""
    mine = self.get_state()
    missing = [k for k in mine if k not in state]
    if missing:
      raise DataError(f'pipeline state: missing fields {missing}; found {sorted(state)}')
    for k in _STATE_FINGERPRINT:
      if state[k] != mine[k]:
        raise DataError(f'pipeline state: {k}={state[k]!r} was saved, but this pipeline has '
                         f'{k}={mine[k]!r}; resume with the same data config, seed and hosts')
    epoch, step = int(state['epoch']), int(state['step'])
    last = self.batches_per_epoch if not self.train else self.batches_per_epoch - 1
    if epoch < 0 or not 0 <= step <= last or (not self.train and epoch != 0):
      raise DataError(f'pipeline state: epoch={epoch}, step={step} out of range '
                       f'(batches_per_epoch={self.batches_per_epoch}, train={self.train})')
    self._epoch, self._step = epoch, step

  # ------------------------------------------------------------------ batches

  def indices_at(self, epoch: int, step: int) -> np.ndarray:
    """Split indices of the real rows of batch ``(epoch, step)`` on this host."""
    start = step * self.global_batch_size + self.process_index * self.batch_size
    if self.train:
      if epoch != self._perm_epoch:
        k = hashrng.key(self.seed, hashrng.SHUFFLE, epoch)
        self._perm, self._perm_epoch = hashrng.permutation(k, self.split_size), epoch
      return self._perm[start:start + self.batch_size]
    return np.arange(min(start, self.split_size), min(start + self.batch_size, self.split_size))

  def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of ``epoch`` (a pure function of the setup and these two numbers)."""
    idx = self.indices_at(epoch, step)
    images = self._load(idx)
    if self._flip:
      u = hashrng.uniform(hashrng.key(self.seed, hashrng.FLIP, epoch, idx), 1)[:, 0]
      images = transforms.flip(images, u < 0.5)
    if self._binarize == 'dynamic':
      stream, e = (hashrng.BINARIZE, epoch) if self.train else (hashrng.EVAL_BINARIZE, 0)
      u = hashrng.uniform(hashrng.key(self.seed, stream, e, idx), int(np.prod(self.image_shape)))
      x = transforms.binarize_dynamic(images, u)
    elif self._binarize == 'threshold':
      x = transforms.binarize_threshold(images)
    else:
      x = transforms.quantize(images, self._num_bits)
    out = np.zeros((self.batch_size,) + self.image_shape, np.float32)
    out[:len(idx)] = x
    mask = np.zeros((self.batch_size,), np.float32)
    mask[:len(idx)] = 1.0
    return {'image': out, 'mask': mask}

  def _read_fit(self, idx: np.ndarray):
    raw = self.source.read(idx)
    if self._content:
      raw = [transforms.fit(im, self._content, self.source.crop_box) for im in raw]
    return raw

  def _load(self, idx: np.ndarray) -> np.ndarray:
    """uint8 ``[len(idx), H, W, C]`` after crop/resize and pad."""
    if len(idx) == 0:
      return np.zeros((0,) + self.image_shape, np.uint8)
    workers = min(self.num_workers, len(idx) // _MIN_ROWS_PER_WORKER)
    if workers > 1 and not isinstance(self.source, sources_lib.ArraySource):
      # Decoding (PNG/JPEG) and PIL resizing release the GIL: threads scale with cores.
      chunks = np.array_split(idx, workers)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        raw = [im for part in pool.map(self._read_fit, chunks) for im in part]
    else:
      raw = self._read_fit(idx)
    shapes = {tuple(im.shape) for im in raw}
    if len(shapes) > 1:
      raise DataError(f'{self.source.description}: images of different shapes {sorted(shapes)} '
                       'cannot share a batch; set data.image_size to resize them')
    images = np.asarray(raw) if not isinstance(raw, np.ndarray) else raw
    images = transforms.pad(images, self._pad)
    if images.shape[1:] != self.image_shape:
      raise DataError(f'{self.source.description}: expected images of shape {self.image_shape} '
                       f'after resize/pad, found {images.shape[1:]} (data.channels='
                       f'{self.image_shape[-1]})')
    return images


def make_pipeline(data_config: Any, split: str, *, train: bool, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_workers: int | None = None) -> Pipeline:
  """The pipeline over ``split`` of the source named by ``data_config.name``.

  Args:
    data_config: ``config.data`` (see ``nvae_jax/config/schema.py``).
    split: split name, e.g. ``data_config.train_split``; TFDS slicing syntax works for TFDS and
      the local sources (``'train[:90%]'``).
    train: infinite shuffled/augmented stream (True) or one ordered, padded pass (False).
    seed: root of the order, flips and binarisation; the same on every host.
    process_index, process_count: this host and the number of hosts; default (None) is
      ``jax.process_index()`` / ``jax.process_count()``, read at call time.
    num_workers: threads that decode and resize a batch (default ``min(8, cpu_count)``; a batch
      uses at most one per 16 rows).  The batches do not depend on it.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  _check_common(data_config)
  source = sources_lib.open_source(data_config, split)
  return Pipeline(source, data_config, split, train=train, seed=seed,
                  process_index=process_index, process_count=process_count,
                  num_workers=num_workers)


def make_pipeline_from_arrays(images_uint8: np.ndarray, data_config: Any, *, train: bool,
                              seed: int, process_index: int | None = None,
                              process_count: int | None = None,
                              split: str = 'arrays') -> Pipeline:
  """The same pipeline over in-memory uint8 ``[N, H, W, C]`` images (e.g. in a notebook).

  ``data_config`` supplies the transforms and batch sizes; its ``name``/``data_dir`` are ignored.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  _check_common(data_config)
  source = sources_lib.ArraySource(images_uint8, data_config.channels, 'images_uint8')
  return Pipeline(source, data_config, split, train=train, seed=seed,
                  process_index=process_index, process_count=process_count)
