"""NVAE defaults shared by the published configs (``configs/nvae_*.py``).

``get_config()`` returns the original implementation's argparse defaults (``train.py`` at
commit 9fc1a28) expressed in nvae_jax fields, plus the flags every README command sets
(``--use_se --res_dist --fast_adamax``, 20 latent channels per group, 2 cells per conditional).
It is a valid config on its own (a small CIFAR-10-shaped model), but is meant to be specialised by
``published(...)``, which every per-dataset file calls with the numbers of ``nvae_spec.md`` §3.

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

import math

import ml_collections

from nvae_jax.config import schema as common

# Training-split sizes used by the original (nvae_spec.md §2 "Data").
TRAIN_EXAMPLES = {
    'mnist': 60_000,
    'cifar10': 50_000,
    'celeba64': 162_770,
    'imagenet32': 1_281_147,  # Glow's "imagenet-oord" split.
    'celebahq256': 27_000,  # Glow's tfrecords: 27k train / 3k validation.
    'ffhq256': 63_000,  # An (unseeded) random 63k / 7k split of the 70k images.
}


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Iterations per epoch of a drop-last loader."""
  if global_batch <= 0:
    raise ValueError(f'global_batch: expected a positive int, got {global_batch}')
  return num_examples // global_batch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The original's defaults in nvae_jax fields (see the module docstring)."""
  del arg
  c = common.base_config()
  c.model = ml_collections.ConfigDict(dict(
      name='nvae',
      num_channels_enc=32,
      num_channels_dec=32,
      num_preprocess_blocks=2,
      num_preprocess_cells=3,
      num_postprocess_blocks=2,
      num_postprocess_cells=3,
      num_latent_scales=1,
      num_groups_per_scale=10,
      num_latent_per_group=20,
      num_cell_per_cond_enc=2,
      num_cell_per_cond_dec=2,
      ada_groups=False,
      min_groups_per_scale=1,
      use_se=True,
      res_dist=True,
      num_nf=0,
      num_mixture_dec=10,
      decoder='auto',
      faithful_dml=False,
      kl_anneal_portion=0.3,
      kl_const_portion=1e-4,
      kl_const_coeff=1e-4,
      weight_decay_norm=0.0,
      weight_decay_norm_init=10.0,
      weight_decay_norm_anneal=False,
      depthwise_impl='auto',
      total_steps=0,
  ))
  c.model.total_steps = c.train.get_ref('num_steps')

  c.optim.name = 'adamax'
  c.optim.lr = 1e-2
  c.optim.min_lr = 1e-4
  c.optim.schedule = 'cosine'
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-3
  c.optim.weight_decay = 3e-4
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


def published(*, dataset: str, channels: int, pre: tuple[int, int], post: tuple[int, int],
              scales: int, groups: int, ada: bool, min_groups: int, num_nf: int,
              batch_per_gpu: int, gpus: int, epochs: int, warmup_epochs: int, lr: float,
              wdn: float, wdn_anneal: bool, wdn_init: float = 10.0,
              compute_dtype: str = 'bfloat16',
              remat_policy: str = 'none') -> ml_collections.ConfigDict:
  """A published NVAE setup (nvae_spec.md §3), with the schedule converted to steps.

  Args:
    dataset: key of ``TRAIN_EXAMPLES``.
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
  m = c.model
  m.num_channels_enc = channels
  m.num_channels_dec = channels
  m.num_preprocess_blocks, m.num_preprocess_cells = pre
  m.num_postprocess_blocks, m.num_postprocess_cells = post
  m.num_latent_scales = scales
  m.num_groups_per_scale = groups
  m.ada_groups = ada
  m.min_groups_per_scale = min_groups
  m.num_nf = num_nf
  m.weight_decay_norm = wdn
  m.weight_decay_norm_anneal = wdn_anneal
  m.weight_decay_norm_init = wdn_init

  global_batch = batch_per_gpu * gpus
  spe = steps_per_epoch(TRAIN_EXAMPLES[dataset], global_batch)
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
  down, runs float32 without remat and uses a short schedule (warm-up 5 % of the steps) with
  lr 5e-3 (issue #2: 1e-2 is too high for small batches).
  """
  m = c.model
  m.num_channels_enc = channels
  m.num_channels_dec = channels
  m.num_preprocess_blocks, m.num_preprocess_cells = pre
  m.num_postprocess_blocks, m.num_postprocess_cells = post
  m.num_latent_scales = scales
  m.num_groups_per_scale = groups
  m.min_groups_per_scale = min(m.min_groups_per_scale, groups)
  m.num_cell_per_cond_enc = 1
  m.num_cell_per_cond_dec = 1
  c.data.batch_size = batch
  c.data.eval_batch_size = 64
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
                  arg: str | None) -> ml_collections.ConfigDict:
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
      dataset=dataset, channels=channels, pre=(1, 2), post=(1, 2), scales=5, groups=16,
      ada=True, min_groups=4, num_nf=2, batch_per_gpu=batch_per_gpu, gpus=gpus, epochs=epochs,
      warmup_epochs=5, lr=lr, wdn=wdn, wdn_anneal=True, wdn_init=1.0,
      compute_dtype='bfloat16', remat_policy='dots_saveable')
  c.data.channels = 3
  c.data.image_size = 256
  c.data.num_bits = 5
  c.data.random_flip = True
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
    raise ValueError(f'configs/nvae_{dataset}.py: unknown variant {arg!r}; expected "", "24ch" '
                     'or "small"')
  return c
