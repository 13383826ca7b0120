"""The workdir: checked before a run, and put back as it was when a run fails before training.

A run that fails before its first step (a bad config value found late, unreadable data, a
checkpoint that does not fit, a compile error) must not leave empty TensorBoard files, an empty
``checkpoints/`` folder or a new empty workdir behind: :func:`snapshot` records what was there, and
:func:`restore` removes only the run's own entries (``checkpoints``, ``tb``, ``metrics.jsonl``)
that were not there before, and the workdir itself if the run created it and it is empty.
"""

from __future__ import annotations

import os
import shutil

from nvae_jax.errors import WorkdirError

RUN_ENTRIES = ('checkpoints', 'tb', 'metrics.jsonl')


def check(workdir: str) -> None:
  """Raises :class:`WorkdirError` if ``workdir`` exists but is not a directory."""
  if not workdir:
    raise WorkdirError('--workdir: expected a directory path, got an empty string')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir}: expected a directory (new or existing), found a file')


def snapshot(workdir: str) -> set[str] | None:
  """The names in ``workdir`` (``None``: it does not exist yet)."""
  return set(os.listdir(workdir)) if os.path.isdir(workdir) else None


def restore(workdir: str, before: set[str] | None) -> None:
  """Removes the run entries created since ``before = snapshot(workdir)`` (see the docstring)."""
  if not os.path.isdir(workdir):
    return
  for name in RUN_ENTRIES:
    if before is not None and name in before:
      continue
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
      os.remove(path)
  if before is None and not os.listdir(workdir):
    os.rmdir(workdir)
