r"""Quickstart: a calibrated-decoder (sigma-VAE) conv VAE on scikit-learn's 8x8 digits, offline.

The default config of ``nvae-jax`` (it ships with the package, so the command works outside a
checkout; ``configs/quickstart.py`` is the same config): it needs no download (the digits ship inside scikit-learn) and
trains in under 30 seconds on 2 CPU cores, leaving a checkpoint, ``metrics.jsonl``, TensorBoard
events, ``samples.png`` and ``recon.png`` in the workdir.

  nvae-jax --workdir=/tmp/quickstart                  # the default --config
  nvae-jax --workdir=/tmp/quickstart --mode=eval      # JSON line on the 297 test digits
  nvae-jax --workdir=/tmp/quickstart --mode=sample --config.sample.temperature=0.8

Data: the 1500 ``train`` digits (the 297 others are ``test``), upsampled from 8x8 to 16x16 (the
encoder halves the size twice), intensities 0..16 scaled to uint8 and used at 8 bits.
Model: conv VAE 16x16x1 -> 16 -> 32 -> 32 channels (strides 1, 2, 2) -> 4-d latent (56k
parameters), decoder with the *optimal* shared sigma (sigma^2 = the batch's mean squared error,
Rybkin et al. 2020), so no beta tuning is needed.  Adam 2e-3, 50 warm-up steps, cosine decay to
1e-4 over 800 steps, batch 64 (34 epochs).

Expected (measured on a shared 2-core CPU: 1.5 min wall, 38 s of CPU time; steps run at ~15/s):
train loss about -220 nats/image, sigma about 0.10, test negative ELBO about -164 nats/image
(-0.92 "bits/dim"); samples are recognisable digits, reconstructions close to the inputs.
A 16-d latent reconstructs better but samples worse (the posterior leaves the prior).

The reported numbers are negative ELBOs of a *continuous* Gaussian density on [0, 1] (the eval
JSON says ``"continuous": true``): they are not discrete likelihoods and may be negative.
``:bernoulli`` uses a Bernoulli decoder on threshold-binarised digits instead (discrete nats).
"""

import ml_collections

from nvae_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.seed = 0

  c.data.name = 'digits'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 16
  c.data.channels = 1
  c.data.num_bits = 8
  c.data.batch_size = 64
  c.data.eval_batch_size = 64

  c.model = ml_collections.ConfigDict(dict(
      name='conv_vae', decoder='gaussian_optimal', latent_dim=4, channels=(16, 32, 32),
      strides=(1, 2, 2)))

  c.optim.name = 'adam'
  c.optim.lr = 2e-3
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.grad_clip = 200.0

  c.train.num_steps = 800
  c.train.log_every = 100
  c.train.eval_every = 400
  c.train.num_eval_batches = 0  # the whole test split (297 digits)
  c.train.checkpoint_every = 400
  c.train.images_every = 400
  c.train.num_images = 64

  c.eval.split = 'test'
  c.sample.num = 64
  c.sample.temperature = 1.0

  if arg == 'bernoulli':
    c.data.binarize = 'threshold'
    c.model.decoder = 'bernoulli'
  elif arg not in (None, ''):
    raise ValueError(f'quickstart config: unknown variant {arg!r}; expected "" or '
                     '"bernoulli"')
  return c
