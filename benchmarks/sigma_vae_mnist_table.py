r"""sigma-VAE, Table 3 (MNIST) at the paper's recipe: one resumable script for the whole table.

    nohup nice -n 10 taskset -c 1 python benchmarks/sigma_vae_mnist_table.py \
      --workdir /work/runs/sigma_table --figure docs/results/sigma_vae_mnist/table.png \
      > /work/runs/sigma_table.out 2>&1 &

Each row trains ``configs/sigma_vae_mnist.py`` unchanged (the reference code's conv VAE 32/64/128,
20-d latent, Adam 1e-3, batch 128, 4,690 steps = 10 epochs, real MNIST at 8 bits in [0, 1],
seed 0) with ``python -m nvae_jax.main``, whose checkpoints make a killed run resume where it
stopped; a row whose ``result.json`` exists is not re-run.  Rows, most informative first:

* ``optimal``: ``gaussian_optimal`` (sigma^2 = batch MSE; running average at test), beta 1;
* ``shared``: ``gaussian_shared`` (one learned log sigma), beta 1;
* ``sigma1``: ``gaussian_fixed`` (sigma = 1), beta 1;
* ``per_pixel``: ``gaussian_per_pixel`` (network sigma, softclip at -6), beta 1;
* ``beta``: ``gaussian_fixed`` sigma 1 with ``--beta`` (default 0.01, the best of the 600-step
  sweep of ``sigma_vae_mnist_sweep.py``: chosen there, not tuned at this recipe).  As that sweep
  does, it is scored with the Gaussian its loss implies, sigma^2 = beta (the minimised
  SSE / 2 + beta KL is beta times the negative ELBO of that decoder), by re-evaluating the same
  checkpoint with ``--config.model.log_sigma=0.5 ln beta``; its sigma = 1 score is kept too.

Numbers per row (nats per image of a continuous density on [0, 1]^784, lower is better):
``test_nelbo``, the negative ELBO with one posterior sample over all 10,000 test images (the
training loop's final evaluation; what the paper reports as -log p <), and ``iw_nll``, the
importance-weighted bound with K = ``--iw_k`` samples on ``--iw_split`` (with that split's own
one-sample ``iw_split_nelbo`` beside it, so the two are paired).  The figure has, per row, the
decoder-mean samples at z ~ N(0, I) and the reconstructions (rows of test images alternating with
their reconstructions) that the training loop wrote at the last step.

Progress: one line per row when it starts and ends, and one per ``--progress_every`` steps, each
with the rate and the ETA of the row and of the whole table (at the current rate).  The full log
of every command goes to ``<workdir>/table.log``; ``<workdir>/table.json`` collects the rows done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
from sigma_vae_mnist_sweep import (CONFIG, ROOT, _decoder_sigma, _last_json, _montage, _run,
                                   read_metrics)

STEPS = 4690
TEST_SIZE = 10000
PAPER = {'optimal': None, 'shared': -896.1, 'sigma1': 740.5, 'per_pixel': -2895.0,
         'beta': -796.2}
ORDER = ('optimal', 'shared', 'sigma1', 'per_pixel', 'beta')


def rows(beta: float) -> dict[str, tuple[str, float]]:
  """Row name -> (decoder, beta)."""
  return {'optimal': ('gaussian_optimal', 1.0), 'shared': ('gaussian_shared', 1.0),
          'sigma1': ('gaussian_fixed', 1.0), 'per_pixel': ('gaussian_per_pixel', 1.0),
          'beta': ('gaussian_fixed', beta)}


def _fmt_s(s: float) -> str:
  if not math.isfinite(s):
    return '?'
  s = int(s)
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def _train(cmd: list[str], log, name: str, progress_every: int, rows_after: int,
           steps: int) -> float:
  """Runs the training command, printing a progress line every ``progress_every`` steps."""
  t0 = time.time()
  log.write(f'$ {" ".join(cmd)}\n')
  log.flush()
  with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as proc:
    last = -1
    for line in proc.stdout:
      log.write(line)
      log.flush()
      m = re.match(r'step (\d+)/(\d+) \| ([\d.]+) steps/s', line.strip())
      if not m:
        continue
      step, rate = int(m.group(1)), float(m.group(3))
      if step // progress_every == last // progress_every and step != steps:
        continue
      last = step
      row_eta = (steps - step) / rate if rate > 0 else float('nan')
      table_eta = row_eta + rows_after * steps / rate if rate > 0 else float('nan')
      kl = re.search(r'\bkl ([-\d.e+]+)', line)
      sigma = re.search(r'\bsigma ([-\d.e+]+)', line)
      print(f'[{name}] step {step}/{steps} | {rate:.2f} steps/s | row ETA {_fmt_s(row_eta)} | '
            f'table ETA {_fmt_s(table_eta)} (+evals) | kl {kl.group(1) if kl else "?"} | sigma '
            f'{sigma.group(1) if sigma else "-"}', flush=True)
    rc = proc.wait()
  if rc:
    raise RuntimeError(f'[{name}] training failed ({rc}); see the log. Command: {" ".join(cmd)}')
  return time.time() - t0


def _final_eval(workdir: str, steps: int) -> tuple[dict, dict]:
  train = read_metrics(workdir, 'train')
  ev = [r for r in read_metrics(workdir, 'eval') if r.get('step') == steps]
  train, ev = (train[-1] if train else {}), (ev[-1] if ev else {})
  if not ev or ev.get('num_examples') != TEST_SIZE:
    raise RuntimeError(f'{workdir}: no evaluation at step {steps} on {TEST_SIZE} test images')
  return train, ev


def run_row(name: str, decoder: str, beta: float, args, log, rows_after: int) -> dict:
  workdir = os.path.join(args.workdir, name)
  common = [sys.executable, '-m', 'nvae_jax.main', f'--config={CONFIG}:{decoder}',
            f'--workdir={workdir}', f'--config.data.data_dir={args.data_dir}',
            f'--config.seed={args.seed}', f'--config.model.beta={beta!r}',
            f'--config.train.num_steps={args.steps}'] + args.extra.split()
  print(f'[{name}] start: decoder {decoder}, beta {beta:g}, {args.steps} steps', flush=True)
  train_s = _train(common + [
      f'--config.train.eval_every={args.steps}', '--config.train.checkpoint_every=250',
      f'--config.train.images_every={args.steps}', '--config.train.log_every=50'],
      log, name, args.progress_every, rows_after, args.steps)
  last_train, ev = _final_eval(workdir, args.steps)
  row = dict(row=name, decoder=decoder, beta=beta, steps=args.steps, seed=args.seed,
             paper=PAPER[name], test_nelbo=ev['nats_per_image'], test_recon=ev['recon_per_image'],
             test_kl=ev['kl_per_image'], num_examples=ev['num_examples'],
             last_train={k: last_train.get(k) for k in ('loss', 'nelbo', 'recon', 'kl', 'sigma')},
             train_steps_per_s=last_train.get('steps_per_sec'), train_wall_s=round(train_s, 1),
             workdir=workdir)
  sigma_override = []
  if decoder == 'gaussian_fixed' and beta != 1.0:
    log_sigma = 0.5 * math.log(beta)
    sigma_override = [f'--config.model.log_sigma={log_sigma!r}']
    calib, _ = _run(common + ['--mode=eval'] + sigma_override, log)
    calib = _last_json(calib)
    if abs(calib['kl_per_image'] - ev['kl_per_image']) > 1e-3 * max(1.0, ev['kl_per_image']):
      raise RuntimeError(f'[{name}] the KL changed under the sigma override: another checkpoint?')
    row.update(test_nelbo_sigma1=row['test_nelbo'], test_recon_sigma1=row['test_recon'],
               test_nelbo=calib['nats_per_image'], test_recon=calib['recon_per_image'],
               sigma=math.sqrt(beta))
  elif decoder == 'gaussian_fixed':
    row['sigma'] = 1.0
  elif decoder in ('gaussian_shared', 'gaussian_optimal'):
    row['sigma'] = _decoder_sigma(workdir, decoder, -6.0)
  if args.iw_k > 1:
    t0 = time.time()
    out, _ = _run(common + ['--mode=eval', f'--config.eval.split={args.iw_split}',
                            f'--config.eval.num_importance_samples={args.iw_k}',
                            f'--config.eval.importance_chunk={args.iw_chunk}'] + sigma_override,
                  log)
    iw = _last_json(out)
    row.update(iw_k=args.iw_k, iw_split=args.iw_split, iw_num_examples=iw['num_examples'],
               iw_nll=iw['nats_per_image'], iw_split_nelbo=iw['nelbo_per_image'],
               iw_wall_s=round(time.time() - t0, 1))
  with open(os.path.join(workdir, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(row, f)
  return row


def figure(results: list[dict], path: str) -> None:
  panels = []
  for r in results:
    sigma = f', sigma {r["sigma"]:.3g}' if r.get('sigma') is not None else ''
    head = f'{r["row"]} ({r["decoder"]}, beta {r["beta"]:g}{sigma})'
    score = f'-ELBO {r["test_nelbo"]:.1f}' + (f', IW {r["iw_nll"]:.1f}' if 'iw_nll' in r else '')
    panels.append((f'{head}\nsamples; {score}', os.path.join(r['workdir'], 'samples.png')))
    panels.append((f'{head}\nreconstructions (odd rows: test images)',
                   os.path.join(r['workdir'], 'recon.png')))
  _montage(panels, path, cols=2, shrink=2)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--workdir', default='/tmp/sigma_vae_mnist_table')
  p.add_argument('--data_dir', default='../shared/data/tfds')
  p.add_argument('--rows', default=','.join(ORDER), help=f'a comma-separated subset of {ORDER}')
  p.add_argument('--beta', type=float, default=0.01, help='beta of the beta-VAE row')
  p.add_argument('--steps', type=int, default=STEPS)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--iw_k', type=int, default=100)
  p.add_argument('--iw_chunk', type=int, default=10)
  p.add_argument('--iw_split', default='test[:2000]', help="e.g. 'test' for all 10,000 images")
  p.add_argument('--progress_every', type=int, default=500)
  p.add_argument('--figure', default='', help='write the samples / reconstructions figure here')
  p.add_argument('--extra', default='', help='more --config.x=y overrides, space-separated')
  args = p.parse_args(argv)
  names = [n for n in args.rows.split(',') if n]
  unknown = [n for n in names if n not in ORDER]
  if unknown or not names:
    raise ValueError(f'--rows: expected names from {ORDER}, got {args.rows!r}')
  if not 0 < args.beta:
    raise ValueError(f'--beta: expected a positive value, got {args.beta}')
  os.makedirs(args.workdir, exist_ok=True)
  # pylint: disable-next=consider-using-with
  log = open(os.path.join(args.workdir, 'table.log'), 'a', encoding='utf-8')
  table = rows(args.beta)
  results = []
  for i, name in enumerate(names):
    done = os.path.join(args.workdir, name, 'result.json')
    if os.path.exists(done):
      with open(done, encoding='utf-8') as f:
        row = json.load(f)
      print(f'[{name}] done earlier: test -ELBO {row["test_nelbo"]:.1f}', flush=True)
    else:
      decoder, beta = table[name]
      row = run_row(name, decoder, beta, args, log, rows_after=len(names) - i - 1)
      print(json.dumps(row), flush=True)
    results.append(row)
    with open(os.path.join(args.workdir, 'table.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(rows=results, command='python ' + ' '.join(sys.argv)), f, indent=1)
    if args.figure:
      figure(results, args.figure)
  print(json.dumps(dict(
      summary='test -ELBO nats/image (continuous density on [0,1]^784, lower is better)',
      table=[(r['row'], round(r['test_nelbo'], 1), r.get('iw_nll') and round(r['iw_nll'], 1),
              r['paper']) for r in results],
      command='python ' + ' '.join(sys.argv))), flush=True)


if __name__ == '__main__':
  main()
