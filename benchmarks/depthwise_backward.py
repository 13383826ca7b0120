r"""Speed of NVAE's 5x5 depthwise convolution and its gradients, one JSON line per shape and impl.

For inputs ``[B, H, W, C]`` (the shapes of mnist_tiny's MBConv cells at batch 32 by default) and a
5x5 kernel with padding 2, for both ``depthwise_impl`` values:

* ``lax``: XLA's grouped convolution, gradients by autodiff;
* ``shift``: the sum of 25 shifted slices with its own backward pass (``nvae_jax/nn/conv.py``:
  dx as the flipped-kernel shift convolution, dW as one per-image reduction over all 25 lags).

Reported: ``forward_ms`` (``y = conv(x, k)``), ``backward_ms`` (both gradients of
``sum(conv(x, k) * g)``, the forward included), ``kernel_grad_ms`` (dW alone), medians over
``--runs`` jitted calls in wall milliseconds, with the median process CPU milliseconds beside each.

  python benchmarks/depthwise_backward.py
  python benchmarks/depthwise_backward.py --shapes 32x32x32x96,32x16x16x192 --runs 30
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

from nvae_jax.nn import conv

DEFAULT_SHAPES = '32x32x32x96,32x16x16x192,32x8x8x384'


def _time(fn, *args, runs: int) -> tuple[float, float]:
  """Median (wall ms, process CPU ms) of the compiled ``fn(*args)``."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  wall, cpu = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    wall.append(1e3 * (time.perf_counter() - t0))
    cpu.append(1e3 * (time.process_time() - c0))
  return round(statistics.median(wall), 2), round(statistics.median(cpu), 2)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default=DEFAULT_SHAPES, help='comma-separated BxHxWxC')
  parser.add_argument('--runs', type=int, default=15)
  args = parser.parse_args(argv)
  keys = jax.random.split(jax.random.key(0), 3)
  dev = jax.devices()[0]
  for spec in args.shapes.split(','):
    shape = tuple(int(v) for v in spec.split('x'))
    if len(shape) != 4:
      raise SystemExit(f'--shapes: expected BxHxWxC, got {spec!r}')
    x = jax.random.normal(keys[0], shape)
    k = jax.random.normal(keys[1], (5, 5, 1, shape[-1]))
    g = jax.random.normal(keys[2], shape)
    for impl in ('lax', 'shift'):
      def forward(x, k, impl=impl):
        return conv.depthwise_conv(x, k, padding=2, impl=impl)

      def both_grads(x, k, forward=forward):
        return jax.grad(lambda x, k: jnp.sum(forward(x, k) * g), argnums=(0, 1))(x, k)

      def kernel_grad(x, k, forward=forward):
        return jax.grad(lambda k: jnp.sum(forward(x, k) * g))(k)

      fwd, bwd, kgrad = (_time(f, x, k, runs=args.runs)
                         for f in (forward, both_grads, kernel_grad))
      print(json.dumps(dict(
          benchmark='depthwise_backward', device=f'{dev.platform}:{dev.device_kind}',
          jax=jax.__version__, config=dict(shape=list(shape), kernel=5, padding=2, impl=impl,
                                           runs=args.runs),
          loadavg_1m_at_start=round(os.getloadavg()[0], 2),
          command='python ' + ' '.join([sys.argv[0]] + list(argv or sys.argv[1:])),
          forward_ms=fwd[0], forward_cpu_ms=fwd[1], backward_ms=bwd[0], backward_cpu_ms=bwd[1],
          kernel_grad_ms=kgrad[0], kernel_grad_cpu_ms=kgrad[1])), flush=True)


if __name__ == '__main__':
  main()
