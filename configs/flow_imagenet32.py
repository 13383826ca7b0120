r"""Glow / emerging-convolution flow on ImageNet 32x32 (van den Oord's downsampled version), 8-bit.

Published test bits/dim (emerging_spec.md §5): Glow 4.09, Emerging 4.09, Real NVP 4.28
[verified, 3rd-party tables]; the emerging layers bring no gain here at two decimals.

Architecture (README command): 3 levels x 48 steps, width 512, learned priors, seed 0; batch 256
(64 x 4 GPUs), Adamax lr 1e-3 with a 10-epoch warm-up (an "epoch" is 50,000 images, also here).
The paper trains "until stopped"; this config stops after 2000 such epochs (390,000 steps), our
choice.

  python -m nvae_jax.main --config=configs/flow_imagenet32.py --config.model.permutation=emerging \
    --workdir=$WORKDIR --config.data.data_dir=$TFDS_DIR

Variants: a permutation name, and ``small`` (2 CPU cores).
"""

from nvae_jax.config import flow as flow_base


def get_config(arg=None):
  small, permutation = flow_base.parse_arg(arg, 'configs/flow_imagenet32.py')
  c = flow_base.glow_config(dataset='downsampled_imagenet/32x32', image_size=32, channels=3,
                            levels=3, steps=48, width=512, global_batch=256, epochs=2000,
                            permutation=permutation)
  c.data.eval_split = 'validation'
  c.eval.split = 'validation'
  if small:
    flow_base.make_small(c)
  return c
