r"""Glow / emerging-convolution flow on CIFAR-10, 8-bit (Hoogeboom et al. 2019; emerging_spec.md §3, §5).

Published test bits/dim (8-bit, uniform dequantisation):
  Glow (1x1 conv, ``permutation=conv1x1``)   3.35 (Glow paper), 3.36 +- 0.002 (re-run by the
                                              emerging authors) [verified via 3rd-party tables]
  Emerging (``permutation=emerging``)        3.34 +- 0.002 [verified, 3rd-party]
  Real NVP (reference)                       3.49
  Periodic: no CIFAR-10 number in the spec (reported on galaxy images).

Architecture (official ``model.py`` README command): 3 levels x 32 steps, coupling width 512,
affine coupling with actnorm in the network, learned split and top priors, seed 2 in the paper.
Optimiser: Adamax lr 1e-3, 10-epoch linear warm-up, no decay, batch 256 (64 x 4 GPUs), 4000 epochs
of 50,000 images (195 steps each: 780,000 steps).  The paper's random 10 % shifts are not implemented; horizontal
flips are.

  python -m nvae_jax.main --config=configs/flow_cifar10.py --config.model.permutation=emerging \
    --workdir=$WORKDIR --config.data.data_dir=$TFDS_DIR
  python -m nvae_jax.main --config=configs/flow_cifar10.py:emerging --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR --mode=eval

Variants (``:ARG``, comma-separated): a permutation name, and ``small`` (2 steps per level,
width 16, batch 16, Adam, 300 steps: runs on 2 CPU cores; for an offline smoke run use the shared
CIFAR-10 subset with ``--config.data.name=npz
--config.data.data_dir=../shared/data/cifar10_subset/cifar10_train_subset.npz``).
Memory: on small GPUs add ``--config.remat.policy=nothing_saveable`` (the paper used gradient
checkpointing).
"""

from nvae_jax.config import flow as flow_base


def get_config(arg=None):
  small, permutation = flow_base.parse_arg(arg, 'configs/flow_cifar10.py')
  c = flow_base.glow_config(dataset='cifar10', image_size=32, channels=3, levels=3, steps=32,
                            width=512, global_batch=256, epochs=4000, permutation=permutation,
                            random_flip=True)
  c.seed = 2
  if small:
    flow_base.make_small(c)
  return c
