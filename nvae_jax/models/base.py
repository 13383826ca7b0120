"""The contract between a model family and the training platform.

Every model family (``conv_vae``, ``nvae``, ``glow``) exposes a :class:`ModelTask`: a small object
built from the whole ``ml_collections`` config that knows how to initialise variables, compute the
training loss, evaluate per-example negative log-likelihoods, sample and reconstruct.  The
platform (``nvae_jax.train``) only ever talks to this interface, so the same jitted, sharded
update step, checkpointing, metrics and ``main`` modes serve every model.

Conventions
-----------
* A *batch* is a dict with ``'image'``: float32 ``[B, H, W, C]`` in ``[0, 1]``, already quantised
  to ``config.data.num_bits`` (values ``k / (2**bits - 1)``) or binary ``{0, 1}`` when the data is
  binarised.  Other keys (``'label'``) may be present and are ignored by models that do not use them.
* *variables* is the flax variable dict: ``{'params': ..., <mutable collection>: ...}``.  Every
  collection other than ``'params'`` is model state (batch-norm statistics, spectral-norm power
  iteration vectors, running sigma estimates) and is listed in ``mutable_collections``.
* Losses are sums over one example's dimensions, averaged over the batch, in nats.
* ``evaluate`` returns per-example negative log-likelihoods in nats of the *discrete* data (for
  flows this includes the dequantisation bin-width term), plus ``continuous=True`` in
  ``describe()['likelihood']`` when the density is continuous and bits/dim is not a discrete
  likelihood.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax

Batch = Mapping[str, jax.Array]
Variables = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class ModelTask(Protocol):
  """What a model family provides to the platform (see the module docstring)."""

  #: Names of the non-parameter collections that training updates (e.g. ``('batch_stats',)``).
  mutable_collections: tuple[str, ...]

  def init(self, rng: jax.Array, batch: Batch) -> Variables:
    """Returns freshly initialised variables for inputs shaped like ``batch``."""

  def loss(self, variables: Variables, batch: Batch, rng: jax.Array,
           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Variables]]:
    """Training objective.

    Returns ``(loss, (metrics, new_state))``: ``loss`` is a float32 scalar to minimise,
    ``metrics`` a dict of float32 scalars to log (e.g. ``recon``, ``kl``, ``elbo``), and
    ``new_state`` the updated non-parameter collections (same structure as in ``variables``).
    ``step`` is the global training step (for KL warm-up and other schedules).
    """

  def evaluate(self, variables: Variables, batch: Batch, rng: jax.Array) -> Metrics:
    """Eval-mode metrics; must contain ``'nll'``: per-example negative log-likelihood [B] in nats.

    May also contain per-example ``'nelbo'`` (negative ELBO, nats) and other [B] arrays.
    """

  def sample(self, variables: Variables, rng: jax.Array, num: int,
             temperature: float) -> jax.Array:
    """Returns ``num`` samples, float32 ``[num, H, W, C]`` in ``[0, 1]``."""

  def reconstruct(self, variables: Variables, batch: Batch, rng: jax.Array) -> jax.Array:
    """Returns reconstructions of ``batch['image']``, float32 in ``[0, 1]``."""

  # Optional: ``prepare_sampling(variables, rng, temperature, cache_dir) -> variables``, called
  # before sampling from a checkpoint (NVAE re-estimates its decoder batch-norm statistics at the
  # sampling temperature there, cached under ``cache_dir``).

  def describe(self) -> dict[str, Any]:
    """Static description: ``{'inputs': shape, 'latents': [...], 'outputs': shape,
    'likelihood': {'name': str, 'continuous': bool}}`` (shapes per example)."""


_REGISTRY: dict[str, Any] = {}


def register(name: str):
  """Class decorator registering a ModelTask factory under ``config.model.name``."""

  def wrap(factory):
    _REGISTRY[name] = factory
    return factory

  return wrap


def build_task(config) -> ModelTask:
  """Builds the ModelTask named by ``config.model.name`` from the whole config."""
  # Import the model modules so that they register themselves.
  from nvae_jax import models  # noqa: F401  pylint: disable=import-outside-toplevel
  name = config.model.name
  if name not in _REGISTRY:
    raise ValueError(f'config.model.name: unknown model {name!r}; expected one of '
                     f'{sorted(_REGISTRY)}')
  return _REGISTRY[name](config)
