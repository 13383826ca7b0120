"""Python's cyclic garbage collector, paused while JAX traces and lowers a program.

Tracing a model (``jax.jit(f).lower(...)``, ``jax.eval_shape``) creates hundreds of thousands
of Python objects (tracers, jaxpr equations, MLIR operations) that live until the trace ends,
and almost no reference cycles.  Every time enough objects have been allocated, the collector
walks all of them, and its full passes also walk everything the imports created, to find next
to nothing.  On mnist_tiny's cold start (jax 0.10.2, Python 3.11) it took 1.0 s of the 4.9 s
spent tracing and lowering the gradient program and 0.6 s of the optimizer program's 1.6 s,
and the resident memory after lowering was the same with it off (README, *NVAE speed and
memory*, item 13).  :func:`paused` turns it off for a block and restores the previous state; the
objects that became garbage meanwhile are found by the next collection after it.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused():
  """``with paused(): ...`` runs the block with ``gc`` disabled, then re-enables it if it was
  enabled before (also when the block raises; nested blocks leave it to the outermost)."""
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()
