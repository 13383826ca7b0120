"""The library's errors: every *user* error is a subclass of :class:`NvaeJaxError`.

A user error is one the user can fix without touching the code (a config value, a flag, a data
file, a checkpoint, a learning rate that explodes); its message names the field or file, what was
expected and what was found.  ``nvae-jax`` prints such an error as one line,
``nvae-jax: <kind> error: <message>``, and exits with status 2 (:data:`USER_ERROR_EXIT`); any other
exception is a bug and keeps its traceback.

Each subclass also derives from the builtin exception that older code (and callers) expected, so
``except ValueError`` still catches a :class:`ConfigError`.

This module imports nothing from the library: anything may import it.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2        # a user error (the one-line message says which field or file)
PREEMPTED_EXIT = 75        # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; requeue


class NvaeJaxError(Exception):
  """Base class of the user errors; ``kind`` names the category in the one-line message."""
  kind = 'user'


class ConfigError(NvaeJaxError, ValueError):
  """A config field has a bad value; the message starts with the dotted field name."""
  kind = 'config'


class FlagError(NvaeJaxError, ValueError):
  """A command-line flag is missing, unknown or malformed (or the config file cannot be loaded)."""
  kind = 'flag'


class DataError(NvaeJaxError, ValueError):
  """The data cannot be read as configured (missing, unprepared, corrupt, wrong dtype/shape)."""
  kind = 'data'


class DataNotFoundError(DataError, FileNotFoundError):
  """A data file or folder named by the config does not exist."""


class CheckpointError(NvaeJaxError):
  """A checkpoint cannot be used."""
  kind = 'checkpoint'


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """A mode that needs a checkpoint (eval, sample) found none in the workdir."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint's state does not have the structure or shapes the model expects."""


class CheckpointVersionError(CheckpointError, ValueError):
  """The checkpoint's layout version cannot be migrated to the one this code writes."""


class WorkdirError(NvaeJaxError, OSError):
  """The workdir cannot be used (e.g. it is a file)."""
  kind = 'workdir'


class TrainingError(NvaeJaxError, RuntimeError):
  """Training cannot go on (e.g. too many consecutive skipped updates: a diverging run)."""
  kind = 'training'
