r"""Training-step time of the sigma-VAE conv VAE with either up-sampling formulation, side by side.

    python benchmarks/conv_vae_upsample.py [--batch_size 128] [--channels 32,64,128] [--repeats 5]

Both formulations of the decoder's stride-2 layers (see ``nvae_jax.models.conv_vae``): 'transpose'
(``nn.ConvTranspose``, 4x4, stride 2) and 'subpixel' (``Upsample2x``: the same kernel rearranged
into a 3x3 convolution, then depth-to-space).  They share one parameter tree, so the same
parameters and the same batch feed both; the script checks that their losses and gradients agree,
then times the jitted value-and-gradient of the training loss (what one optimiser step costs,
less the Adam update), alternating the two formulations ``--repeats`` times (so that load from
other processes hits both alike), each timing the mean of ``--steps`` calls.  Prints one JSON
line: device, config, command, per-formulation median seconds per step and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from nvae_jax.config import files as config_files
from nvae_jax.models import build_task
from nvae_jax.models import conv_vae

sigma_vae_mnist = config_files.load_module(os.path.join(ROOT, 'configs', 'sigma_vae_mnist.py'),
                                           'sigma_vae_mnist')

FORMULATIONS = ('transpose', 'subpixel')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--channels', default='32,64,128')
  p.add_argument('--decoder', default='gaussian_optimal')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps', type=int, default=5, help='calls per timing')
  args = p.parse_args(argv)
  config = sigma_vae_mnist.get_config(args.decoder)
  config.model.channels = tuple(int(c) for c in args.channels.split(','))
  task = build_task(config)
  rng = np.random.default_rng(0)
  shape = (args.batch_size, 28, 28, 1)
  batch = {'image': jnp.asarray(rng.integers(0, 256, shape) / 255.0, jnp.float32),
           'label': jnp.zeros((args.batch_size,), jnp.int32)}
  variables = jax.jit(task.init)(jax.random.key(0), batch)
  base = task._module(shape[1:])  # pylint: disable=protected-access
  eps = jnp.asarray(rng.normal(size=(args.batch_size, task.latent_dim)), jnp.float32)
  state = {k: v for k, v in variables.items() if k != 'params'}

  def step_fn(module):
    def loss(params):
      (log_px, kl), _ = module.apply({'params': params, **state}, batch['image'], eps, True,
                                     mutable=list(task.mutable_collections) + ['intermediates'])
      return jnp.mean(kl - log_px)
    return jax.jit(jax.value_and_grad(loss))

  fns, compile_s = {}, {}
  for name in FORMULATIONS:
    fns[name] = step_fn(base.clone(upsample=name))
    t0 = time.perf_counter()
    jax.block_until_ready(fns[name](variables['params']))
    compile_s[name] = time.perf_counter() - t0
  (l_a, g_a), (l_b, g_b) = (fns[n](variables['params']) for n in FORMULATIONS)
  grad_err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                 for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)))
  if abs(float(l_a) - float(l_b)) > 1e-4 * abs(float(l_b)) or grad_err > 1e-4:
    raise RuntimeError(f'the formulations disagree: loss {float(l_a)} vs {float(l_b)}, max '
                       f'relative gradient error {grad_err}')
  times = {n: [] for n in FORMULATIONS}
  for _ in range(args.repeats):
    for name in FORMULATIONS:
      t0 = time.perf_counter()
      for _ in range(args.steps):
        out = fns[name](variables['params'])
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / args.steps)
  med = {n: statistics.median(t) for n, t in times.items()}
  print(json.dumps(dict(
      benchmark='conv_vae_upsample', device=str(jax.devices()[0]),
      platform=f'{platform.machine()} {os.cpu_count()} CPUs',
      cpus_used=len(os.sched_getaffinity(0)), jax=jax.__version__,
      config=dict(config='configs/sigma_vae_mnist.py', decoder=args.decoder,
                  batch_size=args.batch_size, channels=list(config.model.channels),
                  image=list(shape[1:])),
      measured='jit(value_and_grad(loss)) seconds per call, median of repeats, alternating',
      seconds_per_step={n: round(v, 4) for n, v in med.items()},
      all_seconds={n: [round(v, 4) for v in t] for n, t in times.items()},
      compile_s={n: round(v, 2) for n, v in compile_s.items()},
      speedup=round(med['transpose'] / med['subpixel'], 2),
      max_relative_gradient_difference=grad_err,
      command='python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))))


if __name__ == '__main__':
  main()
