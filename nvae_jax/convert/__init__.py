"""Original NVAE (PyTorch) -> nvae_jax: state_dict name mapping and reference checks.

* ``from_torch_names``: original ``state_dict`` names/layouts <-> the flax variable tree.
* ``check_reference``: ``python -m nvae_jax.convert.check_reference DIR`` replays a fixture of
  the original implementation and reports the relative error of every quantity.
* ``official_keys``, ``torch_checkpoint``: the published configurations' key listings and the
  ``.pt`` checkpoint converter.
"""
