"""XLA:CPU's compile worker at a lower priority (nvae_jax.compile_priority)."""

import json
import os
import subprocess
import sys

import pytest

from nvae_jax import compile_priority

MS = 1_000_000


def _spotter(before, start):
  return compile_priority.WorkerSpotter(before, start, run_ns=50 * MS, max_gap=2, opening=3,
                                        min_work_ns=2 * MS)


def _feed(spotter, samples, excluded=frozenset()):
  """The spotter's answers to a list of samples ({tid: run time in ms})."""
  return [spotter.update({t: ms * MS for t, ms in sample.items()}, set(excluded))
          for sample in samples]


def test_spotter_takes_the_opening_thread_that_outlasts_its_helpers():
  """Thread 2 (the worker) and 3 (a helper) start together; the helper stops after 30 ms.
  Thread 4 ran during the baseline (another compile's worker), thread 1 is Python, thread 5
  (code generation) starts later and runs too."""
  spotter = _spotter({1: 0, 2: 0, 3: 0, 4: 0}, {1: 0, 2: 0, 3: 0, 4: 5 * MS})
  samples = []
  for i in range(1, 10):
    samples.append({1: 10 * i, 2: 10 * i, 3: 10 * min(i, 3), 4: 5 + 10 * i,
                    5: max(0, 10 * (i - 4))})
  answers = _feed(spotter, samples, excluded={1})
  # The helper pauses after sample 3 and counts as stopped after sample 5, when the worker has
  # run 50 ms.
  assert answers == [None] * 4 + [2] * 5


def test_spotter_gives_up_when_the_opening_threads_stop_first():
  """A small program: the worker runs 30 ms, then waits while code generation (thread 5,
  starting after the opening samples) runs; no thread is ever named."""
  spotter = _spotter({2: 0}, {2: 0})
  samples = [{2: 10 * min(i, 3), 5: max(0, 20 * (i - 3))} for i in range(1, 12)]
  assert _feed(spotter, samples) == [None] * 11
  assert spotter.gave_up


def test_spotter_ignores_blips_and_threads_born_after_the_opening():
  """Thread 6 runs 1 ms (below the work threshold) before the worker starts; thread 9 is born
  after the opening samples and never counts."""
  spotter = _spotter({2: 0, 6: 0}, {2: 0, 6: 0})
  samples = [{2: 0, 6: 1}, {2: 0, 6: 1}]
  samples += [{2: 10 * i, 6: 1} for i in range(1, 4)]
  samples += [{2: 30 + 10 * i, 6: 1, 9: 10 * i} for i in range(1, 4)]
  samples += [{2: 60 + 10 * i, 6: 1, 9: 30 + 10 * i} for i in range(1, 3)]
  # The worker opens at sample 3 and has run 50 ms at sample 7; thread 9 keeps running.
  assert _feed(spotter, samples) == [None] * 6 + [2] * 4


def test_worker_nice_setting():
  previous = compile_priority.set_worker_nice(3)
  try:
    assert compile_priority.worker_nice() == 3
    for bad in (-1, 20, 2.0, True, '10'):
      with pytest.raises(ValueError, match='compile_worker_nice'):
        compile_priority.set_worker_nice(bad)
    assert compile_priority.worker_nice() == 3
  finally:
    compile_priority.set_worker_nice(previous)
  assert compile_priority.DEFAULT_NICE == 10


@pytest.mark.parametrize('platform, nice', [('gpu', 10), ('tpu', 10), ('cpu', 0)])
def test_nothing_is_watched_off_cpu_or_at_nice_zero(platform, nice):
  with compile_priority.yielding_compile(platform, nice=nice) as watch:
    assert not watch.active
    assert watch.wait(timeout=0) is False  # nothing to wait for, nothing reniced
  assert watch.reniced == [] and watch._thread is None  # pylint: disable=protected-access


_PROBE = r'''
import json, os, threading, time
import jax, jax.numpy as jnp
from nvae_jax import compile_priority as cp

def program(n):
  def f(x):
    for i in range(n):
      x = jnp.sin(x * (i + 1)) + jnp.roll(x, i % 7) * 0.5
    return x
  return jax.jit(f).lower(jnp.ones(64))

class Recorder:
  """A lowered program that notes the nice value and the run time of the thread compiling it."""
  def __init__(self, lowered):
    self.lowered = lowered
  def compile(self):
    tid = threading.get_native_id()
    self.thread_nice = cp.thread_nice(tid)
    self.is_main = threading.current_thread() is threading.main_thread()
    start = cp.run_times()[tid]
    compiled = self.lowered.compile()
    self.thread_ran_ms = (cp.run_times()[tid] - start) / 1e6
    return compiled

jax.devices()
at_start = set(cp.run_times())
in_thread = cp.compiles_in_calling_thread()
made_by_first_compile = set(cp.run_times()) - at_start
recorder = Recorder(program(100))
before = cp.run_times()
compiled = cp.compile(recorder, 'cpu')
after = cp.run_times()
x = jnp.ones(64)
expected = x
for i in range(100):
  expected = jnp.sin(expected * (i + 1)) + jnp.roll(expected, i % 7) * 0.5
reniced = cp.reniced_threads()
worker = reniced[0] if reniced else None
a = jnp.ones((800, 800))
matmul = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
matmul(a).block_until_ready()
start = cp.run_times()
for _ in range(10):
  matmul(a).block_until_ready()
end = cp.run_times()
print(json.dumps(dict(
    in_thread=in_thread, reniced=reniced, worker_nice=cp.thread_nice(worker) if worker else None,
    worker_existed_before=worker in at_start,
    worker_made_by_first_compile=worker in made_by_first_compile,
    worker_compile_ms=(after.get(worker, 0) - before.get(worker, 0)) / 1e6,
    worker_run_ms=(end.get(worker, 0) - start.get(worker, 0)) / 1e6,
    all_run_ms=sum(ns - start.get(t, 0) for t, ns in end.items()) / 1e6,
    caller_nice=recorder.thread_nice, caller_is_main=recorder.is_main,
    caller_ran_ms=recorder.thread_ran_ms,
    nice_now=sorted({cp.thread_nice(t) for t in cp.run_times() if t != worker}),
    max_error=float(abs(compiled(x) - expected).max()))))
'''


@pytest.mark.skipif(not compile_priority.supported(), reason='needs Linux per-thread scheduling')
def test_the_compile_work_runs_at_the_nice_value():
  """In a fresh process, a compile through ``compile_priority.compile``.  Where XLA compiles on
  a worker of its own (jax 0.10), one thread is given nice 10, and it is that worker: it
  existed before the first compile (XLA's code-generation threads are made by it), it is not a
  Python thread, it worked during the compile, and it takes no part in running a program (at
  most 1 % of the run time of running one, where the threads that run it do nearly all).
  Where XLA compiles in the calling thread (jax 0.11), the compile ran, and worked, in a thread
  other than the main one at nice 10, and no thread is reniced.  Either way every thread left
  keeps nice 0, and the compiled program computes what it should."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  nice = compile_priority.DEFAULT_NICE
  run_ms = compile_priority.RUN_TO_IDENTIFY_NS / 1e6
  if r['in_thread']:
    assert r['reniced'] == [], r
    assert r['caller_nice'] == nice and not r['caller_is_main'], r
    assert r['caller_ran_ms'] >= run_ms, r
  else:
    assert len(r['reniced']) == 1, r
    assert r['worker_nice'] == nice, r
    assert r['worker_existed_before'] and not r['worker_made_by_first_compile'], r
    assert r['worker_compile_ms'] >= run_ms, r
    # Not exactly zero: an idle pool thread can wake for a moment (0.03 ms seen once, against
    # hundreds of ms of the program's own work); a thread that ran the program would have a
    # large share of that work.
    assert r['worker_run_ms'] <= 0.01 * r['all_run_ms'], r
    assert r['caller_nice'] == 0 and r['caller_is_main'], r
  assert r['nice_now'] == [0], r
  assert r['max_error'] < 1e-5


def test_compile_on_first_call_compiles_once_per_signature(monkeypatch):
  """The wrapper computes what the jitted function computes, compiles once per argument
  signature (shape, dtype) and leaves accelerators and nice 0 alone."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  jitted = jax.jit(lambda x, y: jnp.tanh(x) * y)
  assert compile_priority.compile_on_first_call(jitted, 'gpu') is jitted
  previous = compile_priority.set_worker_nice(0)
  try:
    assert compile_priority.compile_on_first_call(jitted, 'cpu') is jitted
  finally:
    compile_priority.set_worker_nice(previous)
  if not compile_priority.supported():
    pytest.skip('needs Linux per-thread scheduling')
  calls = []
  real_compile = compile_priority.compile
  monkeypatch.setattr(compile_priority, 'compile',
                      lambda lowered, platform: calls.append(platform) or real_compile(
                          lowered, platform))
  wrapped = compile_priority.compile_on_first_call(jitted, 'cpu')
  assert isinstance(wrapped, compile_priority.CompileOnFirstCall)
  x = np.linspace(-2, 2, 6, dtype=np.float32)
  for y in (np.float32(2), np.float32(3)):
    np.testing.assert_allclose(wrapped(x, y), np.tanh(x) * y, rtol=1e-6)
  assert len(calls) == 1
  np.testing.assert_allclose(wrapped(x[:4], np.float32(1)), np.tanh(x[:4]), rtol=1e-6)
  np.testing.assert_allclose(wrapped(x.astype(np.float16), np.float16(1)),
                             np.tanh(x).astype(np.float16), rtol=2e-3)
  assert calls == ['cpu'] * 3
  assert wrapped.lower(x, np.float32(1)).compile()(x, np.float32(1)) is not None
  assert len(calls) == 4  # lower(...).compile() goes through compile_priority.compile too
