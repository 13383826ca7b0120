"""Model families behind one protocol (``base.ModelTask``).  Importing this package registers
every family; ``build_task(config)`` builds the one ``config.model.name`` names."""

import importlib

from nvae_jax.models.base import ModelTask, ModelTaskBase, register, registered  # noqa: F401

# Each family module registers itself; a family that is not written yet is simply absent.
for _name in ('conv_vae', 'glow', 'nvae'):
  try:
    importlib.import_module(f'nvae_jax.models.{_name}')
  except ModuleNotFoundError as e:  # only tolerate the module itself being absent
    if e.name != f'nvae_jax.models.{_name}':
      raise


def build_task(config) -> ModelTask:
  """Builds the ModelTask named by ``config.model.name`` from the whole config."""
  return registered(config.model.name)(config)
