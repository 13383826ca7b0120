"""Checkpoints with orbax: the full train state, the data pipeline position and the config.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``.  ``state`` is the train state of
:mod:`nvae_jax.train.state` (params, optimizer state with its skip counters, model state, step,
rng); ``data`` the JSON position of the train pipeline (``pipe.get_state()``) of process 0;
``config`` the config as JSON, for the record.  Saves may be asynchronous: ``save`` returns once
the arrays are copied off the devices, the files are written in the background; ``wait()`` (or
``close()``) before reading them from another process.

Restoring needs an abstract target (``jax.ShapeDtypeStruct`` with shardings, e.g. from
``jax.eval_shape`` of the init); the stored structure and shapes are checked against it first, and
a checkpoint that does not fit the model raises :class:`CheckpointMismatchError` naming the
missing, unexpected and mis-shaped entries.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint's state does not have the structure or shapes the model expects."""


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def _stored_shape(x) -> tuple[int, ...]:
  """Shape as stored on disk: typed PRNG keys are stored as their uint32 key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, x).shape)
  return tuple(x.shape)


def compare_structures(expected_tree, stored_tree) -> list[str]:
  """Lists the differences between an abstract target and stored metadata (empty: they fit)."""
  expected = {_path_str(p): _stored_shape(x)
              for p, x in jax.tree_util.tree_flatten_with_path(expected_tree)[0]}
  stored = {_path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
  problems = []
  for name in sorted(set(expected) - set(stored)):
    problems.append(f'missing in checkpoint: {name} (expected shape {expected[name]})')
  for name in sorted(set(stored) - set(expected)):
    problems.append(f'unexpected in checkpoint: {name} (found shape {stored[name]})')
  for name in sorted(set(expected) & set(stored)):
    if expected[name] != stored[name]:
      problems.append(f'shape mismatch at {name}: expected {expected[name]}, found {stored[name]}')
  return problems


class Checkpointer:
  """A thin owner of an ``ocp.CheckpointManager`` for train states (see the module docstring)."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               save_every: int = 1):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), save_interval_steps=max(1, int(save_every)),
            enable_async_checkpointing=bool(async_save), create=True),
        # Named handlers, so that a fresh process can read item metadata before restoring.
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, *, data_state: dict | None = None, config=None,
           force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether a save was started."""
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(data_state if data_state is not None else {}))
    if config is not None:
      items['config'] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  def check(self, step: int, abstract_state) -> None:
    """Raises :class:`CheckpointMismatchError` if the stored state does not fit the target."""
    meta = self._mngr.item_metadata(step)
    stored = getattr(meta['state'], 'tree', meta['state'])
    problems = compare_structures(abstract_state, stored)
    if problems:
      shown = '\n  '.join(problems[:50])
      more = f'\n  ... and {len(problems) - 50} more' if len(problems) > 50 else ''
      raise CheckpointMismatchError(
          f'checkpoint {self.directory}/{step} does not fit the model ({len(problems)} '
          f'entries differ; was it written with another model config?):\n  {shown}{more}')

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict | None]:
    """Returns ``(state, data_state, config_dict)`` of ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint found in {self.directory}')
    self.check(step, abstract_state)
    names = set(self._mngr.item_metadata(step).keys())
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if 'config' in names:
      items['config'] = ocp.args.JsonRestore()
    r = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return r.state, dict(r.data or {}), (r.config if 'config' in names else None)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
