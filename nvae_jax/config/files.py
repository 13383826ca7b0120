"""Config files ``path.py[:arg]`` as absl flags, loaded with importlib's ``exec_module``.

ml_collections' ``config_flags.DEFINE_config_file`` loads the file with
``SourceFileLoader.load_module()``, deprecated since Python 3.4 and a ``DeprecationWarning`` on
Python 3.12. :func:`define_config_file` defines the same flag (same ``--config.x=y`` overrides,
same locking, same ``get_config_filename``) with a parser that loads the file the current way:
``spec_from_file_location`` + ``module_from_spec`` + ``exec_module``.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import types
from typing import Sequence

from absl import flags
from ml_collections import config_flags


def load_module(path: str, name: str = '_nvae_jax_config_file') -> types.ModuleType:
  """Executes the Python file ``path`` as a fresh module called ``name``."""
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise OSError(f'config file {path!r}: not a Python source file')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # as an import would, so that dataclasses and pickling work
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


class ConfigFileParser(flags.ArgumentParser):
  """``path.py[:arg]`` -> ``get_config(arg)`` of that file (locked), via :func:`load_module`."""

  def __init__(self, name: str, lock_config: bool = True):
    self.name = name
    self.lock_config = lock_config

  def parse(self, argument):
    file_path, *arg = str(argument).split(':', 1)
    try:
      module = load_module(file_path, f'{self.name}_config')
      config = module.get_config(*arg)
    except (TypeError, ValueError) as e:
      # absl turns these into a flag error carrying only the message: keep the file's traceback
      # in it, worded as ml_collections' parser does, so that callers handle both alike.
      raise type(e)('Error whilst parsing config file:\n\n' + traceback.format_exc()) from e
    if self.lock_config and callable(getattr(config, 'lock', None)):
      config.lock()
    return config

  def flag_type(self) -> str:
    return 'config object'


def define_config_file(name: str, help_string: str, flag_values: flags.FlagValues,
                       sys_argv: Sequence[str]) -> None:
  """Defines ``--<name>=path.py[:arg]`` like ``config_flags.DEFINE_config_file`` (locked
  config, ``--<name>.field=value`` overrides read from ``sys_argv``), loading the file with
  :class:`ConfigFileParser`.

  There is no default: a caller with a default file inserts it into ``sys_argv`` (and parses that
  list), so that the default, too, is loaded by this parser.
  """
  config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                  lock_config=True, sys_argv=list(sys_argv))
  flag_values[name].parser = ConfigFileParser(name=name, lock_config=True)
