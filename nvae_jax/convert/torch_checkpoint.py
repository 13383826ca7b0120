"""Original NVAE PyTorch checkpoints (``checkpoint.pt``) -> an nvae_jax workdir.

Usage::

  python -m nvae_jax.convert.torch_checkpoint CHECKPOINT.pt OUT_DIR [--data_dir DIR]
  python -m nvae_jax.main --config=OUT_DIR/config.py --workdir=OUT_DIR --mode=eval
  python -m nvae_jax.main --config=OUT_DIR/config.py --workdir=OUT_DIR --mode=sample

Reading ``.pt`` files needs PyTorch, an optional extra (``pip install nvae_jax[convert]``); it is
imported only here. The file is a ``torch.save`` dict with ``state_dict``, ``args`` (a pickled
``argparse.Namespace``), ``global_step``, ``epoch`` and optimizer/scheduler/scaler states; only
the first three are used. It is unpickled with ``weights_only=True`` and ``argparse.Namespace``
allowed; ``--trust_pickle`` falls back to full unpickling for files you trust.

Steps:

1. ``config_from_args`` (``nvae_jax.config.nvae.config_from_original_args``): an nvae_jax config
   from the original arguments, after the back-fill that the original ``evaluate.py`` applies to
   old checkpoints (``ada_groups=False``, ``min_groups_per_scale=1``, ``num_mixture_dec=10``);
   ``dataset`` sets the data fields (``nvae_jax.config.datasets``), ``num_x_bits`` sets
   ``data.num_bits``, the optimizer and schedule follow the original's flags. ``model.faithful_dml`` is True, so that the likelihood is the one the
   original reported (see nvae_spec.md §0.4).
2. The ``state_dict`` goes through the core name mapping
   (``nvae_jax.convert.from_torch_names``), which places every tensor in the flax variable tree
   (params and batch statistics) and drops ``*.weight_normalized`` aliases and
   ``num_batches_tracked``. Keys the mapping cannot place are reported by name; with ``--strict``
   (the default) they are an error, as are flax variables left unfilled.
3. ``OUT_DIR`` receives ``config.json`` (the config), ``config.py`` (a ``get_config()`` that
   reads it, for ``--config=``), ``conversion.json`` (source, step, unused keys) and an orbax
   checkpoint at ``OUT_DIR/checkpoints/<global_step>`` in the platform's train-state layout with
   a fresh optimizer state, so that ``--mode=eval`` and ``--mode=sample`` restore it like any
   checkpoint of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

import numpy as np

from nvae_jax.config import datasets
from nvae_jax.config import nvae as nvae_base

# Original arguments -> config, and the dataset table, live in the library's config.
config_from_args = nvae_base.config_from_original_args
dataset_fields = datasets.data_fields


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('reading original NVAE .pt checkpoints needs PyTorch, which is an optional '
                      'extra: pip install "nvae_jax[convert]" (or pip install torch)') from None
  return torch


def load_torch_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, Any]:
  """``torch.load`` on CPU; returns the dict with ``state_dict`` as numpy arrays."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint: no file at {path}')
  try:
    if trust_pickle:
      ckpt = torch.load(path, map_location='cpu', weights_only=False)
    else:
      with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if trust_pickle:
      raise
    raise ValueError(f'checkpoint {path}: could not be read with weights_only=True ({e}); if you '
                     'trust the file, pass --trust_pickle') from e
  if not isinstance(ckpt, Mapping) or 'state_dict' not in ckpt or 'args' not in ckpt:
    found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f'checkpoint {path}: expected a dict with "state_dict" and "args" (an NVAE '
                     f'train.py checkpoint), found {found}')
  state_dict = {}
  for k, v in ckpt['state_dict'].items():
    if hasattr(v, 'detach'):
      v = v.detach().cpu()
      if v.dtype in (torch.bfloat16, torch.float16):
        v = v.float()
      v = v.numpy()
    state_dict[k] = np.asarray(v)
  return dict(state_dict=state_dict, args=ckpt['args'],
              global_step=int(ckpt.get('global_step', 0) or 0),
              epoch=int(ckpt.get('epoch', 0) or 0))


# ---------------------------------------------------------------------------------------------
# Conversion.

_CONFIG_PY = '''"""Config of an NVAE model converted from an original checkpoint.

Written by nvae_jax.convert.torch_checkpoint; the values are in config.json next to this file.
  python -m nvae_jax.main --config=%(dir)s/config.py --workdir=%(dir)s --mode=eval
"""

import json
import os

from nvae_jax.config.schema import with_defaults


def get_config(arg=None):
  del arg
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
    return with_defaults(json.load(f))  # fields added to nvae_jax since keep their defaults
'''


def _fresh_spectral(abstract_spectral, seed: int) -> dict[str, Any]:
  """Normalised N(0, 1) power-iteration vectors with ``calls = 0``: the next training step runs
  the full 40 iterations, as the original does after a resume (u, v are not in its checkpoints)."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if leaf.dtype != np.float32 or len(leaf.shape) != 1:  # the ``calls`` counter
      return np.zeros(leaf.shape, leaf.dtype)
    x = rng.standard_normal(leaf.shape)
    return (x / np.linalg.norm(x)).astype(np.float32)

  return jax.tree.map(draw, abstract_spectral)


def convert_checkpoint(checkpoint: str, out_dir: str, *, data_dir: str = '',
                       strict: bool = True, trust_pickle: bool = False,
                       faithful_dml: bool = True) -> dict[str, Any]:
  """Converts an original ``checkpoint.pt`` into an nvae_jax workdir (module docstring).

  Returns a summary: ``step``, ``config`` path, ``checkpoint_dir``, ``num_params``, ``unused``
  (original keys not placed, by name), ``unfilled`` (flax variables no key filled), ``dropped``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from nvae_jax import progress as progress_lib  # pylint: disable=import-outside-toplevel
  from nvae_jax.convert import from_torch_names  # pylint: disable=import-outside-toplevel
  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import build  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  # Four stages, each up to minutes for the 256x256 models: load, place, build the state, save.
  bar = progress_lib.Progress(4, f'convert {os.path.basename(checkpoint)}', 'stage')
  ckpt = load_torch_checkpoint(checkpoint, trust_pickle=trust_pickle)
  bar.update(1, done='loaded')
  config = config_from_args(ckpt['args'], data_dir=data_dir, faithful_dml=faithful_dml)
  config = config.copy_and_resolve_references()
  run = build.build(config)
  shape = tuple(image_shape(config.data))
  abstract = jax.eval_shape(run.task.init, state_lib.stream_key(config.seed,
                                                                state_lib.INIT_STREAM),
                            build.batch_spec(shape, 1))
  conv = from_torch_names.convert_state_dict(ckpt['state_dict'], abstract, strict=False)
  if strict and (conv.unused or conv.missing):
    raise ValueError(f'checkpoint {checkpoint} does not fit the model rebuilt from its args: '
                     f'unused keys {conv.unused}; unfilled variables {conv.missing} (pass '
                     '--no_strict to convert anyway)')
  bar.update(1, done=f'placed {len(ckpt["state_dict"])} keys')
  params = conv.variables['params']
  model_state = {'batch_stats': conv.variables.get('batch_stats', {})}
  for col in run.task.mutable_collections:
    if col == 'spectral':
      model_state[col] = _fresh_spectral(abstract[col], config.seed)
    elif col not in model_state:
      raise ValueError(f'task.mutable_collections: no converter for collection {col!r}')
  params = jax.tree.map(jnp.asarray, params)
  state = dict(step=jnp.asarray(ckpt['global_step'], jnp.int32), params=params,
               opt_state=run.tx.init(params),
               model_state=jax.tree.map(jnp.asarray, model_state),
               rng=state_lib.stream_key(config.seed, state_lib.TRAIN_STREAM))
  # The saved tree must be exactly what a run of this config restores.
  expected, _ = build.abstract_state(run, build.batch_spec(shape, config.data.batch_size))
  if jax.tree.structure(expected) != jax.tree.structure(state):
    raise ValueError('converted state: tree structure differs from the platform\'s train state '
                     f'({jax.tree.structure(state)} vs {jax.tree.structure(expected)})')
  bad = [f'{jax.tree_util.keystr(p)}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}'
         for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                              jax.tree.leaves(expected))
         if a.shape != b.shape or a.dtype != b.dtype]
  if bad:
    raise ValueError('converted state: entries differ from the platform\'s train state: ' +
                     '; '.join(bad[:10]))

  bar.update(1, done='built the train state')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(out_dir, 'config.py'), 'w') as f:
    f.write(_CONFIG_PY % dict(dir=out_dir))
  ckpt_dir = build.checkpoint_dir(out_dir)
  saver = ckpt_lib.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints, async_save=False)
  try:
    saver.save(int(ckpt['global_step']), state, config=config, force=True)
  finally:
    saver.close()
  bar.update(1, done='saved')
  bar.close()
  dataset = nvae_base.original_args_dict(ckpt['args']).get('dataset')
  summary = dict(source=os.path.abspath(checkpoint), step=int(ckpt['global_step']),
                 epoch=ckpt['epoch'], dataset=dataset,
                 config=os.path.join(out_dir, 'config.py'), checkpoint_dir=ckpt_dir,
                 num_params=state_lib.num_params(params), num_keys=len(ckpt['state_dict']),
                 unused=conv.unused, unfilled=conv.missing, num_dropped=len(conv.dropped),
                 faithful_dml=faithful_dml)
  with open(os.path.join(out_dir, 'conversion.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Convert an original NVAE checkpoint.pt into an nvae_jax workdir.')
  parser.add_argument('checkpoint', help='the original checkpoint.pt')
  parser.add_argument('out_dir', help='the nvae_jax workdir to write')
  parser.add_argument('--data_dir', default='', help='data.data_dir of the written config')
  parser.add_argument('--no_strict', action='store_true',
                      help='convert even if keys are unused or variables unfilled')
  parser.add_argument('--trust_pickle', action='store_true',
                      help='unpickle the whole file (only for files you trust)')
  parser.add_argument('--corrected_dml', action='store_true',
                      help='use the corrected discretized logistic likelihood instead of the '
                           'original\'s (nvae_spec.md §0.4)')
  args = parser.parse_args(argv)
  summary = convert_checkpoint(args.checkpoint, args.out_dir, data_dir=args.data_dir,
                               strict=not args.no_strict, trust_pickle=args.trust_pickle,
                               faithful_dml=not args.corrected_dml)
  if summary['unused']:
    print(f'unused keys ({len(summary["unused"])}): ' + ', '.join(summary['unused']),
          file=sys.stderr)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
