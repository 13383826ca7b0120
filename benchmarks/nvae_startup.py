r"""Process start -> first finished train step of ``nvae-jax --mode=train``, cold and warm cache.

  python benchmarks/nvae_startup.py --data_dir=/path/to/tfds -- \
      --config=configs/nvae_mnist.py:small --config.model.num_preprocess_blocks=2 \
      --config.model.num_preprocess_cells=2 --config.model.num_postprocess_blocks=2 \
      --config.model.num_postprocess_cells=2 --config.model.num_cell_per_cond_enc=2 \
      --config.model.num_cell_per_cond_dec=2

Everything after ``--`` is passed to ``python -m nvae_jax.main`` (plus ``--mode=train``, a fresh
``--workdir``, ``--config.train.log_every=1`` and ``--config.data.data_dir``).  The command is run
``--runs`` times with one persistent compilation cache folder (``--config.compile_cache``): the first
run starts from an empty folder (cold), the later ones reuse it (warm: the second start of the same
config).  For each run the wall time from process start to the first progress line (step 1 done)
(the first record in ``metrics.jsonl``) is measured, then the process is stopped; its peak RSS
(``VmHWM``) is read at that moment.

Prints one JSON line: ``cold_s``, ``warm_s`` (list), ``peak_rss_mb`` per run, the command, the
machine.  ``--cache_dir`` keeps the cache folder (default: a temporary one, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mb(pid: int) -> float | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    return None
  return None


def _first_train_record(workdir: str) -> bool:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      return any(json.loads(line).get('split') == 'train' for line in f if line.strip())
  except (OSError, ValueError):
    return False


def time_to_first_step(cmd: list[str], workdir: str, timeout: float, root: str = ROOT):
  """Seconds from launch until ``workdir/metrics.jsonl`` holds the first train record (step 1
  done), and the peak RSS of the process at that moment."""
  log = open(os.path.join(workdir, 'stdout.txt'), 'w', encoding='utf-8')
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1', 'PYTHONPATH': root})
  try:
    while time.perf_counter() - t0 < timeout:
      if _first_train_record(workdir):
        return time.perf_counter() - t0, _peak_rss_mb(proc.pid)
      if proc.poll() is not None:
        break
      time.sleep(0.05)
    with open(os.path.join(workdir, 'stdout.txt'), encoding='utf-8') as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'no train record in {workdir}/metrics.jsonl; output:\n{tail}')
  finally:
    proc.kill()
    proc.wait()
    log.close()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='', help='TFDS data_dir for the config')
  parser.add_argument('--runs', type=int, default=2, help='1 cold + (runs - 1) warm starts')
  parser.add_argument('--cache_dir', default='', help='compile cache folder (default: temporary)')
  parser.add_argument('--timeout', type=float, default=1800)
  parser.add_argument('--root', default=ROOT, help='checkout to run (e.g. a git worktree of an '
                      'older commit, for side-by-side comparisons)')
  parser.add_argument('--no_cache_field', action='store_true',
                      help='the checkout predates config.compile_cache: do not pass it')
  parser.add_argument('rest', nargs='*', help='after --: arguments of nvae_jax.main')
  args = parser.parse_args(argv)

  cache = args.cache_dir or tempfile.mkdtemp(prefix='nvae_jax_cache_')
  fresh_cache = not args.cache_dir
  results = []
  try:
    for run in range(args.runs):
      workdir = tempfile.mkdtemp(prefix='nvae_jax_startup_')
      cmd = ([sys.executable, '-m', 'nvae_jax.main', '--mode=train', f'--workdir={workdir}']
             + list(args.rest) + ['--config.train.log_every=1'])
      if not args.no_cache_field:
        cmd.append(f'--config.compile_cache={cache}')
      if args.data_dir:
        cmd.append(f'--config.data.data_dir={args.data_dir}')
      load = os.getloadavg()[0]
      seconds, rss = time_to_first_step(cmd, workdir, args.timeout, os.path.abspath(args.root))
      shutil.rmtree(workdir, ignore_errors=True)
      results.append(dict(run=run, first_step_s=round(seconds, 2), peak_rss_mb=rss,
                          loadavg_1min=round(load, 2)))
  finally:
    if fresh_cache:
      shutil.rmtree(cache, ignore_errors=True)
  out = dict(benchmark='nvae_startup', machine=platform.processor() or platform.machine(),
             cpu_count=os.cpu_count(), root=os.path.abspath(args.root), cold_s=results[0]['first_step_s'],
             warm_s=[r['first_step_s'] for r in results[1:]], runs=results,
             command='python benchmarks/nvae_startup.py ' + ' '.join(
                 sys.argv[1:] if argv is None else argv))
  print(json.dumps(out), flush=True)
  return out


if __name__ == '__main__':
  main()
