"""Handing the compiler's freed heap back to the operating system.

Compiling a large program (NVAE's train step) makes XLA:CPU allocate and free on the order of a
gigabyte of small heap blocks.  glibc's ``malloc`` keeps freed blocks inside the process for
reuse, so without help the resident set stays at the compiler's peak for the whole run, and the
step's own buffers (allocated later, and large enough to be mapped separately) come on top of it.
``malloc_trim(0)`` returns the free pages to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  name = ctypes.util.find_library('c')
  if not name:
    return None
  try:
    return ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError):  # not glibc (musl, macOS)
    return None


def release_freed_heap() -> bool:
  """Returns the process's free heap pages to the system; False where libc has no malloc_trim."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
