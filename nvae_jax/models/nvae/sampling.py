r"""NVAE sampling with temperatures, batch-norm re-estimation (cached), reconstruction, encoding.

Temperatures. A sample is drawn in two stages, each with its own temperature:

* latent temperature t: z_0 ~ N(0, (1.01 t)^2) and z_d ~ N(mu_p, (sigma_p t)^2) for d > 0,
  where sigma_p includes the +0.01 floor (``NVAE.sample_logits``);
* output temperature t_x: the output distribution's ``sample(net_out, rng, t_x)``; for the
  discretized logistic mixture the logistic noise is *multiplied* by t_x
  (x = mu + t_x s u, u ~ Logistic(0, 1)) and the mixture index is argmax(pi + t_x g), g ~ Gumbel;
  the original divides the noise scale by t (a known bug, PR #54), which this does not copy.
  ``output='mean'`` returns the distribution's mean instead (the original's choice for
  Bernoulli MNIST, and for FID); ``'auto'`` is the mean for Bernoulli and a draw otherwise.

Batch-norm re-estimation (the original's ``--readjust_bn``). Decoder batch norms see different
statistics under the prior at temperature t than under the posterior during training, so before
sampling their running statistics are re-estimated from ``steps`` train-mode passes of the
decoder on prior samples of ``batch`` images at the *latent* temperature t. Each pass gives the
batch mean m_k and the unbiased batch variance v_k of every decoder BN (read off the BN update:
a pass from zero statistics returns mu * m_k, mu the BN's own momentum, which is measured rather
than assumed), and the estimate is

  s <- (1 - momentum) s + momentum b_k,  starting from the training statistics  (default 0.05,
  the original's 500 passes at BN momentum 0.05: the training statistics weigh 0.95^500 ~ 1e-11)
  s = mean_k b_k                                                               (momentum=None)

Only the BNs the prior path touches change (decoder tower and post-process; the encoder's keep
their training statistics). Everything runs in float32 whatever ``precision.compute_dtype`` is,
and a pass whose statistics are not finite is dropped and counted; if none is finite the
re-estimation fails with an error naming the layers, so NaN statistics never reach sampling
(the original's re-adjustment under fp16 autocast gives NaN samples, issue #36).

Cache. ``cached_bn_stats`` stores the result as ``<cache_dir>/bn_t<t>.npz`` (e.g.
``bn_t0.7.npz``) with the settings and a fingerprint of the parameters, and reuses it when both
match (the idea of the original's PR #18).

Encoding (issue #15: use posterior means). ``encode`` runs the model in eval mode with zero
reparameterisation noise, so each group's latent is its posterior mean given the means of the
groups above it (after the flows, which are deterministic): z_d = mu_q,d(x, z_<d).
``encode_decode`` decodes those latents (or posterior samples, given an rng) and returns the
output distribution's mean.  (``NVAETask.reconstruct``, the platform's reconstruction grid,
decodes one posterior sample.)

From the command line, sampling is ``nvae-jax --mode=sample`` with the ``config.sample.*``
options: ``temperature`` (latent), ``output_temperature``, ``output_mode`` (``OUTPUT_MODES``),
``readjust_bn_steps``/``readjust_bn_batch``/``readjust_bn_momentum`` (0 steps: no
re-estimation; momentum 0: a plain average); the platform calls ``NVAETask.prepare_sampling``
(the re-estimation, cached as ``<workdir>/bn_stats/step<N>/bn_t<t>.npz``) and then
``NVAETask.sample``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nvae_jax import progress as progress_lib
from nvae_jax.config.schema import SAMPLE_OUTPUT_MODES as OUTPUT_MODES
from nvae_jax.models.nvae.network import NVAE


# ---------------------------------------------------------------------------------------------
# The model pieces.

def image_shape_from_variables(task, variables) -> tuple[int, int, int]:
  """(H, W, C) of the model's inputs, read from the variables (``prior_ftr0`` and the stem)."""
  p = variables['params']
  h, w, _ = p['prior_ftr0'].shape
  c = p['stem']['kernel'].shape[2]
  hp = task.hparams
  f = 2 ** (hp['num_preprocess_blocks'] + hp['num_latent_scales'] - 1)
  return (int(h * f), int(w * f), int(c))


def float32_model(task, variables):
  """The task's flax module for these variables, computing in float32."""
  model = task.model(image_shape_from_variables(task, variables))
  return model.clone(dtype=jnp.float32) if model.dtype != jnp.float32 else model


def use_output_mean(task, output: str) -> bool:
  """Whether output mode ``output`` shows the output distribution's mean (``mean``, or ``auto``
  with a Bernoulli decoder) rather than a draw (``sample``, or ``auto`` otherwise)."""
  if output not in OUTPUT_MODES:
    raise ValueError(f'sample.output_mode: expected one of {OUTPUT_MODES}, got {output!r}')
  return output == 'mean' or (output == 'auto' and task.likelihood_name == 'bernoulli')


def _check_temperature(name: str, t: float) -> float:
  t = float(t)
  if not (np.isfinite(t) and t >= 0):
    raise ValueError(f'{name}: expected a finite temperature >= 0, got {t}')
  return t


# ---------------------------------------------------------------------------------------------
# Batch-norm re-estimation.

@functools.lru_cache(maxsize=16)
def _bn_pass_fn(model, batch: int) -> Callable:
  """Jitted ``(params, batch_stats, rng, t) -> batch_stats`` (cached per float32 model, batch)."""

  def one_pass(params, stats, rng, t):
    _, upd = model.apply({'params': params, 'batch_stats': stats}, int(batch),
                         jnp.asarray(t, jnp.float32), True, rngs={'sample': rng},
                         method=NVAE.sample_logits, mutable=['batch_stats'])
    return upd['batch_stats']

  return jax.jit(one_pass)


def make_bn_pass(task, variables, batch: int, temperature: float) -> Callable:
  """``(params, batch_stats, rng) -> batch_stats`` after one train-mode prior pass (float32)."""
  t = _check_temperature('temperature', temperature)
  if batch < 2:
    raise ValueError(f'batch: train-mode batch norm needs at least 2 images, got {batch}')
  fn = _bn_pass_fn(float32_model(task, variables), int(batch))
  return lambda params, stats, rng: fn(params, stats, rng, t)


def _flat(tree) -> dict[tuple, np.ndarray]:
  return {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def reestimate_bn(task, variables, rng: jax.Array, temperature: float, *, steps: int = 500,
                  batch: int = 16, momentum: Optional[float] = 0.05,
                  progress: Optional[str] = None) -> tuple[dict, dict[str, Any]]:
  """Batch-norm statistics for sampling at latent temperature ``temperature`` (module docstring).

  Shows the passes' progress (``progress``: a :mod:`nvae_jax.progress` mode, None =
  ``NVAE_JAX_PROGRESS`` or auto).

  Returns ``(batch_stats, info)``: the full ``batch_stats`` tree (untouched layers unchanged) and
  ``info`` with ``touched`` (layer count), ``bn_momentum`` (measured), ``skipped`` (non-finite
  passes dropped) and the settings.
  """
  if steps < 1:
    raise ValueError(f'steps: expected at least one re-estimation pass, got {steps}')
  if momentum is not None and not 0 < momentum <= 1:
    raise ValueError(f'momentum: expected a value in (0, 1] or None, got {momentum}')
  if 'batch_stats' not in variables or not variables['batch_stats']:
    raise ValueError('variables: expected a "batch_stats" collection to re-estimate')
  one_pass = make_bn_pass(task, variables, batch, temperature)
  params = variables['params']
  train_stats = _flat(variables['batch_stats'])
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  ones = jax.tree.map(jnp.ones_like, variables['batch_stats'])

  # Probe: from zero statistics a BN with momentum mu returns mu * b; from ones, (1 - mu) + mu * b.
  # Leaves that come back unchanged from both were not on the prior path.
  k0 = jax.random.fold_in(rng, 0)
  r0 = _flat(one_pass(params, zeros, k0))
  r1 = _flat(one_pass(params, ones, k0))
  touched, bn_mu, conditioning = [], {}, {}
  for key in train_stats:
    if np.any(r0[key] != 0) or np.any(r1[key] != 1):
      touched.append(key)
      bn_mu[key] = float(np.mean(1.0 - (r1[key].astype(np.float64) - r0[key])))
      conditioning[key] = float(np.max(np.abs(r1[key])))
  if not touched:
    raise ValueError('re-estimation: no batch norm is on the prior path of this model')
  # 1 - (r1 - r0) loses precision where r1 is large (float32 rounding of (1 - mu) + mu b), so mu
  # is read off the well-conditioned layers; every BN of NVAE has the same momentum.
  good = [k for k in touched if conditioning[k] < 10.0] or touched
  mus = np.array([bn_mu[k] for k in good])
  mu = float(np.median(mus))
  if not (mu > 0 and np.max(np.abs(mus - mu)) < 1e-4):
    raise ValueError(f're-estimation: batch norms do not update as running = (1 - mu) running + '
                     f'mu batch (measured mu from {mus.min()} to {mus.max()})')

  est = {k: train_stats[k].astype(np.float64) for k in touched}
  used = skipped = 0
  with progress_lib.Progress(steps, f'bn re-estimation t={float(temperature):g}', 'pass',
                             mode=progress) as bar:
    for i in range(steps):
      r = r0 if i == 0 else _flat(one_pass(params, zeros, jax.random.fold_in(rng, i)))
      b = {k: r[k].astype(np.float64) / mu for k in touched}
      finite = all(np.all(np.isfinite(v)) for v in b.values())
      if finite:
        used += 1
        w = (1.0 / used) if momentum is None else momentum
        for k in touched:
          est[k] = (1.0 - w) * est[k] + w * b[k]
      else:
        skipped += 1
      bar.update(1, skipped=skipped)
  if used == 0:
    names = sorted('/'.join(k) for k in touched
                   if not np.all(np.isfinite(r0[k])))
    raise FloatingPointError(f're-estimation: every pass gave non-finite statistics (at t='
                             f'{temperature}); first layers: {names[:5]}')
  out = dict(train_stats)
  out.update({k: v.astype(np.float32) for k, v in est.items()})
  info = dict(touched=len(touched), total=len(train_stats), bn_momentum=mu,
              skipped=skipped, steps=steps, batch=batch, momentum=momentum,
              temperature=float(temperature))
  return traverse_util.unflatten_dict(out), info


def params_fingerprint(params) -> str:
  """A short hash of the parameters (path, shape, float64 sum and sum of squares per leaf)."""
  h = hashlib.sha1()
  for path, leaf in sorted(traverse_util.flatten_dict(dict(params)).items()):
    x = np.asarray(leaf, np.float64)
    stats = np.array([x.sum(), np.square(x).sum()], np.float64)
    h.update('/'.join(path).encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(np.round(stats, 6).tobytes())
  return h.hexdigest()[:16]


def cache_path(cache_dir: str, temperature: float) -> str:
  """``<cache_dir>/bn_t<t>.npz``, with t printed as ``%g`` (``bn_t0.7.npz``)."""
  return os.path.join(cache_dir, f'bn_t{float(temperature):g}.npz')


def save_bn_stats(path: str, batch_stats, meta: Mapping[str, Any]) -> str:
  flat = {'/'.join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(dict(batch_stats)).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, __meta__=np.array(json.dumps(dict(meta), sort_keys=True)), **flat)
  os.replace(tmp, path)
  return path


def load_bn_stats(path: str) -> tuple[dict, dict[str, Any]]:
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(str(f['__meta__']))
    flat = {tuple(k.split('/')): f[k] for k in f.files if k != '__meta__'}
  return traverse_util.unflatten_dict(flat), meta


def cached_bn_stats(task, variables, rng: jax.Array, temperature: float, cache_dir: str, *,
                    steps: int = 500, batch: int = 16, momentum: Optional[float] = 0.05,
                    progress: Optional[str] = None) -> tuple[dict, dict[str, Any]]:
  """``reestimate_bn`` through the ``bn_t<t>.npz`` cache in ``cache_dir`` (module docstring).

  The cache is reused when its temperature, settings and parameter fingerprint match and its
  tree fits ``variables['batch_stats']``; otherwise it is recomputed and overwritten.
  ``info['cached']`` says which happened.
  """
  path = cache_path(cache_dir, temperature)
  meta = dict(temperature=float(temperature), steps=int(steps), batch=int(batch),
              momentum=momentum, params=params_fingerprint(variables['params']))
  if os.path.exists(path):
    stats, stored = load_bn_stats(path)
    same_tree = (jax.tree.structure(stats) == jax.tree.structure(dict(variables['batch_stats']))
                 and all(np.shape(a) == np.shape(b) for a, b in zip(
                     jax.tree.leaves(stats), jax.tree.leaves(variables['batch_stats']))))
    if same_tree and all(stored.get(k) == v for k, v in meta.items()):
      return stats, dict(stored, cached=True, path=path)
  stats, info = reestimate_bn(task, variables, rng, temperature, steps=steps, batch=batch,
                              momentum=momentum, progress=progress)
  save_bn_stats(path, stats, dict(meta, **{k: info[k] for k in ('touched', 'skipped',
                                                                'bn_momentum')}))
  return stats, dict(info, cached=False, path=path)


# ---------------------------------------------------------------------------------------------
# Sampling, reconstruction, encoding.

def make_sample_fn(task, variables, num: int) -> Callable:
  """Jitted ``(variables, rng, t, t_x) -> (mean, draw)``, each [num, H, W, C] in [0, 1].

  Eval-mode BN; ``t`` (latent) and ``t_x`` (output) are traced scalars, so one compilation
  serves every temperature, and both the output mean and a draw come out of the same decoder
  pass.
  """
  model = float32_model(task, variables)

  def sample(v, rng, t, tx):
    v = {k: v[k] for k in ('params', 'batch_stats') if k in v}
    k_z, k_x = jax.random.split(rng)
    t = jnp.asarray(t, jnp.float32)
    net_out = model.apply(v, int(num), t, False, rngs={'sample': k_z}, method=NVAE.sample_logits)
    mean = model.apply(v, net_out, method=NVAE.output_mean)
    draw = model.apply(v, net_out, k_x, jnp.asarray(tx, jnp.float32),
                       method=NVAE.output_sample)
    return jnp.clip(mean, 0.0, 1.0), jnp.clip(draw, 0.0, 1.0)

  return jax.jit(sample)


def make_temperature_sampler(task, variables, num: int, *, temperature: float = 1.0,
                             output_temperature: float = 1.0, output: str = 'auto',
                             sample_fn: Optional[Callable] = None) -> Callable:
  """``(variables, rng) -> [num, H, W, C]`` images in [0, 1] (eval-mode BN, float32) at latent
  temperature ``temperature`` and output temperature ``output_temperature``.

  Pass variables whose ``batch_stats`` were re-estimated at ``temperature`` for the original's
  ``--readjust_bn`` behaviour. ``sample_fn`` (from :func:`make_sample_fn`) shares one
  compilation between samplers of different temperatures.
  """
  use_mean = use_output_mean(task, output)
  t = _check_temperature('temperature', temperature)
  tx = _check_temperature('output_temperature', output_temperature)
  fn = sample_fn or make_sample_fn(task, variables, num)

  def sampler(v, rng):
    mean, draw = fn(v, rng, t, tx)
    return mean if use_mean else draw

  return sampler


def make_encoder(task, variables, batch: int) -> Callable:
  """Jitted ``(variables, x, eps) -> (latents, reconstruction mean)``, eval-mode BN.

  ``eps`` is the reparameterisation noise per group (decoder order); zeros give the posterior
  means along the mean path.
  """
  model = task.model(image_shape_from_variables(task, variables))
  del batch

  def run(v, x, eps):
    v = {k: v[k] for k in ('params', 'batch_stats') if k in v}
    out = model.apply(v, x, False, eps)
    return list(out['z']), model.apply(v, out['net_out'], method=NVAE.output_mean)

  return jax.jit(run)


def latent_noise(task, variables, batch: int, rng: Optional[jax.Array]) -> list[jax.Array]:
  """Standard-normal noise per group (zeros without ``rng``), shapes of the latent groups."""
  arch = task.arch(image_shape_from_variables(task, variables))
  shapes = [(batch,) + s for s in arch.latent_shapes()]
  if rng is None:
    return [jnp.zeros(s, jnp.float32) for s in shapes]
  return [jax.random.normal(k, s, jnp.float32)
          for k, s in zip(jax.random.split(rng, len(shapes)), shapes)]


def encode(task, variables, images: jax.Array, rng: Optional[jax.Array] = None,
           encoder: Optional[Callable] = None) -> list[jax.Array]:
  """Per-group latents [B, h_d, w_d, L] in decoder order (top first), eval-mode BN.

  Without ``rng``: posterior means along the mean path (zero noise in every group); with
  ``rng``: one posterior sample. ``encoder`` (from :func:`make_encoder`) reuses a compilation.
  """
  x = jnp.asarray(images, jnp.float32)
  fn = encoder or make_encoder(task, variables, x.shape[0])
  return fn(variables, x, latent_noise(task, variables, x.shape[0], rng))[0]


def encode_decode(task, variables, images: jax.Array, rng: Optional[jax.Array] = None,
                  encoder: Optional[Callable] = None) -> jax.Array:
  """The output distribution's mean given the latents of :func:`encode`, [B, H, W, C] in [0,1]."""
  x = jnp.asarray(images, jnp.float32)
  fn = encoder or make_encoder(task, variables, x.shape[0])
  return fn(variables, x, latent_noise(task, variables, x.shape[0], rng))[1]
