"""The mesh, the shardings and the jitted, donated update step (one XLA program, or two on CPU).

Parallelism is expressed with ``jax.jit`` and ``NamedSharding`` over a 2-axis mesh
``('data', 'fsdp')``:

* the batch is split over *all* devices (``P(('data', 'fsdp'))``), so each device sees
  ``global_batch / num_devices`` examples; gradients and batch-norm statistics are reductions over
  the global batch, which XLA turns into all-reduces (synchronised batch norm for free);
* with ``mesh.fsdp == 1`` the whole train state is replicated (plain data parallelism);
* with ``mesh.fsdp = k > 1`` each state array of at least ``FSDP_MIN_SIZE`` entries is split
  ``k`` ways along its largest dimension divisible by ``k`` (parameters, Adam moments alike), and
  XLA inserts the all-gathers and reduce-scatters (ZeRO-3 style sharding of parameters and
  optimizer state).

The code is the same on 1 device, N devices and N processes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nvae_jax import collector, compile_options, compile_priority
from nvae_jax.config import schema
from nvae_jax.train import optim
from nvae_jax.train.state import TrainState

DATA_AXES = ('data', 'fsdp')
FSDP_MIN_SIZE = 2**12


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh from ``config.mesh`` (``data=-1``: all devices / fsdp)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = int(mesh_config.fsdp)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'mesh.fsdp: expected a positive divisor of the device count {n}, got {fsdp}')
  data = int(mesh_config.data)
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh.data: expected data * fsdp == number of devices ({n}) or data=-1, '
                     f'got data={data}, fsdp={fsdp}')
  grid = np.array(devices, dtype=object).reshape(data, fsdp)
  # Auto axes: jax.make_mesh defaults to Explicit axes in recent jax, which we do not want.
  try:
    return Mesh(grid, DATA_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  except (TypeError, AttributeError):  # older jax without axis_types
    return Mesh(grid, DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, k: int, min_size: int) -> P:
  if k == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = [d for d in np.argsort(shape)[::-1] if shape[d] % k == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = 'fsdp'
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
  """Per-leaf shardings of the train state (replicated, or FSDP as in the module docstring)."""
  k = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), k, min_size)),
                      abstract_state)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's part of the batch on the mesh as one global array per key.

  Each process passes its local ``[B_local, ...]`` arrays; the global batch is the concatenation
  over processes in process order.
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] % local:
      raise ValueError(f'batch[{k!r}]: expected a leading batch dimension divisible by the '
                       f'{local} local devices, found shape {v.shape}')
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def platform_of(mesh: Mesh) -> str:
  """The platform of the devices of ``mesh`` (``'cpu'``, ``'gpu'``, ``'tpu'``)."""
  return mesh.devices.flat[0].platform


def jit_on_mesh(fn, mesh: Mesh, program: str = 'model', **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` with the compiler options of the mesh's platform
  (:func:`nvae_jax.compile_options.for_mesh`), each compile through
  :func:`nvae_jax.compile_priority.compile_on_first_call`."""
  return compile_priority.compile_on_first_call(
      jax.jit(fn, compiler_options=compile_options.for_mesh(mesh, program), **jit_kwargs),
      platform_of(mesh))


def resolve_update_programs(setting: str = 'auto', platform: str | None = None) -> str:
  """``'one'`` or ``'two'`` for a ``train.update_programs`` value (``'auto'``: two on CPU)."""
  if setting not in schema.UPDATE_PROGRAMS:
    raise ValueError(f'train.update_programs: expected one of {schema.UPDATE_PROGRAMS}, got '
                     f'{setting!r}')
  if setting != 'auto':
    return setting
  platform = platform or jax.devices()[0].platform
  return 'two' if platform == 'cpu' else 'one'


class TwoProgramUpdate:
  """``update(state, batch)`` as two jitted programs: the gradients, then the optimizer.

  Behaves like the one-program update (``__call__``, and ``lower(state, batch).compile()``
  returning a callable with the same signature).  ``parallel_compile``: ``compile()`` compiles
  the two programs at the same time, the gradient program in a second thread (XLA:CPU leaves a
  core idle during much of a compile; on 2 cores mnist_tiny's pair compiles in 17.4-19.2 s
  instead of 21.1-24.1 s, at a 150-290 MB higher peak RSS); otherwise one after the other.
  Each compile goes through :func:`nvae_jax.compile_priority.compile` (on CPU, XLA's compile
  work runs below its code generation).
  """

  def __init__(self, gradients, apply, parallel_compile: bool = False, platform: str = 'cpu'):
    self.gradients, self.apply = gradients, apply
    self.parallel_compile = parallel_compile
    self.platform = platform

  def __call__(self, state, batch):
    return self.apply(state, *self.gradients(state, batch))

  def lower(self, state, batch):
    with collector.paused():
      gradients = self.gradients.lower(state, batch)
      apply = self.apply.lower(state, *gradients.out_info)
    return _LoweredPair(gradients, apply, self.parallel_compile, self.platform)


class _LoweredPair:

  def __init__(self, gradients, apply, parallel_compile: bool, platform: str):
    self.gradients, self.apply = gradients, apply
    self.parallel_compile = parallel_compile
    self.platform = platform

  def compile(self):
    if not self.parallel_compile:
      return TwoProgramUpdate(compile_priority.compile(self.gradients, self.platform),
                              compile_priority.compile(self.apply, self.platform))
    gradients = compile_priority.start_compile(self.gradients, self.platform)
    apply = compile_priority.compile(self.apply, self.platform)
    return TwoProgramUpdate(gradients.result(), apply)


def make_train_step(task, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], mesh: Mesh,
                    state_sharding, programs: str = 'one', parallel_compile: bool = False
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """Returns ``update(state, batch) -> (state, metrics)``, jitted with ``state`` donated.

  ``batch`` must be placed with :func:`put_batch`.  One update:
  ``loss, grads = value_and_grad(task.loss)`` with rng ``fold_in(state.rng, state.step)``, then
  the optimizer (which may skip the update, see :mod:`nvae_jax.train.optim`); a skipped update
  also keeps the old model state (batch-norm statistics of a bad batch are dropped).

  ``programs``: ``'one'`` compiles the update as one XLA program; ``'two'`` as a gradient program
  and an optimizer program (:class:`TwoProgramUpdate`; ``'auto'``: see
  :func:`resolve_update_programs`).  The maths is the same.  Two programs compile faster and
  with a lower peak memory on XLA:CPU (the compiler's memory grows with the program), at the cost
  of writing the gradients out once between them.  ``parallel_compile``: see
  :class:`TwoProgramUpdate` (no effect on one program).

  Metrics (float32/int32 scalars, replicated): the task's metrics, ``loss``, ``grad_norm`` (global
  norm of the raw gradient), ``param_norm``, ``lr`` (the rate of this update), ``skipped``,
  ``num_skipped``, ``consecutive_skips``.
  """

  def gradients(state: TrainState, batch):
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)

    def loss_fn(params):
      variables = {'params': params, **state['model_state']}
      loss, (metrics, new_model_state) = task.loss(variables, batch, rng, step)
      return loss, (metrics, new_model_state)

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    return grads, loss, metrics, dict(new_model_state)

  def apply(state: TrainState, grads, loss, metrics, new_model_state):
    step = state['step']
    lr = schedule(optim.applied_updates(state['opt_state'], step))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)

    if isinstance(opt_state, optim.SkipState):
      skipped = opt_state.last_skipped
      new_model_state = jax.tree.map(lambda n, o: jnp.where(skipped, o, n),
                                     dict(new_model_state), dict(state['model_state']))
      counters = dict(skipped=skipped.astype(jnp.int32), num_skipped=opt_state.num_skipped,
                      consecutive_skips=opt_state.consecutive_skips)
    else:
      counters = {}
    new_state = dict(step=step + 1, params=params, opt_state=opt_state,
                     model_state=dict(new_model_state), rng=state['rng'])
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=optim.global_norm(grads),
               param_norm=optim.global_norm(params), lr=lr, **counters)
    return new_state, out

  def update(state: TrainState, batch) -> tuple[TrainState, dict]:
    return apply(state, *gradients(state, batch))

  platform = platform_of(mesh)
  programs = resolve_update_programs(programs, platform)
  data, rep = batch_sharding(mesh), replicated(mesh)
  if programs == 'one':
    return jit_on_mesh(update, mesh, in_shardings=(state_sharding, data),
                       out_shardings=(state_sharding, rep), donate_argnums=(0,))
  params_sharding = state_sharding['params']
  model_state_sharding = state_sharding['model_state']
  return TwoProgramUpdate(
      jax.jit(gradients, in_shardings=(state_sharding, data),
              out_shardings=(params_sharding, rep, rep, model_state_sharding),
              compiler_options=compile_options.for_mesh(mesh)),
      jax.jit(apply, in_shardings=(state_sharding, params_sharding, rep, rep,
                                   model_state_sharding),
              out_shardings=(state_sharding, rep), donate_argnums=(0,),
              compiler_options=compile_options.for_mesh(mesh, 'optimizer')),
      parallel_compile, platform)


def to_host(tree):
  """Fetches replicated (or fully addressable) arrays to numpy, also in multi-process runs.

  Typed PRNG keys come back as their uint32 key data.
  """

  def get(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f'to_host: expected a replicated array, found sharding {x.sharding}')
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)
