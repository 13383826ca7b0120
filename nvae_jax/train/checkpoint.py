"""Checkpoints with orbax: the full train state, the data pipeline position and the config.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config,meta}``.  ``state`` is the train state of
:mod:`nvae_jax.train.state` (params, optimizer state with its skip counters, model state, step,
rng); ``data`` the JSON position of the train pipeline (``pipe.get_state()``) of process 0;
``config`` the config as JSON, for the record; ``meta`` the model family and the layout version of
the train state (``{"model": "nvae", "layout_version": 2}``, see
:mod:`nvae_jax.train.migrations`).  Saves may be asynchronous: ``save`` returns once the arrays are
copied off the devices, the files are written in the background; ``wait()`` (or ``close()``) before
reading them from another process.

Restoring needs an abstract target (``jax.ShapeDtypeStruct`` with shardings, e.g. from
``jax.eval_shape`` of the init).  A checkpoint of an older layout version is migrated in memory
(:func:`nvae_jax.train.migrations.migrate`); the stored structure and shapes are then checked
against the target, and a checkpoint that does not fit the model raises
:class:`~nvae_jax.errors.CheckpointMismatchError` naming the missing, unexpected and mis-shaped
entries.

Damaged checkpoints: :meth:`Checkpointer.restore_latest` restores the newest *readable* checkpoint;
a newer one that cannot be read (a truncated or missing file, a partial write) is reported with a
warning naming its step and skipped, never deleted; a later :meth:`Checkpointer.save` (training)
first moves it to ``<workdir>/checkpoints_damaged/<step>``, so that the run can write that step
again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from nvae_jax.errors import (CheckpointError, CheckpointMismatchError,  # noqa: F401 (re-exported)
                             CheckpointVersionError, NoCheckpointError)
from nvae_jax.train import migrations

_log = logging.getLogger(__name__)


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


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stored_shape(x) -> tuple[int, ...]:
  """Shape as stored on disk: typed PRNG keys are stored as their uint32 key data."""
  if _is_key(x):
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


def _to_host(tree):
  """A restored tree as numpy, PRNG keys as their key data (the form migrations work on)."""
  def leaf(x):
    if hasattr(x, 'dtype') and _is_key(x):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(leaf, tree)


def _replicated_target(stored_tree, abstract_state):
  """A restore target for the stored (old-layout) tree: every array whole on every device of the
  new target's mesh, so that a checkpoint of any topology can be read for migration; PRNG keys
  at paths the target shares take the target's leaf."""
  leaves = jax.tree.leaves(abstract_state)
  shardings = [getattr(x, 'sharding', None) for x in leaves]
  named = [s for s in shardings if isinstance(s, jax.sharding.NamedSharding)]
  if named:
    replicated = jax.sharding.NamedSharding(named[0].mesh, jax.sharding.PartitionSpec())
  else:
    replicated = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  keys = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
          if _is_key(x)}

  def leaf(path, meta):
    name = _path_str(path)
    if name in keys:
      return keys[name]
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=replicated)

  return jax.tree_util.tree_map_with_path(leaf, stored_tree)


def _place(abstract_state, host_tree):
  """Host arrays (matched by path) -> the target's dtypes, shardings and typed keys."""
  stored = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(host_tree)[0]}

  def leaf(path, target):
    x = stored[_path_str(path)]
    sharding = getattr(target, 'sharding', None)
    if _is_key(target):
      return jax.device_put(jax.random.wrap_key_data(np.asarray(x, np.uint32)), sharding)
    return jax.device_put(np.asarray(x, target.dtype), sharding)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


class Checkpointer:
  """A thin owner of an ``ocp.CheckpointManager`` for train states (see the module docstring).

  ``model`` is the model family (``config.model.name``) whose layout version is recorded and
  checked; when ``None`` it is taken from the config given to ``save`` and, on restore, from the
  checkpoint's own record.
  """

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               save_every: int = 1, model: str | None = None):
    self.directory = os.path.abspath(directory)
    self.model = model
    self._damaged: list[int] = []
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), save_interval_steps=max(1, int(save_every)),
            enable_async_checkpointing=bool(async_save), create=True),
        # Named handlers, so that a fresh process can read item metadata before restoring.
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, *, data_state: dict | None = None, config=None,
           force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether a save was started."""
    if self._damaged:  # found by restore_latest: make room for the steps they hold
      self._set_aside(self._damaged)
      self._damaged = []
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(data_state if data_state is not None else {}))
    model = self.model or (str(config.model.name) if config is not None else None)
    if model is not None:
      items['meta'] = ocp.args.JsonSave(
          {'model': model, 'layout_version': migrations.current_version(model)})
    if config is not None:
      items['config'] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  def _where(self, step: int) -> str:
    return f'checkpoint {self.directory}/{step}'

  def _mismatch(self, step: int, problems: list[str], note: str = '') -> CheckpointMismatchError:
    shown = '\n  '.join(problems[:50])
    more = f'\n  ... and {len(problems) - 50} more' if len(problems) > 50 else ''
    return CheckpointMismatchError(
        f'{self._where(step)} does not fit the model{note} ({len(problems)} entries differ; was '
        f'it written with another model config?):\n  {shown}{more}')

  def _stored_tree(self, step: int, names):
    if 'state' not in names:
      raise CheckpointError(f'{self._where(step)} has no "state" item (found {sorted(names)})')
    meta = self._mngr.item_metadata(step)['state']
    return getattr(meta, 'tree', meta)

  def _version(self, step: int, names, stored_tree, abstract_state) -> tuple[str | None, int, int]:
    """``(model, found version, current version)`` of a checkpoint (see the migrations module)."""
    record = {}
    if 'meta' in names:
      record = self._mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta or {}
    model = self.model or record.get('model')
    if model is None:
      return None, 1, 1
    current = migrations.current_version(model)
    if 'layout_version' in record:
      found = int(record['layout_version'])
    else:  # written before versions were recorded: current if it fits, else the first layout
      found = current if not compare_structures(abstract_state, stored_tree) else 1
    return model, found, current

  def check(self, step: int, abstract_state) -> None:
    """Raises :class:`CheckpointMismatchError` if the stored state does not fit the target."""
    names = set(self._mngr.item_metadata(step).keys())
    problems = compare_structures(abstract_state, self._stored_tree(step, names))
    if problems:
      raise self._mismatch(step, problems)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict | None]:
    """Returns ``(state, data_state, config_dict)`` of ``step`` (default: the newest readable).

    Migrates an older layout version; raises :class:`CheckpointMismatchError` or
    :class:`CheckpointVersionError` if the checkpoint cannot become the target.
    """
    if step is None:
      _, state, data_state, config = self.restore_latest(abstract_state)
      return state, data_state, config
    names = set(self._mngr.item_metadata(step).keys())
    stored_tree = self._stored_tree(step, names)
    model, found, current = self._version(step, names, stored_tree, abstract_state)
    items = dict(data=ocp.args.JsonRestore())
    if 'config' in names:
      items['config'] = ocp.args.JsonRestore()
    if found == current:
      problems = compare_structures(abstract_state, stored_tree)
      if problems:
        raise self._mismatch(step, problems)
      items['state'] = ocp.args.StandardRestore(abstract_state)
      r = self._mngr.restore(step, args=ocp.args.Composite(**items))
      state = r.state
    else:
      path = migrations.migration_path(model, found, self._where(step))  # fails before reading
      items['state'] = ocp.args.StandardRestore(_replicated_target(stored_tree, abstract_state))
      r = self._mngr.restore(step, args=ocp.args.Composite(**items))
      host = _to_host(r.state)
      for fn in path:
        host = fn(host)
      problems = compare_structures(abstract_state, host)
      if problems:
        guessed = '' if 'meta' in names else ' (it records no version: read as version 1)'
        raise self._mismatch(step, problems, f' after migrating its {model} layout version '
                             f'{found}{guessed} to {current}')
      state = _place(abstract_state, host)
      _log.info('%s: migrated %s layout version %d -> %d', self._where(step), model, found,
                current)
    return state, dict(r.data or {}), (r.config if 'config' in names else None)

  def restore_latest(self, abstract_state, *, stream=None) -> tuple[int, Any, dict, dict | None]:
    """``(step, state, data_state, config_dict)`` of the newest checkpoint that can be read.

    Newer checkpoints that cannot be read are skipped with a warning naming their step (on
    ``stream``, default stderr) and kept; the next :meth:`save` first moves them to
    ``<directory>_damaged/<step>`` (process 0), so that those steps can be written again.

    Raises:
      NoCheckpointError: no checkpoint at all.
      CheckpointError: checkpoints exist but none can be read.
      CheckpointMismatchError, CheckpointVersionError: the newest readable one does not fit.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise NoCheckpointError(f'no checkpoint found in {self.directory}')
    damaged = []
    for step in steps:
      try:
        state, data_state, config = self.restore(abstract_state, step)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # anything unreadable is damage
        reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        print(f'nvae-jax: warning: {self._where(step)} cannot be read ({reason}); it is kept, '
              'and the previous checkpoint is used', file=stream or sys.stderr, flush=True)
        damaged.append(step)
        continue
      self._damaged = damaged
      return step, state, data_state, config
    raise CheckpointError(f'no readable checkpoint in {self.directory}: steps {steps} are all '
                          'damaged (see the warnings above); move them away to start afresh')

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of the manager's directory (never deletes them)."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('nvae_jax_checkpoint_set_aside_start')
    if jax.process_index() == 0:
      target_dir = self.directory + '_damaged'
      os.makedirs(target_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(target_dir, str(step))
        if os.path.exists(target):
          target = f'{target}.{int(time.time())}'
        os.rename(os.path.join(self.directory, str(step)), target)
        print(f'nvae-jax: warning: moved the damaged {self._where(step)} to {target}',
              file=sys.stderr, flush=True)
    multihost_utils.sync_global_devices('nvae_jax_checkpoint_set_aside_done')
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
