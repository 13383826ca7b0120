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
# # A tour of NVAE in nvae_jax
#
# NVAE (Vahdat & Kautz 2020) is a deep hierarchical VAE: latent groups z_1 (top) ... z_L are
# generated top-down, p(z) = prod_l p(z_l | z_<l), and the encoder predicts each group's posterior
# relative to its prior. This notebook
#
# 1. builds a small NVAE from a config (the same config fields as the published setups);
# 2. trains it in-process with the platform's loop, `nvae_jax.train.loop.train_and_evaluate`;
# 3. plots the loss curve from the metric history, `loop.read_metrics(workdir)`;
# 4. samples at several latent temperatures, re-estimating the decoder's batch-norm statistics at
#    each temperature first (as the original's `--readjust_bn`);
# 5. reconstructs test digits from their posterior means;
# 6. shows the KL of each latent group.
#
# Data: scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16 and binarised, with a
# Bernoulli decoder. `NVAE_JAX_NOTEBOOK_STEPS` sets the number of training steps.

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

STEPS = int(os.environ.get('NVAE_JAX_NOTEBOOK_STEPS', '400'))  # training steps
FIGURE_DIR = os.environ.get('NVAE_JAX_NOTEBOOK_FIGURES', '')  # save the figure there if set
WORKDIR = os.environ.get('NVAE_JAX_NOTEBOOK_WORKDIR', '')  # parent of the run's fresh folder

# %%
import json
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np

from nvae_jax.config import nvae as nvae_config
from nvae_jax.data import make_pipeline
from nvae_jax.models import build_task
from nvae_jax.models.nvae import sampling
from nvae_jax.train import build, loop
from nvae_jax.train import sample as sample_lib
from nvae_jax.train import state as state_lib

if WORKDIR:
  os.makedirs(WORKDIR, exist_ok=True)
# A fresh folder for every run (a folder holding a finished run's checkpoint would be resumed).
WORKDIR = tempfile.mkdtemp(prefix='nvae_tour_', dir=WORKDIR or None)
print('jax', jax.__version__, 'on', jax.devices()[0].platform, '| work directory', WORKDIR)

# %% [markdown]
# ## A small NVAE from a config
#
# `nvae_jax.config.nvae.get_config()` holds the original implementation's defaults; the published
# setups (`configs/nvae_*.py`, 2 to 5 latent scales of up to 20 groups) specialise them. Here they
# are shrunk so that a CPU compiles and trains it in about a minute: 8 channels, one pre-/post-
# processing block of one cell, one latent scale of 3 groups with 4 latent channels each, no
# squeeze-excitation.

# %%
config = nvae_config.get_config()
config.model.update(
    num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1, num_preprocess_cells=1,
    num_postprocess_blocks=1, num_postprocess_cells=1, num_latent_scales=1,
    num_groups_per_scale=3, num_latent_per_group=4, num_cell_per_cond_enc=1,
    num_cell_per_cond_dec=1, use_se=False)
config.data.update(name='digits', train_split='train', eval_split='test', image_size=16,
                   channels=1, binarize='threshold', batch_size=16, eval_batch_size=64)
config.optim.update(name='adamax', lr=5e-3, min_lr=1e-4, warmup_steps=min(20, STEPS // 10),
                    weight_decay=3e-4)
config.train.update(num_steps=STEPS, log_every=max(2, STEPS // 20), eval_every=0,
                    num_eval_batches=0,  # the final evaluation covers all 297 test digits
                    checkpoint_every=STEPS, images_every=0, num_images=16)
config.sample.update(num=16, readjust_bn_steps=min(100, 4 * STEPS), readjust_bn_batch=16)

description = build.describe(config)  # shapes and parameter count via jax.eval_shape (no compile)
print(json.dumps({k: description[k] for k in ('num_params', 'image_shape', 'latents')}))

# %% [markdown]
# ## Training with the platform's loop
#
# `train_and_evaluate(config, workdir)` is what `nvae-jax --mode=train` runs: the jitted, donated
# update step, KL warm-up over the first 30 % of the steps, checkpoints, `metrics.jsonl` and a
# final evaluation over the test split. It returns the last metrics, the evaluation report and the
# final train state.

# %%
task = build_task(config)  # the ModelTask the loop trains (config -> model, loss, evaluation)
result = loop.train_and_evaluate(config, WORKDIR, task=task)
history = loop.read_metrics(WORKDIR, 'train')
report = result['eval']
print(f'test: {report["nats_per_image"]:.2f} nats/image (negative ELBO, {report["num_examples"]} '
      f'binarised digits)')
assert np.isfinite(report['nats_per_image'])

# %% [markdown]
# ## Samples at several temperatures, with batch-norm re-estimation
#
# Sampling at latent temperature t draws z_l ~ N(mu_p, (t sigma_p)^2). The decoder's batch norms
# were trained on posterior samples; before sampling, their statistics are re-estimated from
# train-mode passes on prior samples at that temperature
# (`nvae_jax.models.nvae.sampling.reestimate_bn`; a progress bar shows the passes). One compiled
# sampler serves every temperature.

# %%
variables = jax.device_get(state_lib.variables_of(result['state']))
TEMPERATURES = (0.6, 0.8, 1.0)
sample_fn = sampling.make_sample_fn(task, variables, 16)
samples = {}
for i, t in enumerate(TEMPERATURES):
  stats, info = sampling.reestimate_bn(task, variables, jax.random.key(10 + i), t,
                                       steps=config.sample.readjust_bn_steps,
                                       batch=config.sample.readjust_bn_batch)
  sampler = sampling.make_temperature_sampler(task, variables, 16, temperature=t,
                                             sample_fn=sample_fn)
  samples[t] = np.asarray(sampler(dict(variables, batch_stats=stats), jax.random.key(20 + i)))
  print(f't={t}: re-estimated {info["touched"]} of {info["total"]} batch norms '
        f'({info["skipped"]} passes skipped)')
  assert np.all(np.isfinite(samples[t]))

# %% [markdown]
# ## Reconstructions and the KL of each group
#
# `sampling.encode_decode` encodes each image to its posterior means (group by group, top first)
# and decodes them. The KL per group is the training objective's, averaged over the last logged
# interval, in decoder order (the top group first).

# %%
test_images = next(make_pipeline(config.data, 'test', train=False, seed=0))['image'][:16]
recon = np.asarray(sampling.encode_decode(task, variables, test_images))
kl_groups = [history[-1][f'kl_group_{d}'] for d in range(len(description['latents']))]
print('KL per group (nats):', np.round(kl_groups, 3))

# %%
fig = plt.figure(figsize=(15, 8.5))
grid = fig.add_gridspec(2, 3)
ax = fig.add_subplot(grid[0, 0])
steps = [r['step'] for r in history]
ax.plot(steps, [r['loss'] for r in history], label='training loss')
ax.plot(steps, [r['nelbo'] for r in history], label='negative ELBO')
ax.plot(steps, [r['recon'] for r in history], label='reconstruction -log p(x|z)')
ax.set_xlabel('step')
ax.set_ylabel('nats per image (training batches)')
ax.set_title(f'Training (test negative ELBO {report["nats_per_image"]:.1f} nats)')
ax.legend()

ax = fig.add_subplot(grid[0, 1])
ax.bar([f'group {d}' for d in range(len(kl_groups))], kl_groups, color='tab:purple')
ax.set_xlabel('latent group (decoder order: top first), 8x8x4 each')
ax.set_ylabel('KL(q || p) (nats per image)')
ax.set_title('KL per latent group')

ax = fig.add_subplot(grid[0, 2])
pairs = sample_lib.pair_rows(np.asarray(test_images), recon, 8)
ax.imshow(sample_lib.make_grid(pairs, 8)[..., 0], cmap='gray', vmin=0, vmax=255)
ax.set_title('Test digits (odd rows) and reconstructions')
ax.set_xticks([])
ax.set_yticks([])
ax.set_xlabel('posterior means, Bernoulli mean')

for i, t in enumerate(TEMPERATURES):
  ax = fig.add_subplot(grid[1, i])
  ax.imshow(sample_lib.make_grid(samples[t], 4)[..., 0], cmap='gray', vmin=0, vmax=255)
  ax.set_title(f'Samples at t = {t} (BN re-estimated)')
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel('Bernoulli mean of the decoder')
fig.suptitle(f'NVAE, {description["num_params"]:,} parameters, {STEPS} steps on 16x16 digits')
fig.tight_layout()
if FIGURE_DIR:
  os.makedirs(FIGURE_DIR, exist_ok=True)
  fig.savefig(os.path.join(FIGURE_DIR, 'nvae_tour.png'), dpi=100)
plt.show()
