"""Likelihood evaluation over a split: the one place that turns nats into reported numbers.

A task's ``evaluate`` returns per-example negative log-likelihoods ``nll_i`` in nats (of the
discrete data, or of a density when ``describe(shape)['likelihood']['continuous']``).  Over a
split with padding mask ``m_i`` in {0, 1} (the eval pipeline pads its last batch with
``m_i = 0``)::

  nats_per_image = sum_i m_i * nll_i / sum_i m_i
  bits_per_dim   = nats_per_image / (ln 2 * D)

where D = ``task.num_dims(image_shape)`` is the number of dimensions the likelihood covers
(H W C, or e.g. 28 * 28 = 784 for NVAE on 2-pixel-padded MNIST, whose likelihood skips the
padding).  Every other per-example [B] output of ``evaluate`` (e.g. ``nelbo``) is averaged the
same way and reported as ``<name>_per_image``.  Sums are taken per batch in float32 on the devices and
accumulated over batches in float64 on the host.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax import progress as progress_lib
from nvae_jax.distributions import units
from nvae_jax.train import step as step_lib


def likelihood_info(task, image_shape) -> dict[str, Any]:
  """``{'continuous': bool, 'num_dims': D}`` of ``task``'s likelihood for inputs of
  ``image_shape`` (what the reports need next to the numbers)."""
  if len(tuple(image_shape)) != 3:
    raise ValueError(f'image_shape: expected (H, W, C), found {tuple(image_shape)}')
  info = task.describe(tuple(image_shape)).get('likelihood', {})
  return dict(continuous=bool(info.get('continuous', False)),
              num_dims=int(task.num_dims(tuple(image_shape))))


def make_eval_step(task, mesh, variables_sharding) -> Callable:
  """Returns jitted ``(variables, batch, rng) -> ({name: masked sum}, mask sum)``.

  ``batch`` (placed with ``put_batch``) must hold ``'mask'``; padded examples are replaced by 0
  before summing so that a NaN on padding cannot leak into the totals.
  """

  def eval_sums(variables, batch, rng):
    out = task.evaluate(variables, batch, rng)
    if 'nll' not in out:
      raise ValueError(f'task.evaluate: expected a "nll" entry, found {sorted(out)}')
    mask = batch['mask'].astype(jnp.float32)
    sums = {}
    for name, v in out.items():
      v = jnp.asarray(v, jnp.float32)
      if v.shape != mask.shape:
        if name == 'nll':
          raise ValueError(f'task.evaluate: "nll" must be per example with shape {mask.shape}, '
                           f'found {v.shape}')
        continue
      sums[name] = jnp.sum(jnp.where(mask > 0, v, 0.0) * mask)
    return sums, jnp.sum(mask)

  repl = step_lib.replicated(mesh)
  return step_lib.jit_on_mesh(
      eval_sums, mesh, in_shardings=(variables_sharding, step_lib.batch_sharding(mesh), repl),
      out_shardings=(repl, repl))


def evaluate_split(eval_step: Callable, variables, batches: Iterator[dict[str, np.ndarray]],
                   mesh, rng: jax.Array, *, num_dims: int, continuous: bool,
                   num_batches: int | None = None, split: str = '',
                   progress: str | None = None) -> dict[str, Any]:
  """Runs ``eval_step`` over ``batches`` (at most ``num_batches``) and returns the report.

  ``num_dims``: the dimensions the likelihood covers (``task.num_dims(image_shape)``).
  Keys: ``split``, ``num_examples``, ``nats_per_image``, ``bits_per_dim``, ``num_dims``,
  ``continuous``, plus ``<name>_per_image`` for every other per-example output of the task.
  Shows progress (batches/s, ETA, running nats/image; ``progress`` is a :mod:`nvae_jax.progress`
  mode, None = ``NVAE_JAX_PROGRESS`` or auto) over ``len(batches)`` or
  ``batches.batches_per_epoch``.
  """
  totals: dict[str, float] = {}
  count = 0.0
  total = getattr(batches, 'batches_per_epoch', None)
  if total is None and hasattr(batches, '__len__'):
    total = len(batches)
  if num_batches is not None:
    total = num_batches if total is None else min(total, num_batches)
  with progress_lib.Progress(total, f'eval {split}'.rstrip(), 'batch', mode=progress) as bar:
    for i, batch in enumerate(batches):
      if num_batches is not None and i >= num_batches:
        break
      if 'mask' not in batch:
        batch = dict(batch, mask=np.ones(batch['image'].shape[0], np.float32))
      sums, n = step_lib.to_host(eval_step(variables, step_lib.put_batch(batch, mesh),
                                           jax.random.fold_in(rng, i)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      count += float(n)
      bar.update(1, nats_per_image=totals['nll'] / max(count, 1.0))
  if count == 0:
    raise ValueError(f'evaluate: split {split!r} gave no examples (every mask was 0 or the '
                     'pipeline was empty)')
  nats = totals.pop('nll') / count
  report = dict(split=split, num_examples=int(round(count)), nats_per_image=nats,
                bits_per_dim=float(units.bits_per_dim(nats, int(num_dims))),
                num_dims=int(num_dims), continuous=bool(continuous))
  for k, v in sorted(totals.items()):
    report[f'{k}_per_image'] = v / count
  return report


def evaluate_checkpoint(config, workdir: str, *, task=None, pipeline_fn=None) -> dict[str, Any]:
  """``--mode=eval``: the latest checkpoint of ``workdir`` over the whole ``config.eval.split``.

  Returns ``{'split', 'nats_per_image', 'bits_per_dim', 'num_examples', 'step', 'continuous',
  'num_bits', 'num_dims', ...}`` (see :func:`evaluate_split`).
  """
  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import build
  from nvae_jax.train import state as state_lib
  if pipeline_fn is None:
    from nvae_jax.data import make_pipeline as pipeline_fn
  run = build.build(config, task)
  pipe = pipeline_fn(config.data, config.eval.split, train=False, seed=config.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
  state, _, step, shardings = build.restore_latest(run, workdir, pipe.image_shape,
                                                   config.data.batch_size)
  eval_step = make_eval_step(run.task, run.mesh, build.variables_sharding(shardings))
  report = evaluate_split(eval_step, state_lib.variables_of(state), pipe, run.mesh,
                          state_lib.stream_key(config.seed, state_lib.EVAL_STREAM),
                          split=config.eval.split, **likelihood_info(run.task, pipe.image_shape))
  out = {k: report[k] for k in ('split', 'nats_per_image', 'bits_per_dim', 'num_examples')}
  out.update(step=int(step), continuous=report['continuous'], num_bits=int(config.data.num_bits))
  out.update({k: v for k, v in report.items() if k not in out})
  return out
