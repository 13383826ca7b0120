"""The sharded update step, update skipping, schedules and weight decay.

Independent references: the same step on one device (for 8-way data parallel and FSDP), the
state before a skipped update, closed-form schedules, and Adam/Adamax written out in numpy.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from nvae_jax.config import base_config
from nvae_jax.train import optim
from nvae_jax.train import state as state_lib
from nvae_jax.train import step as step_lib
from nvae_jax.train.testing import TinyVAETask

B, S = 8, 8  # global batch, image side


def _config():
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(name='tiny_test_vae', features=4, latent=2))
  c.data.image_size = S
  c.data.batch_size = B
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 5
  c.optim.grad_clip = 100.0
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_mode = 'coupled'
  return c


def _batches(n):
  rng = np.random.default_rng(0)
  return [{'image': (rng.integers(0, 256, (B, S, S, 1)) / 255.0).astype(np.float32),
           'mask': np.ones((B,), np.float32)} for _ in range(n)]


class _Runner:
  """A compiled step on one mesh, with its initial state."""

  def __init__(self, task, config, mesh, fsdp_min_size=step_lib.FSDP_MIN_SIZE, programs='one',
               parallel_compile=False):
    self.mesh = mesh
    self.tx, self.schedule = optim.make_optimizer(config.optim, 100)
    batch0 = step_lib.put_batch(_batches(1)[0], mesh)
    init = lambda b: state_lib.init_train_state(task, self.tx, config.seed, b)  # noqa: E731
    shapes = jax.eval_shape(init, batch0)
    self.shardings = step_lib.state_shardings(shapes, mesh, min_size=fsdp_min_size)
    self.init = jax.jit(init, out_shardings=self.shardings)
    self.batch0 = batch0
    self.step = step_lib.make_train_step(task, self.tx, self.schedule, mesh, self.shardings,
                                         programs, parallel_compile)

  def fresh_state(self):
    return self.init(self.batch0)

  def run(self, batches):
    state, losses = self.fresh_state(), []
    for b in batches:
      state, metrics = self.step(state, step_lib.put_batch(b, self.mesh))
      losses.append(float(metrics['loss']))
    return step_lib.to_host(state), losses


@pytest.fixture(scope='module')
def config():
  return _config()


@pytest.fixture(scope='module')
def task(config):
  return TinyVAETask(config)


@pytest.fixture(scope='module', params=['one', 'two'])
def programs(request):
  """The update as one XLA program, or as a gradient program and an optimizer program."""
  return request.param


@pytest.fixture(scope='module')
def single(task, config, programs):
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.devices()[:1])
  return _Runner(task, config, mesh, programs=programs)


def _assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('fsdp', [1, 2])
def test_sharded_step_equals_single_device(task, config, single, fsdp, programs):
  assert jax.device_count() == 8, 'conftest should provide 8 CPU devices'
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp)))
  assert dict(mesh.shape) == {'data': 8 // fsdp, 'fsdp': fsdp}
  sharded = _Runner(task, config, mesh, fsdp_min_size=1, programs=programs)
  if fsdp > 1:  # the conv kernel [3, 3, 1, 4] is split on its last axis, moments too
    assert sharded.shardings['params']['conv']['kernel'].spec == P(None, None, None, 'fsdp')
    adam = sharded.shardings["opt_state"].inner_state[2]
    assert adam.mu['conv']['kernel'].spec == P(None, None, None, 'fsdp')
  batches = _batches(3)
  state_1, losses_1 = single.run(batches)
  state_n, losses_n = sharded.run(batches)
  # Same maths, different reduction order over the 8 shards: float32 rounding only.
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-6)
  assert losses_1[0] != losses_1[2]  # the parameters did move
  _assert_trees_close(state_n['params'], state_1['params'], rtol=1e-5, atol=1e-6)
  # Batch-norm statistics of the global batch (synchronised BN without an axis name).
  _assert_trees_close(state_n['model_state'], state_1['model_state'], rtol=1e-5, atol=1e-6)
  assert int(state_n['step']) == 3


def test_two_programs_equal_one(task, config, single, programs):
  """The gradient + optimizer programs compute the same update as the single program."""
  if programs == 'one':
    pytest.skip('compares the two-program update with the one-program update')
  one = _Runner(task, config, single.mesh, programs='one')
  assert isinstance(single.step, step_lib.TwoProgramUpdate)
  batches = _batches(3)
  state_2, losses_2 = single.run(batches)
  state_1, losses_1 = one.run(batches)
  np.testing.assert_allclose(losses_2, losses_1, rtol=1e-6)
  _assert_trees_close(state_2['params'], state_1['params'], rtol=1e-6, atol=1e-7)
  _assert_trees_close(state_2['model_state'], state_1['model_state'], rtol=1e-6, atol=1e-7)
  _assert_trees_close(state_2['opt_state'], state_1['opt_state'], rtol=1e-6, atol=1e-7)
  # Compiled ahead of time (as the training loop does), one program after the other or both at
  # the same time, it is the same update again.
  parallel = _Runner(task, config, single.mesh, programs='two', parallel_compile=True)
  for runner in (single, parallel):
    compiled = runner.step.lower(runner.fresh_state(), runner.batch0).compile()
    assert isinstance(compiled, step_lib.TwoProgramUpdate)
    state_c = runner.fresh_state()
    for b in batches:
      state_c, _ = compiled(state_c, step_lib.put_batch(b, runner.mesh))
    _assert_trees_close(step_lib.to_host(state_c)['params'], state_2['params'], rtol=1e-6,
                        atol=1e-7)


def test_update_programs_setting():
  assert step_lib.resolve_update_programs('auto', 'cpu') == 'two'
  assert step_lib.resolve_update_programs('auto', 'gpu') == 'one'
  assert step_lib.resolve_update_programs('one', 'cpu') == 'one'
  with pytest.raises(ValueError, match='train.update_programs'):
    step_lib.resolve_update_programs('three', 'cpu')


@pytest.mark.parametrize('programs_setting', ['one', 'two'])
def test_step_programs_are_compiled_with_the_platform_options(task, config, monkeypatch,
                                                              programs_setting):
  """Every program of the update goes through ``compile_options.for_platform`` (checked by making
  it return an option XLA rejects), and on CPU the default is LLVM level 1, with remat's
  barriers kept for the model's programs."""
  from nvae_jax import compile_options
  assert compile_options.for_platform('cpu') == {
      'xla_backend_optimization_level': 1, **compile_options.KEEP_REMAT_BARRIERS}
  assert compile_options.for_platform('cpu', 'optimizer') == {'xla_backend_optimization_level': 1}
  monkeypatch.setattr(compile_options, 'for_platform',
                      lambda platform, program='model': {'xla_no_such_option_for_this_test': True})
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.devices()[:1])
  runner = _Runner(task, config, mesh, programs=programs_setting)
  with pytest.raises(Exception, match='xla_no_such_option_for_this_test'):
    runner.step.lower(runner.fresh_state(), runner.batch0).compile()


def test_the_optimizer_program_asks_for_the_optimizer_options(task, config, monkeypatch):
  """In the two-program update only the optimizer program is compiled with
  ``program='optimizer'`` (the options that name it are rejected by XLA; the gradient program's
  are not)."""
  from nvae_jax import compile_options
  real = compile_options.for_platform

  def options(platform, program='model'):
    if program == 'optimizer':
      return {'xla_no_such_option_for_this_test': True}
    return real(platform, program)

  monkeypatch.setattr(compile_options, 'for_platform', options)
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.devices()[:1])
  runner = _Runner(task, config, mesh, programs='two')
  state = runner.fresh_state()
  gradients = runner.step.gradients.lower(state, runner.batch0)
  gradients.compile()
  with pytest.raises(Exception, match='xla_no_such_option_for_this_test'):
    runner.step.apply.lower(state, *gradients.out_info).compile()


@pytest.fixture
def low_memory():
  """Low-memory compilation switched on for one test (the setting is process-wide)."""
  from nvae_jax import compile_options
  previous = compile_options.set_cpu_low_memory(True)
  yield
  compile_options.set_cpu_low_memory(previous)


def test_low_memory_setting(low_memory, monkeypatch):
  """Low memory: the model's CPU programs leave XLA's MLIR fusion emitters, the optimizer
  program and accelerators keep their options."""
  from nvae_jax import compile_options
  monkeypatch.delenv(compile_options.ENV, raising=False)
  monkeypatch.setattr(compile_options, 'cpu_has_older_emitters', lambda: True)
  assert compile_options.cpu_low_memory()
  keep = compile_options.KEEP_REMAT_BARRIERS
  assert compile_options.for_platform('cpu') == {'xla_backend_optimization_level': 1,
                                                 'xla_cpu_use_fusion_emitters': False, **keep}
  assert compile_options.for_platform('cpu', 'optimizer') == {'xla_backend_optimization_level': 1}
  assert compile_options.for_platform('gpu') is None
  monkeypatch.setenv(compile_options.ENV, 'default')
  assert compile_options.for_platform('cpu') == {'xla_cpu_use_fusion_emitters': False, **keep}
  assert compile_options.for_platform('cpu', 'optimizer') is None
  with pytest.raises(ValueError, match='program'):
    compile_options.for_platform('cpu', 'decoder')
  with pytest.raises(TypeError, match='compile_low_memory'):
    compile_options.set_cpu_low_memory('yes')
  # An XLA without the older emitters (jax 0.11): a warning, and the usual options.
  monkeypatch.setattr(compile_options, 'cpu_has_older_emitters', lambda: False)
  compile_options._warn_no_older_emitters.cache_clear()  # pylint: disable=protected-access
  with pytest.warns(RuntimeWarning, match='no older CPU emitters'):
    assert compile_options.for_platform('cpu') == keep


def test_older_emitters_probe_matches_this_xla():
  """The probe agrees with what XLA does with the option (accepted up to jax 0.10)."""
  from nvae_jax import compile_options
  program = jax.jit(lambda x: x + 1, compiler_options=compile_options.OLDER_EMITTERS)
  try:
    program.lower(np.float32(1)).compile()
    accepted = True
  except Exception as e:  # pylint: disable=broad-except
    assert 'No such compile option' in str(e)
    accepted = False
  assert compile_options.cpu_has_older_emitters() is accepted


def test_low_memory_update_equals_the_default_update(task, config, low_memory):
  """The same three updates compiled with XLA's older loop emitters (the low-memory mode) and
  with its fusion emitters: float32 rounding only (two code generators)."""
  from nvae_jax import compile_options
  if not compile_options.cpu_has_older_emitters():
    pytest.skip(f'XLA in jax {jax.__version__} has no older CPU emitters')
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.devices()[:1])
  low = _Runner(task, config, mesh, programs='two')
  compile_options.set_cpu_low_memory(False)
  default = _Runner(task, config, mesh, programs='two')
  batches = _batches(3)
  state_low, losses_low = low.run(batches)
  state_default, losses_default = default.run(batches)
  np.testing.assert_allclose(losses_low, losses_default, rtol=1e-6)
  assert losses_low[0] != losses_low[2]
  _assert_trees_close(state_low['params'], state_default['params'], rtol=1e-5, atol=1e-6)
  _assert_trees_close(state_low['model_state'], state_default['model_state'], rtol=1e-5,
                      atol=1e-6)


def test_build_sets_low_memory_from_the_config(task, config):
  from nvae_jax import compile_options
  from nvae_jax.train import build
  previous = compile_options.cpu_low_memory()
  try:
    for flag in (True, False):
      c = _config()
      c.compile_low_memory = flag
      build.build(c, task)
      assert compile_options.cpu_low_memory() is flag
  finally:
    compile_options.set_cpu_low_memory(previous)


def test_build_sets_the_compile_worker_nice_from_the_config(task, config):
  from nvae_jax import compile_priority
  from nvae_jax.config import validation
  from nvae_jax.train import build
  previous = compile_priority.worker_nice()
  try:
    for nice in (0, 7, compile_priority.DEFAULT_NICE):
      c = _config()
      c.compile_worker_nice = nice
      build.build(c, task)
      assert compile_priority.worker_nice() == nice
    for bad in (-1, 20):
      c = _config()
      c.compile_worker_nice = bad
      with pytest.raises(validation.ConfigError, match='compile_worker_nice: expected an int in '
                         '0..19'):
        build.build(c, task)
  finally:
    compile_priority.set_worker_nice(previous)


def test_cpu_opt_level_setting(monkeypatch):
  from nvae_jax import compile_options
  monkeypatch.delenv(compile_options.ENV, raising=False)
  assert compile_options.cpu_opt_level() == 1
  assert compile_options.for_platform('gpu') is None
  assert compile_options.for_platform('tpu') is None
  monkeypatch.setenv(compile_options.ENV, '2')
  assert compile_options.for_platform('cpu', 'optimizer') == {'xla_backend_optimization_level': 2}
  monkeypatch.setenv(compile_options.ENV, 'default')
  assert compile_options.for_platform('cpu', 'optimizer') is None
  assert compile_options.for_platform('cpu') == compile_options.KEEP_REMAT_BARRIERS
  monkeypatch.setenv(compile_options.ENV, 'fast')
  with pytest.raises(ValueError, match='NVAE_JAX_CPU_OPT_LEVEL'):
    compile_options.for_platform('cpu')


def test_batch_norm_statistics_are_global(task, single):
  """The running mean after one step equals the closed form over all 8 examples."""
  batch = _batches(1)[0]
  state = single.fresh_state()
  params = step_lib.to_host(state['params'])
  new_state, _ = single.step(state, step_lib.put_batch(batch, single.mesh))
  x = 2.0 * batch['image'] - 1.0
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(x), jnp.asarray(params['conv']['kernel']), (2, 2), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = 0.1 * np.asarray(conv).mean(axis=(0, 1, 2))  # momentum 0.9 from a zero mean
  got = step_lib.to_host(new_state['model_state'])['batch_stats']['bn']['mean']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_nonfinite_update_is_skipped_and_counted(single):
  good, bad = _batches(1)[0], dict(_batches(1)[0])
  bad['image'] = bad['image'].copy()
  bad['image'][0, 0, 0, 0] = np.nan
  state, m0 = single.step(single.fresh_state(), step_lib.put_batch(good, single.mesh))
  before = step_lib.to_host(state)
  state, m1 = single.step(state, step_lib.put_batch(bad, single.mesh))
  after = step_lib.to_host(state)
  assert not np.isfinite(float(m1['loss']))
  assert (int(m1['skipped']), int(m1['num_skipped']), int(m1['consecutive_skips'])) == (1, 1, 1)
  for key in ('params', 'model_state'):
    for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(before['opt_state'].inner_state),
                  jax.tree.leaves(after['opt_state'].inner_state)):
    np.testing.assert_array_equal(x, y)
  assert int(after['step']) == 2  # the step counter still counts the batch
  state, m2 = single.step(state, step_lib.put_batch(bad, single.mesh))
  assert (int(m2['num_skipped']), int(m2['consecutive_skips'])) == (2, 2)
  state, m3 = single.step(state, step_lib.put_batch(good, single.mesh))
  assert (int(m3['skipped']), int(m3['num_skipped']), int(m3['consecutive_skips'])) == (0, 2, 0)
  # The schedule counts applied updates: the 2nd applied update uses lr(1), as did the skips.
  lr1 = float(single.schedule(1))
  assert float(m0['lr']) == pytest.approx(float(single.schedule(0)))
  for m in (m1, m2, m3):
    assert float(m['lr']) == pytest.approx(lr1)
  changed = step_lib.to_host(state)['params']
  assert not np.array_equal(changed['conv']['kernel'], before['params']['conv']['kernel'])


def test_consecutive_skip_limit_raises(single):
  bad = dict(_batches(1)[0])
  bad['image'] = np.full_like(bad['image'], np.inf)
  state = single.fresh_state()
  with pytest.raises(optim.TooManySkipsError, match=r'optim\.max_consecutive_skips: 3 '):
    for _ in range(10):
      state, m = single.step(state, step_lib.put_batch(bad, single.mesh))
      optim.check_skips(int(m['consecutive_skips']), int(m['num_skipped']), 3, int(state['step']))
  assert int(m['consecutive_skips']) == 3


def test_skip_threshold_on_gradient_norm():
  inner = optax.sgd(1.0)
  tx = optim.skip_nonfinite_or_huge(inner, threshold=4.0)
  params = {'w': jnp.array([1.0, 2.0])}
  st = tx.init(params)
  u, st = tx.update({'w': jnp.array([3.0, 4.0])}, st, params)  # norm 5 > 4: skipped
  np.testing.assert_array_equal(u['w'], [0.0, 0.0])
  assert (int(st.num_skipped), int(st.consecutive_skips), bool(st.last_skipped)) == (1, 1, True)
  u, st = tx.update({'w': jnp.array([0.6, 0.8])}, st, params)  # norm 1: applied
  np.testing.assert_allclose(u['w'], [-0.6, -0.8])
  assert (int(st.num_skipped), int(st.consecutive_skips), bool(st.last_skipped)) == (1, 0, False)
  # threshold 0: only non-finite gradients are skipped, however large the finite ones
  tx0 = optim.skip_nonfinite_or_huge(inner, threshold=0.0)
  u, st0 = tx0.update({'w': jnp.array([3e4, 4e4])}, tx0.init(params), params)
  np.testing.assert_allclose(u['w'], [-3e4, -4e4])
  u, st0 = tx0.update({'w': jnp.array([1.0, -jnp.inf])}, st0, params)
  np.testing.assert_array_equal(u['w'], [0.0, 0.0])
  assert int(st0.num_skipped) == 1


@pytest.mark.parametrize('values_per_sum', [1, 7, 30, 2**22])
def test_global_norm_against_float64_sum(values_per_sum):
  """The same norm however the leaves are grouped (one leaf per sum, several, one bigger than
  the bound, all in one), including scalars, bfloat16 and a non-finite entry."""
  rng = np.random.default_rng(3)
  tree = {'a': rng.normal(size=(3, 4)), 'b': [rng.normal(size=()), rng.normal(size=(5,))],
          'c': rng.normal(size=(2, 2, 2)).astype(np.float32), 'd': rng.normal(size=(40,))}
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  tree['e'] = jnp.asarray(rng.normal(size=(6,)), jnp.bfloat16)
  want = math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree.leaves(tree)))
  got = float(jax.jit(lambda t: optim.global_norm(t, values_per_sum))(tree))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  tree['b'][1] = tree['b'][1].at[2].set(jnp.nan)
  assert not np.isfinite(float(optim.global_norm(tree, values_per_sum)))
  assert float(optim.global_norm({})) == 0.0


def _schedule_config(kind, warmup=4, lr=1.0, min_lr=0.1):
  c = base_config().optim
  c.schedule, c.warmup_steps, c.lr, c.min_lr = kind, warmup, lr, min_lr
  return c


def test_warmup_cosine_schedule_closed_form():
  n, w, lr, lo = 20, 4, 1.0, 0.1
  sched = optim.make_schedule(_schedule_config('cosine', w, lr, lo), n)
  got = np.asarray(jax.vmap(sched)(jnp.arange(n + 5)))
  expected = [lr * (s + 1) / w if s < w else
              lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / (n - w))))
              for s in range(n + 5)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # anchors: the peak is reached by the last warm-up step, half-way point, floor at the end
  assert got[w - 1] == pytest.approx(lr) and got[w] == pytest.approx(lr)
  assert got[(n + w) // 2] == pytest.approx((lr + lo) / 2, rel=1e-6)
  assert got[n] == pytest.approx(lo) and got[n + 4] == pytest.approx(lo)
  assert np.all(np.diff(got[:w]) > 0) and np.all(np.diff(got[w:n + 1]) < 0)


def test_constant_schedule_and_no_warmup():
  sched = optim.make_schedule(_schedule_config('constant', 3, 0.5), 10)
  np.testing.assert_allclose([float(sched(s)) for s in range(6)],
                             [0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.5, 0.5], rtol=1e-6)
  sched = optim.make_schedule(_schedule_config('cosine', 0, 1.0, 0.0), 10)
  assert float(sched(0)) == pytest.approx(1.0)
  assert float(sched(5)) == pytest.approx(0.5, rel=1e-6)


C = np.array([1.0, 0.5, -1.0])


def _numpy_reference(name, mode, p, a, lr, wd, steps, clip=0.0, b1=0.9, b2=0.999, eps=1e-8):
  """Adam (Kingma & Ba, eps outside the sqrt) / Adamax (u = max(b2 u, |g| + eps)) by hand for
  the loss 0.5 * sum(a * (p - C)^2), whose gradient is a * (p - C)."""
  p = np.array(p, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t in range(1, steps + 1):
    g = a * (p - C)
    if clip > 0:
      g = g * min(1.0, clip / np.linalg.norm(g))
    if mode == 'coupled':
      g = g + wd * p
    m = b1 * m + (1 - b1) * g
    if name == 'adamax':
      v = np.maximum(b2 * v, np.abs(g) + eps)
      u = m / (1 - b1**t) / v
    else:
      v = b2 * v + (1 - b2) * g**2
      u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    if mode == 'decoupled':
      u = u + wd * p
    p = p - lr * u
  return p


@pytest.mark.parametrize('name,mode,clip', [('adam', 'coupled', 0.0), ('adam', 'decoupled', 0.0),
                                            ('adamw', 'decoupled', 0.0),
                                            ('adamax', 'coupled', 0.0),
                                            ('adamax', 'coupled', 0.5)])
def test_weight_decay_against_hand_computation(name, mode, clip):
  c = base_config().optim
  c.name, c.weight_decay_mode, c.weight_decay, c.lr, c.grad_clip = name, mode, 0.3, 0.1, clip
  tx, _ = optim.make_optimizer(c, 10)
  a = np.array([1.0, 3.0, 0.5])
  p0 = np.array([0.5, -1.0, 2.0])
  # float64, so that the comparison is not limited by float32 rounding of 1 - b2**t.
  with jax.enable_x64(True):
    params = jnp.asarray(p0, jnp.float64)
    st = tx.init(params)
    for _ in range(3):
      updates, st = tx.update(jnp.asarray(a) * (params - jnp.asarray(C)), st, params)
      params = optax.apply_updates(params, updates)
    params = np.asarray(params)
  assert params.dtype == np.float64
  lr = float(np.float32(0.1))  # the schedule returns a float32 learning rate
  expected = _numpy_reference('adamax' if name == 'adamax' else 'adam', mode, p0, a, lr, 0.3, 3,
                              clip=clip)
  np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-14)
  # and the decay did matter: without it the result differs
  assert not np.allclose(expected, _numpy_reference(name, 'none', p0, a, 0.1, 0.0, 3, clip=clip),
                         rtol=1e-4)


def test_adamw_with_coupled_decay_is_an_error():
  c = base_config().optim
  c.name, c.weight_decay_mode = 'adamw', 'coupled'
  with pytest.raises(ValueError, match=r"optim\.weight_decay_mode: .*'coupled'"):
    optim.make_optimizer(c, 10)


def test_fsdp_spec_choices():
  mesh = step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=4)))
  abstract = {'big': jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
              'odd': jax.ShapeDtypeStruct((3, 4099), jnp.float32),
              'small': jax.ShapeDtypeStruct((16,), jnp.float32)}
  sh = step_lib.state_shardings(abstract, mesh)
  assert sh['big'].spec == P(None, None, None, 'fsdp')  # the largest divisible axis
  assert sh['odd'].spec == P() and sh['small'].spec == P()
  with pytest.raises(ValueError, match=r'mesh\.fsdp: .*device count 8, got 3'):
    step_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=3)))
  with pytest.raises(ValueError, match=r'mesh\.data: .*got data=3'):
    step_lib.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1)))


def test_host_constant_optimizer_init_equals_jit():
  """``state.host_constant`` (the optimizer state computed in numpy) equals ``jit(tx.init)``, and a
  value-dependent function falls back to jit."""
  config = base_config()
  config.optim.update(name='adamw', grad_clip=1.0, schedule='cosine', warmup_steps=3,
                      skip_threshold=10.0)
  tx, _ = optim.make_optimizer(config.optim, 100)
  params = {'a': np.ones((3, 4), np.float32), 'b': {'c': np.arange(5, dtype=np.float32)}}
  host, ref = state_lib.host_constant(tx.init, params), jax.jit(tx.init)(params)
  assert jax.tree.structure(host) == jax.tree.structure(ref)
  for h, r in zip(jax.tree.leaves(host), jax.tree.leaves(ref)):
    assert isinstance(h, np.ndarray) and h.dtype == r.dtype
    np.testing.assert_array_equal(h, r)
  np.testing.assert_array_equal(state_lib.host_constant(lambda x: 2 * x, params['b']['c']),
                                2 * params['b']['c'])
