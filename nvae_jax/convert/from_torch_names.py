"""Original NVAE ``state_dict`` names and layouts -> the nvae_jax flax variable tree, and back.

Module paths (``N`` = ModuleList index, kept as is; see ``nvae_jax.models.nvae``):

=============================================  ===============================================
original                                       flax
=============================================  ===============================================
``prior_ftr0`` [C, h, w]                       params ``prior_ftr0`` [h, w, C]
``stem.*``, ``enc0.1.*``,                      ``stem``, ``enc0``, ``image_conditional``
``image_conditional.1.*``
``enc_sampler.N.*``, ``dec_sampler.N.1.*``     ``enc_sampler_N``, ``dec_sampler_N``
``nf_cells.N.cellK.conv.convz.{0,2}.*``        ``nf_cells_N/cellK/conv_z{0,2}``
``nf_cells.N.cellK.mu.conv_0.*``               ``nf_cells_N/cellK/mu``
``<tower>.N.conv.*`` (combiners)               ``<tower>_N/conv``
``<tower>.N._ops.K.bn_act.*``                  ``<tower>_N/bn_K``       (BN-Swish-conv cells)
``<tower>.N._ops.K.conv_0.*``                  ``<tower>_N/conv_K``
``<tower>.N.skip.conv_J.*``                    ``<tower>_N/skip/conv_J`` (FactorizedReduce)
``<tower>.N._ops.0.conv.{0,1,2,3,4}...``       ``bn_in``, ``conv_expand``/``bn_expand``,
  (MBConv; +1 in up cells, whose                ``conv_depthwise``/``bn_depthwise``,
  ``conv.0`` is the upsample)                   ``conv_project``, ``bn_out``
``<tower>.N.skip.1.*`` (up cells)              ``<tower>_N/skip_conv``
``<tower>.N.se.se.{0,2}.*``                    ``<tower>_N/se/fc{1,2}``
=============================================  ===============================================

with ``<tower>`` one of ``pre_process``, ``enc_tower``, ``dec_tower``, ``post_process``.  Whether a
tower entry is a combiner, a BN-Swish cell or an (up) MBConv cell is read from the flax template.

Leaves: conv ``weight`` OIHW -> ``kernel`` HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C]), ``bias``,
``log_weight_norm`` [O, 1, 1, 1] -> [O]; linear ``weight`` [out, in] -> ``kernel`` [in, out];
batch norm ``weight`` -> ``scale``, ``bias``, ``running_mean`` / ``running_var`` -> batch_stats
``mean`` / ``var``.  Dropped on purpose: ``*.weight_normalized`` (aliases of ``weight`` for
convs without weight normalisation) and ``*.num_batches_tracked``.  The AR masks are constants of
the flax module (mirrored masks flip both spatial axes in both code bases), so masked kernels
convert like any other.  The spectral power-iteration vectors are not part of a state_dict
(:func:`spectral_state_from_sr` reads the fixtures' ``sr.npz``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

DROPPED_SUFFIXES = ('weight_normalized', 'num_batches_tracked')
TOWERS = ('pre_process', 'enc_tower', 'dec_tower', 'post_process')

_CONV_LEAVES = {'weight': ('params', 'kernel', 'conv_kernel'), 'bias': ('params', 'bias', 'id'),
                'log_weight_norm': ('params', 'log_weight_norm', 'vector')}
_BN_LEAVES = {'weight': ('params', 'scale', 'id'), 'bias': ('params', 'bias', 'id'),
              'running_mean': ('batch_stats', 'mean', 'id'),
              'running_var': ('batch_stats', 'var', 'id')}
_LINEAR_LEAVES = {'weight': ('params', 'kernel', 'linear'), 'bias': ('params', 'bias', 'id')}
_LEAVES = {'conv': _CONV_LEAVES, 'bn': _BN_LEAVES, 'linear': _LINEAR_LEAVES}

# Layout transforms (original -> flax) and their inverses.
_FORWARD: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'id': lambda a: a,
    'conv_kernel': lambda a: np.transpose(a, (2, 3, 1, 0)),
    'vector': lambda a: a.reshape(a.shape[0]),
    'linear': lambda a: np.transpose(a, (1, 0)),
    'prior': lambda a: np.transpose(a, (1, 2, 0)),
}
_BACKWARD: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'id': lambda a: a,
    'conv_kernel': lambda a: np.transpose(a, (3, 2, 0, 1)),
    'vector': lambda a: a.reshape(a.shape[0], 1, 1, 1),
    'linear': lambda a: np.transpose(a, (1, 0)),
    'prior': lambda a: np.transpose(a, (2, 0, 1)),
}


def is_dropped(key: str) -> bool:
  """Keys that carry no information for nvae_jax (aliases, BN step counters)."""
  return key.rsplit('.', 1)[-1] in DROPPED_SUFFIXES


def _cell_module(tower: str, index: str, rest: list[str], template: Mapping[str, Any]):
  """(flax module path, kind) of a tower entry's sub-key, or None."""
  name = f'{tower}_{index}'
  node = template.get(name)
  if not isinstance(node, Mapping):
    return None
  base = (name,)
  r = '.'.join(rest)
  m = re.fullmatch(r'se\.se\.([02])', r)
  if m:
    return base + ('se', 'fc1' if m.group(1) == '0' else 'fc2'), 'linear'
  if 'bn_0' in node:  # BN-Swish-conv residual cell
    m = re.fullmatch(r'_ops\.(\d+)\.bn_act', r)
    if m:
      return base + (f'bn_{m.group(1)}',), 'bn'
    m = re.fullmatch(r'_ops\.(\d+)\.conv_0', r)
    if m:
      return base + (f'conv_{m.group(1)}',), 'conv'
    m = re.fullmatch(r'skip\.(conv_[1-4])', r)
    if m:
      return base + ('skip', m.group(1)), 'conv'
    return None
  if 'bn_in' in node:  # MBConv cell
    off = 1 if 'skip_conv' in node else 0
    if r == 'skip.1' and off:
      return base + ('skip_conv',), 'conv'
    m = re.fullmatch(r'_ops\.0\.conv\.(\d+)((?:\.[a-z_0-9]+)*)', r)
    if not m:
      return None
    i, sub = int(m.group(1)) - off, m.group(2)
    table = {(0, '.bn'): ('bn_in', 'bn'), (1, '.conv.0'): ('conv_expand', 'conv'),
             (1, '.conv.1'): ('bn_expand', 'bn'), (2, '.conv.0'): ('conv_depthwise', 'conv'),
             (2, '.conv.1'): ('bn_depthwise', 'bn'), (3, ''): ('conv_project', 'conv'),
             (4, '.bn'): ('bn_out', 'bn')}
    hit = table.get((i, sub))
    return (base + (hit[0],), hit[1]) if hit else None
  if set(node) == {'conv'} and r == 'conv':  # combiner
    return base + ('conv',), 'conv'
  return None


def module_of(torch_module: str, template: Mapping[str, Any]):
  """(flax module path, kind) for an original module name (without the leaf), or None."""
  parts = torch_module.split('.')
  head = parts[0]
  if len(parts) == 1 and head == 'stem':
    return ('stem',), 'conv'
  if parts in (['enc0', '1'], ['image_conditional', '1']):
    return (head,), 'conv'
  if head == 'enc_sampler' and len(parts) == 2:
    return (f'enc_sampler_{parts[1]}',), 'conv'
  if head == 'dec_sampler' and len(parts) == 3 and parts[2] == '1':
    return (f'dec_sampler_{parts[1]}',), 'conv'
  if head == 'nf_cells' and len(parts) >= 4 and parts[2] in ('cell1', 'cell2'):
    rest = '.'.join(parts[3:])
    sub = {'conv.convz.0': 'conv_z0', 'conv.convz.2': 'conv_z2', 'mu.conv_0': 'mu'}.get(rest)
    return ((f'nf_cells_{parts[1]}', parts[2], sub), 'conv') if sub else None
  if head in TOWERS and len(parts) >= 3:
    return _cell_module(head, parts[1], parts[2:], template)
  return None


def map_key(key: str, params_template: Mapping[str, Any]):
  """(collection, flax path, transform) for an original key, or None if it has no place."""
  if key == 'prior_ftr0':
    return 'params', ('prior_ftr0',), 'prior'
  if '.' not in key:
    return None
  module, leaf = key.rsplit('.', 1)
  found = module_of(module, params_template)
  if found is None:
    return None
  path, kind = found
  entry = _LEAVES[kind].get(leaf)
  if entry is None:
    return None
  collection, flax_leaf, transform = entry
  return collection, path + (flax_leaf,), transform


@dataclasses.dataclass
class Conversion:
  """Result of :func:`convert_state_dict`.

  Attributes:
    variables: {'params', 'batch_stats'} filled from the state_dict (numpy float32), plus every
      other collection of the template unchanged (e.g. the fresh ``'spectral'`` state).
    unused: original keys that found no place (by name).
    missing: flax variables (``collection/a/b/leaf``) that no key filled.
    dropped: keys dropped on purpose (aliases, ``num_batches_tracked``).
    names: {(collection,) + flax path: (original key, transform)} of every placed key.
  """
  variables: dict
  unused: list
  missing: list
  dropped: list
  names: dict


def convert_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any],
                       strict: bool = True) -> Conversion:
  """Places an original ``state_dict`` (name -> array) into flax variables shaped as ``variables``.

  Args:
    state_dict: original names -> arrays (numpy or anything ``np.asarray`` accepts).
    variables: a template (real or ``jax.eval_shape`` abstract) with ``'params'`` and
      ``'batch_stats'``; its shapes are checked.
    strict: raise a ValueError listing unused keys and unfilled variables when there are any.
  """
  params_t = variables['params']
  template = {}
  for col in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(dict(variables.get(col, {}))).items():
      template[(col,) + path] = leaf
  filled, names, unused, dropped = {}, {}, [], []
  for key in state_dict:
    if is_dropped(key):
      dropped.append(key)
      continue
    m = map_key(key, params_t)
    target = None if m is None else (m[0],) + m[1]
    if target is None or target not in template:
      unused.append(key)
      continue
    value = np.asarray(state_dict[key])
    arr = _FORWARD[m[2]](value)
    expected = tuple(template[target].shape)
    if arr.shape != expected:
      raise ValueError(f'{key}: shape {value.shape} (as {arr.shape} in nvae_jax layout) does not '
                       f'fit {"/".join(target)} of shape {expected}')
    if target in filled:
      raise ValueError(f'{key}: {"/".join(target)} already filled by {names[target][0]}')
    filled[target] = arr.astype(np.float32)
    names[target] = (key, m[2])
  missing = sorted('/'.join(t) for t in template if t not in filled)
  if strict and (unused or missing):
    raise ValueError(f'state_dict does not fit the model: unused keys {sorted(unused)}; '
                     f'unfilled variables {missing}')
  out: dict[str, Any] = {}
  for col in ('params', 'batch_stats'):
    flat = {t[1:]: v for t, v in filled.items() if t[0] == col}
    out[col] = traverse_util.unflatten_dict(flat) if flat else {}
  for col, tree in variables.items():
    if col not in out:
      out[col] = tree
  return Conversion(variables=out, unused=sorted(unused), missing=missing,
                    dropped=sorted(dropped), names=names)


def to_torch_names(tree: Mapping[str, Any], names: Mapping[tuple, tuple],
                   collection: str = 'params') -> dict[str, np.ndarray]:
  """Maps a flax tree of ``collection`` (e.g. gradients w.r.t. params) back to original names
  and layouts, using the ``names`` of a :class:`Conversion`."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
    target = (collection,) + path
    if target not in names:
      raise KeyError(f'{"/".join(target)}: not placed by the conversion')
    key, transform = names[target]
    out[key] = _BACKWARD[transform](np.asarray(leaf))
  return out


def spectral_state_from_sr(sr: Mapping[str, np.ndarray], params_template: Mapping[str, Any],
                           calls: int = 1) -> dict[str, Any]:
  """The ``'spectral'`` state from an ``sr.npz`` (groups ``g<i>_names``, ``g<i>_u``, ``g<i>_v``).

  The original's per-layer vectors are regrouped as ``nvae_jax.objectives.spectral`` keeps them
  (by matrix shape, convs in sorted module-path order) and v is permuted from PyTorch's (I, kh,
  kw) column order to the HWIO kernel's (kh, kw, I).  ``calls`` is stored as the number of updates
  already done (>= 1: the next default update runs 4 iterations).
  """
  from nvae_jax.objectives import spectral  # pylint: disable=import-outside-toplevel
  layers = {}
  i = 0
  while f'g{i}_names' in sr:
    for j, name in enumerate(sr[f'g{i}_names']):
      found = module_of(str(name), params_template)
      node = params_template
      for part in (found[0] if found else ()):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
      if found is None or found[1] != 'conv' or 'kernel' not in node:
        raise ValueError(f'sr.npz group {i}: layer {name!r} has no conv in the model')
      shape = tuple(node['kernel'].shape)
      u = np.asarray(sr[f'g{i}_u'][j], np.float32)
      v = spectral.torch_v_to_hwi(np.asarray(sr[f'g{i}_v'][j], np.float32), shape)
      if u.shape != (shape[3],) or v.shape != (shape[0] * shape[1] * shape[2],):
        raise ValueError(f'sr.npz group {i}: vectors {u.shape}, {v.shape} of {name!r} do not fit '
                         f'its kernel {shape}')
      layers[found[0]] = (spectral.group_key(shape), u, v)
    i += 1
  if not layers:
    raise ValueError('sr.npz: no groups g0_names, g0_u, g0_v found')
  grouped: dict[str, list] = {}
  for path in sorted(layers):
    grouped.setdefault(layers[path][0], []).append(layers[path][1:])
  return {'u': {k: np.stack([uv[0] for uv in g]) for k, g in grouped.items()},
          'v': {k: np.stack([uv[1] for uv in g]) for k, g in grouped.items()},
          'calls': np.asarray(calls, np.int32)}
