"""The train state: a plain dict, so that checkpoints, shardings and tests see ordinary pytrees.

Keys:

* ``step``: int32 scalar, the number of train steps taken (skipped updates included);
* ``params``: the ``'params'`` collection of the model's variables;
* ``opt_state``: the optax state; its outermost element is a :class:`~nvae_jax.train.optim.SkipState`
  holding the skip counters (``num_skipped``, ``consecutive_skips``, ``last_skipped``);
* ``model_state``: every other variable collection (``task.mutable_collections``: batch-norm
  statistics and the like), as a dict ``{collection: tree}``;
* ``rng``: a typed PRNG key, fixed for the run; step ``t`` uses ``fold_in(rng, t)``.

Random streams: ``root = key(config.seed)``; ``init`` uses ``fold_in(root, 0)``, training
``fold_in(root, 1)``, evaluation ``fold_in(root, 2)`` and sampling ``fold_in(root, 3)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax.train.optim import SkipState

TrainState = dict[str, Any]

INIT_STREAM, TRAIN_STREAM, EVAL_STREAM, SAMPLE_STREAM = 0, 1, 2, 3


def stream_key(seed: int, stream: int) -> jax.Array:
  """The typed key of one random stream (see the module docstring)."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def init_train_state(task, tx, seed: int, batch) -> TrainState:
  """Initialises variables and optimizer state for inputs shaped like ``batch``.

  Pure: call it under ``jax.jit`` (with ``out_shardings``) or ``jax.eval_shape``.
  """
  variables = dict(task.init(stream_key(seed, INIT_STREAM), batch))
  if 'params' not in variables:
    raise ValueError(f'task.init: expected a "params" collection, found {sorted(variables)}')
  params = variables.pop('params')
  expected = set(task.mutable_collections)
  if set(variables) != expected:
    raise ValueError(f'task.init: expected collections {sorted(expected)} besides "params" '
                     f'(task.mutable_collections), found {sorted(variables)}')
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
              model_state=variables, rng=stream_key(seed, TRAIN_STREAM))


def init_train_state_host(task, tx, seed: int, batch) -> TrainState:
  """:func:`init_train_state` with the variables drawn on the host by ``task.init_host(seed,
  batch)`` (tasks that have it, e.g. NVAE): no XLA compilation of the model's initialiser."""
  variables = dict(task.init_host(seed, batch))
  params = variables.pop('params')
  expected = set(task.mutable_collections)
  if set(variables) != expected:
    raise ValueError(f'task.init_host: expected collections {sorted(expected)} besides "params" '
                     f'(task.mutable_collections), found {sorted(variables)}')
  return dict(step=np.zeros((), np.int32), params=params, opt_state=host_constant(tx.init, params),
              model_state=variables, rng=stream_key(seed, TRAIN_STREAM))


class _NotConstant(Exception):
  pass


def host_constant(fn, *args):
  """``fn(*args)`` computed in numpy when its result depends only on the arguments' shapes (as
  an optax ``init`` does: zeros and counters); otherwise ``jax.jit(fn)(*args)``.

  Tracing gives a jaxpr; if it only broadcasts and converts constants it is evaluated on the host,
  which avoids compiling an XLA program with one kernel per output (seconds for a model with
  hundreds of parameters).
  """
  abstract = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), x) for x in args]
  closed = jax.make_jaxpr(fn, return_shape=True)(*abstract)
  closed, out_shape = closed
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, (np.asarray(c) for c in closed.consts)))

  def read(a):
    if hasattr(a, 'val') and not hasattr(a, 'count'):  # a Literal
      return np.asarray(a.val)
    if a not in env:
      raise _NotConstant
    return env[a]

  try:
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == 'broadcast_in_dim':
        x = read(eqn.invars[0])
        shape, dims = eqn.params['shape'], eqn.params['broadcast_dimensions']
        expanded = [1] * len(shape)
        for i, d in enumerate(dims):
          expanded[d] = x.shape[i]
        out = np.broadcast_to(x.reshape(expanded), shape).copy()
      elif name == 'convert_element_type':
        out = read(eqn.invars[0]).astype(eqn.params['new_dtype'])
      else:
        raise _NotConstant
      env[eqn.outvars[0]] = out
    leaves = [np.asarray(read(v), dtype=v.aval.dtype) for v in jaxpr.outvars]
  except _NotConstant:
    return jax.jit(fn)(*args)
  return jax.tree.unflatten(jax.tree.structure(out_shape), leaves)


def variables_of(state: TrainState) -> dict[str, Any]:
  """The flax variable dict ``{'params': ..., **model_state}`` of a train state."""
  return {'params': state['params'], **state['model_state']}


def skip_counters(state: TrainState) -> dict[str, jax.Array]:
  """``num_skipped`` and ``consecutive_skips`` from the optimizer's skip wrapper (zeros if none)."""
  opt = state['opt_state']
  if isinstance(opt, SkipState):
    return {'num_skipped': opt.num_skipped, 'consecutive_skips': opt.consecutive_skips}
  zero = jnp.zeros((), jnp.int32)
  return {'num_skipped': zero, 'consecutive_skips': zero}


def num_params(params) -> int:
  """Total number of parameter entries (works on arrays and ShapeDtypeStructs)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
