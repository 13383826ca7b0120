r"""NVAE on CIFAR-10, 8-bit (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 2.91 bits/dim on the test split (paper abstract and Table 1; confirmed on
paperswithcode), 1000 importance samples.
Original budget: 8x V100-16GB, about 55 hours (400 epochs of 195 iterations at batch 8 x 32).

Architecture: 128 channels, 1 pre-process block x 2 cells, 1 post-process block x 2 cells,
1 latent scale of 30 groups (20 x 16x16 each), 1 flow per group, SE cells, residual posterior,
discretized logistic mixture decoder with 10 components.
Schedule: global batch 256, 78,000 steps (400 epochs x 195), 975 warm-up steps (5 epochs),
Adamax lr 1e-2 -> 1e-4 cosine, eps 1e-3, coupled weight decay 3e-4, lambda 1e-2 (no anneal).

Original launch command (README):

  python train.py --data $DATA_DIR/cifar10 --root $CHECKPOINT_DIR --save $EXPR_ID --dataset cifar10 \
    --num_channels_enc 128 --num_channels_dec 128 --epochs 400 --num_postprocess_cells 2 --num_preprocess_cells 2 \
    --num_latent_scales 1 --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 \
    --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-2 --num_groups_per_scale 30 \
    --batch_size 32 --num_nf 1 --num_process_per_node 8 --use_se --res_dist --fast_adamax

nvae_jax (8 GPUs, data parallel, bfloat16 convolutions):

  python -m nvae_jax.main --config=configs/nvae_cifar10.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR
  python -m nvae_jax.main --config=configs/nvae_cifar10.py --workdir=$WORKDIR --mode=eval \
    --config.data.data_dir=$TFDS_DIR --config.eval.num_importance_samples=1000

``:small`` trains on 2 CPU cores: 16 channels, 1 pre/post block x 1 cell, 2 scales of 2 groups,
1 flow per group, batch 16, 3000 steps, float32. Without the TFDS cifar10 files, the 5,085-image
subset works: ``--config.data.name=npz
--config.data.data_dir=../shared/data/cifar10_subset/cifar10_train_subset.npz``.
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('cifar10', arg)
