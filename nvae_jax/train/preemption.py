"""Preemption: SIGTERM/SIGINT ask the train loop to stop cleanly instead of killing it.

SLURM (before a requeue or at the time limit, with ``--signal``), Kubernetes and Cloud TPU
maintenance send SIGTERM some seconds before killing a job; Ctrl-C sends SIGINT.  While
:func:`handle_stop_signals` is active, such a signal only sets a flag: the loop finishes the step
it is in, writes a checkpoint of that step (waiting for the write to finish), closes its writers
and returns ``{'preempted': 'SIGTERM', ...}``; ``nvae-jax`` then exits with status
:data:`~nvae_jax.errors.PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``), which ``launch/slurm_gpu.sbatch``
turns into a requeue.  The restarted run resumes from that step, bit-identically.

A second signal while stopping restores the default handler and re-sends itself (an impatient
Ctrl-C still kills).  In multi-process runs each process may see the signal at a different step,
so the processes agree on stopping with one small all-gather per step (``any`` of the flags);
single-process runs do not synchronise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """The flag set by the handlers: ``signal_name`` is None until a stop signal arrives."""

  def __init__(self):
    self.signal_name: str | None = None

  def requested(self) -> bool:
    """Whether to stop after this step; collective (the same answer on every process)."""
    import jax  # pylint: disable=import-outside-toplevel
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(local))
    if np.any(flags) and self.signal_name is None:
      self.signal_name = 'SIGTERM (on another process)'
    return bool(np.any(flags))


@contextlib.contextmanager
def handle_stop_signals() -> Iterator[StopRequest]:
  """Installs the SIGTERM/SIGINT flag handlers for the ``with`` block (main thread only).

  Outside the main thread (where Python cannot install handlers) the request never fires.
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return

  def handler(signum, _frame):
    if request.signal_name is not None:  # the second signal: give up on stopping cleanly
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    request.signal_name = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
