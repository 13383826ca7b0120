r"""NVAE on CelebA-HQ 256x256, 5-bit (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 0.70 bits/dim on 5-bit validation data (paper Table 1; confirmed on
paperswithcode).
Original budget: 24x V100-32GB (3 nodes x 8), about 94 hours (300 epochs of 281 iterations at
batch 24 x 4). Issue #17: on 8x V100-32GB the README batch runs out of memory; batch 3 (30 ch)
or 5 (24 ch) fits.

Architecture: 30 channels, 1 pre-process block x 2 cells, 1 post-process block x 2 cells,
5 latent scales with ada groups [16, 8, 4, 4, 4] (36 groups: 4 x 8x8, 4 x 16x16, 4 x 32x32,
8 x 64x64, 16 x 128x128), 2 flows per group, SE cells, residual posterior, 10-component
discretized logistic mixture on 5-bit data.
Schedule: global batch 96, 84,300 steps (300 epochs x 281), 1,405 warm-up steps (5 epochs),
Adamax lr 1e-2 -> 1e-4 cosine, eps 1e-3, coupled weight decay 3e-4, lambda annealed
geometrically from 1.0 to 1e-2 over the KL warm-up.

Data: TFDS ``celeb_a_hq/256`` (manual download, 30,000 images in one split); the original uses
Glow's 27k / 3k split, reproduced here as ``train[:27000]`` / ``train[27000:]``.

Original launch command (README; per node):

  mpirun --allow-run-as-root -np 3 -npernode 1 bash -c \
    'python train.py --data $DATA_DIR/celeba/celeba-lmdb --root $CHECKPOINT_DIR --save $EXPR_ID \
    --dataset celeba_256 --num_channels_enc 30 --num_channels_dec 30 --epochs 300 --num_postprocess_cells 2 \
    --num_preprocess_cells 2 --num_latent_scales 5 --num_latent_per_group 20 --num_cell_per_cond_enc 2 \
    --num_cell_per_cond_dec 2 --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-2 \
    --num_groups_per_scale 16 --batch_size 4 --num_nf 2 --ada_groups --min_groups_per_scale 4 \
    --weight_decay_norm_anneal --weight_decay_norm_init 1. --num_process_per_node 8 --num_proc_node 3 \
    --use_se --res_dist --fast_adamax --num_x_bits 5 --node_rank $NODE_RANK --master_address $IP_ADDR'

nvae_jax (3 nodes x 8 GPUs, bfloat16, remat of cells under ``dots_saveable``):

  python -m nvae_jax.main --config=configs/nvae_celebahq256.py --workdir=$WORKDIR --distributed \
    --config.data.data_dir=$TFDS_DIR

Variants: ``:24ch`` (24 channels, 8 GPUs x batch 6 = 48, 168,600 steps; the README's smaller
model, 0.01 bits/dim worse); ``:small`` (8 channels, 2 pre/post blocks x 1 cell, 2 scales of
2 groups, batch 4, 2000 steps, float32, for 2 CPU cores).
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('celebahq256', arg)
