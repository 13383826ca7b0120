# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Calibrated decoders: fixed, learned and optimal sigma
#
# A Gaussian decoder N(x; mu(z), sigma^2 I) turns the reconstruction term of the ELBO into
#
#     -log p(x|z) = ||x - mu||^2 / (2 sigma^2) + D log sigma + D/2 log(2 pi),
#
# so sigma weighs the reconstruction against the KL exactly as a beta would. sigma-VAE
# (Rybkin, Daniilidis & Levine 2020) calibrates it instead of tuning it:
#
# * **fixed** sigma = 1 (`gaussian_fixed`): the usual "MSE" VAE, over-regularised on images;
# * **learned** shared sigma (`gaussian_shared`): one log sigma trained with the model;
# * **optimal** sigma (`gaussian_optimal`): sigma^2 = the batch's mean squared error, the
#   analytic maximiser of the likelihood, so nothing is tuned.
#
# The three train here on scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16,
# with the same conv VAE, data order and number of steps, through the platform's training loop
# (`nvae_jax.train.loop.train_and_evaluate`). `NVAE_JAX_NOTEBOOK_STEPS` sets the steps.

# %%
# Install (a fresh Colab runtime or environment); does nothing when nvae_jax is importable.
# NVAE_JAX_SOURCE: this repository's git URL (git+https://...) or a path to a copy of it; the
# default is the checkout this notebook sits in.
import importlib
import importlib.util
import os

if importlib.util.find_spec('nvae_jax') is None:
  SOURCE = os.environ.get('NVAE_JAX_SOURCE') or ('..' if os.path.isfile('../pyproject.toml')
                                                 else '')
  if not SOURCE:
    raise RuntimeError('nvae_jax is not installed: set NVAE_JAX_SOURCE to the repository '
                       '(%env NVAE_JAX_SOURCE=git+https://... or a path), then rerun this cell')
  REQUIREMENT = f'nvae_jax[notebooks] @ {SOURCE}' if '://' in SOURCE else f'{SOURCE}[notebooks]'
  # %pip install -q "{REQUIREMENT}"
  importlib.invalidate_caches()

STEPS = int(os.environ.get('NVAE_JAX_NOTEBOOK_STEPS', '600'))  # training steps per decoder
FIGURE_DIR = os.environ.get('NVAE_JAX_NOTEBOOK_FIGURES', '')  # save the figure there if set
WORKDIR = os.environ.get('NVAE_JAX_NOTEBOOK_WORKDIR', '')  # parent of the run's fresh folder

# %%
import tempfile

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from nvae_jax.config import base_config
from nvae_jax.config import conv_vae as conv_vae_config
from nvae_jax.data import make_pipeline
from nvae_jax.models import build_task
from nvae_jax.train import loop
from nvae_jax.train import sample as sample_lib
from nvae_jax.train import state as state_lib

if WORKDIR:
  os.makedirs(WORKDIR, exist_ok=True)
# A fresh folder for every run (a folder holding a finished run's checkpoint would be resumed).
WORKDIR = tempfile.mkdtemp(prefix='calibrated_decoders_', dir=WORKDIR or None)
print('jax', jax.__version__, 'on', jax.devices()[0].platform, '| work directory', WORKDIR)

# %% [markdown]
# ## One config, three decoders
#
# The config is the platform's schema (`nvae_jax.config.base_config()`) with the conv VAE's
# fields (`nvae_jax.config.conv_vae.model_config`), filled in here: the digits source, the
# sigma-VAE conv VAE with a 4-d latent, Adam with warm-up and cosine decay.
# Only `model.decoder` differs between the runs.

# %%
DECODERS = {'fixed sigma = 1': 'gaussian_fixed', 'learned sigma': 'gaussian_shared',
            'optimal sigma': 'gaussian_optimal'}


def make_config(decoder: str) -> ml_collections.ConfigDict:
  c = base_config()
  c.data.update(name='digits', train_split='train', eval_split='test', image_size=16,
                channels=1, num_bits=8, batch_size=64, eval_batch_size=64)
  c.model = conv_vae_config.model_config(decoder)  # every conv_vae field at its default
  c.model.update(latent_dim=4, channels=(16, 32, 32))
  c.optim.update(name='adam', lr=2e-3, min_lr=1e-4, warmup_steps=min(50, STEPS // 10),
                 schedule='cosine', grad_clip=200.0)
  c.train.update(num_steps=STEPS, log_every=max(2, STEPS // 6), eval_every=0,
                 num_eval_batches=0,  # the final evaluation covers all 297 test digits
                 checkpoint_every=STEPS, images_every=0, num_images=36)
  c.sample.num = 36
  return c


results, tasks = {}, {}
for label, decoder in DECODERS.items():
  print(f'--- {label} ({decoder})')
  config = make_config(decoder)
  tasks[label] = build_task(config)  # the ModelTask the loop trains; kept for sampling below
  results[label] = loop.train_and_evaluate(config, os.path.join(WORKDIR, decoder),
                                           task=tasks[label])

# %% [markdown]
# ## Test ELBO
#
# The negative ELBO over the 297 test digits, in nats per image of a *continuous* density on
# [0, 1]^256 (so it can be negative; it is not a discrete likelihood). sigma is the decoder's at
# the end of training: 1 by construction, the learned parameter, or the square root of the batch
# MSE (evaluation uses its running average).

# %%
print(f'{"decoder":16s} {"sigma":>7s} {"-ELBO":>9s} {"recon":>9s} {"KL":>7s}')
for label, result in results.items():
  ev, train = result['eval'], result['train']
  sigma = train.get('sigma', 1.0)
  print(f'{label:16s} {sigma:7.3f} {ev["nats_per_image"]:9.1f} {ev["recon_per_image"]:9.1f} '
        f'{ev["kl_per_image"]:7.2f}')
  assert np.isfinite(ev['nats_per_image'])
best = min(results, key=lambda k: results[k]['eval']['nats_per_image'])
print(f'best test ELBO: {best}')

# %% [markdown]
# ## Reconstructions and samples
#
# Each trained model reconstructs the same 18 test digits (rows alternate originals and
# reconstructions from the posterior mean) and decodes 36 draws of z ~ N(0, I) (the decoder
# mean, as the paper shows).

# %%
test_batch = next(make_pipeline(make_config('gaussian_fixed').data, 'test', train=False,
                                seed=0))
originals = test_batch['image'][:18]
fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 9.4), layout='constrained')
for col, (label, result) in enumerate(results.items()):
  task = tasks[label]
  variables = state_lib.variables_of(result['state'])
  recon = jax.jit(task.reconstruct)(variables, {'image': originals}, jax.random.key(1))
  samples = jax.jit(lambda v, k, task=task: task.sample(v, k, 36, 1.0))(variables,
                                                                         jax.random.key(2))
  _, cols = sample_lib.grid_layout(18, 6)
  pairs = sample_lib.pair_rows(np.asarray(originals), np.asarray(recon), cols)
  for row, (images, ncols, what) in enumerate(((pairs, cols, 'reconstructions'),
                                               (np.asarray(samples), 6, 'samples'))):
    ax = axes[row, col]
    ax.imshow(sample_lib.make_grid(images, ncols)[..., 0], cmap='gray', vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    ev, sigma = result['eval'], result['train'].get('sigma', 1.0)
    ax.set_title(f'{label}: {what}\ntest -ELBO {ev["nats_per_image"]:.1f} nats, KL '
                 f'{ev["kl_per_image"]:.1f}, sigma {sigma:.3g}', fontsize=10)
  axes[1, col].set_xlabel('z ~ N(0, I), decoder mean')
fig.suptitle(f'sigma-VAE decoders on scikit-learn digits (16x16), {STEPS} steps each\n'
             'top: test digits (odd rows) and their reconstructions (even rows)')
if FIGURE_DIR:
  os.makedirs(FIGURE_DIR, exist_ok=True)
  fig.savefig(os.path.join(FIGURE_DIR, 'calibrated_decoders.png'), dpi=100)
plt.show()
