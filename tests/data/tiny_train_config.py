"""A config for child-process tests of the command line (preemption, SIGKILL fault injection):
the one-layer ``tiny_test_vae`` (``nvae_jax/train/testing.py``) on the 8x8 digits, which compiles
in seconds.  ``get_config('long')`` runs 40 steps, checkpointing every 5."""

import ml_collections

import nvae_jax.train.testing  # noqa: F401  (registers the model name tiny_test_vae)
from nvae_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(name='tiny_test_vae', features=4, latent=2))
  c.data.name = 'digits'
  c.data.train_split, c.data.eval_split = 'train[:90%]', 'train[90%:]'
  c.data.batch_size, c.data.eval_batch_size = 16, 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.train.update(dict(num_steps=6, log_every=1, eval_every=0, checkpoint_every=3,
                      images_every=0, num_eval_batches=1, num_images=8, async_checkpoints=True))
  if arg == 'long':
    c.train.update(dict(num_steps=40, checkpoint_every=5))
  elif arg not in (None, ''):
    raise ValueError(f'tiny_train_config: unknown variant {arg!r}')
  return c
