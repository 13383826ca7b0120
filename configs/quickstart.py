"""Quickstart: the offline default config of ``nvae-jax`` (a sigma-VAE conv VAE on scikit-learn's
8x8 digits); ``:bernoulli`` for the Bernoulli variant.  The config lives in the package,
``nvae_jax/config/quickstart.py`` (what ``nvae-jax`` loads without ``--config``), so that the
command works where only the installed package is; its docstring has the details and the
expected numbers.
"""

from nvae_jax.config import quickstart


def get_config(arg=None):
  return quickstart.get_config(arg)
