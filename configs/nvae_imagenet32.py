r"""NVAE on ImageNet 32x32, 8-bit (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 3.92 bits/dim on the validation split (paper Table 1 [memory: not verified
against the PDF]). No checkpoint was released (issue #44).
Original budget: 24x V100-16GB (3 nodes x 8), about 70 hours (45 epochs of 2224 iterations at
batch 24 x 24).

Architecture: 192 channels, 1 pre-process block x 2 cells, 1 post-process block x 2 cells,
1 latent scale of 28 groups (20 x 16x16 each), 1 flow per group, SE cells, residual posterior,
10-component discretized logistic mixture.
Schedule: global batch 576, 100,080 steps (45 epochs x 2224), 2,224 warm-up steps (1 epoch),
Adamax lr 1e-2 -> 1e-4 cosine, eps 1e-3, coupled weight decay 3e-4, lambda annealed
geometrically from 1.0 to 1e-2 over the KL warm-up (first 30 % of training).

Data: TFDS ``downsampled_imagenet/32x32`` (the Glow/Oord "imagenet-oord" images), validation
split of 50,000.

Original launch command (README; per node, NODE_RANK = 0, 1, 2):

  mpirun --allow-run-as-root -np 3 -npernode 1 bash -c \
    'python train.py --data $DATA_DIR/imagenet-oord/imagenet-oord-lmdb_32 --root $CHECKPOINT_DIR --save $EXPR_ID \
    --dataset imagenet_32 --num_channels_enc 192 --num_channels_dec 192 --epochs 45 --num_postprocess_cells 2 \
    --num_preprocess_cells 2 --num_latent_scales 1 --num_latent_per_group 20 --num_cell_per_cond_enc 2 \
    --num_cell_per_cond_dec 2 --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-2 \
    --num_groups_per_scale 28 --batch_size 24 --num_nf 1 --warmup_epochs 1 --weight_decay_norm_init 1e0 \
    --weight_decay_norm_anneal --num_process_per_node 8 --num_proc_node 3 --use_se --res_dist --fast_adamax \
    --node_rank $NODE_RANK --master_address $IP_ADDR'

nvae_jax (3 nodes x 8 GPUs; see launch/slurm_gpu.sbatch):

  python -m nvae_jax.main --config=configs/nvae_imagenet32.py --workdir=$WORKDIR --distributed \
    --config.data.data_dir=$TFDS_DIR

``:small`` trains on 2 CPU cores: 16 channels, 1 pre/post block x 1 cell, 2 scales of 2 groups,
1 flow per group, batch 16, 3000 steps, float32.
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('imagenet32', arg)
