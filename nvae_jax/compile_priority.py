"""XLA:CPU's compile worker at a lower scheduling priority than its code generation (Linux).

Why.  XLA:CPU compiles a program on a worker thread of its own while the calling Python thread
waits.  After the HLO passes, the worker emits each distinct fused kernel as MLIR and hands it
to the code-generation pool (one thread per core), which lowers it to LLVM IR with a compiler
instance of its own: a fresh MLIR context with every dialect loaded, about 2 MB.  Emitting a
kernel is cheaper than lowering it, so on a machine with few cores the emitted kernels queue
up, each holding an instance: mnist_tiny's gradient program (1,310 kernels) gains 1.3 GB at its
compile's peak on 2 cores.  With the worker at nice +10 (scheduler weight 110 against the
code-generation threads' 1024), the kernel scheduler runs it only when lowering leaves a core
free, so emission keeps pace with lowering.  The compile does the same work in about the same
time, the executable is the same, and the peak is 0.8-1.1 GB lower (README, *NVAE speed and
memory*).

Which thread is the worker.  With jax 0.11 XLA compiles in the calling thread, so the compile
runs in a short-lived thread of ours that takes the nice value.  With jax 0.10 XLA takes a
worker from a pool of its own for each compile, so every compile is watched
(:class:`yielding_compile`): the run time of every thread of the process
(``/proc/self/task/<tid>/schedstat``) is read just before the compile call and every few
milliseconds after it, and :class:`WorkerSpotter` names the thread that starts working first and
outlasts the helpers that start with it (the HLO passes keep the worker busy for a second or
more before code generation starts; Python threads are never candidates).  A small probe
compile tells the two apart (:func:`compiles_in_calling_thread`); it also makes XLA's
code-generation threads before anything is reniced, since a thread inherits the nice value of
the thread that creates it.  A thread's nice value cannot be lowered again without privileges,
and XLA keeps its compile workers for compiling.  The cost: while other processes
keep the cores busy, a reniced compile gets a smaller share of them.

Nothing changes where ``/proc`` or ``os.setpriority`` is missing (not Linux), on accelerators,
with ``nice`` 0, or when no thread qualifies (a persistent-cache hit compiles nothing; a small
program is through its HLO passes before its worker can be told from its helpers).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax import collector

DEFAULT_NICE = 10
MAX_NICE = 19
RUN_TO_IDENTIFY_NS = 250_000_000  # 0.25 s of run time
BASELINE_S = 0.01  # a thread that runs during this window before the call is not a candidate
POLL_S = 0.005
# How long start_compile waits for the worker to show (it starts once the program is hashed for
# the compilation cache; a cache hit never shows one).
FIND_WORKER_S = 3.0
_TASKS = '/proc/self/task'

_nice = DEFAULT_NICE
_reniced: set[int] = set()


def set_worker_nice(nice: int) -> int:
  """Sets the nice value given to XLA:CPU's compile worker (0 = leave it alone), process-wide
  (``train.build.build`` sets it from ``config.compile_worker_nice``).  Returns the previous
  value."""
  global _nice
  if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= MAX_NICE:
    raise ValueError(f'compile_worker_nice: expected an int in 0..{MAX_NICE}, got {nice!r}')
  previous, _nice = _nice, nice
  return previous


def worker_nice() -> int:
  """The nice value given to XLA:CPU's compile worker (0: none)."""
  return _nice


def reniced_threads() -> list[int]:
  """The thread ids this process has given the compile worker's nice value so far."""
  return sorted(_reniced)


def supported() -> bool:
  """Whether this system exposes per-thread run times and per-thread priorities (Linux)."""
  return hasattr(os, 'setpriority') and os.path.exists(f'{_TASKS}/{threading.get_native_id()}'
                                                       '/schedstat')


def thread_nice(tid: int) -> int:
  """The nice value of thread ``tid`` of this process."""
  return os.getpriority(os.PRIO_PROCESS, tid)


def run_times() -> dict[int, int]:
  """Nanoseconds each thread of this process has run so far, by thread id."""
  times = {}
  for name in os.listdir(_TASKS):
    try:
      with open(f'{_TASKS}/{name}/schedstat') as f:
        times[int(name)] = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # the thread ended meanwhile
      continue
  return times


def _probe_program(n: int = 30):
  """A small program that no persistent compilation cache holds: a constant drawn per process
  makes its cache key new (it compiles in well under the cache's 0.5 s threshold, so it is not
  written either), and a cache hit would time a load instead of a compile."""
  salt = float(np.random.default_rng().random())

  def f(x):
    for i in range(n):
      x = jnp.sin(x * (i + 1) + salt) + x[::-1] * 0.5
    return x
  return jax.jit(f).lower(jax.device_put(np.ones(16, np.float32), jax.devices('cpu')[0]))


@functools.lru_cache(maxsize=1)
def compiles_in_calling_thread() -> bool:
  """Whether XLA:CPU compiles in the thread that asks for the compile (jax 0.11) rather than
  on a worker of its own (jax 0.10).  Compiles a small program in a new thread and sees which
  thread did the work.  It runs before anything is reniced, so XLA's code-generation threads
  exist at nice 0 from then on: XLA makes them on the first compile that needs them, and a
  thread inherits the nice value of the thread that creates it."""
  lowered = _probe_program()
  box = {}

  def run():
    tid = threading.get_native_id()
    before = run_times()
    lowered.compile()
    after = run_times()
    box['own'] = after[tid] - before[tid]
    box['all'] = sum(after.values()) - sum(before.values())

  thread = threading.Thread(target=run, name='nvae_jax-compile-probe')
  thread.start()
  thread.join()
  # jax 0.10: the caller's share is about 3 %; jax 0.11: 35-45 % (the rest is code generation).
  return box['own'] > 0.2 * box['all']


def _renice(tid: int, nice: int) -> None:
  """Raises thread ``tid``'s nice value to ``nice`` (never lowers it)."""
  os.setpriority(os.PRIO_PROCESS, tid, max(nice, thread_nice(tid)))


def _python_threads() -> set[int]:
  return {t.native_id for t in threading.enumerate() if t.native_id is not None}


class WorkerSpotter:
  """Finds the compile worker in successive samples of the threads' run times (``run_times()``).

  The threads that start working within ``opening`` samples of the first one (working: at least
  ``min_work_ns`` in one sample interval) are the compile's opening set: the worker and the
  helpers that convert the program with it.  Code-generation threads start later, once kernels
  are emitted.  The helpers stop after a fraction of a second; the worker runs through the HLO
  passes for a second or more.  So the worker is the member of the opening set that has run
  ``run_ns`` while every other member has paused (``max_gap`` samples in a row without run time).
  If every member pauses first (a program small enough to have finished its passes), there is
  no answer: a compile that short gains nothing.  Candidates: not running during the baseline
  (``before`` and ``start``: two samples just before the call; another compile's worker, say)
  and not in ``excluded`` (Python threads, workers already found).
  """

  def __init__(self, before: dict[int, int], start: dict[int, int],
               run_ns: int = RUN_TO_IDENTIFY_NS, max_gap: int = 4, opening: int = 10,
               min_work_ns: int = 2_000_000):
    self.busy_before = {tid for tid, ns in start.items() if ns > before.get(tid, ns)}
    self.run_ns, self.max_gap, self.opening, self.min_work_ns = (run_ns, max_gap, opening,
                                                                 min_work_ns)
    self._start = dict(start)
    self._last = dict(start)
    self._sample = 0
    self._opened_at: Optional[int] = None
    self._members: set[int] = set()
    self._idle: dict[int, int] = {}
    self.gave_up = False

  def update(self, now: dict[int, int], excluded: set[int]) -> Optional[int]:
    """Takes the next sample; returns the worker's thread id once one qualifies, else None."""
    if self.gave_up:
      return None
    self._sample += 1
    for tid, ns in now.items():
      if tid in self.busy_before or tid in excluded:
        continue
      ran = ns - self._last.get(tid, 0)  # a thread born since the last sample: all its run time
      opening = self._opened_at is None or self._sample - self._opened_at < self.opening
      if ran >= self.min_work_ns and opening and tid not in self._members:
        self._members.add(tid)
        self._opened_at = self._sample if self._opened_at is None else self._opened_at
      if tid in self._members:
        self._idle[tid] = 0 if ran > 0 else self._idle[tid] + 1
    self._last = dict(now)
    running = [tid for tid in self._members
               if tid in now and tid not in excluded and self._idle[tid] < self.max_gap]
    if not running:
      self.gave_up = self._opened_at is not None
      return None
    if len(running) == 1 and now[running[0]] - self._start.get(running[0], 0) >= self.run_ns:
      return running[0]
    return None


class yielding_compile:  # pylint: disable=invalid-name  (used as a context manager)
  """``with yielding_compile(platform): lowered.compile()``: gives XLA:CPU's compile worker the
  process-wide nice value while the compile runs (see the module docstring).

  One compile call may start inside the block: the watch ends when its worker is found.
  ``reniced``: the thread ids given the nice value.  :meth:`wait` blocks until the worker is
  found (or ``future``, a compile running in another thread, is done).
  """

  def __init__(self, platform: str, nice: Optional[int] = None):
    self.nice = worker_nice() if nice is None else nice
    self.active = _active(platform, self.nice)
    self.reniced: list[int] = []
    self._settled = threading.Event()  # the worker is found, or there is none to find
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    if not self.active:
      self._settled.set()
      return self
    compiles_in_calling_thread()
    before = run_times()
    time.sleep(BASELINE_S)
    start = run_times()
    self._thread = threading.Thread(target=self._watch, args=(before, start), daemon=True,
                                    name='nvae_jax-compile-priority')
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    return False

  def wait(self, future=None, timeout: Optional[float] = None) -> bool:
    """Blocks until the worker is found (or known not to show), ``future`` is done, or
    ``timeout`` seconds passed; returns whether a worker was reniced."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not self._settled.wait(POLL_S):
      if future is not None and future.done():
        break
      if deadline is not None and time.monotonic() > deadline:
        break
    return bool(self.reniced)

  def _watch(self, before, start):
    spotter = WorkerSpotter(before, start)
    while not self._stop.wait(POLL_S):
      tid = spotter.update(run_times(), _python_threads() | _reniced)
      if spotter.gave_up:
        self._settled.set()
        return
      if tid is None:
        continue
      try:
        _renice(tid, self.nice)
      except OSError:  # it ended, or the system refused: leave it as it is
        pass
      else:
        self.reniced.append(tid)
        _reniced.add(tid)
      self._settled.set()
      return


def _active(platform: str, nice: Optional[int] = None) -> bool:
  """Whether compiles for ``platform`` get a nice value (``nice``, default the process-wide
  one)."""
  nice = worker_nice() if nice is None else nice
  return platform == 'cpu' and nice > 0 and supported()


def start_compile(lowered, platform: str) -> concurrent.futures.Future:
  """Starts ``lowered.compile()`` in a new thread, with XLA:CPU's compile work at the
  process-wide nice value; returns its future.  Where XLA compiles on a worker of its own, this
  returns once the worker is found (at most ``FIND_WORKER_S``), so that a compile started next
  is watched alone."""
  future = concurrent.futures.Future()
  if not _active(platform):
    nice = 0
  elif compiles_in_calling_thread():
    nice = worker_nice()
  else:
    with yielding_compile(platform) as watch:
      _run_in_thread(lowered.compile, future, 0)
      watch.wait(future, timeout=FIND_WORKER_S)
    return future
  _run_in_thread(lowered.compile, future, nice)
  return future


def compile(lowered, platform: str):  # pylint: disable=redefined-builtin
  """``lowered.compile()`` with XLA:CPU's compile work at the process-wide nice value: in a
  thread of its own that takes the nice value and ends with the compile (XLA compiling in the
  calling thread), or under :class:`yielding_compile` (XLA compiling on a worker).  Python's
  garbage collector is paused meanwhile (:mod:`nvae_jax.collector`)."""
  with collector.paused():
    if not _active(platform):
      return lowered.compile()
    if not compiles_in_calling_thread():
      with yielding_compile(platform):
        return lowered.compile()
    future = concurrent.futures.Future()
    _run_in_thread(lowered.compile, future, worker_nice())
    return future.result()


def _run_in_thread(fn, future: concurrent.futures.Future, nice: int) -> None:
  def run():
    try:
      if nice:
        _renice(threading.get_native_id(), nice)
      future.set_result(fn())
    except BaseException as e:  # pylint: disable=broad-except  (handed to the caller)
      future.set_exception(e)

  threading.Thread(target=run, name='nvae_jax-compile', daemon=True).start()


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((np.shape(x), np.result_type(x) if not hasattr(x, 'dtype') else x.dtype,
                         bool(getattr(x, 'weak_type', False))) for x in leaves)


class CompileOnFirstCall:
  """``jitted`` with each of its compiles through :func:`compile`.

  A call with arguments of a new signature (tree structure, shapes, dtypes) lowers the program,
  compiles it with :func:`compile` and keeps the compiled program for later calls of that
  signature.
  ``lower(*args).compile()`` is :func:`compile` too.  (A plain first call of a jitted
  function compiles inside the call, where the watch would also see the threads that run the
  program.)
  """

  def __init__(self, jitted, platform: str):
    self.jitted, self.platform = jitted, platform
    self._compiled = {}

  def __call__(self, *args):
    key = _signature(args)
    compiled = self._compiled.get(key)
    if compiled is None:
      with collector.paused():
        lowered = self.jitted.lower(*args)
      compiled = self._compiled[key] = compile(lowered, self.platform)
    return compiled(*args)

  def lower(self, *args):
    with collector.paused():
      return _WatchedLowered(self.jitted.lower(*args), self.platform)


class _WatchedLowered:
  """A ``jax.stages.Lowered`` whose ``compile()`` is :func:`compile`."""

  def __init__(self, lowered, platform: str):
    self._lowered, self._platform = lowered, platform

  def compile(self):
    return compile(self._lowered, self._platform)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


def compile_on_first_call(jitted, platform: str):
  """``jitted`` itself where nothing would be reniced (accelerators, nice 0, not Linux), else a
  :class:`CompileOnFirstCall` of it."""
  if not _active(platform):
    return jitted
  return CompileOnFirstCall(jitted, platform)
