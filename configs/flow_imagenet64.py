r"""Glow / emerging-convolution flow on ImageNet 64x64 (van den Oord's downsampled version), 8-bit.

Published test bits/dim (emerging_spec.md §5): Glow 3.81, Emerging 3.81 [verified, 3rd-party],
Real NVP 3.98 [memory].

Architecture (README command): 4 levels x 48 steps, width 512, learned priors; batch 16 per GPU
(64 global on 4 GPUs), Adamax lr 1e-3 with a 10-epoch warm-up (an "epoch" is 50,000 images).
The paper trains "until stopped"; this config stops after 1000 such epochs (781,000 steps), our
choice.

  python -m nvae_jax.main --config=configs/flow_imagenet64.py --config.model.permutation=emerging \
    --workdir=$WORKDIR --config.data.data_dir=$TFDS_DIR --config.remat.policy=nothing_saveable

Variants: a permutation name, and ``small`` (2 CPU cores).
"""

from nvae_jax.config import flow as flow_base


def get_config(arg=None):
  small, permutation = flow_base.parse_arg(arg, 'configs/flow_imagenet64.py')
  c = flow_base.glow_config(dataset='downsampled_imagenet/64x64', image_size=64, channels=3,
                            levels=4, steps=48, width=512, global_batch=64, epochs=1000,
                            permutation=permutation)
  c.data.eval_split = 'validation'
  c.eval.split = 'validation'
  if small:
    flow_base.make_small(c, batch=8)
  return c
