"""NVAE's config: the one argument list, the one defaults table and the published setups.

* ``MODEL_ARGS`` (``ARCH_ARGS`` + ``OBJECTIVE_ARGS``): the original's model arguments, which are
  also the ``config.model`` field names; ``MODEL_DEFAULTS``: every ``config.model`` field's
  default; ``ORIGINAL_DEFAULTS``/``BACKFILL``/``REQUIRED_ARGS``: the original ``train.py``'s
  argparse defaults and what its ``evaluate.py`` back-fills.
* ``get_config()``: the original implementation's argparse defaults (``train.py`` at commit
  9fc1a28) expressed in nvae_jax fields, plus the flags every README command sets (``--use_se
  --res_dist --fast_adamax``, 20 latent channels per group, 2 cells per conditional).  It is a
  valid config on its own (a small CIFAR-10-shaped model).
* ``published_config(name, arg)``: the published setups (``PUBLISHED``) with the numbers of
  ``nvae_spec.md`` §3 (through ``published``); ``configs/nvae_<name>.py`` is exactly this, and
  the converter's parameter checks build the same configs without the experiment folder.
* ``config_from_original_args(args)``: the config of an original run (checkpoint converter,
  reference check), for every dataset of ``nvae_jax.config.datasets``.

Schedule arithmetic (the original counts epochs; nvae_jax counts steps):

* steps per epoch = floor(train examples / global batch) (the original's loader drops the last
  partial batch);
* total steps = epochs * steps per epoch; warm-up steps = warm-up epochs * steps per epoch.
* The original warms the learning rate up linearly per iteration, then follows a cosine stepped
  once per epoch down to ``min_lr``; nvae_jax's cosine is per step, which differs from the
  original's staircase by less than one epoch's worth of decay.
* ``model.total_steps`` (the KL warm-up horizon N of §2) follows ``train.num_steps`` by reference,
  so ``--config.train.num_steps=...`` moves both.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Mapping

import ml_collections

from nvae_jax.config import datasets
from nvae_jax.config import schema

# The original's model arguments, named as ``config.model`` fields (the one argument list).
ARCH_ARGS = ('num_channels_enc', 'num_channels_dec', 'num_preprocess_blocks',
             'num_preprocess_cells', 'num_postprocess_blocks', 'num_postprocess_cells',
             'num_latent_scales', 'num_groups_per_scale', 'num_latent_per_group',
             'num_cell_per_cond_enc', 'num_cell_per_cond_dec', 'ada_groups',
             'min_groups_per_scale', 'use_se', 'res_dist', 'num_nf')
OBJECTIVE_ARGS = ('num_mixture_dec', 'kl_anneal_portion', 'kl_const_portion', 'kl_const_coeff',
                  'weight_decay_norm', 'weight_decay_norm_init', 'weight_decay_norm_anneal')
MODEL_ARGS = ARCH_ARGS + OBJECTIVE_ARGS

# The original train.py's argparse defaults (for arguments absent from an old Namespace).
ORIGINAL_DEFAULTS: dict[str, Any] = dict(
    num_x_bits=8, num_preprocess_cells=3, num_postprocess_cells=3, num_cell_per_cond_enc=1,
    num_cell_per_cond_dec=1, use_se=False, res_dist=False, num_nf=0, num_mixture_dec=10,
    ada_groups=False, min_groups_per_scale=1, kl_anneal_portion=0.3, kl_const_portion=1e-4,
    kl_const_coeff=1e-4, weight_decay_norm=0.0, weight_decay_norm_init=10.0,
    weight_decay_norm_anneal=False, arch_instance='res_mbconv', learning_rate=1e-2,
    learning_rate_min=1e-4, weight_decay=3e-4, epochs=200, warmup_epochs=5, batch_size=200,
    num_process_per_node=1, num_proc_node=1, seed=1)
# Arguments that the original evaluate.py back-fills for checkpoints written before they existed.
BACKFILL = dict(ada_groups=False, min_groups_per_scale=1, num_mixture_dec=10)
# Arguments without which no model can be built (the rest have argparse defaults).
REQUIRED_ARGS = ('dataset', 'num_channels_enc', 'num_channels_dec', 'num_latent_scales',
                 'num_groups_per_scale', 'num_latent_per_group', 'num_preprocess_blocks',
                 'num_postprocess_blocks')

# The one NVAE defaults table: every ``config.model`` field of the ``nvae`` family.  The
# original's defaults, with the values every README command sets (``--use_se --res_dist``, 20
# latent channels per group, 2 cells per conditional) and 32 channels, 2 pre/post blocks, 1 scale
# of 10 groups for the required arguments; then the nvae_jax-only fields: ``decoder`` (``auto``
# or an output-distribution name), ``faithful_dml`` (the original's logistic-mixture quirks),
# ``depthwise_impl`` (``auto``/``lax``/``shift``), ``scan_groups`` (each run of identical latent
# groups compiled once, as a ``lax.scan``; same variables, same results) and ``total_steps`` (the
# KL warm-up horizon; 0 = ``train.num_steps``).
MODEL_DEFAULTS: dict[str, Any] = dict(
    {k: ORIGINAL_DEFAULTS[k] for k in MODEL_ARGS if k in ORIGINAL_DEFAULTS},
    num_channels_enc=32, num_channels_dec=32, num_preprocess_blocks=2,
    num_postprocess_blocks=2, num_latent_scales=1, num_groups_per_scale=10,
    num_latent_per_group=20, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2, use_se=True,
    res_dist=True, decoder='auto', faithful_dml=False, depthwise_impl='auto', scan_groups=True,
    total_steps=0)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Iterations per epoch of a drop-last loader."""
  if global_batch <= 0:
    raise ValueError(f'global_batch: expected a positive int, got {global_batch}')
  return num_examples // global_batch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The original's defaults in nvae_jax fields (see the module docstring)."""
  del arg
  c = schema.base_config()
  c.model = ml_collections.ConfigDict(dict(name='nvae', **{
      k: MODEL_DEFAULTS[k] for k in MODEL_ARGS + ('decoder', 'faithful_dml', 'depthwise_impl',
                                                  'scan_groups', 'total_steps')}))
  c.model.total_steps = c.train.get_ref('num_steps')

  c.optim.name = 'adamax'
  c.optim.lr = ORIGINAL_DEFAULTS['learning_rate']
  c.optim.min_lr = ORIGINAL_DEFAULTS['learning_rate_min']
  c.optim.schedule = 'cosine'
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-3
  c.optim.weight_decay = ORIGINAL_DEFAULTS['weight_decay']
  c.optim.weight_decay_mode = 'coupled'
  c.optim.grad_clip = 0.0  # The original has no clipping; AMP's scaler skips non-finite steps.
  c.optim.skip_threshold = 0.0

  # Original validation uses 10 importance samples during training and 1000 at the end;
  # pass --config.eval.num_importance_samples=1000 for the final figure.
  c.eval.num_importance_samples = 10
  c.eval.importance_chunk = 10
  c.sample.num = 16
  c.sample.temperature = 0.7
  return c


def set_dataset(c: ml_collections.ConfigDict, dataset: str, *, num_bits: int = 8,
                field: str = 'dataset') -> ml_collections.ConfigDict:
  """Sets ``c.data`` (and ``c.eval.split``) to the table entry of an original ``--dataset``."""
  c.data.update(datasets.data_fields(dataset, field))
  c.data.num_bits = int(num_bits)
  c.eval.split = c.data.eval_split
  return c


def _set_architecture(m: ml_collections.ConfigDict, *, channels: int, pre: tuple[int, int],
                      post: tuple[int, int], scales: int, groups: int) -> None:
  """Sets the network size fields of ``config.model`` (encoder and decoder alike)."""
  m.num_channels_enc = channels
  m.num_channels_dec = channels
  m.num_preprocess_blocks, m.num_preprocess_cells = pre
  m.num_postprocess_blocks, m.num_postprocess_cells = post
  m.num_latent_scales = scales
  m.num_groups_per_scale = groups


def published(*, dataset: str, num_bits: int = 8, channels: int, pre: tuple[int, int], post: tuple[int, int],
              scales: int, groups: int, ada: bool, min_groups: int, num_nf: int,
              batch_per_gpu: int, gpus: int, epochs: int, warmup_epochs: int, lr: float,
              wdn: float, wdn_anneal: bool, wdn_init: float = 10.0,
              compute_dtype: str = 'bfloat16',
              remat_policy: str = 'none') -> ml_collections.ConfigDict:
  """A published NVAE setup (nvae_spec.md §3), with the schedule converted to steps.

  Args:
    dataset, num_bits: an original ``--dataset`` value (``nvae_jax.config.datasets``, which
      must know its training-split size) and the bits of the data.
    channels: ``num_channels_enc = num_channels_dec``.
    pre, post: (blocks, cells) of the pre- and post-processing towers.
    scales, groups, ada, min_groups: latent hierarchy (``num_latent_scales``,
      ``num_groups_per_scale``, ``ada_groups``, ``min_groups_per_scale``).
    num_nf: flow cells per latent group.
    batch_per_gpu, gpus: the original per-GPU batch and GPU count; the global batch is their
      product (batch statistics are global too, as with the original's SyncBN).
    epochs, warmup_epochs: the original schedule, converted with ``steps_per_epoch``.
    lr: base learning rate (min 1e-4, Adamax eps 1e-3, coupled weight decay 3e-4).
    wdn, wdn_anneal, wdn_init: lambda of the spectral/BN regulariser and its geometric anneal.
    compute_dtype, remat_policy: the precision and memory policies for accelerators.
  """
  c = get_config()
  set_dataset(c, dataset, num_bits=num_bits)
  m = c.model
  _set_architecture(m, channels=channels, pre=pre, post=post, scales=scales, groups=groups)
  m.ada_groups = ada
  m.min_groups_per_scale = min_groups
  m.num_nf = num_nf
  m.weight_decay_norm = wdn
  m.weight_decay_norm_anneal = wdn_anneal
  m.weight_decay_norm_init = wdn_init

  global_batch = batch_per_gpu * gpus
  examples = datasets.lookup(dataset).train_examples
  if examples is None:
    raise ValueError(f'dataset: the training-split size of {dataset!r} is unknown, so epochs '
                     'cannot be converted to steps')
  spe = steps_per_epoch(examples, global_batch)
  c.data.batch_size = global_batch
  c.data.eval_batch_size = global_batch
  c.train.num_steps = epochs * spe
  c.optim.warmup_steps = warmup_epochs * spe
  c.optim.lr = lr
  # Original: validation every epoch when epochs <= 50, else every 20 epochs; checkpoints every
  # ceil(epochs / 100) epochs.
  c.train.eval_every = spe * (1 if epochs <= 50 else 20)
  c.train.images_every = c.train.eval_every
  c.train.checkpoint_every = spe * math.ceil(epochs / 100)
  c.train.log_every = 100
  c.train.num_eval_batches = 10
  c.precision.compute_dtype = compute_dtype
  c.remat.policy = remat_policy
  return c


def small_model(c: ml_collections.ConfigDict, *, channels: int = 16, pre: tuple[int, int] = (1, 1),
                post: tuple[int, int] = (1, 1), scales: int = 2, groups: int = 2,
                batch: int = 32, steps: int = 3000) -> ml_collections.ConfigDict:
  """Shrinks a published config to something that trains on 2 CPU cores.

  Keeps the dataset, the likelihood, the flows setting and the optimizer; scales the network
  down, runs float32 without remat, evaluates one importance sample per pass and uses a short
  schedule (warm-up 5 % of the steps) with lr 5e-3 (issue #2: 1e-2 is too high for small
  batches).
  """
  m = c.model
  _set_architecture(m, channels=channels, pre=pre, post=post, scales=scales, groups=groups)
  m.min_groups_per_scale = min(m.min_groups_per_scale, groups)
  m.num_cell_per_cond_enc = 1
  m.num_cell_per_cond_dec = 1
  c.data.batch_size = batch
  c.data.eval_batch_size = 64
  # One importance sample per pass: the eval step then runs 64 images at a time, not 640, which
  # on a CPU is no slower and keeps a run's peak memory at the training step's (README, *NVAE
  # speed and memory*, item 11).
  c.eval.importance_chunk = 1
  c.train.num_steps = steps
  c.optim.warmup_steps = max(1, steps // 20)
  c.optim.lr = 5e-3
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.images_every = 1000
  c.train.checkpoint_every = 500
  c.train.num_eval_batches = 5
  c.precision.compute_dtype = 'float32'
  c.remat.policy = 'none'
  c.sample.readjust_bn_steps = 50  # BN re-estimation before sampling: 50 passes on a CPU
  return c


def published_256(*, dataset: str, epochs: int, lr: float, wdn: float,
                  arg: str | None, where: str = 'published_256') -> ml_collections.ConfigDict:
  """CelebA-HQ 256 / FFHQ 256 (same architecture), with the ``24ch`` and ``small`` variants.

  Published: 30 channels, 5 scales of ada groups [16, 8, 4, 4, 4] (min 4), 2 flows per group,
  5-bit data, batch 3 nodes x 8 GPUs x 4, lambda annealed from 1.0. ``24ch`` is the README's
  smaller model: 24 channels on 8 GPUs with batch 6 each (0.01 bits/dim worse, same time).

  Memory: ``remat.policy='dots_saveable'`` keeps convolution outputs and recomputes batch norm
  and Swish in the backward pass, which is the saving the original gets from its fused
  BN-Swish function; use ``nothing_saveable`` if a device still runs out of memory.
  """
  if arg == '24ch':
    channels, batch_per_gpu, gpus = 24, 6, 8
  else:
    channels, batch_per_gpu, gpus = 30, 4, 24
  c = published(
      dataset=dataset, num_bits=5, channels=channels, pre=(1, 2), post=(1, 2), scales=5,
      groups=16, ada=True, min_groups=4, num_nf=2, batch_per_gpu=batch_per_gpu, gpus=gpus,
      epochs=epochs, warmup_epochs=5, lr=lr, wdn=wdn, wdn_anneal=True, wdn_init=1.0,
      compute_dtype='bfloat16', remat_policy='dots_saveable')
  c.sample.num = 16
  c.sample.temperature = 0.7
  # Evaluation tiles each batch importance_chunk times: 8 images x 2 samples per device.
  c.data.eval_batch_size = 8 * gpus
  c.eval.importance_chunk = 2
  if arg == 'small':
    # 256x256 inputs, but 8 channels and two down-sampling pre-process blocks (latents at 64x64
    # and 32x32) so that a step takes about a second on 2 CPU cores.
    small_model(c, channels=8, pre=(2, 1), post=(2, 1), scales=2, groups=2, batch=4, steps=2000)
    c.data.eval_batch_size = 8
    c.eval.importance_chunk = 10
  elif arg not in (None, '', '24ch'):
    raise ValueError(f'{where}: unknown variant {arg!r}; expected "", "24ch" or "small"')
  return c


# The published setups (nvae_spec.md §3): name -> arguments of ``published`` and the batch of
# the ``:small`` variant.  CelebA-HQ 256 and FFHQ 256 go through ``published_256``.
_PUBLISHED = {
    'mnist': (dict(dataset='mnist', channels=32, pre=(2, 3), post=(2, 3), scales=2, groups=10,
                   ada=True, min_groups=1, num_nf=0, batch_per_gpu=200, gpus=2, epochs=400,
                   warmup_epochs=5, lr=1e-2, wdn=1e-2, wdn_anneal=False), 32),
    'cifar10': (dict(dataset='cifar10', channels=128, pre=(1, 2), post=(1, 2), scales=1,
                     groups=30, ada=False, min_groups=1, num_nf=1, batch_per_gpu=32, gpus=8,
                     epochs=400, warmup_epochs=5, lr=1e-2, wdn=1e-2, wdn_anneal=False), 16),
    'celeba64': (dict(dataset='celeba_64', channels=64, pre=(1, 2), post=(1, 2), scales=3,
                      groups=20, ada=True, min_groups=1, num_nf=1, batch_per_gpu=16, gpus=8,
                      epochs=90, warmup_epochs=5, lr=1e-2, wdn=1e-1, wdn_anneal=False), 8),
    'imagenet32': (dict(dataset='imagenet_32', channels=192, pre=(1, 2), post=(1, 2), scales=1,
                        groups=28, ada=False, min_groups=1, num_nf=1, batch_per_gpu=24, gpus=24,
                        epochs=45, warmup_epochs=1, lr=1e-2, wdn=1e-2, wdn_anneal=True,
                        wdn_init=1.0), 16),
}
_PUBLISHED_256 = {
    'celebahq256': dict(dataset='celeba_256', epochs=300, lr=1e-2, wdn=1e-2),
    'ffhq256': dict(dataset='ffhq', epochs=200, lr=8e-3, wdn=1e-1),
}
PUBLISHED = tuple(_PUBLISHED) + tuple(_PUBLISHED_256)


def published_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The published setup ``name`` (one of ``PUBLISHED``) with its variant ``arg``.

  ``arg``: ``''``/None (the paper's model), ``small`` (trains on 2 CPU cores) and, for the 256
  setups, ``24ch``.  ``configs/nvae_<name>.py`` is ``published_config('<name>', arg)``.
  """
  where = f'configs/nvae_{name}.py'
  if name in _PUBLISHED_256:
    return published_256(**_PUBLISHED_256[name], arg=arg, where=where)
  if name not in _PUBLISHED:
    raise ValueError(f'published config: unknown name {name!r}; expected one of {PUBLISHED}')
  setup, small_batch = _PUBLISHED[name]
  c = published(**setup, compute_dtype='bfloat16')
  if name == 'mnist':
    c.sample.temperature = 1.0
  if arg == 'small':
    small_model(c, channels=16, pre=(1, 1), post=(1, 1), scales=2, groups=2, batch=small_batch,
                steps=3000)
  elif arg not in (None, ''):
    raise ValueError(f'{where}: unknown variant {arg!r}; expected "" or "small"')
  return c


def original_args_dict(args) -> dict[str, Any]:
  if isinstance(args, argparse.Namespace):
    return dict(vars(args))
  if isinstance(args, Mapping):
    return dict(args)
  raise TypeError(f'args: expected an argparse.Namespace or a mapping, found {type(args)}')


def config_from_original_args(args, *, data_dir: str = '',
                              faithful_dml: bool = True) -> ml_collections.ConfigDict:
  """An nvae_jax config equivalent to an original run's ``train.py`` arguments.

  Missing arguments take ``BACKFILL`` (what the original ``evaluate.py`` fills in for old
  checkpoints) and then the argparse defaults (``ORIGINAL_DEFAULTS``); ``REQUIRED_ARGS`` must be
  present.  ``dataset`` sets the data fields (``nvae_jax.config.datasets``: every dataset the
  original accepts), ``num_x_bits`` sets ``data.num_bits``, the optimizer and schedule follow
  the original's flags (epochs -> steps when the training-split size is known), and
  ``model.faithful_dml`` selects the likelihood the original reported (nvae_spec.md §0.4).
  """
  given = original_args_dict(args)
  missing = [k for k in REQUIRED_ARGS if k not in given]
  if missing:
    raise ValueError(f'args: missing original arguments {missing}; is this an NVAE run?')
  a = dict(ORIGINAL_DEFAULTS)
  a.update(BACKFILL)
  a.update({k: v for k, v in given.items() if v is not None})
  if a['arch_instance'] != 'res_mbconv':
    raise ValueError(f'args.arch_instance: only "res_mbconv" (every README command) is '
                     f'implemented, found {a["arch_instance"]!r}')

  c = get_config()
  for k in MODEL_ARGS:
    c.model[k] = type(c.model[k])(a[k])
  c.model.faithful_dml = bool(faithful_dml)
  set_dataset(c, a['dataset'], num_bits=int(a['num_x_bits']), field='args.dataset')
  c.data.data_dir = data_dir

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
  examples = datasets.lookup(a['dataset']).train_examples
  if examples:
    spe = steps_per_epoch(examples, global_batch)
    c.train.num_steps = int(a['epochs']) * spe
    c.optim.warmup_steps = int(a['warmup_epochs']) * spe
  return c
