r"""Real-MNIST sweep of the flow permutations at equal steps and seed: test bits/dim per permutation.

For each permutation, trains ``configs/flow_mnist.py:<permutation>`` (2 levels x 4 steps, width 32,
native 28x28, 8-bit, batch 32, Adam 1e-3) for ``--steps`` steps with ``python -m nvae_jax.main``,
then evaluates the final checkpoint on the whole MNIST test split (10,000 images, one uniform
dequantisation sample per image) with ``--mode=eval``.  Every run uses the same seed, so the data
order and dequantisation noise are identical; only the mixing layer differs.

Prints one JSON line per permutation (test bits/dim and nats/image, parameters, wall times, the
last logged training bits/dim) and a final ``summary`` line ordering them.  Runs under ``nice``;
meant to be started in the background on 2 CPU cores:

  nohup nice -n 10 .venv/bin/python benchmarks/flow_mnist_sweep.py --steps 2000 \
    --workdir /tmp/flow_mnist_sweep > flow_mnist_sweep.jsonl 2> flow_mnist_sweep.log &

Measured (2026-11-21, jax 0.10.2, shared 2-core CPU, 2000 steps = 1.07 epochs, seed 0, one run
each; the whole sweep took 19 min wall): test bits/dim on 8-bit MNIST, 10,000 test images

  emerging 2.475 | plu 2.596 | qr 2.609 | periodic 2.627 | shuffle 2.641 | reverse 2.802 |
  conv1x1 2.813

(parameters: 31.0k reverse/shuffle, 31.3k conv1x1, 31.7k plu/qr, 33.9k periodic, 34.0k emerging).
These are short runs far from convergence with a single seed: differences of ~0.1 bits/dim are
within what seeds and optimisation noise can produce here, and the plain 1x1 conv finishing last
is not a statement about converged models.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from nvae_jax import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERMUTATIONS = ('reverse', 'shuffle', 'conv1x1', 'plu', 'qr', 'emerging', 'periodic')


def _run(cmd: list[str], log) -> tuple[str, float]:
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  log.write(f'$ {" ".join(cmd)}\n{proc.stdout}\n{proc.stderr}\n')
  log.flush()
  if proc.returncode:
    raise RuntimeError(f'command failed ({proc.returncode}): {" ".join(cmd)}\n{proc.stderr[-3000:]}')
  return proc.stdout + proc.stderr, time.time() - t0


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=2000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--workdir', default='/tmp/flow_mnist_sweep')
  p.add_argument('--data_dir', default='../shared/data/tfds')
  p.add_argument('--permutations', default=','.join(PERMUTATIONS))
  p.add_argument('--extra', default='', help='more --config.x=y overrides, space-separated')
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  log = open(os.path.join(args.workdir, 'sweep.log'), 'a', encoding='utf-8')  # pylint: disable=consider-using-with
  results = []
  for perm in progress.track(args.permutations.split(','), desc='flow sweep', unit='run'):
    workdir = os.path.join(args.workdir, perm)
    base = [sys.executable, '-m', 'nvae_jax.main', f'--config=configs/flow_mnist.py:{perm}',
            f'--workdir={workdir}', f'--config.data.data_dir={args.data_dir}',
            f'--config.seed={args.seed}'] + args.extra.split()
    train_out, train_s = _run(base + [
        f'--config.train.num_steps={args.steps}', f'--config.train.eval_every={args.steps}',
        f'--config.train.checkpoint_every={args.steps}',
        f'--config.train.images_every={args.steps}', '--config.train.log_every=100'], log)
    eval_out, eval_s = _run(base + [f'--config.train.num_steps={args.steps}', '--mode=eval'], log)
    report = json.loads([l for l in eval_out.splitlines() if l.startswith('{')][-1])
    params = re.search(r'glow: ([\d,]+) parameters', train_out)
    steps_s = re.findall(r'\| ([\d.]+) steps/s', train_out)
    train_bpd = re.findall(r'bits_per_dim ([\d.]+)', train_out)
    row = dict(permutation=perm, steps=args.steps, seed=args.seed,
               test_bits_per_dim=report['bits_per_dim'],
               test_nats_per_image=report['nats_per_image'],
               num_test_examples=report['num_examples'],
               parameters=int(params.group(1).replace(',', '')) if params else None,
               last_train_bits_per_dim=float(train_bpd[-1]) if train_bpd else None,
               train_steps_per_s=float(steps_s[-1]) if steps_s else None,
               train_wall_s=round(train_s, 1), eval_wall_s=round(eval_s, 1),
               config=f'configs/flow_mnist.py:{perm}', workdir=workdir)
    results.append(row)
    print(json.dumps(row), flush=True)
  order = sorted(results, key=lambda r: r['test_bits_per_dim'])
  print(json.dumps(dict(summary='test bits/dim, 8-bit MNIST, lower is better',
                        steps=args.steps, seed=args.seed,
                        ranking=[(r['permutation'], round(r['test_bits_per_dim'], 4))
                                 for r in order],
                        command='python ' + ' '.join(sys.argv))), flush=True)


if __name__ == '__main__':
  main()
