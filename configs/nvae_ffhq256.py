r"""NVAE on FFHQ 256x256, 5-bit (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 0.69 bits/dim on 5-bit held-out data (paper Table 1 [memory: not verified
against the PDF]).
Original budget: 24x V100-32GB (3 nodes x 8), about 160 hours (200 epochs of 656 iterations at
batch 24 x 4).

Architecture: as CelebA-HQ 256 (30 channels, 5 scales of ada groups [16, 8, 4, 4, 4],
2 flows per group, 5-bit discretized logistic mixture); lr 8e-3 and lambda annealed from 1.0 to
1e-1. Schedule: global batch 96, 131,200 steps (200 epochs x 656), 3,280 warm-up steps.

Data: the 70k FFHQ images resized 1024 -> 256 (bilinear) in a folder; ``data.name='folder'``
splits it by a stable hash of the file name (about 90 % / 10 %, like the original's unseeded
random 63k / 7k split). Set ``--config.data.data_dir=/path/to/ffhq256``.

Original launch command (README; per node):

  mpirun --allow-run-as-root -np 3 -npernode 1 bash -c \
    'python train.py --data $DATA_DIR/ffhq/ffhq-lmdb --root $CHECKPOINT_DIR --save $EXPR_ID --dataset ffhq \
    --num_channels_enc 30 --num_channels_dec 30 --epochs 200 --num_postprocess_cells 2 --num_preprocess_cells 2 \
    --num_latent_scales 5 --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 \
    --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-1 --num_groups_per_scale 16 \
    --batch_size 4 --num_nf 2 --ada_groups --min_groups_per_scale 4 --weight_decay_norm_anneal \
    --weight_decay_norm_init 1. --num_process_per_node 8 --num_proc_node 3 --use_se --res_dist --fast_adamax \
    --num_x_bits 5 --learning_rate 8e-3 --node_rank $NODE_RANK --master_address $IP_ADDR'

nvae_jax (3 nodes x 8 GPUs, bfloat16, remat of cells under ``dots_saveable``):

  python -m nvae_jax.main --config=configs/nvae_ffhq256.py --workdir=$WORKDIR --distributed \
    --config.data.data_dir=/path/to/ffhq256

Variants: ``:24ch`` (24 channels on 8 GPUs x batch 6 = 48, 262,400 steps: the README's smaller
model, "0.01 bits/dim worse in the same time"); ``:small`` (8 channels, 2 pre/post blocks x 1
cell, 2 scales of 2 groups, batch 4, 2000 steps, float32, for 2 CPU cores).
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('ffhq256', arg)
