r"""NVAE sampling speed: milliseconds per image of ``task.sample`` (prior -> decoder -> image).

  python benchmarks/nvae_sample.py                                  # CelebA-HQ 256, batch 36
  python benchmarks/nvae_sample.py --config=configs/nvae_mnist.py:small --batch=4 --runs=3

The paper reports 56 ms/image for the 256x256 CelebA-HQ model at batch 36 on a Titan V.  The
variables are freshly initialised (``init_host``: the speed does not depend on the weights); the
sampler is the jitted ``task.sample`` at the config's temperature and compute dtype (``--set``
overrides fields, e.g. ``--set precision.compute_dtype=float32``).  Prints one JSON line:
``compile_s``, ``ms_per_image`` (median over ``--runs`` calls / batch), ``batch``, the device,
peak memory (``device.memory_stats()`` on accelerators, RSS on CPU) and the command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_bench():
  """benchmarks/nvae_step.py as a module (config loading, overrides, memory figures)."""
  spec = importlib.util.spec_from_file_location(
      '_nvae_step_bench', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nvae_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/nvae_celebahq256.py')
  parser.add_argument('--batch', type=int, default=36)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--compile_cache', default='off')
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel

  bench = _step_bench()
  load_config, apply_override = bench.load_config, bench.apply_override
  from nvae_jax.data import image_shape  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import build  # pylint: disable=import-outside-toplevel

  config = load_config(args.config)
  for assignment in args.set:
    apply_override(config, assignment)
  config.compile_cache = args.compile_cache
  run = build.build(config)
  shape = tuple(image_shape(config.data))
  variables = run.task.init_host(config.seed, build.batch_spec(shape, 2))
  variables = jax.device_put({k: v for k, v in variables.items() if k != 'spectral'})
  temperature = float(config.sample.temperature)
  sampler = jax.jit(lambda v, key: run.task.sample(v, key, args.batch, temperature))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = sampler.lower(variables, key).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, key))
  times = []
  for i in range(args.runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t0)
  dev = jax.devices()[0]
  out = dict(benchmark='nvae_sample', device=str(dev.device_kind), platform=dev.platform,
             jax_version=jax.__version__, config=args.config, overrides=args.set,
             image_shape=list(shape), batch=args.batch, temperature=temperature,
             compute_dtype=config.precision.compute_dtype, compile_s=round(compile_s, 2),
             ms_per_image=round(1e3 * statistics.median(times) / args.batch, 2),
             batch_ms_median=round(1e3 * statistics.median(times), 1), runs=args.runs,
             commit=bench.git_commit(ROOT), peak_rss_mb=bench.rss_mb('VmHWM'),
             **bench.memory_stats(),
             command=bench.command_line(__file__, argv))
  print(json.dumps(out), flush=True)
  return out


if __name__ == '__main__':
  main()
