"""Shared builder of the Glow / emerging-convolution flow configs (``configs/flow_*.py``).

Recipe of the official emerging code (``docs/emerging_spec.md`` §3): affine coupling of width 512
with actnorm inside the coupling network, learned conditional split priors and a learned top prior,
uniform dequantisation with the ``x - 1/2`` preprocessing, Adamax (beta1 0.9,
beta2 = 1 - 1/(iterations per epoch)), learning rate 1e-3 with a linear warm-up over 10 "epochs" of
50,000 images and no decay, 64 images per GPU on 4 GPUs at 32x32.

Config strings (``--config=configs/flow_cifar10.py:ARG``): comma-separated tokens, each either
``small`` (a model that trains on 2 CPU cores) or a permutation name (``reverse``, ``shuffle``,
``conv1x1``, ``plu``, ``qr``, ``emerging``, ``periodic``), e.g. ``:emerging`` or ``:small,qr``.
"""

from __future__ import annotations

import ml_collections

from nvae_jax.config import base_config

PERMUTATIONS = ('reverse', 'shuffle', 'conv1x1', 'plu', 'qr', 'emerging', 'periodic')
EPOCH_IMAGES = 50_000  # the official code's "epoch", also for ImageNet


def parse_arg(arg, where: str, default_permutation: str = 'conv1x1') -> tuple[bool, str]:
  """``(small, permutation)`` from a config string such as ``'small,emerging'``."""
  small, permutation = False, default_permutation
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token == 'small':
      small = True
    elif token in PERMUTATIONS:
      permutation = token
    else:
      raise ValueError(f'{where}: unknown config argument {token!r}; expected "small" and/or one '
                       f'of {PERMUTATIONS}')
  return small, permutation


def glow_config(*, dataset: str, image_size: int, channels: int, levels: int, steps: int,
                width: int, global_batch: int, epochs: int, permutation: str,
                warmup_epochs: int = 10, random_flip: bool = False,
                num_bits: int = 8) -> ml_collections.ConfigDict:
  """The paper recipe for one dataset (see the module docstring)."""
  c = base_config()
  c.seed = 0
  c.data.update(dict(name=dataset, image_size=image_size, channels=channels, pad=0,
                     num_bits=num_bits, binarize='none', random_flip=random_flip,
                     batch_size=global_batch, eval_batch_size=global_batch))
  c.model = ml_collections.ConfigDict(dict(
      name='glow', num_levels=levels, num_steps=steps, hidden_channels=width,
      permutation=permutation, coupling='affine', kernel_size=3, dilation=1, learn_top=True,
      learn_split_prior=True, net_actnorm=True, preprocess='center', logit_alpha=0.05))
  its_per_epoch = max(1, EPOCH_IMAGES // global_batch)
  c.optim.update(dict(name='adamax', lr=1e-3, min_lr=1e-3, schedule='constant',
                      warmup_steps=warmup_epochs * its_per_epoch, b1=0.9,
                      b2=1.0 - 1.0 / its_per_epoch, eps=1e-8, weight_decay=0.0, grad_clip=0.0,
                      skip_threshold=0.0))
  c.train.update(dict(num_steps=epochs * its_per_epoch, log_every=100,
                      eval_every=50 * its_per_epoch, num_eval_batches=0,
                      checkpoint_every=5 * its_per_epoch, images_every=10 * its_per_epoch,
                      num_images=64))
  c.eval.split = c.data.eval_split
  c.sample.temperature = 0.7  # Glow's usual sampling temperature; bits/dim never depends on it
  return c


def make_small(c: ml_collections.ConfigDict, *, steps: int = 2, width: int = 16,
               batch: int = 16, num_steps: int = 300) -> ml_collections.ConfigDict:
  """Shrinks ``c`` in place to a model that trains on 2 CPU cores (same levels and data)."""
  c.model.num_steps = steps
  c.model.hidden_channels = width
  c.data.batch_size = batch
  c.data.eval_batch_size = 4 * batch
  c.optim.name = 'adam'
  c.optim.b2 = 0.999
  c.optim.warmup_steps = min(50, num_steps // 5)
  c.train.update(dict(num_steps=num_steps, log_every=25, eval_every=num_steps,
                      num_eval_batches=4, checkpoint_every=num_steps, images_every=num_steps,
                      num_images=16))
  return c
