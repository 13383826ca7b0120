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
  ``describe(image_shape)['likelihood']`` when the density is continuous and bits/dim is not a
  discrete likelihood.
* Models receive their input shape: from the batch in ``init``/``loss``/``evaluate``, and from the
  platform in ``describe(image_shape)`` and ``num_dims(image_shape)``; no model reads the data
  config or imports ``nvae_jax.data``.
* ``num_dims(image_shape)`` is the number of dimensions D the likelihood covers (all H W C unless
  the model scores a crop, e.g. NVAE's central 28x28 of 2-pixel-padded MNIST: D = 784), and the
  platform reports bits/dim = nats / (D ln 2).
* A metric named ``nelbo`` is the negative ELBO in nats, in every model.

Model families subclass :class:`ModelTaskBase`, which gives the optional parts of the protocol
their defaults (``num_dims`` = H W C, ``image_size_multiple`` = 1, ``prepare_sampling`` a
no-op).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol, Sequence

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
    ``metrics`` a dict of float32 scalars to log (e.g. ``recon``, ``kl``, ``nelbo``), and
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

  def prepare_sampling(self, variables: Variables, rng: jax.Array, temperature: float,
                       cache_dir: str) -> Variables:
    """Optional (default: returns ``variables``): called before sampling from a checkpoint at
    ``temperature``; returns the variables to sample with.  NVAE re-estimates its decoder
    batch-norm statistics at the sampling temperature here, cached under ``cache_dir``."""

  def num_dims(self, image_shape: Sequence[int]) -> int:
    """Optional (default: H W C): the number of dimensions the likelihood covers for inputs of
    ``image_shape``, the denominator of bits/dim."""

  def image_size_multiple(self) -> tuple[int, str]:
    """Optional (default: ``(1, '')``): ``(m, why)``, the image height and width must be
    multiples of ``m`` (``why`` names the config fields that set it, for the error message)."""

  def describe(self, image_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Static description for inputs of ``image_shape`` (default: the shape ``init`` saw):
    ``{'inputs': shape, 'latents': [...], 'outputs': shape, 'likelihood': {'name': str,
    'continuous': bool}}`` (shapes per example)."""


class ModelTaskBase:
  """The defaults of the optional parts of :class:`ModelTask`; model families subclass it."""

  mutable_collections: tuple[str, ...] = ()

  def prepare_sampling(self, variables: Variables, rng: jax.Array, temperature: float,
                       cache_dir: str) -> Variables:
    """No preparation: sample with the variables as they are."""
    del rng, temperature, cache_dir
    return variables

  def num_dims(self, image_shape: Sequence[int]) -> int:
    """D = H W C: the likelihood covers every pixel and channel."""
    return int(math.prod(int(s) for s in image_shape))

  def image_size_multiple(self) -> tuple[int, str]:
    """Any image size."""
    return 1, ''


_REGISTRY: dict[str, Any] = {}


def register(name: str):
  """Class decorator registering a ModelTask factory under ``config.model.name``."""

  def wrap(factory):
    _REGISTRY[name] = factory
    return factory

  return wrap


def registered(name: str):
  """The ModelTask factory registered under ``name`` (``ValueError`` naming the known ones)."""
  if name not in _REGISTRY:
    raise ValueError(f'config.model.name: unknown model {name!r}; expected one of '
                     f'{sorted(_REGISTRY)}')
  return _REGISTRY[name]
