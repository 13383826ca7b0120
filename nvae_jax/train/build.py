"""Building a run from a config: task, mesh, optimizer, abstract state, restore, describe.

Shared by the train loop and by the ``eval``/``sample``/``describe`` modes, so that every mode sees
the same validated config, the same shardings and the same checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from nvae_jax import collector, compile_cache, compile_options, compile_priority, errors
from nvae_jax.config import validation as config_validation
from nvae_jax.models import build_task
from nvae_jax.train import checkpoint as ckpt_lib
from nvae_jax.train import optim
from nvae_jax.train import state as state_lib
from nvae_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
  """What a config builds before any data is read or anything is compiled."""
  config: Any
  task: Any
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]


def build(config, task=None) -> Run:
  """Validates ``config`` (before any compilation), switches on the persistent compilation cache
  (``config.compile_cache``), sets low-memory compilation (``config.compile_low_memory``) and
  the compile worker's priority (``config.compile_worker_nice``) and builds the task, mesh and
  optimizer."""
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  compile_cache.enable(config.get('compile_cache', 'auto'))
  compile_options.set_cpu_low_memory(config.get('compile_low_memory', False))
  compile_priority.set_worker_nice(config.get('compile_worker_nice',
                                              compile_priority.DEFAULT_NICE))
  task = _build_task(config) if task is None else task
  mesh = step_lib.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  return Run(config=config, task=task, mesh=mesh, tx=tx, schedule=schedule)


def _build_task(config):
  """``build_task`` with the model family's own config checks reported as config errors."""
  try:
    return build_task(config)
  except errors.NvaeJaxError:
    raise
  except ValueError as e:  # 'model.<field>: expected ..., got ...' from the family's constructor
    raise errors.ConfigError(str(e)) from e


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def make_checkpointer(config, workdir: str) -> ckpt_lib.Checkpointer:
  t = config.train
  return ckpt_lib.Checkpointer(checkpoint_dir(workdir), keep=t.keep_checkpoints,
                               async_save=t.async_checkpoints, model=str(config.model.name))


def batch_spec(image_shape, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch ``{'image': [B, H, W, C] float32, 'mask': [B]}``."""
  return {'image': jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32),
          'mask': jax.ShapeDtypeStruct((batch_size,), jnp.float32)}


def spec_of(batch) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract twin of a (placed) batch: each array's shape and dtype."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)


def check_image_shape(task, config, image_shape) -> None:
  """Raises :class:`~nvae_jax.errors.ConfigError` if the model cannot take ``image_shape``
  (the task's ``image_size_multiple``: its height and width must be multiples of ``m``)."""
  m, why = task.image_size_multiple()
  h, w = int(image_shape[0]), int(image_shape[1])
  if h % m or w % m:
    pad = int(config.data.get('pad', 0) or 0)
    padded = f' including data.pad={pad} on each side' if pad else ''
    raise errors.ConfigError(
        f'data.image_size: expected the image height and width{padded} to be multiples of {m} '
        f'= {why}; found images of {h}x{w} (data.image_size={config.data.image_size})')


def abstract_state(run: Run, spec) -> tuple[Any, Any]:
  """``(abstract train state with shardings, shardings)`` for batches like ``spec`` (no compile).

  Checks first that the model can take the images (:func:`check_image_shape`).
  """
  check_image_shape(run.task, run.config, spec['image'].shape[1:])
  init = functools.partial(state_lib.init_train_state, run.task, run.tx, run.config.seed)
  with collector.paused():
    shapes = jax.eval_shape(init, spec)
  shardings = step_lib.state_shardings(shapes, run.mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def init_state(run: Run, global_batch) -> tuple[Any, Any]:
  """``(train state on the mesh, its shardings)`` for a fresh run on batches like
  ``global_batch``.

  Tasks with an ``init_host`` (NVAE) draw their variables in numpy, compiling nothing but the
  optimizer's (tiny) initial state, and trace the model's init once (the shardings come from
  the drawn state's shapes); others run their ``init`` under ``jax.jit``, with the shardings of
  :func:`abstract_state`.  Checks first that the model can take the images.
  """
  spec = spec_of(global_batch)
  if not hasattr(run.task, 'init_host'):
    _, shardings = abstract_state(run, spec)
    init = functools.partial(state_lib.init_train_state, run.task, run.tx, run.config.seed)
    return jax.jit(init, in_shardings=(step_lib.batch_sharding(run.mesh),),
                   out_shardings=shardings)(global_batch), shardings
  check_image_shape(run.task, run.config, spec['image'].shape[1:])
  with collector.paused():  # it traces the model's init (nvae_jax.collector)
    state = state_lib.init_train_state_host(run.task, run.tx, run.config.seed, spec)
  shardings = step_lib.state_shardings(state, run.mesh)
  return jax.device_put(state, shardings), shardings


def variables_sharding(shardings):
  return state_lib.variables_of(shardings)


def restore_latest(run: Run, workdir: str, image_shape, batch_size: int):
  """``(state, data_state, step, shardings)`` from the newest readable checkpoint in ``workdir``.

  Damaged newer checkpoints are skipped with a warning (and kept); older layouts are migrated.
  """
  abstract, shardings = abstract_state(run, batch_spec(image_shape, batch_size))
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise ckpt_lib.NoCheckpointError(f'--workdir={workdir}: no checkpoint in '
                                     f'{checkpoint_dir(workdir)}; train first (--mode=train)')
  ckpt = make_checkpointer(run.config, workdir)
  try:
    if ckpt.latest_step() is None:
      raise ckpt_lib.NoCheckpointError(f'--workdir={workdir}: no checkpoint in '
                                       f'{checkpoint_dir(workdir)}; train first (--mode=train)')
    step, state, data_state, _ = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  return state, data_state, step, shardings


def describe(config, task=None) -> dict[str, Any]:
  """Shapes and parameter count of the model of ``config``, via ``jax.eval_shape`` (no compile)."""
  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  config_validation.validate(config)
  task = _build_task(config) if task is None else task
  shape = image_shape(config.data)
  check_image_shape(task, config, shape)
  spec = batch_spec(shape, 1)
  variables = jax.eval_shape(task.init, state_lib.stream_key(config.seed, state_lib.INIT_STREAM),
                             spec)
  params = variables['params']
  info = dict(task.describe(tuple(shape)))
  out = dict(model=config.model.name, num_params=state_lib.num_params(params),
             param_bytes=int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                                 for x in jax.tree.leaves(params))),
             collections={k: state_lib.num_params(v) for k, v in variables.items()
                          if k != 'params'},
             image_shape=list(shape), num_dims=int(task.num_dims(tuple(shape))))
  for key in ('inputs', 'latents', 'outputs', 'likelihood'):
    out[key] = _jsonable(info.get(key))
  for key, value in info.items():
    out.setdefault(key, _jsonable(value))
  return out


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (jax.ShapeDtypeStruct, np.ndarray, jax.Array)):
    return list(x.shape)
  return x
