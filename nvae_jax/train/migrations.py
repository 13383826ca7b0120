"""Layout versions of the train state, and the migrations that upgrade old checkpoints.

Every checkpoint records, in its ``meta`` item, the model family (``config.model.name``) and the
*layout version* of its train state for that family.  A family's current version is one more than
the highest ``from_version`` registered for it here (1 when nothing is registered), so that
registering a migration is the one thing to do when a layout changes.  Checkpoints written before
versions were recorded have no ``meta`` item: they are taken as the current version when their
structure fits the model, and as version 1 otherwise.

Restoring a checkpoint of an older version applies the registered migrations one version step at a
time (``v -> v+1 -> ... -> current``), in memory; the next save writes the current version.  A
checkpoint with no migration path (a newer version than this code, or a missing step) fails with
:class:`~nvae_jax.errors.CheckpointVersionError` naming both versions and the missing migration.

To change the layout of a model family's train state (rename, regroup or stack parameters...)::

  @register_migration('nvae', from_version=2)
  def _nvae_2_to_3(state):
    '''What changed, and the commit that changed it.'''
    ...
    return new_state

A migration gets the whole stored train state of ``from_version`` as host data: nested dicts
``{'step', 'params', 'opt_state', 'model_state', 'rng'}`` of numpy arrays, the PRNG key as its
``uint32`` key data, optax states as dicts of their field names and lists for tuples (e.g.
``opt_state['inner_state'][0]['mu']`` mirrors ``params``).  It returns the state in the layout of
``from_version + 1`` and must not modify its input.  Remember the optimizer's moments when
moving parameters.  Test it on a small checkpoint of the old layout kept in ``tests/data/``
(``tests/test_operations.py`` shows how).

Registered migrations:

* ``nvae`` 1 -> 2 (commit df9ff56): the spectral power-iteration vectors, stored per conv at the
  conv's module path (``u`` [C_out], ``v`` [C_in/groups * kh * kw] in PyTorch's (I, kh, kw)
  column order), are stacked per group of equally shaped convs
  (``nvae_jax.objectives.spectral``: key ``o<rows>_i<cols>``, convs in sorted module-path order,
  ``v`` columns in the HWIO kernel's (kh, kw, I) order).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from nvae_jax.errors import CheckpointVersionError

Migration = Callable[[dict[str, Any]], dict[str, Any]]

_MIGRATIONS: dict[str, dict[int, Migration]] = {}


def register_migration(model: str, from_version: int) -> Callable[[Migration], Migration]:
  """Decorator: ``fn(state) -> state`` upgrades ``model``'s layout ``from_version`` -> ``+1``."""
  if int(from_version) < 1:
    raise ValueError(f'from_version: expected an int >= 1, got {from_version!r}')

  def decorate(fn: Migration) -> Migration:
    steps = _MIGRATIONS.setdefault(str(model), {})
    if int(from_version) in steps:
      raise ValueError(f'a migration of {model!r} from version {from_version} is already '
                       f'registered ({steps[int(from_version)].__name__})')
    steps[int(from_version)] = fn
    return fn

  return decorate


def current_version(model: str) -> int:
  """The layout version that this code writes for ``model`` (1 + the last registered step)."""
  steps = _MIGRATIONS.get(str(model), {})
  return max(steps) + 1 if steps else 1


def migration_path(model: str, found: int, where: str = 'checkpoint') -> list[Migration]:
  """The migrations that take ``model``'s layout ``found`` to the current version, in order.

  Raises:
    CheckpointVersionError: naming both versions and the missing migration when there is no path.
  """
  expected = current_version(model)
  if found > expected:
    raise CheckpointVersionError(
        f'{where}: {model} train-state layout version {found}, but this nvae_jax writes version '
        f'{expected}; it was written by a newer nvae_jax: use that version, or register a '
        f'migration {found} -> {expected} (nvae_jax/train/migrations.py)')
  steps = _MIGRATIONS.get(str(model), {})
  path = []
  for v in range(found, expected):
    if v not in steps:
      raise CheckpointVersionError(
          f'{where}: {model} train-state layout version {found}, expected version {expected}: no '
          f'migration {v} -> {v + 1} is registered; write one with '
          f"@register_migration('{model}', from_version={v}) in nvae_jax/train/migrations.py")
    path.append(steps[v])
  return path


def migrate(model: str, state: dict[str, Any], found: int,
            where: str = 'checkpoint') -> dict[str, Any]:
  """Applies the migrations from layout ``found`` to the current one (see the module docstring)."""
  for fn in migration_path(model, found, where):
    state = fn(state)
  return state


# ------------------------------------------------------------------------------------- nvae


_GROUP_KEY = re.compile(r'^o\d+_i\d+$')


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


@register_migration('nvae', from_version=1)
def _nvae_1_to_2(state: dict[str, Any]) -> dict[str, Any]:
  """Per-conv spectral vectors -> per group of equally shaped convs (commit df9ff56).

  Version 1: ``spectral/u/<conv path>`` [rows] and ``spectral/v/<conv path>`` [cols] with
  rows = C_out, cols = C_in/groups * kh * kw in PyTorch's (I, kh, kw) order.  Version 2:
  ``spectral/u/o<rows>_i<cols>`` [n, rows], ``spectral/v/...`` [n, cols] stacking the group's n
  convs in sorted path order, v in the kernel's (kh, kw, I) order (kernel shape from ``params``).
  """
  spectral = state['model_state']['spectral']
  if all(_GROUP_KEY.match(str(k)) for k in spectral['u']):
    return state  # already grouped (an unversioned checkpoint of another architecture)
  u_flat, v_flat = _flatten(spectral['u']), _flatten(spectral['v'])
  if set(u_flat) != set(v_flat):
    raise CheckpointVersionError(
        'nvae layout 1 -> 2: spectral u and v name different convs: '
        f'{sorted("/".join(p) for p in set(u_flat) ^ set(v_flat))}')
  params = _flatten(state['params'])
  grouped: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  for path in sorted(u_flat):
    kernel = params.get(path + ('kernel',))
    if kernel is None or np.ndim(kernel) != 4:
      raise CheckpointVersionError(
          f'nvae layout 1 -> 2: spectral vectors at {"/".join(path)} have no conv kernel '
          f'params/{"/".join(path)}/kernel in the checkpoint')
    kh, kw, cin, cout = np.shape(kernel)
    u, v = np.asarray(u_flat[path]), np.asarray(v_flat[path])
    if u.shape != (cout,) or v.shape != (kh * kw * cin,):
      raise CheckpointVersionError(
          f'nvae layout 1 -> 2: spectral vectors {u.shape}, {v.shape} at {"/".join(path)} do not '
          f'fit its kernel {np.shape(kernel)}')
    v_hwi = v.reshape(cin, kh, kw).transpose(1, 2, 0).reshape(-1)  # (I, kh, kw) -> (kh, kw, I)
    grouped.setdefault(f'o{cout}_i{kh * kw * cin}', []).append((u, v_hwi))
  new_spectral = dict(spectral)
  new_spectral['u'] = {k: np.stack([uv[0] for uv in g]) for k, g in grouped.items()}
  new_spectral['v'] = {k: np.stack([uv[1] for uv in g]) for k, g in grouped.items()}
  model_state = dict(state['model_state'], spectral=new_spectral)
  return dict(state, model_state=model_state)
