"""XLA compiler options of the platform's programs (train step, evaluation, sampling).

XLA:CPU compiles every distinct fused kernel through LLVM, and for NVAE that code generation is
most of the compile (mnist_tiny's gradient program: about 1,000 kernels; the published CIFAR-10
model's: about 1,700, 57 s of LLVM per compiler thread).  LLVM optimisation level 1
(``xla_backend_optimization_level``; XLA's default is 2) compiles mnist_tiny's gradient program
in 14.7-15.8 s instead of 18.2-19.5 s wall, at the same step time (README, *NVAE speed and
memory*), so on CPU the platform passes level 1.  Accelerators keep XLA's defaults.

``NVAE_JAX_CPU_OPT_LEVEL`` (0-3) overrides the CPU level; ``default`` leaves XLA's own.
"""

from __future__ import annotations

import os
from typing import Optional

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


def for_platform(platform: str) -> Optional[dict]:
  """``compiler_options`` for ``jax.jit`` on ``platform`` (``'cpu'``, ``'gpu'``, ...)."""
  if platform != 'cpu':
    return None
  level = cpu_opt_level()
  return None if level is None else {'xla_backend_optimization_level': level}


def for_mesh(mesh) -> Optional[dict]:
  """:func:`for_platform` of the devices of ``mesh``."""
  return for_platform(mesh.devices.flat[0].platform)
