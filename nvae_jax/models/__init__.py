"""Model families. Importing this package registers every family with ``base.build_task``."""

import importlib

from nvae_jax.models.base import ModelTask, build_task, register  # noqa: F401

# Each family module registers itself; a family that is not written yet is simply absent.
for _name in ('conv_vae', 'glow', 'nvae'):
  try:
    importlib.import_module(f'nvae_jax.models.{_name}')
  except ModuleNotFoundError as e:  # only tolerate the module itself being absent
    if e.name != f'nvae_jax.models.{_name}':
      raise
