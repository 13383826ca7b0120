r"""A small Glow-style flow on MNIST, 8-bit, that trains on 2 CPU cores.

Geometry: the native 28x28x1 images with no padding and 2 levels (28 -> 14x14x4 -> split ->
7x7x8), so bits/dim is over the real 784 pixels (padding 28 -> 32 would add 240 constant pixels
that a flow models almost for free and so lower the reported bits/dim).  A third level is
impossible without padding (7 is odd).

Model: 2 levels x 4 steps, coupling width 32, affine coupling with actnorm in the coupling
network, learned split and top priors, ``permutation`` from the config string (default
``conv1x1``).  Adam lr 1e-3 with 100 warm-up steps, batch 32, 1500 steps.

Published numbers: the spec (emerging_spec.md §5) has no MNIST flow result.  For orientation only,
large flows reach about 1.0 bits/dim on dequantised 8-bit MNIST [memory, unverified]; this tiny,
briefly trained model is far from that (see benchmarks/flow_mnist_sweep.py for measured figures).

  python -m nvae_jax.main --config=configs/flow_mnist.py:emerging --workdir=$WORKDIR \
    --config.data.data_dir=../shared/data/tfds
  python -m nvae_jax.main --config=configs/flow_mnist.py:emerging --workdir=$WORKDIR \
    --config.data.data_dir=../shared/data/tfds --mode=eval

5-bit data: ``--config.data.num_bits=5``.  ``:small`` (2 steps per level, width 16, 300 steps) is a
quick smoke run; comma-separate it with a permutation, e.g. ``:small,periodic``.
"""

from nvae_jax.config import flow as flow_base


def get_config(arg=None):
  small, permutation = flow_base.parse_arg(arg, 'configs/flow_mnist.py')
  c = flow_base.glow_config(dataset='mnist', image_size=28, channels=1, levels=2, steps=4,
                            width=32, global_batch=32, epochs=1, permutation=permutation)
  c.optim.update(dict(name='adam', lr=1e-3, min_lr=1e-3, schedule='constant', warmup_steps=100,
                      b1=0.9, b2=0.999))
  c.data.eval_batch_size = 250
  c.train.update(dict(num_steps=1500, log_every=100, eval_every=500, num_eval_batches=8,
                      checkpoint_every=500, images_every=1500, num_images=16))
  if small:
    flow_base.make_small(c, num_steps=300)
  return c
