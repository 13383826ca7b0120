"""Python's garbage collector is paused while programs are traced and lowered, and restored
after: the train step in the training loop (every platform), the two-program update, and the
programs compiled on their first call (eval step, sampler)."""

import gc

import jax
import ml_collections
import numpy as np
import pytest

from nvae_jax import collector, compile_priority
from nvae_jax.config import base_config
from nvae_jax.train import loop, optim
from nvae_jax.train import state as state_lib
from nvae_jax.train import step as step_lib
from nvae_jax.train.testing import TinyVAETask


def test_paused_disables_and_restores():
  assert gc.isenabled()
  with collector.paused():
    assert not gc.isenabled()
    with collector.paused():
      assert not gc.isenabled()
    assert not gc.isenabled()  # the inner block leaves it to the outer one
  assert gc.isenabled()
  with pytest.raises(RuntimeError):
    with collector.paused():
      raise RuntimeError('boom')
  assert gc.isenabled()


def test_paused_leaves_a_disabled_collector_disabled():
  gc.disable()
  try:
    with collector.paused():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()


class _RecordingTask(TinyVAETask):
  """Notes whether the collector was enabled each time its loss or evaluation is traced."""

  def __init__(self, config):
    super().__init__(config)
    self.traced = []

  def loss(self, variables, batch, rng, step):
    self.traced.append(('loss', gc.isenabled()))
    return super().loss(variables, batch, rng, step)

  def evaluate(self, variables, batch, rng):
    self.traced.append(('evaluate', gc.isenabled()))
    return super().evaluate(variables, batch, rng)


def _config(**train):
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(name='tiny_test_vae', features=4, latent=2))
  c.data.name = 'digits'
  c.data.train_split, c.data.eval_split = 'train[:90%]', 'train[90%:]'
  c.data.batch_size, c.data.eval_batch_size = 16, 16
  c.train.update(dict(num_steps=1, log_every=1, eval_every=0, checkpoint_every=0,
                      images_every=0, num_eval_batches=1))
  c.train.update(train)
  return c


def test_the_loop_traces_its_train_step_with_the_collector_paused(tmp_path):
  """With ``compile_worker_nice=0`` (as on accelerators) the loop's programs are plain jitted
  functions, so the pause around the train step is the loop's own."""
  config = _config(update_programs='one')
  config.compile_worker_nice = 0
  task = _RecordingTask(config)
  previous = compile_priority.worker_nice()
  try:
    loop.train_and_evaluate(config, str(tmp_path), task=task)
  finally:
    compile_priority.set_worker_nice(previous)
  assert ('loss', False) in task.traced
  assert ('loss', True) not in task.traced
  assert gc.isenabled()


@pytest.mark.skipif(not compile_priority.supported(), reason='per-thread priorities: Linux only')
def test_two_program_update_and_first_call_programs_trace_with_the_collector_paused():
  config = _config()
  task = _RecordingTask(config)
  mesh = step_lib.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  batch = step_lib.put_batch({'image': np.zeros((16, 8, 8, 1), np.float32),
                              'mask': np.ones((16,), np.float32)}, mesh)
  state = state_lib.init_train_state(task, tx, 0, batch)
  shardings = step_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  update = step_lib.make_train_step(task, tx, schedule, mesh, shardings, programs='two')
  update.lower(state, batch)
  assert task.traced == [('loss', False)]
  assert gc.isenabled()

  previous = compile_priority.set_worker_nice(compile_priority.DEFAULT_NICE)
  try:
    program = step_lib.jit_on_mesh(
        lambda v, b: task.evaluate(v, b, jax.random.key(0)), mesh)
    assert isinstance(program, compile_priority.CompileOnFirstCall)
    program(state_lib.variables_of(state), batch)
  finally:
    compile_priority.set_worker_nice(previous)
  assert task.traced[-1] == ('evaluate', False)
  assert gc.isenabled()
