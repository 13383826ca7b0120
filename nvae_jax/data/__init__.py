"""Input pipeline: TFDS (no TensorFlow at read time), scikit-learn digits, image folders, npz files
and in-memory arrays, with deterministic host sharding, exact resume, flips, padding/resizing,
n-bit quantisation and dynamic binarisation.  See :mod:`nvae_jax.data.pipeline`."""

from nvae_jax.data.pipeline import Pipeline
from nvae_jax.data.pipeline import image_shape
from nvae_jax.data.pipeline import make_pipeline
from nvae_jax.data.pipeline import make_pipeline_from_arrays

__all__ = ['Pipeline', 'image_shape', 'make_pipeline', 'make_pipeline_from_arrays']
