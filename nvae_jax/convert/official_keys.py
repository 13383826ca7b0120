"""The state_dict layouts of the published NVAE models, and checks that nvae_jax matches them.

``official_keys/*.txt`` (in ``shared/fixtures/nvae_reference``) lists, one per line,
``name<TAB>shape<TAB>dtype`` of every ``state_dict`` entry of an original model built with a
README command, e.g. ``stem.weight\t(32, 1, 3, 3)\ttorch.float32``.

Parameter count. The original's trainable parameters are the entries that are neither batch-norm
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) nor ``*.weight_normalized``
aliases (the same tensor as ``weight`` for convs built without weight normalisation)::

  num_params = sum over the remaining entries of prod(shape)

which must equal the size of nvae_jax's ``'params'`` collection for the same config
(nvae_spec.md §1.10). ``count_flax_params`` gets the latter from ``jax.eval_shape`` of the
task's ``init``, so no parameter is allocated and no XLA compilation happens.

Placement. ``check_placement`` builds a zero state_dict from the listed shapes, runs the core
name mapping (``nvae_jax.convert.from_torch_names``) against the abstract flax variables and
returns the keys it could not place and the flax variables it left empty.

Command line::

  python -m nvae_jax.convert.official_keys [--keys_dir DIR] [--only mnist,cifar10]

prints one JSON line per published config with the official count, the nvae_jax count and the
placement result, and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping

import numpy as np

BUFFER_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')
ALIAS_SUFFIX = 'weight_normalized'

# name (of ``nvae_jax.config.nvae.PUBLISHED``) -> (keys file, experiment file, config arg,
# parameter count of nvae_spec.md §1.10).  The configs are built from the library
# (``nvae_jax.config.nvae.published_config``), so this works from any install; the experiment
# file is only named in the output.  FFHQ 256 has the CelebA-HQ 256 architecture (the fixtures
# README), hence the shared file.
PUBLISHED: dict[str, tuple[str, str, str | None, int]] = {
    'mnist': ('mnist_official.txt', 'configs/nvae_mnist.py', None, 33_363_134),
    'cifar10': ('cifar_official.txt', 'configs/nvae_cifar10.py', None, 130_852_480),
    'celeba64': ('celeba64_official.txt', 'configs/nvae_celeba64.py', None, 153_281_364),
    'imagenet32': ('imagenet32_official.txt', 'configs/nvae_imagenet32.py', None, 268_509_444),
    'celebahq256': ('celebahq256_official.txt', 'configs/nvae_celebahq256.py', None,
                    330_798_664),
    'ffhq256': ('celebahq256_official.txt', 'configs/nvae_ffhq256.py', None, 330_798_664),
}

_NP_DTYPES = {'torch.float32': np.float32, 'torch.int64': np.int64, 'torch.float16': np.float16,
              'torch.float64': np.float64}


@dataclasses.dataclass(frozen=True)
class KeyInfo:
  """One ``state_dict`` entry: its original name, shape and torch dtype string."""
  name: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _parse_shape(text: str, where: str) -> tuple[int, ...]:
  inner = text.strip()
  if not (inner.startswith('(') and inner.endswith(')')):
    raise ValueError(f'{where}: expected a shape like "(32, 1, 3, 3)", found {text!r}')
  parts = [p.strip() for p in inner[1:-1].split(',') if p.strip()]
  try:
    return tuple(int(p) for p in parts)
  except ValueError:
    raise ValueError(f'{where}: expected integer dimensions, found {text!r}') from None


def parse_keys(path: str | os.PathLike) -> list[KeyInfo]:
  """Reads a ``name<TAB>shape<TAB>dtype`` file (the ``official_keys/*.txt`` and ``keys.txt``)."""
  keys = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      fields = line.split('\t')
      where = f'{path}:{lineno}'
      if len(fields) != 3:
        raise ValueError(f'{where}: expected 3 tab-separated fields (name, shape, dtype), '
                         f'found {len(fields)}: {line!r}')
      name, shape, dtype = fields
      keys.append(KeyInfo(name.strip(), _parse_shape(shape, where), dtype.strip()))
  if not keys:
    raise ValueError(f'{path}: no keys found')
  return keys


def is_buffer(name: str) -> bool:
  """Batch-norm buffers: statistics and counters, not trainable parameters."""
  return name.rsplit('.', 1)[-1] in BUFFER_SUFFIXES


def is_alias(name: str) -> bool:
  """``*.weight_normalized``: an alias of ``weight`` for convs without weight normalisation."""
  return name.rsplit('.', 1)[-1] == ALIAS_SUFFIX


def parameter_keys(keys: Iterable[KeyInfo]) -> list[KeyInfo]:
  """The trainable parameters among ``keys`` (no buffers, no aliases)."""
  return [k for k in keys if not is_buffer(k.name) and not is_alias(k.name)]


def count_parameters(keys: Iterable[KeyInfo]) -> int:
  """Number of trainable parameters of an original model from its key listing."""
  return sum(k.size for k in parameter_keys(keys))


def zero_state_dict(keys: Iterable[KeyInfo]) -> dict[str, np.ndarray]:
  """A state_dict of zeros with the listed names, shapes and dtypes (aliases included)."""
  out = {}
  for k in keys:
    if k.dtype not in _NP_DTYPES:
      raise ValueError(f'{k.name}: unsupported dtype {k.dtype!r}; expected one of '
                       f'{sorted(_NP_DTYPES)}')
    out[k.name] = np.zeros(k.shape, _NP_DTYPES[k.dtype])
  return out


def load_published_config(name: str):
  """The nvae_jax config of a published setup (a key of ``PUBLISHED``)."""
  if name not in PUBLISHED:
    raise ValueError(f'published config: unknown name {name!r}; expected one of '
                     f'{sorted(PUBLISHED)}')
  from nvae_jax.config import nvae as nvae_base  # pylint: disable=import-outside-toplevel
  _, _, arg, _ = PUBLISHED[name]
  return nvae_base.published_config(name, arg)


def abstract_variables(config) -> Mapping[str, Any]:
  """``jax.eval_shape`` of the task's ``init`` on a batch of one: shapes only, no compilation."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  from nvae_jax.models import build_task  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  # Only shapes are traced: the lax depthwise conv traces fewer ops than the CPU shift-and-add
  # one and has the same parameters.
  config.model.depthwise_impl = 'lax'
  task = build_task(config)
  shape = tuple(image_shape(config.data))
  batch = {'image': jax.ShapeDtypeStruct((1,) + shape, jnp.float32)}
  return jax.eval_shape(task.init, jax.random.key(0), batch)


def count_flax_params(variables: Mapping[str, Any]) -> int:
  """Number of entries in the ``'params'`` collection of (abstract) flax variables."""
  import jax  # pylint: disable=import-outside-toplevel
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def check_placement(keys: Iterable[KeyInfo], config,
                    variables: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
  """Runs the core name mapping on a zero state_dict built from ``keys``.

  Returns ``{'unplaced': [...], 'unfilled': [...], 'dropped': [...]}``: original keys the mapping
  did not place (other than the documented drops), flax variables it left empty, and the keys it
  dropped on purpose (aliases and ``num_batches_tracked``), all by name.
  """
  from nvae_jax.convert import from_torch_names  # pylint: disable=import-outside-toplevel

  keys = list(keys)
  if variables is None:
    variables = abstract_variables(config)
  result = from_torch_names.convert_state_dict(zero_state_dict(keys), variables, strict=False)
  return {'unplaced': sorted(result.unused), 'unfilled': sorted(result.missing),
          'dropped': sorted(result.dropped)}


def check_published(name: str, keys_dir: str, placement: bool = True) -> dict[str, Any]:
  """Official count vs nvae_jax count (and placement) for one published setup."""
  file, config_file, arg, expected = PUBLISHED[name]
  keys = parse_keys(os.path.join(keys_dir, file))
  config = load_published_config(name)
  variables = abstract_variables(config)
  out = {'config': name, 'config_file': config_file + (f':{arg}' if arg else ''),
         'keys_file': file, 'num_keys': len(keys), 'official_params': count_parameters(keys),
         'spec_params': expected, 'nvae_jax_params': count_flax_params(variables)}
  ok = out['official_params'] == expected == out['nvae_jax_params']
  if placement:
    placed = check_placement(keys, config, variables)
    out['unplaced'] = placed['unplaced']
    out['unfilled'] = placed['unfilled']
    out['num_dropped'] = len(placed['dropped'])
    ok = ok and not placed['unplaced'] and not placed['unfilled']
  out['ok'] = ok
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--keys_dir', default=os.path.join(
      '..', 'shared', 'fixtures', 'nvae_reference', 'official_keys'),
                      help='folder of the official_keys/*.txt files')
  parser.add_argument('--only', default='', help='comma-separated subset of ' +
                      ','.join(PUBLISHED))
  parser.add_argument('--no_placement', action='store_true',
                      help='skip the name-mapping check (counts only)')
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(',') if n] or list(PUBLISHED)
  failed = False
  for name in names:
    if name not in PUBLISHED:
      parser.error(f'--only: unknown config {name!r}; expected names from {sorted(PUBLISHED)}')
    res = check_published(name, args.keys_dir, placement=not args.no_placement)
    failed |= not res['ok']
    print(json.dumps(res), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
