r"""sigma-VAE's small conv VAE with a calibrated decoder on CIFAR-10 (32x32x3, 8 bits).

Launch, full CIFAR-10 through TFDS (prepared in array_record format under ``data_dir``):

  python -m nvae_jax.main --config=configs/sigma_vae_cifar10.py \
    --config.model.decoder=gaussian_optimal --config.data.data_dir=$TFDS_DIR \
    --workdir=runs/sigma_cifar

or offline on the 5,085-image real CIFAR-10 subset shipped with the project (an ``npz`` source;
its ``train`` split is the first 90 % of the rows, ``test`` the last 10 %):

  python -m nvae_jax.main --config=configs/sigma_vae_cifar10.py:subset \
    --workdir=runs/sigma_cifar_subset

The variant may also name the decoder (``:logistic_mixture``, ``:subset,categorical``).

Recipe: the sigma-VAE reference code's conv VAE (32/64/128 filters, strides 1, 2, 2: 32 -> 8,
20-d latent), Adam lr 1e-3, batch 128, beta 1, 20 epochs of the full training set (7,800
steps).  The paper's CIFAR-10 numbers (Table 2: optimal sigma < -5677 nats, FID 101.4; shared
sigma < -5435, FID 116.1) come from a hierarchical HVAE, not from this small model, and are not
comparable; the author recommends sigma-VAE on top of NVAE for CIFAR.  Gaussian decoders give
continuous densities on [0, 1] (negative nats, ``"continuous": true`` in the eval JSON);
``categorical`` and ``logistic_mixture`` give discrete likelihoods in bits/dim.
"""

from nvae_jax.config import base_config
from nvae_jax.config.conv_vae import DECODERS, model_config

SUBSET = '../shared/data/cifar10_subset/cifar10_train_subset.npz'


def get_config(arg=None):
  parts = [p for p in (arg or '').split(',') if p]
  subset = 'subset' in parts
  decoders = [p for p in parts if p != 'subset']
  unknown = [p for p in decoders if p not in DECODERS]
  if unknown or len(decoders) > 1:
    raise ValueError(f'configs/sigma_vae_cifar10.py: unknown variant {arg!r}; expected '
                     f'"subset" and/or one decoder name of {DECODERS}')
  c = base_config()
  if subset:
    c.data.name = 'npz'
    c.data.data_dir = SUBSET
    c.data.npz_key = 'images_nhwc_uint8'
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
  else:
    c.data.name = 'cifar10'
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
  c.data.channels = 3
  c.data.image_size = 0  # native 32x32
  c.data.num_bits = 8
  c.data.binarize = 'none'
  c.data.batch_size = 128
  c.data.eval_batch_size = 200

  c.model = model_config(decoders[0] if decoders else 'gaussian_optimal')

  c.optim.name = 'adam'
  c.optim.lr = 1e-3
  c.optim.schedule = 'constant'

  c.train.num_steps = 7800 if not subset else 1000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.num_eval_batches = 0
  c.train.checkpoint_every = 1000
  c.train.images_every = 1000

  c.eval.split = 'test'
  c.eval.num_importance_samples = 1
  c.eval.importance_chunk = 1
  return c
