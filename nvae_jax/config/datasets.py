"""The one dataset table: the original NVAE's ``--dataset`` names -> nvae_jax data fields.

Every dataset NVAE was published on (and the others its ``train.py`` accepts) maps to the
``config.data`` fields that reproduce its preprocessing (nvae_spec.md §1.1) and to the size of
its training split (nvae_spec.md §2 "Data"), from which epochs are converted to steps.  The
published configs (``configs/nvae_*.py``), the checkpoint converter and the reference check all
read this table; ``num_bits`` is not in it (5 or 8 bits is a property of the run, not of the data).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Dataset:
  """``data``: the ``config.data`` fields; ``train_examples``: training-split size (None when the
  original's split is not known here)."""
  data: Mapping[str, Any]
  train_examples: int | None = None


def _fields(name: str, channels: int, *, image_size: int = 0, pad: int = 0,
            binarize: str = 'none', random_flip: bool = True, train_split: str = 'train',
            eval_split: str = 'test') -> dict[str, Any]:
  return dict(name=name, channels=channels, image_size=image_size, pad=pad, binarize=binarize,
              random_flip=random_flip, train_split=train_split, eval_split=eval_split)


DATASETS: dict[str, Dataset] = {
    # Binarised 28x28 digits padded to 32x32; the likelihood covers the central 28x28.
    'mnist': Dataset(_fields('mnist', 1, pad=2, binarize='dynamic', random_flip=False), 60_000),
    'omniglot': Dataset(_fields('omniglot', 1, image_size=28, pad=2, binarize='dynamic',
                                random_flip=False)),
    'cifar10': Dataset(_fields('cifar10', 3), 50_000),
    'celeba_64': Dataset(_fields('celeb_a', 3, image_size=64, eval_split='validation'), 162_770),
    # Glow's tfrecords: 27k train / 3k validation.
    'celeba_256': Dataset(_fields('celeb_a_hq/256', 3, image_size=256,
                                  train_split='train[:27000]', eval_split='train[27000:]'),
                          27_000),
    # Glow's "imagenet-oord" split.
    'imagenet_32': Dataset(_fields('downsampled_imagenet/32x32', 3, image_size=32,
                                   eval_split='validation'), 1_281_147),
    'imagenet_64': Dataset(_fields('downsampled_imagenet/64x64', 3, image_size=64,
                                   eval_split='validation')),
    # An (unseeded) random 63k / 7k split of the 70k images, read from an image folder.
    'ffhq': Dataset(_fields('folder', 3, image_size=256), 63_000),
}
_LSUN = {'church': 'lsun/church_outdoor', 'bedroom': 'lsun/bedroom', 'tower': 'lsun/tower'}
_LSUN_RE = re.compile(r'lsun_(church|bedroom|tower)_(\d+)')


def names() -> list[str]:
  """The accepted ``--dataset`` values (``lsun_<category>_<size>`` is a pattern)."""
  return sorted(DATASETS) + ['lsun_{church,bedroom,tower}_<size>']


def lookup(dataset: str, field: str = 'dataset') -> Dataset:
  """The table entry of an original ``--dataset`` value; ``field`` names it in errors."""
  if dataset in DATASETS:
    return DATASETS[dataset]
  m = _LSUN_RE.fullmatch(str(dataset))
  if m:
    return Dataset(_fields(_LSUN[m.group(1)], 3, image_size=int(m.group(2)),
                           eval_split='validation'))
  raise ValueError(f'{field}: unsupported dataset {dataset!r}; expected one of {names()}')


def data_fields(dataset: str, field: str = 'dataset') -> dict[str, Any]:
  """A copy of the ``config.data`` fields of ``dataset`` (see :func:`lookup`)."""
  return dict(lookup(dataset, field).data)
