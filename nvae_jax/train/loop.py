"""The training loop: ``train_and_evaluate(config, workdir)``.

What ends up in ``workdir`` (written by process 0, checkpoints by all processes together):

* ``checkpoints/<step>/``: train state + data pipeline position + config (resumed automatically);
* ``metrics.jsonl``: one JSON object per line: ``{"step", "split": "train", <metric>: mean over
  the steps since the last line, "lr"/"num_skipped"/"consecutive_skips": latest value,
  "skipped": count in the interval, "steps_per_sec", ...}`` every ``train.log_every`` steps
  (``steps_per_sec`` leaves out the compiling first step, so a record of that step alone has
  none), and
  ``{"step", "split": "eval", "nats_per_image", "bits_per_dim", ...}`` every
  ``train.eval_every`` steps and at the end;
* ``tb/``: the same scalars as TensorBoard events (``nvae_jax.train.event_file``);
* ``samples_step<N>.png``/``recon_step<N>.png`` every ``train.images_every`` steps and at the end,
  and ``samples.png``/``recon.png`` (the latest); a recon grid alternates rows of eval images and
  their reconstructions.

Resuming: a run started in a ``workdir`` that holds a checkpoint restores the train state and the
data position and continues exactly as if it had not stopped (the step's rng is
``fold_in(rng, step)``, the pipeline is a pure function of its position).  Records of steps after
the restored checkpoint, left by the interrupted run, are dropped from ``metrics.jsonl`` (and
purged from the TensorBoard events), so that each (step, split) appears once.  A damaged newest
checkpoint is skipped for the newest readable one (``nvae_jax.train.checkpoint``).

Stopping: SIGTERM/SIGINT end the run after the current step with a checkpoint of it
(``nvae_jax.train.preemption``).  A run that fails before its first step leaves the workdir as it
found it (``nvae_jax.train.workdir``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from nvae_jax import collector, errors, host_memory
from nvae_jax import progress as progress_lib
from nvae_jax.train import evaluate as eval_lib
from nvae_jax.train import event_file
from nvae_jax.train import preemption
from nvae_jax.train import workdir as workdir_lib
from nvae_jax.train import sample as sample_lib
from nvae_jax.train import optim
from nvae_jax.train import build
from nvae_jax.train import state as state_lib
from nvae_jax.train import step as step_lib


def _default_pipeline_fn():
  from nvae_jax.data import make_pipeline  # pylint: disable=import-outside-toplevel
  return make_pipeline


def _format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class MetricWriter:
  """JSON lines + TensorBoard + stdout, only on process 0.

  Files are opened on the first record, so that a run that fails before it trains leaves none.
  ``start_at(step)`` (the restored step, 0 for a fresh run) drops the records of later steps that an
  interrupted run left in ``metrics.jsonl`` (and a partial last line), and purges the TensorBoard
  events of those steps, so that every (step, split) appears once.
  """

  def __init__(self, workdir: str, enabled: bool = True, stream=None):
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.workdir = workdir
    self._start_step = 0
    self._tb = None
    self._jsonl = None

  def start_at(self, step: int) -> None:
    self._start_step = int(step)

  def _open_jsonl(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if os.path.exists(path):
      _drop_records_after(path, self._start_step)
    self._jsonl = open(path, 'a', encoding='utf-8')

  def _open_tensorboard(self) -> None:
    self._tb = event_file.ScalarEventWriter(os.path.join(self.workdir, 'tb'),
                                            purge_step=self._start_step + 1)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    if self._jsonl is None:
      self._open_jsonl()
    record = {'step': int(step), 'split': split}
    record.update({k: _json_number(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is None:
      self._open_tensorboard()
    self._tb.write_scalars(int(step), {
        f'{split}/{k}': float(v) for k, v in values.items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """Keeps the complete records of ``path`` with ``record['step'] <= step`` (atomic rewrite)."""
  kept, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = line.endswith('\n') and int(record['step']) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


def _json_number(v):
  if isinstance(v, (bool, str, int)) or v is None:
    return v
  v = float(v)
  return v if np.isfinite(v) else str(v)


_SHOWN_FIRST = ('loss', 'nll', 'nelbo', 'recon', 'kl')  # nelbo: the negative ELBO, every model
_SHOWN_LAST = ('grad_norm', 'lr')


def _progress_line(step: int, total: int, rate: float, values: dict[str, float]) -> str:
  eta = (total - step) / rate if rate > 0 else float('nan')
  shown = [k for k in _SHOWN_FIRST if k in values]
  shown += [k for k in sorted(values) if k not in shown and k not in _SHOWN_LAST
            and k not in ('skipped', 'num_skipped', 'consecutive_skips', 'param_norm',
                          'steps_per_sec')]
  terms = ' '.join(f'{k} {values[k]:.4g}' for k in shown)
  tail = ' '.join(f'{k} {values[k]:.3g}' for k in _SHOWN_LAST if k in values)
  skips = ''
  if 'num_skipped' in values:
    skips = (f' | skips {int(values["num_skipped"])} '
             f'({int(values["consecutive_skips"])} in a row)')
  eta_s = _format_duration(eta) if np.isfinite(eta) else '?'
  rate_s = f'{rate:.2f}' if np.isfinite(rate) else '?'
  return f'step {step}/{total} | {rate_s} steps/s | ETA {eta_s} | {terms} | {tail}{skips}'


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = step_lib.to_host(history)
  out = {}
  for k in host[-1]:
    if k in ('num_skipped', 'consecutive_skips'):
      out[k] = int(host[-1][k])
    elif k == 'lr':  # the latest rate, not an average over the interval
      out[k] = float(host[-1][k])
    elif k == 'skipped':
      out[k] = int(np.sum([h[k] for h in host]))
    else:
      out[k] = float(np.mean([h[k] for h in host]))
  return out


def read_metrics(workdir: str, split: str = 'train') -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` for ``split`` (``train`` or ``eval``), in order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'workdir: no metrics.jsonl in {workdir}; train first')
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  if lines and not lines[-1].endswith('\n'):  # a run killed while writing it: incomplete
    lines = lines[:-1]
  records = [json.loads(line) for line in lines if line.strip()]
  return [r for r in records if r.get('split') == split]


def _due(step: int, every: int, last: bool) -> bool:
  return last or (every > 0 and step % every == 0)


def train_and_evaluate(config, workdir: str, *, task=None,
                       pipeline_fn: Callable | None = None,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

  Args:
    config: a full config (``nvae_jax/config/schema.py``); validated before anything compiles.
    workdir: output folder (created); see the module docstring for its content.
    task: a ModelTask to use instead of ``build_task(config)`` (tests, notebooks).
    pipeline_fn: ``make_pipeline``-compatible factory (default ``nvae_jax.data.make_pipeline``).
    stop_after_steps: stop (after checkpointing) once this many steps ran *in this call*, as if
      the process were killed there; for tests of resumption.

  Returns:
    ``{'step', 'train': last logged train metrics, 'eval': last eval report, 'state': the final
    train state}`` (``variables_of(result['state'])`` for sampling; the metric history is in
    ``read_metrics(workdir)``), and ``'preempted': 'SIGTERM'`` (or ``'SIGINT'``) when a stop
    signal ended the run early: the step it stopped at is checkpointed (see
    :mod:`nvae_jax.train.preemption`).
  """
  workdir_lib.check(workdir)
  run = build.build(config, task)
  before = workdir_lib.snapshot(workdir)
  progress = {'trained': False}
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  ckpt = None
  try:
    with preemption.handle_stop_signals() as stop:
      ckpt = build.make_checkpointer(config, workdir)
      return _train(run, workdir, writer, ckpt, pipeline_fn or _default_pipeline_fn(),
                    stop_after_steps, stop, progress)
  finally:  # also on errors: finish pending checkpoint writes, flush the logs
    if ckpt is not None:
      ckpt.close()
    writer.close()
    if not progress['trained'] and jax.process_index() == 0:
      workdir_lib.restore(workdir, before)  # failed before its first step: leave no trace


def _train(run: build.Run, workdir: str, writer: MetricWriter, ckpt, pipeline_fn: Callable,
           stop_after_steps: int | None, stop: preemption.StopRequest,
           progress: dict[str, bool]) -> dict[str, Any]:
  """The body of :func:`train_and_evaluate` (which owns ``writer`` and ``ckpt``)."""
  c = run.config
  pidx, pcount = jax.process_index(), jax.process_count()
  is_main = pidx == 0

  make_pipe = lambda split, train: pipeline_fn(  # noqa: E731
      c.data, split, train=train, seed=c.seed, process_index=pidx, process_count=pcount)
  train_pipe = make_pipe(c.data.train_split, True)
  first = next(train_pipe)  # gives the shapes; rewound by set_state when resuming
  global_first = step_lib.put_batch(first, run.mesh)
  image_shape = tuple(first['image'].shape[1:])

  restored_step = None
  if ckpt.latest_step() is not None:
    abstract, shardings = build.abstract_state(run, build.spec_of(global_first))
    restored_step, state, data_state, _ = ckpt.restore_latest(abstract)
    # The position is that of the global batch stream, the same on every host (process 0's).
    train_pipe.set_state(data_state)
    first = next(train_pipe)
    global_first = step_lib.put_batch(first, run.mesh)
    writer.start_at(restored_step)
    writer.print(f'Resumed from {ckpt.directory}/{restored_step}.')
  else:
    state, shardings = build.init_state(run, global_first)
    n_params = state_lib.num_params(state['params'])
    writer.print(f'Initialised {c.model.name}: {n_params:,} parameters on '
                 f'{jax.device_count()} device(s), mesh {dict(run.mesh.shape)}.')

  train_step = step_lib.make_train_step(run.task, run.tx, run.schedule, run.mesh, shardings,
                                       c.train.update_programs, c.train.parallel_compile)
  var_sharding = build.variables_sharding(shardings)
  eval_step = eval_lib.make_eval_step(run.task, run.mesh, var_sharding)
  sampler = sample_lib.make_sampler(run.task, run.mesh, var_sharding, c.train.num_images,
                                    c.sample.temperature)
  # Returns the (all-gathered) originals too: in multi-process runs no host holds the batch.
  reconstructor = step_lib.jit_on_mesh(
      lambda v, b, r: (b['image'], run.task.reconstruct(v, b, r)), run.mesh,
      in_shardings=(var_sharding, step_lib.batch_sharding(run.mesh),
                    step_lib.replicated(run.mesh)),
      out_shardings=step_lib.replicated(run.mesh))
  likelihood = eval_lib.likelihood_info(run.task, image_shape)  # continuous, num_dims
  continuous = likelihood['continuous']
  eval_key = state_lib.stream_key(c.seed, state_lib.EVAL_STREAM)
  sample_key = state_lib.stream_key(c.seed, state_lib.SAMPLE_STREAM)
  recon_batch = None

  data_kind = f'{c.data.num_bits}-bit' if c.data.binarize == 'none' else 'binarised'

  def run_eval(step: int) -> dict[str, Any]:
    # Freed heap back to the system before and after: the training steps leave freed buffers,
    # and the first call compiles the eval step (the evaluation's own buffers are not affected).
    host_memory.release_freed_heap()
    pipe = make_pipe(c.data.eval_split, False)
    report = eval_lib.evaluate_split(
        eval_step, state_lib.variables_of(state), pipe, run.mesh, eval_key,
        num_batches=c.train.num_eval_batches or None, split=c.data.eval_split, **likelihood)
    host_memory.release_freed_heap()
    writer.write(step, 'eval', {k: v for k, v in report.items() if k != 'split'})
    writer.print(f'eval at step {step} on {report["num_examples"]} {c.data.eval_split} examples: '
                 f'{report["nats_per_image"]:.3f} nats/image, {report["bits_per_dim"]:.4f} '
                 f'bits/dim ({data_kind} data'
                 + (', continuous density)' if continuous else ')'))
    return report

  def write_images(step: int) -> None:
    nonlocal recon_batch
    host_memory.release_freed_heap()  # as in run_eval: the first call compiles the samplers
    variables = state_lib.variables_of(state)
    samples = step_lib.to_host(sampler(variables, jax.random.fold_in(sample_key, 0)))
    if recon_batch is None:
      recon_batch = step_lib.put_batch(next(make_pipe(c.data.eval_split, False)), run.mesh)
    originals, recons = step_lib.to_host(reconstructor(variables, recon_batch,
                                                       jax.random.fold_in(sample_key, 1)))
    host_memory.release_freed_heap()
    n = min(c.train.num_images, recons.shape[0])
    originals = originals[:n]
    if not is_main:
      return
    _, cols = sample_lib.grid_layout(n)
    for name, images, ncols in (('samples', samples, None),
                                ('recon', sample_lib.pair_rows(originals, recons[:n], cols), cols)):
      grid = sample_lib.make_grid(images, ncols,
                                  scale=sample_lib.display_scale(images.shape[1]))
      sample_lib.save_png(os.path.join(workdir, f'{name}_step{step}.png'), grid)
      sample_lib.save_png(os.path.join(workdir, f'{name}.png'), grid)

  total = int(c.train.num_steps)
  start = int(step_lib.to_host(state['step']))
  result: dict[str, Any] = {'step': start, 'train': None, 'eval': None, 'state': state}
  if start >= total:
    writer.print(f'Nothing to do: the checkpoint is at step {start} >= train.num_steps={total}.')
    return result

  history: list[dict] = []
  # In a notebook, a bar next to the log lines (nvae_jax.progress; NVAE_JAX_PROGRESS=off hides it).
  bar = (progress_lib.Progress(total - start, 'train', 'step')
         if is_main and progress_lib.resolve_mode() == 'bar' else None)
  previous = None
  t_last, steps_since, overhead = time.time(), 0, 0.0
  batch = global_first
  # Compile before the first step and return the compiler's freed heap to the system, so that the
  # step's buffers do not come on top of it (nvae_jax.host_memory).
  with collector.paused():  # tracing and lowering run faster without it (nvae_jax.collector)
    train_step = train_step.lower(state, batch).compile()
  host_memory.release_freed_heap()
  for step in range(start, total):
    if step > start:
      batch = step_lib.put_batch(next(train_pipe), run.mesh)
    state, metrics = train_step(state, batch)
    if bar is not None:
      bar.update(1)
    if step == start:  # keep compilation out of steps/s and the ETA
      jax.block_until_ready(metrics)
      t_last, steps_since = time.time(), -1
      progress['trained'] = True
    done = step + 1
    stopping = stop.requested()  # SIGTERM/SIGINT: checkpoint this step and return
    last = (done == total or stopping
            or (stop_after_steps is not None and done - start >= stop_after_steps))
    history.append(metrics)
    steps_since += 1
    if previous is not None:  # one step behind, so the host does not wait on every step
      p = step_lib.to_host({k: previous[k] for k in ('num_skipped', 'consecutive_skips')
                            if k in previous})
      if p:
        optim.check_skips(int(p['consecutive_skips']), int(p['num_skipped']),
                          c.optim.max_consecutive_skips, done - 1)
    previous = metrics

    if _due(done, c.train.log_every, last):
      values = _mean_metrics(history)
      if 'consecutive_skips' in values:
        optim.check_skips(int(values['consecutive_skips']), int(values['num_skipped']),
                          c.optim.max_consecutive_skips, done)
      elapsed = max(time.time() - t_last - overhead, 1e-9)
      if steps_since > 0:  # none yet when only the first (compiling) step is in the interval
        values['steps_per_sec'] = steps_since / elapsed
      writer.print(_progress_line(done, total, values.get('steps_per_sec', float('nan')), values))
      writer.write(done, 'train', values)
      result['train'] = values
      history, t_last, steps_since, overhead = [], time.time(), 0, 0.0

    t0 = time.time()
    if _due(done, c.train.eval_every, done == total):
      result['eval'] = run_eval(done)
    if _due(done, c.train.images_every, done == total):
      write_images(done)
    if _due(done, c.train.checkpoint_every, last):
      ckpt.save(done, state, data_state=train_pipe.get_state(), config=c, force=True)
    overhead += time.time() - t0
    result['step'], result['state'] = done, state
    if stopping and done < total:
      ckpt.wait()
      result['preempted'] = stop.signal_name
      if bar is not None:
        bar.close()
      writer.print(f'Stopped by {stop.signal_name} after step {done}: checkpoint '
                   f'{ckpt.directory}/{done} written; rerun the same command to resume '
                   f'(nvae-jax exits with status {errors.PREEMPTED_EXIT}).')
      return result
    if last:
      break
  if bar is not None:
    bar.close()

  if previous is not None and 'consecutive_skips' in previous:
    p = step_lib.to_host(previous)
    optim.check_skips(int(p['consecutive_skips']), int(p['num_skipped']),
                      c.optim.max_consecutive_skips, result['step'])
  return result
