r"""NVAE on dynamically binarised MNIST (Vahdat & Kautz 2020, nvae_spec.md §3).

Published result: 78.01 nats test NLL (paper Table 1 [memory: not verified against the PDF]),
1000 importance samples, no flows.
Original budget: 2x V100-16GB, about 21 hours (400 epochs of 150 iterations at batch 2 x 200).

Architecture: 32 channels, 2 pre-process blocks x 3 cells, 2 post-process blocks x 3 cells,
2 latent scales with ada groups [10, 5] (15 groups of 20 x {8x8, 4x4}), no flows, SE cells,
residual posterior, Bernoulli decoder over the central 28x28 of the 2-pixel-padded 32x32 image.
Schedule: global batch 400, 60,000 steps (400 epochs x 150), 750 warm-up steps (5 epochs),
Adamax lr 1e-2 -> 1e-4 cosine, eps 1e-3, coupled weight decay 3e-4, lambda 1e-2 (no anneal).

Original launch command (README):

  python train.py --data $DATA_DIR/mnist --root $CHECKPOINT_DIR --save $EXPR_ID --dataset mnist \
    --batch_size 200 --epochs 400 --num_latent_scales 2 --num_groups_per_scale 10 --num_postprocess_cells 3 \
    --num_preprocess_cells 3 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 --num_latent_per_group 20 \
    --num_preprocess_blocks 2 --num_postprocess_blocks 2 --weight_decay_norm 1e-2 --num_channels_enc 32 \
    --num_channels_dec 32 --num_nf 0 --ada_groups --num_process_per_node 2 --use_se --res_dist --fast_adamax

nvae_jax (2 GPUs, data parallel, batch statistics over the global batch):

  python -m nvae_jax.main --config=configs/nvae_mnist.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR
  python -m nvae_jax.main --config=configs/nvae_mnist.py --workdir=$WORKDIR --mode=eval \
    --config.data.data_dir=$TFDS_DIR --config.eval.num_importance_samples=1000

``:small`` trains on 2 CPU cores: 16 channels, 1 pre/post block x 1 cell, 2 scales of 2 groups
(ada [2, 1]), 1 cell per conditional, batch 32, 3000 steps, float32.
"""

from nvae_jax.config import nvae as nvae_base


def get_config(arg=None):
  return nvae_base.published_config('mnist', arg)
