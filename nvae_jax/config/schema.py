"""Fields shared by every experiment config; each ``configs/*.py`` starts from ``base_config()``.

Field reference (the platform validates these before any compilation):

* ``seed``: int, the root of every random stream (init, data order, noise).
* ``compile_cache``: where JAX's persistent compilation cache lives: ``'auto'`` (the default:
  ``$NVAE_JAX_COMPILE_CACHE``, else ``$JAX_COMPILATION_CACHE_DIR``, else
  ``~/.cache/nvae_jax/jax_cache``), ``'off'``, or a directory (``nvae_jax.compile_cache``).
* ``compile_low_memory``: bool (False).  On XLA:CPU, compile the model's programs with XLA's
  older loop emitters: a compile peak about 0.8 GB lower for mnist_tiny (a cold start at
  1.4 GB instead of 2.4 GB) for a train step 1.15-1.25x slower in CPU time
  (``nvae_jax.compile_options``).  No effect on accelerators.
* ``compile_worker_nice``: int in 0..19 (10).  On XLA:CPU under Linux, the thread that does
  XLA's compile work for the platform's programs (train step, evaluation, sampling) runs at
  this nice value, below XLA's code-generation threads, so the kernels it emits do not queue up
  waiting for code generation: the same compile with a peak about 0.8 GB lower for mnist_tiny
  (``nvae_jax.compile_priority``); 0 leaves it alone.  With it, ``compile_low_memory`` gains
  next to nothing.
* ``data``: ``name`` (TFDS name such as ``mnist``/``cifar10``/``celeb_a``/
  ``downsampled_imagenet/32x32``, or ``digits`` (scikit-learn, offline), ``folder``, ``npz``),
  ``data_dir`` (TFDS data_dir, or the folder / npz path for local sources), ``download`` (False
  unless asked), ``train_split``/``eval_split``, ``image_size`` (final H = W; 0 keeps the
  native size), ``channels``, ``pad`` (pixels of zero padding per side, e.g. 2 for 28 -> 32),
  ``num_bits`` (8 or 5; the quantisation of the data), ``binarize`` (``'none'``,
  ``'dynamic'`` Bernoulli(pixel) resampled every pass, ``'threshold'``), ``random_flip``,
  ``batch_size`` (global), ``eval_batch_size``, ``npz_key`` (array name inside an ``.npz``
  source; empty = ``images`` or the only uint8 4-D array).
* ``model``: ``name`` (``conv_vae``, ``nvae``, ``glow``) plus family-specific fields.
* ``optim``: ``name`` (``adam``, ``adamax``, ``adamw``), ``lr``, ``min_lr``, ``warmup_steps``,
  ``schedule`` (``cosine`` or ``constant``), ``b1``, ``b2``, ``eps``, ``weight_decay``,
  ``weight_decay_mode`` (``coupled`` L2 added to the gradient as NVAE does, or ``decoupled``),
  ``grad_clip`` (global norm, 0 = off), ``skip_threshold`` (skip updates whose gradient norm
  exceeds it, 0 = only non-finite), ``max_consecutive_skips``.
* ``train``: ``num_steps``, ``log_every``, ``eval_every``, ``num_eval_batches``,
  ``checkpoint_every``, ``keep_checkpoints``, ``async_checkpoints``, ``images_every``,
  ``num_images``, ``update_programs`` (``'one'``: the train step is one XLA program; ``'two'``: a
  gradient program and an optimizer program, which compile faster and with less memory on
  XLA:CPU; ``'auto'``, the default: two on CPU, one on accelerators), ``parallel_compile``
  (True, the default: the two programs compile at the same time, a few seconds sooner at a
  somewhat higher peak memory; False: one after the other).
* ``precision``: ``compute_dtype`` (``float32`` or ``bfloat16``); parameters are always float32.
* ``remat``: ``policy`` (``none`` or a ``jax.checkpoint_policies`` name such as
  ``nothing_saveable`` / ``dots_saveable``).
* ``mesh``: ``data`` (devices on the data axis, -1 = all), ``fsdp`` (1 = replicated parameters).
* ``eval``: ``split``, ``num_importance_samples``, ``importance_chunk``.
* ``sample``: ``num``, ``temperature`` (of the latents), and for NVAE: ``output_temperature``
  (of the output distribution's draw, >= 0), ``output_mode`` (``auto``: the mean for a Bernoulli
  decoder and a draw otherwise, ``sample``, ``mean``), ``readjust_bn_steps`` /
  ``readjust_bn_batch`` / ``readjust_bn_momentum`` (NVAE's ``prepare_sampling`` hook re-estimates
  the decoder batch-norm statistics at the sampling temperature from that many train-mode prior
  passes of that batch, as an EMA with that momentum, 0 = a plain average; cached in the
  workdir; 0 steps = use the training statistics).
"""

import ml_collections

from nvae_jax.data.pipeline import BINARIZE_MODES  # noqa: F401  (the data pipeline's own table)

# The allowed values of the enumerated fields (checked by ``validation``, used by the platform).
OPTIMIZERS = ('adam', 'adamax', 'adamw')
SCHEDULES = ('cosine', 'constant')
WEIGHT_DECAY_MODES = ('coupled', 'decoupled')
COMPUTE_DTYPES = ('float32', 'bfloat16')
SAMPLE_OUTPUT_MODES = ('auto', 'sample', 'mean')
UPDATE_PROGRAMS = ('auto', 'one', 'two')
MAX_NICE = 19  # Linux's lowest scheduling priority


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = 'auto'
  c.compile_low_memory = False
  c.compile_worker_nice = 10

  c.data = ml_collections.ConfigDict(dict(
      name='mnist', data_dir='', download=False, train_split='train', eval_split='test',
      image_size=0, channels=1, pad=0, num_bits=8, binarize='none', random_flip=False,
      batch_size=32, eval_batch_size=64, npz_key=''))

  c.model = ml_collections.ConfigDict(dict(name='conv_vae'))

  c.optim = ml_collections.ConfigDict(dict(
      name='adam', lr=1e-3, min_lr=0.0, warmup_steps=0, schedule='constant', b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=0.0, weight_decay_mode='decoupled', grad_clip=0.0,
      skip_threshold=0.0, max_consecutive_skips=20))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, log_every=50, eval_every=500, num_eval_batches=10,
      checkpoint_every=500, keep_checkpoints=2, async_checkpoints=True, images_every=500,
      num_images=64, update_programs='auto', parallel_compile=True))

  c.precision = ml_collections.ConfigDict(dict(compute_dtype='float32'))
  c.remat = ml_collections.ConfigDict(dict(policy='none'))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.eval = ml_collections.ConfigDict(dict(split='test', num_importance_samples=1,
                                          importance_chunk=1))
  c.sample = ml_collections.ConfigDict(dict(
      num=64, temperature=1.0, output_temperature=1.0, output_mode='auto',
      readjust_bn_steps=500, readjust_bn_batch=16, readjust_bn_momentum=0.05))
  return c


def with_defaults(stored) -> ml_collections.ConfigDict:
  """A saved config (a dict or ConfigDict, e.g. the ``config.json`` of a converted workdir) over
  ``base_config()``: fields added to the schema after it was saved take their defaults, so an
  older saved config keeps validating.  ``model`` belongs to the model family and is kept as is.
  """
  stored = stored.to_dict() if isinstance(stored, ml_collections.ConfigDict) else dict(stored)
  c = base_config()
  for section, values in stored.items():
    if section != 'model' and section in c and isinstance(values, dict):
      c[section].update(values)
    else:
      c[section] = ml_collections.ConfigDict(values) if isinstance(values, dict) else values
  return c
