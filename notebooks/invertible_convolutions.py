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
# # Invertible convolutions: exact log-determinants and fast inverses
#
# The mixing layers of `nvae_jax.flows` (Hoogeboom, van den Berg & Welling 2019) all follow one
# contract, `y, logdet = layer(x, reverse=False)`. This notebook
#
# 1. builds ActNorm, the 1x1 convolution (plain, PLU, QR), the emerging convolution and the
#    periodic convolution;
# 2. checks each log-determinant against `slogdet` of the dense Jacobian `jax.jacfwd`, in float64;
# 3. inverts each layer and measures the round-trip error;
# 4. times the forward pass and the two inverses of the emerging convolution (the wavefront scan,
#    H + W - 1 sequential steps, against the naive per-pixel scan, H W steps) as the image grows.
#
# Nothing is downloaded. `NVAE_JAX_NOTEBOOK_STEPS` (read below) shrinks the timing sweep for
# quick runs such as the test suite.

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

STEPS = int(os.environ.get('NVAE_JAX_NOTEBOOK_STEPS', '400'))  # < 100: a quick run
QUICK = STEPS < 100
FIGURE_DIR = os.environ.get('NVAE_JAX_NOTEBOOK_FIGURES', '')  # save the figure there if set

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from nvae_jax.flows import ActNorm, Conv1x1, EmergingConv, PeriodicConv

print('jax', jax.__version__, 'on', jax.devices()[0].platform)

# %% [markdown]
# ## Log-determinants against the dense Jacobian (float64)
#
# For a layer f on one image x of shape (H, W, C), the Jacobian of the flattened map is an
# (HWC) x (HWC) matrix; `slogdet` of it is the exact log |det J| the layer must return. The
# parameters are perturbed away from their initial values (identity-like at init) so that every
# term of each formula is exercised, and the image is 5 x 4 (odd and even sides).

# %%
SHAPE = (1, 5, 4, 3)
LAYERS = {
    'ActNorm': ActNorm(),
    'Conv1x1 plain': Conv1x1('plain'),
    'Conv1x1 PLU': Conv1x1('plu'),
    'Conv1x1 QR': Conv1x1('qr'),
    'Emerging 3x3': EmergingConv(kernel_size=3),
    'Emerging 5x5, dilation 2': EmergingConv(kernel_size=5, dilation=2, conv1x1_variant='qr'),
    'Periodic 3x3': PeriodicConv(kernel_size=3),
}


def perturbed(variables, key, scale=0.3):
  """Every parameter moved by N(0, scale^2): no layer stays at its (near-identity) init."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


rows = []
with jax.enable_x64(True):
  x = jax.random.normal(jax.random.key(0), SHAPE, jnp.float64)
  for i, (name, layer) in enumerate(LAYERS.items()):
    variables = perturbed(layer.init(jax.random.key(i), x), jax.random.key(100 + i))
    forward = jax.jit(lambda v, a, layer=layer: layer.apply(v, a))
    inverse = jax.jit(lambda v, a, layer=layer: layer.apply(v, a, reverse=True))
    flat = jax.jit(lambda v, a, layer=layer: layer.apply(v, a.reshape(SHAPE))[0].reshape(-1))
    jacobian = jax.jacfwd(flat, argnums=1)(variables, x.reshape(-1))
    _, dense_logdet = jnp.linalg.slogdet(jacobian)
    y, logdet = forward(variables, x)
    x_back, inverse_logdet = inverse(variables, y)
    rows.append(dict(layer=name, logdet=float(logdet[0]), dense=float(dense_logdet),
                     error=abs(float(logdet[0]) - float(dense_logdet)),
                     inverse_plus_forward=abs(float(inverse_logdet[0] + logdet[0])),
                     roundtrip=float(jnp.max(jnp.abs(x_back - x)))))

print(f'{"layer":26s} {"log-det":>12s} {"dense slogdet":>14s} {"|error|":>9s} '
      f'{"|ld_inv+ld|":>11s} {"round trip":>10s}')
for r in rows:
  print(f'{r["layer"]:26s} {r["logdet"]:12.6f} {r["dense"]:14.6f} {r["error"]:9.1e} '
        f'{r["inverse_plus_forward"]:11.1e} {r["roundtrip"]:10.1e}')
assert all(r['error'] <= 1e-9 * max(1.0, abs(r['dense'])) for r in rows)
assert all(r['roundtrip'] <= 1e-10 for r in rows)

# %% [markdown]
# Every log-det matches the dense Jacobian to float64 round-off, and every inverse returns the
# input. Only the periodic convolution needs a determinant at run time (H (W/2 + 1) complex C x C
# ones); the others are sums of log-diagonals, O(C).
#
# ## Inverting the emerging convolution: wavefront against per-pixel
#
# The masked autoregressive convolutions inside the emerging convolution are inverted by a
# sequential solve. Pixels on the same anti-diagonal (i + j = t) never depend on each other, so the
# wavefront inverse solves a whole anti-diagonal per step: H + W - 1 steps instead of the naive
# scan's H W. Times are the best of repeated jitted calls after compilation (the least disturbed
# by other work on the machine), float32, batch 4, 8 channels.

# %%
SIZES = [4, 8, 16] if QUICK else [8, 16, 32, 48, 64]
RUNS = 3 if QUICK else 20


def best_ms(fn, *args):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(RUNS):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return min(times)


timings = {'forward': [], 'wavefront inverse': [], 'naive per-pixel inverse': []}
layer = EmergingConv(kernel_size=3)
naive = layer.clone(inverse_algorithm='naive')
for size in SIZES:
  xs = jax.random.normal(jax.random.key(size), (4, size, size, 8), jnp.float32)
  v = layer.init(jax.random.key(0), xs)
  ys, _ = layer.apply(v, xs)
  timings['forward'].append(best_ms(jax.jit(lambda v, a: layer.apply(v, a)), v, xs))
  timings['wavefront inverse'].append(
      best_ms(jax.jit(lambda v, a: layer.apply(v, a, reverse=True)), v, ys))
  timings['naive per-pixel inverse'].append(
      best_ms(jax.jit(lambda v, a: naive.apply(v, a, reverse=True)), v, ys))
  back, _ = jax.jit(lambda v, a: layer.apply(v, a, reverse=True))(v, ys)
  print(f'{size:3d}x{size:<3d} ' + '  '.join(f'{k} {t[-1]:8.2f} ms' for k, t in timings.items())
        + f'  round trip {float(jnp.max(jnp.abs(back - xs))):.1e}')

# %%
fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
names = [r['layer'] for r in rows]
errors = [max(r['error'], 1e-17) for r in rows]  # exact zeros drawn at the axis floor
ax_err.barh(names, errors, color='tab:blue')
ax_err.set_xscale('log')
ax_err.invert_yaxis()
ax_err.set_xlabel('|log-det - slogdet(dense Jacobian)| (float64, 5x4x3 image)')
ax_err.set_title('Exact log-determinants')
for size_key, style in zip(timings, ('o-', 's-', '^-')):
  ax_time.plot(SIZES, timings[size_key], style, label=size_key)
ax_time.set_xscale('log', base=2)
ax_time.set_xticks(SIZES, [str(s) for s in SIZES])
ax_time.set_yscale('log')
ax_time.set_xlabel('image side H = W (batch 4, 8 channels, 3x3 kernel)')
ax_time.set_ylabel(f'time per call, best of {RUNS} (ms)')
ax_time.set_title(f'Emerging convolution on {jax.devices()[0].platform.upper()}')
ax_time.legend()
fig.tight_layout()
if FIGURE_DIR:
  os.makedirs(FIGURE_DIR, exist_ok=True)
  fig.savefig(os.path.join(FIGURE_DIR, 'invertible_convolutions.png'), dpi=100)
plt.show()
