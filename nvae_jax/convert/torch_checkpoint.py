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

1. ``config_from_args``: an nvae_jax config from the original arguments, after the back-fill that
   the original ``evaluate.py`` applies to old checkpoints (``ada_groups=False``,
   ``min_groups_per_scale=1``, ``num_mixture_dec=10``); ``dataset`` sets the data fields
   (``DATASETS``), ``num_x_bits`` sets ``data.num_bits``, the optimizer and schedule follow the
   original's flags. ``model.faithful_dml`` is True, so that the likelihood is the one the
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
import re
import sys
from typing import Any, Mapping

import ml_collections
import numpy as np

from nvae_jax.config import nvae as nvae_base

# Original dataset name -> data fields. Sizes: nvae_spec.md §1.1.
DATASETS: dict[str, dict[str, Any]] = {
    'mnist': dict(name='mnist', channels=1, pad=2, binarize='dynamic', image_size=0,
                  random_flip=False, eval_split='test'),
    'omniglot': dict(name='omniglot', channels=1, pad=2, binarize='dynamic', image_size=28,
                     random_flip=False, eval_split='test'),
    'cifar10': dict(name='cifar10', channels=3, random_flip=True, eval_split='test'),
    'celeba_64': dict(name='celeb_a', channels=3, image_size=64, random_flip=True,
                      eval_split='validation'),
    'celeba_256': dict(name='celeb_a_hq/256', channels=3, image_size=256, random_flip=True,
                       train_split='train[:27000]', eval_split='train[27000:]'),
    'imagenet_32': dict(name='downsampled_imagenet/32x32', channels=3, image_size=32,
                        random_flip=True, eval_split='validation'),
    'imagenet_64': dict(name='downsampled_imagenet/64x64', channels=3, image_size=64,
                        random_flip=True, eval_split='validation'),
    'ffhq': dict(name='folder', channels=3, image_size=256, random_flip=True,
                 eval_split='test'),
}
_LSUN = {'church': 'lsun/church_outdoor', 'bedroom': 'lsun/bedroom', 'tower': 'lsun/tower'}

_TRAIN_EXAMPLES_KEY = {'mnist': 'mnist', 'cifar10': 'cifar10', 'celeba_64': 'celeba64',
                       'imagenet_32': 'imagenet32', 'celeba_256': 'celebahq256',
                       'ffhq': 'ffhq256'}

# Arguments that evaluate.py back-fills for checkpoints written before they existed.
BACKFILL = dict(ada_groups=False, min_groups_per_scale=1, num_mixture_dec=10)

_MODEL_ARGS = ('num_channels_enc', 'num_channels_dec', 'num_preprocess_blocks',
               'num_preprocess_cells', 'num_postprocess_blocks', 'num_postprocess_cells',
               'num_latent_scales', 'num_groups_per_scale', 'num_latent_per_group',
               'num_cell_per_cond_enc', 'num_cell_per_cond_dec', 'ada_groups',
               'min_groups_per_scale', 'use_se', 'res_dist', 'num_nf', 'num_mixture_dec',
               'kl_anneal_portion', 'kl_const_portion', 'kl_const_coeff', 'weight_decay_norm',
               'weight_decay_norm_init', 'weight_decay_norm_anneal')
# Arguments without which no model can be built (the rest have argparse defaults).
_REQUIRED = ('dataset', 'num_channels_enc', 'num_channels_dec', 'num_latent_scales',
             'num_groups_per_scale', 'num_latent_per_group', 'num_preprocess_blocks',
             'num_postprocess_blocks')
# argparse defaults of the original train.py, for fields absent from a Namespace.
_DEFAULTS = dict(num_x_bits=8, num_preprocess_cells=3, num_postprocess_cells=3,
                 num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, use_se=False,
                 res_dist=False, num_nf=0, kl_anneal_portion=0.3, kl_const_portion=1e-4,
                 kl_const_coeff=1e-4, weight_decay_norm=0.0, weight_decay_norm_init=10.0,
                 weight_decay_norm_anneal=False, arch_instance='res_mbconv',
                 learning_rate=1e-2, learning_rate_min=1e-4, weight_decay=3e-4, epochs=200,
                 warmup_epochs=5, batch_size=200, num_process_per_node=1, num_proc_node=1,
                 seed=1)


def dataset_fields(dataset: str) -> dict[str, Any]:
  """Data fields for an original ``--dataset`` value (``DATASETS``, plus ``lsun_<cat>_<N>``)."""
  if dataset in DATASETS:
    return dict(DATASETS[dataset])
  m = re.fullmatch(r'lsun_(church|bedroom|tower)_(\d+)', dataset)
  if m:
    return dict(name=_LSUN[m.group(1)], channels=3, image_size=int(m.group(2)),
                random_flip=True, eval_split='validation')
  raise ValueError(f'args.dataset: unsupported dataset {dataset!r}; expected one of '
                   f'{sorted(DATASETS)} or lsun_{{church,bedroom,tower}}_<size>')


def _args_dict(args) -> dict[str, Any]:
  if isinstance(args, argparse.Namespace):
    return dict(vars(args))
  if isinstance(args, Mapping):
    return dict(args)
  raise TypeError(f'args: expected an argparse.Namespace or a mapping, found {type(args)}')


def config_from_args(args, *, data_dir: str = '',
                     faithful_dml: bool = True) -> ml_collections.ConfigDict:
  """An nvae_jax config equivalent to an original run's arguments (see the module docstring)."""
  a = dict(_DEFAULTS)
  a.update(BACKFILL)
  a.update({k: v for k, v in _args_dict(args).items() if v is not None})
  missing = [k for k in _REQUIRED if k not in _args_dict(args)]
  if missing:
    raise ValueError(f'args: missing original arguments {missing}; is this an NVAE checkpoint?')
  if a['arch_instance'] != 'res_mbconv':
    raise ValueError(f'args.arch_instance: only "res_mbconv" (every README command) is '
                     f'implemented, found {a["arch_instance"]!r}')

  c = nvae_base.get_config()
  for k in _MODEL_ARGS:
    c.model[k] = type(c.model[k])(a[k])
  c.model.faithful_dml = bool(faithful_dml)

  data = dataset_fields(a['dataset'])
  for k, v in data.items():
    c.data[k] = v
  c.data.data_dir = data_dir
  c.data.num_bits = int(a['num_x_bits'])
  c.eval.split = c.data.eval_split

  gpus = int(a['num_process_per_node']) * int(a['num_proc_node'])
  global_batch = int(a['batch_size']) * gpus
  c.data.batch_size = global_batch
  c.data.eval_batch_size = global_batch
  c.optim.lr = float(a['learning_rate'])
  c.optim.min_lr = float(a['learning_rate_min'])
  c.optim.weight_decay = float(a['weight_decay'])
  c.seed = int(a['seed'])
  # The schedule (and the KL warm-up horizon, which follows train.num_steps) in steps, when the
  # epoch length of the dataset is known.
  examples = nvae_base.TRAIN_EXAMPLES.get(_TRAIN_EXAMPLES_KEY.get(a['dataset'], ''))
  if examples:
    spe = nvae_base.steps_per_epoch(examples, global_batch)
    c.train.num_steps = int(a['epochs']) * spe
    c.optim.warmup_steps = int(a['warmup_epochs']) * spe
  return c


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

import ml_collections


def get_config(arg=None):
  del arg
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))
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

  from nvae_jax.convert import from_torch_names  # pylint: disable=import-outside-toplevel
  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import build  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  ckpt = load_torch_checkpoint(checkpoint, trust_pickle=trust_pickle)
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
  summary = dict(source=os.path.abspath(checkpoint), step=int(ckpt['global_step']),
                 epoch=ckpt['epoch'], dataset=_args_dict(ckpt['args']).get('dataset'),
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
