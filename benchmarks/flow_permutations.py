r"""Speed of the flow mixing layers: forward, inverse and one-step sampling, one JSON line each.

For every ``config.model.permutation`` of the Glow model (``reverse``, ``shuffle``, ``conv1x1``,
``plu``, ``qr``, ``emerging``, ``periodic``) on inputs of shape ``[batch, size, size, channels]``:

* ``forward_ms``: the mixing layer(s) of one flow step, ``y, logdet = layer(x)``;
* ``inverse_ms``: their inverse ``layer(y, reverse=True)`` (for ``emerging``: the wavefront scan);
* ``sample_step_ms``: the inverse of a whole flow step (coupling -> mixing -> actnorm, coupling
  width ``--width``), i.e. the per-step cost of sampling;
* ``*_compile_s``: lowering + compilation time of each function.

One extra line, ``emerging_naive``, times the per-pixel raster-order inverse of the emerging
convolution (``nvae_jax.flows.emerging.naive_inverse``) on the same input.  Times are medians over
``--runs`` jitted calls after compilation (``block_until_ready``), in milliseconds.

  python benchmarks/flow_permutations.py                           # batch 16, 32x32x12
  python benchmarks/flow_permutations.py --batch 64 --size 16 --channels 48 --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from nvae_jax import progress
from nvae_jax.flows.emerging import naive_inverse
from nvae_jax.models import glow


class _Mixing(glow.FlowStep):
  """Only the mixing layer(s) of a flow step."""

  def __call__(self, x, reverse=False):
    layers = self.mixers[::-1] if reverse else self.mixers
    logdet = jnp.zeros(x.shape[:1], jnp.float32)
    for layer in layers:
      x, ld = layer(x, reverse=reverse)
      logdet = logdet + ld
    return x, logdet


def _time(fn, *args, runs: int) -> tuple[float, float]:
  """(compile seconds, median milliseconds per call) of ``jax.jit(fn)(*args)``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return compile_s, statistics.median(times)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--size', type=int, default=32, help='height = width')
  p.add_argument('--channels', type=int, default=12)
  p.add_argument('--width', type=int, default=64, help='coupling network width (sample_step)')
  p.add_argument('--kernel_size', type=int, default=3)
  p.add_argument('--runs', type=int, default=10)
  p.add_argument('--permutations', default=','.join(glow.PERMUTATIONS))
  p.add_argument('--no_naive', action='store_true', help='skip the naive emerging inverse')
  args = p.parse_args(argv)

  shape = (args.batch, args.size, args.size, args.channels)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  dev = jax.devices()[0]
  common = dict(shape=list(shape), width=args.width, kernel_size=args.kernel_size,
                runs=args.runs, device=f'{dev.platform}:{dev.device_kind}',
                num_devices=jax.device_count(), jax=jax.__version__,
                loadavg_1m_at_start=round(os.getloadavg()[0], 2),
                command='python ' + ' '.join([sys.argv[0]] + list(argv or sys.argv[1:])))

  for perm in progress.track(args.permutations.split(','), desc='permutations', unit='layer'):
    kw = dict(index=0, permutation=perm, hidden=args.width, kernel_size=args.kernel_size)
    mixing = _Mixing(**kw)
    mv = jax.jit(mixing.init)(jax.random.key(1), x)
    step = glow.FlowStep(**kw)
    sv = jax.jit(step.init)(jax.random.key(2), x)
    y, _ = jax.jit(mixing.apply)(mv, x)
    fwd_c, fwd = _time(lambda v, a: mixing.apply(v, a), mv, x, runs=args.runs)
    inv_c, inv = _time(lambda v, a: mixing.apply(v, a, reverse=True), mv, y, runs=args.runs)
    smp_c, smp = _time(lambda v, a: step.apply(v, a, reverse=True), sv, x, runs=args.runs)
    err = float(jnp.max(jnp.abs(jax.jit(lambda v, a: mixing.apply(v, a, reverse=True)[0])(mv, y)
                                - x)))
    print(json.dumps(dict(permutation=perm, forward_ms=round(fwd, 3), inverse_ms=round(inv, 3),
                          sample_step_ms=round(smp, 3), forward_compile_s=round(fwd_c, 3),
                          inverse_compile_s=round(inv_c, 3), sample_step_compile_s=round(smp_c, 3),
                          max_abs_roundtrip_error=err, **common)), flush=True)
    if perm == 'emerging' and not args.no_naive:
      emerging = glow.make_mixers('emerging', 0, args.kernel_size)[0]
      ev = {'params': mv['params']['mixers_0']}
      ye, _ = jax.jit(emerging.apply)(ev, x)
      nai_c, nai = _time(lambda v, a: naive_inverse(emerging, v, a), ev, ye, runs=args.runs)
      err = float(jnp.max(jnp.abs(jax.jit(lambda v, a: naive_inverse(emerging, v, a)[0])(ev, ye)
                                  - x)))
      print(json.dumps(dict(permutation='emerging_naive', inverse_ms=round(nai, 3),
                            inverse_compile_s=round(nai_c, 3), max_abs_roundtrip_error=err,
                            **common)), flush=True)


if __name__ == '__main__':
  main()
