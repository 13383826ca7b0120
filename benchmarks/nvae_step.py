r"""Train-step compile time and step time of an NVAE config, printed as one JSON line.

  python benchmarks/nvae_step.py                                   # CIFAR-10, published model
  python benchmarks/nvae_step.py --config=configs/nvae_mnist.py:small --batch_per_device=8
  python benchmarks/nvae_step.py --set model.num_groups_per_scale=10 --set precision.compute_dtype=float32

What is timed is the platform's real update (``nvae_jax.train.step.make_train_step``: forward,
loss with KL balancing and the spectral/BN regularisers, gradient, Adamax, donated state) on a
mesh over every local device, with the global batch = batch_per_device x devices, random
quantised images as input.

* ``compile_s``: lowering + XLA compilation of the update (``update.lower(...).compile()``; both
  programs when ``update_programs`` is ``two``, the CPU default, see ``train.update_programs``;
  at the same time when ``train.parallel_compile``, the default, is true), after which the freed
  heap is returned to the system as the training loop does;
* ``first_step_s``: the first call (includes the 40 power iterations of the spectral regulariser
  only in the model's first step; not a steady-state figure);
* ``step_ms``: median / min over ``--steps`` further calls, each waited for with
  ``block_until_ready``;
* ``program_temp_mb``: XLA's temporary memory of each compiled program (``memory_analysis()``),
  the memory a remat policy (``--set remat.policy=nothing_saveable``) governs;
* ``compile_cpu_s``, ``step_cpu_ms_median``: the same in process CPU time (all threads), and
  ``loadavg_1min`` before / after: on a shared CPU machine wall times depend on the other load,
  CPU times much less.

Defaults: the published per-GPU batch on accelerators; on CPU a reduced batch (``--cpu_batch``,
default 2 per device) and float32, flagged in the output (``reduced_batch: true``).

Measured (2026-11-29, jax 0.10.2, the project's 2-core CPU machine, 1 device, nothing else
running; the README's *NVAE speed and memory* has these with their commands and the history):

  config                          batch  params       compile (wall / CPU)  step median (wall / CPU)
  configs/nvae_cifar10.py         2*     130,852,480  68.6 s / 112 s        6.85 s / 12.9 s
    (same, model.scan_groups=false)                   194.4 s / 286 s       7.24 s / 13.5 s

  * reduced from the published 32 per GPU (8 GPUs, global 256); float32. No GPU was available to
    these sessions, so there is no accelerator figure yet: run the default command on one.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if '--root' in ' '.join(sys.argv):  # run another checkout (side-by-side comparisons)
  for i, a in enumerate(sys.argv):
    if a.startswith('--root'):
      ROOT = os.path.abspath(a.split('=', 1)[1] if '=' in a else sys.argv[i + 1])
      sys.path.insert(0, ROOT)


def rss_mb(field: str = 'VmRSS') -> float | None:
  """Current (VmRSS) or peak (VmHWM) resident memory of this process in MB (Linux)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith(field + ':'):
          return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    pass
  return None


def memory_stats() -> dict:
  """Peak device memory on accelerators (``device.memory_stats()``), RSS on CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  if stats:
    return {'device_peak_mb': round(stats.get('peak_bytes_in_use', 0) / 2**20, 1),
            'device_in_use_mb': round(stats.get('bytes_in_use', 0) / 2**20, 1)}
  return {}


def command_line(script: str, argv=None) -> str:
  """The command that reproduces this run: ``python <script relative to the root> <args>``."""
  return 'python ' + ' '.join([os.path.relpath(script, ROOT)] + list(
      sys.argv[1:] if argv is None else argv))


def git_commit(root: str) -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  try:
    return subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''

# The original per-GPU batch of each published config (nvae_spec.md §3); configs store the
# global batch.
PER_GPU_BATCH = {'nvae_mnist.py': 200, 'nvae_cifar10.py': 32, 'nvae_celeba64.py': 16,
                 'nvae_imagenet32.py': 24, 'nvae_celebahq256.py': 4, 'nvae_ffhq256.py': 4,
                 'nvae_celebahq256.py:24ch': 6, 'nvae_ffhq256.py:24ch': 6}


def load_config(spec: str):
  """``path.py[:arg]`` -> ``get_config(arg)`` (the ml_collections config-file convention).

  A relative path is looked up in the benchmarked checkout (``--root``) first, so that an older
  checkout runs with its own configs, then in the working directory.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isabs(path):
    in_root = os.path.join(ROOT, path)
    if os.path.exists(in_root) or not os.path.exists(path):
      path = in_root
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no config file at {path}')
  mod_spec = importlib.util.spec_from_file_location('_bench_config', path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def apply_override(config, assignment: str) -> None:
  """``a.b.c=value`` with the value parsed as the existing field's type."""
  key, sep, text = assignment.partition('=')
  if not sep:
    raise ValueError(f'--set: expected FIELD=VALUE, got {assignment!r}')
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f'--set: unknown field {key!r}')
  old = node[leaf]
  if isinstance(old, bool):
    value = text.lower() in ('1', 'true', 'yes')
  elif isinstance(old, int):
    value = int(text)
  elif isinstance(old, float):
    value = float(text)
  else:
    value = text
  node[leaf] = value


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/nvae_cifar10.py')
  parser.add_argument('--batch_per_device', type=int, default=0,
                      help='0: the config batch / its GPU count on accelerators, '
                           '--cpu_batch on CPU')
  parser.add_argument('--cpu_batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--compile_cache', default='off',
                      help="config.compile_cache ('off' by default: compile times are measured)")
  parser.add_argument('--root', default=ROOT, help='checkout to benchmark (default: this one)')
  args = parser.parse_args(argv)
  t_start = time.perf_counter()

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  try:
    from nvae_jax import progress  # pylint: disable=import-outside-toplevel
    track = progress.track
  except ImportError:  # checkouts before the progress bars
    track = lambda it, **_: it  # noqa: E731
  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  try:
    from nvae_jax.train import build  # pylint: disable=import-outside-toplevel
  except ImportError:  # checkouts before the restructuring
    from nvae_jax.train import setup as build  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  config = load_config(args.config)
  platform = jax.devices()[0].platform
  ndev = jax.device_count()
  published_global = int(config.data.batch_size)
  reduced = False
  if args.batch_per_device:
    per_device = args.batch_per_device
  elif platform == 'cpu':
    per_device = args.cpu_batch
    reduced = True
    config.precision.compute_dtype = 'float32'
  else:
    per_device = PER_GPU_BATCH.get(os.path.basename(args.config),
                                   max(1, published_global // ndev))
  for assignment in args.set:
    apply_override(config, assignment)
  config.data.batch_size = per_device * ndev
  config.data.eval_batch_size = per_device * ndev
  if 'compile_cache' in config:
    config.compile_cache = args.compile_cache

  run = build.build(config)
  shape = tuple(image_shape(config.data))
  spec = build.batch_spec(shape, config.data.batch_size)
  t0 = time.perf_counter()
  abstract, shardings = build.abstract_state(run, spec)
  abstract_s = time.perf_counter() - t0
  parallel_compile = bool(config.train.get('parallel_compile', False))
  if 'update_programs' in config.train:
    programs = step_lib.resolve_update_programs(config.train.update_programs, platform)
    # Checkouts before train.parallel_compile take no such argument.
    extra = (parallel_compile,) if 'parallel_compile' in config.train else ()
    update = step_lib.make_train_step(run.task, run.tx, run.schedule, run.mesh, shardings,
                                      programs, *extra)
  else:  # checkouts before the two-program update
    programs = 'one'
    update = step_lib.make_train_step(run.task, run.tx, run.schedule, run.mesh, shardings)

  levels = 2 if config.data.binarize != 'none' else 2**int(config.data.num_bits)
  rng = np.random.default_rng(0)
  host = {'image': (rng.integers(0, levels, (config.data.batch_size,) + shape)
                    / (levels - 1)).astype(np.float32),
          'mask': np.ones((config.data.batch_size,), np.float32)}
  batch = step_lib.put_batch(host, run.mesh)

  load_before = os.getloadavg()[0]
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = update.lower(abstract, batch).compile()
  compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  rss_after_compile = rss_mb('VmHWM')
  try:  # as the training loop does after its compile
    from nvae_jax import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.release_freed_heap()
  except ImportError:  # checkouts before it
    pass

  t0 = time.perf_counter()
  if 'shardings' in inspect.signature(build.init_state).parameters:  # older checkouts
    state = build.init_state(run, batch, shardings)
  else:
    state, _ = build.init_state(run, batch)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - t0
  times, cpu = [], []
  for _ in track(range(args.steps), desc='timed steps', unit='step'):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  loss = float(metrics['loss'])
  start_to_step_s = time.perf_counter() - t_start
  # Read before memory_analysis(), which itself leaves about 90 MB more resident on XLA:CPU.
  peak_rss, rss_end = rss_mb('VmHWM'), rss_mb('VmRSS')

  out = dict(
      benchmark='nvae_step', device=str(jax.devices()[0].device_kind), platform=platform,
      num_devices=ndev, jax_version=jax.__version__, config=args.config,
      overrides=args.set, batch_per_device=per_device, global_batch=config.data.batch_size,
      published_global_batch=published_global, reduced_batch=reduced,
      compute_dtype=config.precision.compute_dtype, remat=config.remat.policy,
      update_programs=programs, parallel_compile=parallel_compile,
      compile_low_memory=bool(config.get('compile_low_memory', False)),
      compile_worker_nice=int(config.get('compile_worker_nice', 0)),
      compile_workers_reniced=_reniced_count(),
      image_shape=list(shape), params=state_lib.num_params(abstract['params']),
      commit=git_commit(args.root), abstract_state_s=round(abstract_s, 2),
      init_s=round(init_s, 2),
      compile_s=round(compile_s, 2), compile_cpu_s=round(compile_cpu_s, 2),
      first_step_s=round(first_step_s, 3),
      step_ms_median=round(1e3 * statistics.median(times), 1),
      step_ms_min=round(1e3 * min(times), 1), steps_timed=len(times),
      step_cpu_ms_median=round(1e3 * statistics.median(cpu), 1),
      cpu_count=os.cpu_count(), loadavg_1min=[round(load_before, 2),
                                              round(os.getloadavg()[0], 2)],
      images_per_s=round(config.data.batch_size / statistics.median(times), 2),
      loss_finite=bool(np.isfinite(loss)), loss=round(loss, 4),
      program_temp_mb=program_temp_mb(compiled),
      peak_rss_mb=peak_rss, peak_rss_after_compile_mb=rss_after_compile,
      rss_end_mb=rss_end, script_s=round(start_to_step_s, 1), **memory_stats(),
      command=command_line(__file__, argv))
  print(json.dumps(out), flush=True)
  return out


def program_temp_mb(compiled) -> dict | None:
  """XLA's temporary memory of each compiled program in MB (``memory_analysis()``): what a
  remat policy governs, and on accelerators the part of device memory beyond the state."""
  if hasattr(compiled, 'gradients'):  # the two-program update
    programs = {'gradients': compiled.gradients, 'optimizer': compiled.apply}
  else:
    programs = {'update': compiled}
  out = {}
  for name, program in programs.items():
    try:
      analysis = program.memory_analysis()
    except Exception:  # pylint: disable=broad-except  # a backend without the analysis
      return None
    if analysis is None:
      return None
    out[name] = round(analysis.temp_size_in_bytes / 2**20, 1)
  return out


def _reniced_count():
  """How many XLA compile workers were given the nice value (None for checkouts without it)."""
  try:
    from nvae_jax import compile_priority  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return len(compile_priority.reniced_threads())


if __name__ == '__main__':
  main()
