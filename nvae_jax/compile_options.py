"""XLA compiler options of the platform's programs (train step, evaluation, sampling).

XLA:CPU compiles every distinct fused kernel through LLVM, and for NVAE that code generation is
most of the compile (mnist_tiny's gradient program: about 1,000 kernels; the published CIFAR-10
model's: about 1,700, 57 s of LLVM per compiler thread).  LLVM optimisation level 1
(``xla_backend_optimization_level``; XLA's default is 2) compiles mnist_tiny's gradient program
in 14.7-15.8 s instead of 18.2-19.5 s wall, at the same step time (README, *NVAE speed and
memory*), so on CPU the platform passes level 1.  Accelerators keep XLA's defaults.

``NVAE_JAX_CPU_OPT_LEVEL`` (0-3) overrides the CPU level; ``default`` leaves XLA's own.

Remat's optimisation barriers stay until the end on CPU.  ``jax.checkpoint`` (``prevent_cse``)
passes a recomputation's inputs through an ``optimization_barrier``, so that XLA's common-
subexpression elimination cannot merge the recomputation with the forward pass.  jax 0.10's
XLA:CPU removes the barriers (its ``cse_barrier_expander`` pass) before layout assignment and
runs CSE after it, which merges them after all: remat then saved no memory (mnist_tiny's
gradient program: 356.5 MB of temporary memory under ``nothing_saveable``, 375.6 MB without
remat).  jax 0.11's XLA:CPU removes them after scheduling.  The model's CPU programs therefore
compile with that pass disabled (``xla_disable_hlo_passes``): XLA:CPU runs the barriers as
no-ops, and the same program keeps 139.9 MB with either jax (README, *NVAE speed and memory*,
item 14).  Programs without remat have no barriers and do not change.  Accelerators keep XLA's
own pipeline.

Low-memory compilation (``config.compile_low_memory``, :func:`set_cpu_low_memory`).  XLA:CPU's
MLIR fusion emitters lower each distinct fused kernel with a compiler instance that owns its own
MLIR context (every dialect loaded, about 2 MB with its pass pipelines).  The main compiler
thread emits kernels faster than the codegen threads lower them, so on a 2-core machine hundreds
of a program's kernels wait at once, each holding an instance: about 1.3 GB at the peak of
mnist_tiny's gradient program (1,310 kernels).  With ``compile_low_memory`` the model's programs
(gradients, evaluation, sampling, reconstruction) use XLA's older loop emitters instead
(``xla_cpu_use_fusion_emitters=False``), which emit LLVM IR directly: the same arithmetic, a
compile peak about 0.8 GB lower, and a train step 1.15-1.25x slower in CPU time (README, *NVAE
speed and memory*, item 10).  The optimizer program keeps the fusion emitters: its 1,300 tiny
per-parameter kernels take more memory with the older emitters, not less.  Accelerators are
unaffected.  XLA removed the older emitters in later releases (jax 0.11 rejects the option):
there the setting warns once and compiles as usual.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import jax
import numpy as np

ENV = 'NVAE_JAX_CPU_OPT_LEVEL'
CPU_OPT_LEVEL = 1
_LEVELS = ('0', '1', '2', '3')


def cpu_opt_level() -> Optional[int]:
  """The LLVM optimisation level for XLA:CPU programs (None: XLA's default)."""
  value = os.environ.get(ENV, '').strip()
  if not value:
    return CPU_OPT_LEVEL
  if value.lower() == 'default':
    return None
  if value not in _LEVELS:
    raise ValueError(f'{ENV}: expected one of {", ".join(_LEVELS)} or "default", got {value!r}')
  return int(value)


PROGRAMS = ('model', 'optimizer')
KEEP_REMAT_BARRIERS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}
OLDER_EMITTERS = {'xla_cpu_use_fusion_emitters': False}
_cpu_low_memory = False


@functools.lru_cache(maxsize=None)
def cpu_has_older_emitters() -> bool:
  """Whether this XLA:CPU still accepts ``xla_cpu_use_fusion_emitters`` (compiles a no-op)."""
  try:
    on_cpu = jax.device_put(np.float32(0), jax.devices('cpu')[0])
    jax.jit(lambda x: x, compiler_options=OLDER_EMITTERS).lower(on_cpu).compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'No such compile option' in str(e):
      return False
    raise
  return True


def set_cpu_low_memory(enabled: bool) -> bool:
  """Switches low-memory compilation of the model's CPU programs on or off (process-wide, like
  the compilation cache; ``train.build.build`` sets it from ``config.compile_low_memory``).
  Returns the previous setting.  Programs already jitted keep the options they were made with."""
  global _cpu_low_memory
  if not isinstance(enabled, bool):
    raise TypeError(f'compile_low_memory: expected a bool, got {enabled!r}')
  previous, _cpu_low_memory = _cpu_low_memory, enabled
  return previous


def cpu_low_memory() -> bool:
  """Whether the model's CPU programs compile with the low-memory emitters."""
  return _cpu_low_memory


def for_platform(platform: str, program: str = 'model') -> Optional[dict]:
  """``compiler_options`` for ``jax.jit`` on ``platform`` (``'cpu'``, ``'gpu'``, ...).

  ``program``: ``'model'`` (anything that runs the network: gradients, evaluation, sampling) or
  ``'optimizer'`` (the parameter update of a two-program train step).
  """
  if program not in PROGRAMS:
    raise ValueError(f'program: expected one of {PROGRAMS}, got {program!r}')
  if platform != 'cpu':
    return None
  options = {}
  level = cpu_opt_level()
  if level is not None:
    options['xla_backend_optimization_level'] = level
  if program == 'model':
    options.update(KEEP_REMAT_BARRIERS)
  if _cpu_low_memory and program == 'model':
    if cpu_has_older_emitters():
      options.update(OLDER_EMITTERS)
    else:
      _warn_no_older_emitters()
  return options or None


@functools.lru_cache(maxsize=None)
def _warn_no_older_emitters() -> None:
  warnings.warn(f'compile_low_memory: this XLA ({jax.__version__}) has no older CPU emitters '
                '(xla_cpu_use_fusion_emitters); the model compiles with the usual memory',
                RuntimeWarning, stacklevel=3)


def for_mesh(mesh, program: str = 'model') -> Optional[dict]:
  """:func:`for_platform` of the devices of ``mesh``."""
  return for_platform(mesh.devices.flat[0].platform, program)
