r"""NVAE on CelebA 64x64, 8-bit (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 2.03 bits/dim on the validation split (paper Table 1 [memory: not verified
against the PDF]).
Original budget: 8x V100-16GB, about 92 hours (90 epochs of 1271 iterations at batch 8 x 16).

Architecture: 64 channels, 1 pre-process block x 2 cells, 1 post-process block x 2 cells,
3 latent scales with ada groups [20, 10, 5] (35 groups: 5 x 8x8, 10 x 16x16, 20 x 32x32),
1 flow per group, SE cells, residual posterior, 10-component discretized logistic mixture.
Schedule: global batch 128, 114,390 steps (90 epochs x 1271), 6,355 warm-up steps (5 epochs),
Adamax lr 1e-2 -> 1e-4 cosine, eps 1e-3, coupled weight decay 3e-4, lambda 1e-1 (no anneal).
Issue #2: with smaller batches, lr 1e-2 NaNs; use 5e-3 or 1e-3 (``--config.optim.lr``).

Data: TFDS ``celeb_a``; as the original, the data package crops the box (left 15, top 40,
right 163, bottom 188) = 148x148 from the 178x218 aligned images and resizes it to 64.
Validation split: CelebA "validation" (19,867 images).

Original launch command (README):

  python train.py --data $DATA_DIR/celeba64_lmdb --root $CHECKPOINT_DIR --save $EXPR_ID --dataset celeba_64 \
    --num_channels_enc 64 --num_channels_dec 64 --epochs 90 --num_postprocess_cells 2 --num_preprocess_cells 2 \
    --num_latent_scales 3 --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 \
    --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-1 --num_groups_per_scale 20 \
    --batch_size 16 --num_nf 1 --ada_groups --num_process_per_node 8 --use_se --res_dist --fast_adamax

nvae_jax (8 GPUs):

  python -m nvae_jax.main --config=configs/nvae_celeba64.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

``:small`` trains on 2 CPU cores: 16 channels, 1 pre/post block x 1 cell, 2 scales of 2 groups
(ada [2, 1]), 1 flow per group, batch 8, 3000 steps, float32.
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('celeba64', arg)
