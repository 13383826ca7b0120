"""Counter-based random numbers for the input pipeline (numpy, no hidden state).

Every random decision of the pipeline (epoch order, horizontal flips, dynamic binarisation) is a
pure function of ``(seed, stream, epoch, example index, element)``.  That is what makes the
pipeline exactly resumable from ``(epoch, step)`` alone, identical for any batch size or host
count, and stable across numpy versions (nothing depends on numpy's generator streams).

Maths (all arithmetic modulo 2**64, on uint64):

* ``mix(z)`` is the SplitMix64 finaliser:
  ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
* A key absorbs words one at a time: ``h_0 = 0``, ``h_{i+1} = mix((h_i ^ w_i) + G)`` with the golden
  ratio increment ``G = 0x9E3779B97F4A7C15``; ``key(w_0, ..., w_k) = h_{k+1}``.
* Element ``j`` of the stream under ``key`` is ``mix(key + (j + 1) * G)`` (a SplitMix64 sequence
  seeded with ``key``); its top 53 bits give a uniform double ``u = (bits >> 11) * 2**-53`` in
  ``[0, 1)``.
* ``permutation(key, n)`` sorts ``0..n-1`` by their stream values (stable sort, so the order is
  defined even on a 64-bit collision).
"""

from __future__ import annotations

import numpy as np

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1

# Stream identifiers: one independent family of random numbers per use.
SHUFFLE = 1
FLIP = 2
BINARIZE = 3
EVAL_BINARIZE = 4


def _u64(x) -> np.ndarray:
  """Python ints (any sign or size, reduced mod 2**64) or integer arrays -> uint64 array."""
  if isinstance(x, (int, np.integer)):
    return np.array([int(x) & _MASK], dtype=np.uint64)
  return np.asarray(x).astype(np.uint64)


def mix(z: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
  with np.errstate(over='ignore'):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def key(*words) -> np.ndarray:
  """Hashes words (ints or integer arrays, broadcast together) into uint64 keys."""
  h = np.zeros((1,), dtype=np.uint64)
  with np.errstate(over='ignore'):
    for w in words:
      h = mix((h ^ _u64(w)) + _G)
  return h


def bits(keys: np.ndarray, count: int) -> np.ndarray:
  """Stream values ``[len(keys), count]`` uint64: element j of row i is mix(keys[i] + (j+1) G)."""
  j = np.arange(1, count + 1, dtype=np.uint64)
  with np.errstate(over='ignore'):
    return mix(keys.reshape(-1, 1) + j * _G)


def uniform(keys: np.ndarray, count: int) -> np.ndarray:
  """Uniform float64 in [0, 1), shape ``[len(keys), count]``, from the top 53 bits."""
  return (bits(keys, count) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def permutation(k: np.ndarray, n: int) -> np.ndarray:
  """A permutation of ``range(n)`` determined by the single key ``k``."""
  return np.argsort(bits(k.reshape(1), n)[0], kind='stable')
