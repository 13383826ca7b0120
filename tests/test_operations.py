"""Operations: checkpoint layout versions and migrations, damaged checkpoints, preemption, one-line
errors, metrics on resume, and a SIGKILL fault-injection run.

The old-layout checkpoint (``tests/data/nvae_layout_v1/``) was written by the code before commit
df9ff56 (see its ``make_fixture.py``); the sigmas it must give come from that code too.
"""

import atexit
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from nvae_jax import errors
from nvae_jax.config import nvae as nvae_config
from nvae_jax.objectives import spectral
from nvae_jax.train import build
from nvae_jax.train import checkpoint as ckpt_lib
from nvae_jax.train import migrations
from nvae_jax.train import testing  # noqa: F401  (registers tiny_test_vae)

DATA = os.path.join(os.path.dirname(__file__), 'data')
V1 = os.path.join(DATA, 'nvae_layout_v1')


# ----------------------------------------------------------------------- versions and migrations


def _tiny_nvae_config():
  """The config of ``tests/data/nvae_layout_v1`` (see its make_fixture.py)."""
  c = nvae_config.published_config('mnist', 'small')  # configs/nvae_mnist.py:small
  m = c.model
  m.num_channels_enc = m.num_channels_dec = 4
  m.num_latent_scales, m.num_groups_per_scale, m.min_groups_per_scale = 1, 2, 1
  m.num_latent_per_group = 2
  c.data.batch_size = c.data.eval_batch_size = 8  # 4 in the fixture; a multiple of 8 devices here
  c.train.num_steps = 2
  return c


@pytest.fixture(scope='module')
def v1_checkpoint(tmp_path_factory):
  """(checkpoint dir, abstract target of today's code) of the version-1 checkpoint."""
  root = tmp_path_factory.mktemp('nvae_v1')
  with tarfile.open(os.path.join(V1, 'checkpoint_v1.tar.gz')) as tar:
    tar.extractall(root, filter='data')
  config = _tiny_nvae_config()
  run = build.build(config)
  abstract, _ = build.abstract_state(run, build.batch_spec((32, 32, 1), 8))
  return str(root / 'checkpoints'), abstract, config


def _raw_state(directory, step):
  mngr = ocp.CheckpointManager(directory, item_handlers=dict(state=ocp.StandardCheckpointHandler()))
  try:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  finally:
    mngr.close()


def _by_path(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_nvae_v1_checkpoint_migrates_to_today(v1_checkpoint, tmp_path):
  directory, abstract, config = v1_checkpoint
  assert migrations.current_version('nvae') == 2
  ckpt = ckpt_lib.Checkpointer(directory, model='nvae')
  with pytest.raises(errors.CheckpointMismatchError):  # the old layout does not fit as it is
    ckpt.check(2, abstract)
  state, data_state, saved_config = ckpt.restore(abstract, 2)
  ckpt.close()
  assert data_state['step'] == 2 and saved_config['model']['name'] == 'nvae'

  # Everything but the spectral vectors is carried over bit for bit.
  raw = _raw_state(directory, 2)
  for name in ('params', 'opt_state', 'step'):
    before, after = _by_path(raw[name]), _by_path(state[name])
    assert sorted(before) == sorted(after) and before
    for path, x in before.items():
      np.testing.assert_array_equal(np.asarray(x), np.asarray(after[path]), err_msg=path)
  np.testing.assert_array_equal(jax.random.key_data(raw['rng']), jax.random.key_data(state['rng']))

  # The migrated vectors give, through today's spectral code, the old code's per-conv sigmas.
  old = np.load(os.path.join(V1, 'old_spectral.npz'))
  kernels = traverse_util.unflatten_dict(
      {tuple(k[len('kernel:'):].split('/')): old[k] for k in old.files if k.startswith('kernel:')})
  loss, _, sigmas = jax.jit(lambda k, st: spectral.spectral_loss(k, st, 0))(
      kernels, state['model_state']['spectral'])
  groups = spectral.conv_groups(kernels)
  assert sum(len(p) for p in groups.values()) == 26
  for key, paths in groups.items():
    expected = [float(old['sigma:' + '/'.join(p)]) for p in paths]
    np.testing.assert_allclose(np.asarray(sigmas[key]), expected, rtol=2e-5, err_msg=key)
  assert float(loss) == pytest.approx(sum(float(old[k]) for k in old.files
                                          if k.startswith('sigma:')), rel=1e-5)


def _host_tree(state):
  """Numpy leaves, PRNG keys as their key data."""
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x), state)


_FAMILY = 'test_layout_family'  # version 1: params {'w_old'}; version 2: params {'w'} (x 2)


@migrations.register_migration(_FAMILY, from_version=1)
def _family_1_to_2(state):
  params = dict(state['params'])
  return dict(state, params={'w': params.pop('w_old') * 2})


def _family_save(directory, params, *, model, meta=None):
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False, model=model)
  state = {'step': np.int32(1), 'params': {k: np.asarray(v, np.float32) for k, v in params.items()}}
  ckpt.save(1, state, data_state={'step': 1}, force=True)
  ckpt.close()
  if meta is not None:
    with open(os.path.join(directory, '1', 'meta', 'metadata'), 'w', encoding='utf-8') as f:
      json.dump(meta, f)


def _family_restore(directory):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {'step': jax.ShapeDtypeStruct((), np.int32, sharding=sharding),
              'params': {'w': jax.ShapeDtypeStruct((3,), np.float32, sharding=sharding)}}
  ckpt = ckpt_lib.Checkpointer(directory, model=_FAMILY)
  try:
    state, _, _ = ckpt.restore(abstract, 1)
  finally:
    ckpt.close()
  return np.asarray(state['params']['w'])


def test_layout_versions_are_recorded_detected_and_checked(tmp_path):
  assert migrations.current_version(_FAMILY) == 2
  w = np.arange(3.0)
  # Written today: the record says version 2, and it restores as it is.
  _family_save(str(tmp_path / 'v2'), {'w': w}, model=_FAMILY)
  with open(tmp_path / 'v2' / '1' / 'meta' / 'metadata', encoding='utf-8') as f:
    assert json.load(f) == {'model': _FAMILY, 'layout_version': 2}
  np.testing.assert_array_equal(_family_restore(str(tmp_path / 'v2')), w)
  # Recorded as version 1: migrated.
  _family_save(str(tmp_path / 'v1'), {'w_old': w}, model=_FAMILY,
               meta={'model': _FAMILY, 'layout_version': 1})
  np.testing.assert_array_equal(_family_restore(str(tmp_path / 'v1')), 2 * w)
  # No record (written before versions were): today's layout as it is, another one from 1.
  _family_save(str(tmp_path / 'bare2'), {'w': w}, model=None)
  assert not os.path.exists(tmp_path / 'bare2' / '1' / 'meta')
  np.testing.assert_array_equal(_family_restore(str(tmp_path / 'bare2')), w)
  _family_save(str(tmp_path / 'bare1'), {'w_old': w}, model=None)
  np.testing.assert_array_equal(_family_restore(str(tmp_path / 'bare1')), 2 * w)
  # Newer than this code: fails naming both versions, and reads nothing.
  _family_save(str(tmp_path / 'v7'), {'w': w}, model=_FAMILY,
               meta={'model': _FAMILY, 'layout_version': 7})
  with pytest.raises(errors.CheckpointVersionError,
                     match=r'test_layout_family train-state layout version 7, but this nvae_jax '
                           r'writes version 2.*register a migration 7 -> 2'):
    _family_restore(str(tmp_path / 'v7'))
  # A migrated state that still does not fit names the entries.
  _family_save(str(tmp_path / 'odd'), {'w_old': np.arange(4.0)}, model=_FAMILY,
               meta={'model': _FAMILY, 'layout_version': 1})
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r'after migrating its test_layout_family layout version 1 to 2'):
    _family_restore(str(tmp_path / 'odd'))


def test_missing_migration_step_is_named():
  @migrations.register_migration('test_gap_model', from_version=1)
  def _one(state):
    return dict(state, x=state['x'] + 1)

  @migrations.register_migration('test_gap_model', from_version=3)
  def _three(state):
    return state

  assert migrations.current_version('test_gap_model') == 4
  with pytest.raises(errors.CheckpointVersionError,
                     match=r'version 1, expected version 4: no migration 2 -> 3 is registered; '
                           r"write one with @register_migration\('test_gap_model', "
                           r'from_version=2\)'):
    migrations.migrate('test_gap_model', {'x': 0}, 1)
  assert migrations.migrate('test_gap_model', {'x': 0}, 3) == {'x': 0}
  with pytest.raises(ValueError, match='already registered'):
    migrations.register_migration('test_gap_model', from_version=1)(_one)


# ------------------------------------------------------------------------- damaged checkpoints


TINY_CONFIG = os.path.join(DATA, 'tiny_train_config.py')


def _tiny_config(arg=None):
  """``tests/data/tiny_train_config.py``: TinyVAETask on the 8x8 digits, compiles in seconds."""
  spec = importlib.util.spec_from_file_location('tiny_train_config', TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _host_state(workdir, step, arg=None):
  config = _tiny_config(arg)
  run = build.build(config)
  abstract, _ = build.abstract_state(run, build.batch_spec((8, 8, 1), 16))
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(workdir))
  try:
    state, _, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return _host_tree(state)


@pytest.fixture(scope='module')
def tiny_uninterrupted(tmp_path_factory):
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('tiny_uninterrupted'))
  loop.train_and_evaluate(_tiny_config(), workdir)
  return workdir


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(max(0, os.path.getsize(path) // 2))


@pytest.mark.parametrize('damage', ['data_json', 'state_arrays'])
def test_damaged_latest_checkpoint_falls_back(tiny_uninterrupted, tmp_path, capfd, damage):
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  loop.train_and_evaluate(_tiny_config(), workdir)
  step6 = os.path.join(workdir, 'checkpoints', '6')
  if damage == 'data_json':
    _truncate(os.path.join(step6, 'data', 'metadata'))
  else:  # every array chunk of the state
    for root, _, files in os.walk(os.path.join(step6, 'state')):
      for name in files:
        if os.sep + 'd' in root:
          _truncate(os.path.join(root, name))
  capfd.readouterr()

  # nvae-jax --mode=eval (and sample, through the same restore) uses the newest readable
  # checkpoint, and keeps the damaged one.
  from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  report = main_lib.main(['nvae-jax', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
                          '--mode=eval'])
  assert report['step'] == 3
  err = capfd.readouterr().err
  assert f'warning: checkpoint {step6} cannot be read' in err and 'it is kept' in err
  assert os.path.isdir(step6)

  # Training resumes from step 3, sets the damaged step aside (kept) and redoes it identically.
  loop.train_and_evaluate(_tiny_config(), workdir)
  err = capfd.readouterr().err
  assert 'cannot be read' in err and 'checkpoints_damaged' in err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '6'))
  expected, found = _host_state(tiny_uninterrupted, 6), _host_state(workdir, 6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(found)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------- preemption and SIGKILL, in child processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_STEPS = 40


@pytest.fixture(scope='module')
def long_reference(tmp_path_factory):
  """The 'long' tiny config trained in one go (in this process: same devices and flags)."""
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('long_reference'))
  loop.train_and_evaluate(_tiny_config('long'), workdir)
  return workdir


def _start_child(workdir):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'nvae_jax.main', f'--config={TINY_CONFIG}:long',
       f'--workdir={workdir}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _run_until(proc, step, sig):
  """Reads the child's progress lines; sends ``sig`` once it reports ``step`` (or later)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    m = re.match(r'step (\d+)/', line)
    if m and int(m.group(1)) >= step:
      proc.send_signal(sig)
      break
  lines.extend(proc.stdout)  # until the child exits
  proc.wait(timeout=120)
  return ''.join(lines)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _assert_same_run(reference, workdir):
  """Final state bit-identical to the reference; metrics once per (step, split), same losses."""
  expected, found = _host_state(reference, LONG_STEPS, 'long'), _host_state(workdir, LONG_STEPS,
                                                                              'long')
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(found)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  records = _metrics(workdir)
  keys = [(r['step'], r['split']) for r in records]
  assert len(keys) == len(set(keys)), f'repeated records: {sorted(keys)}'
  ref = {(r['step'], r['split']): r for r in _metrics(reference)}
  assert sorted(keys) == sorted(ref)
  for r in records:
    if r['split'] == 'train':
      assert r['loss'] == ref[(r['step'], 'train')]['loss'], r['step']


def test_metrics_of_a_killed_run(tmp_path):
  """A kill while writing leaves a partial last line: read_metrics skips it, and the next start
  drops it together with the records after the restored checkpoint."""
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train", "loss": 3.0}\n'
                  '{"step": 2, "split": "train", "loss": 2.0}\n'
                  '{"step": 2, "split": "eval", "nelbo": 9.0}\n'
                  '{"step": 3, "split": "train", "loss": 1.0}\n{"step": 4, "spl')
  assert [r['step'] for r in loop.read_metrics(str(tmp_path))] == [1, 2, 3]
  writer = loop.MetricWriter(str(tmp_path))
  writer.start_at(2)  # restored from the checkpoint of step 2
  writer.write(3, 'train', {'loss': 1.5})
  writer.close()
  assert [(r['step'], r['split'], r.get('loss')) for r in map(json.loads, path.open())] == [
      (1, 'train', 3.0), (2, 'train', 2.0), (2, 'eval', None), (3, 'train', 1.5)]


def test_sigint_in_process_stops_after_the_step_and_resumes(long_reference, tmp_path):
  """Ctrl-C in a notebook: the in-process API returns {'preempted': 'SIGINT'} after
  checkpointing the step, and the next call resumes bit-identically."""
  from nvae_jax.data import make_pipeline  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel

  class Interrupting:
    """The train pipeline, sending this process SIGINT when it gives its 8th batch."""

    def __init__(self, pipe):
      self.pipe, self.drawn = pipe, 0

    def __next__(self):
      self.drawn += 1
      if self.drawn == 8:  # the batch of the 8th step: it finishes, then the run stops
        os.kill(os.getpid(), signal.SIGINT)
      return next(self.pipe)

    def get_state(self):
      return self.pipe.get_state()

    def set_state(self, state):
      self.pipe.set_state(state)

  def interrupting_pipeline(*args, train, **kwargs):
    pipe = make_pipeline(*args, train=train, **kwargs)
    return Interrupting(pipe) if train else pipe

  workdir = str(tmp_path)
  # What the run must put back: Python's KeyboardInterrupt handler, or SIG_IGN when this process
  # was started with SIGINT ignored (a background job of a non-interactive shell).
  before = signal.getsignal(signal.SIGINT)
  result = loop.train_and_evaluate(_tiny_config('long'), workdir,
                                   pipeline_fn=interrupting_pipeline)
  assert result['preempted'] == 'SIGINT' and result['step'] == 8
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(workdir))
  assert ckpt.latest_step() == result['step']
  ckpt.close()
  assert signal.getsignal(signal.SIGINT) is before  # handlers put back
  final = loop.train_and_evaluate(_tiny_config('long'), workdir)
  assert final['step'] == LONG_STEPS and 'preempted' not in final
  _assert_same_run(long_reference, workdir)


def test_sigkill_at_random_steps_then_resume(long_reference, tmp_path):
  """Fault injection: 3 SIGKILLs at random steps (one may land during an async checkpoint write)."""
  workdir = str(tmp_path)
  rng = random.Random(8)
  kills = sorted(rng.sample(range(3, LONG_STEPS - 2), 3))
  for target in kills:
    proc = _start_child(workdir)
    out = _run_until(proc, target, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
  proc = _start_child(workdir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  _assert_same_run(long_reference, workdir)


def _sbatch(tmp_path, workdir):
  """launch/slurm_gpu.sbatch run by bash, with stand-ins for srun (runs the command) and scontrol
  (records its arguments in scontrol.txt)."""
  bin_dir = tmp_path / 'bin'
  if not bin_dir.exists():
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / 'scontrol').write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.txt\n')
    for name in ('srun', 'scontrol'):
      os.chmod(bin_dir / name, 0o755)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242')
  return subprocess.Popen(
      ['bash', os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch'), f'--config={TINY_CONFIG}:long',
       f'--workdir={workdir}', '--nodistributed'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_the_step_requeues_and_resumes_bit_identically(long_reference,
                                                                            tmp_path):
  """SIGTERM to the SLURM batch shell mid-training: the training process finishes its step,
  checkpoints it and exits 75, which the script turns into `scontrol requeue`; the requeued job
  resumes from that step and ends bit-identical to an uninterrupted run."""
  workdir = str(tmp_path / 'work')
  proc = _sbatch(tmp_path, workdir)
  out = _run_until(proc, 12, signal.SIGTERM)
  assert proc.returncode == 0, out[-3000:]
  m = re.search(r'Stopped by SIGTERM after step (\d+): checkpoint (\S+) written', out)
  assert m and 'requeueing job 4242' in out, out[-3000:]
  assert (tmp_path / 'scontrol.txt').read_text().split() == ['requeue', '4242']
  stopped = int(m.group(1))
  assert 12 <= stopped < LONG_STEPS
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(workdir))
  assert ckpt.latest_step() == stopped  # nothing lost
  ckpt.close()

  os.remove(tmp_path / 'scontrol.txt')
  proc = _sbatch(tmp_path, workdir)  # the requeued job
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert f'Resumed from {build.checkpoint_dir(workdir)}/{stopped}.' in out
  assert not (tmp_path / 'scontrol.txt').exists()  # finished: not requeued
  _assert_same_run(long_reference, workdir)


def test_preempted_status_is_75(tmp_path, monkeypatch):
  """nvae-jax itself exits 75 when a stop signal ended training (the script above requeues on
  it); the signal is stood in for by a request that fires at the first step."""
  from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  from nvae_jax.train import preemption  # pylint: disable=import-outside-toplevel

  def fire(self):
    self.signal_name = 'SIGTERM'
    return True

  monkeypatch.setattr(preemption.StopRequest, 'requested', fire)
  with pytest.raises(SystemExit) as e:
    main_lib.run(['nvae-jax', f'--config={TINY_CONFIG}:long', f'--workdir={tmp_path}'])
  assert e.value.code == errors.PREEMPTED_EXIT == 75
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(str(tmp_path)))
  assert ckpt.all_steps() == [1]
  ckpt.close()


# ------------------------------------------------------------ one line and exit 2 for user errors

QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
NVAE_MNIST = os.path.join(ROOT, 'configs', 'nvae_mnist.py')
FLOW_MNIST = os.path.join(ROOT, 'configs', 'flow_mnist.py')
MNIST_TFDS = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'tfds')
# The quickstart conv VAE, shrunk: compiles in seconds.
TINY_BASE = (f'--config={QUICKSTART}', '--config.data.batch_size=16',
             '--config.data.eval_batch_size=16', '--config.train.num_steps=2',
             '--config.train.log_every=1', '--config.train.eval_every=0',
             '--config.train.images_every=0', '--config.train.checkpoint_every=1',
             '--config.train.num_eval_batches=1')
TINY = TINY_BASE + ('--config.model.channels=(4, 8, 8)',)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return str(path)


def _npz(path, dtype, channels=1):
  np.savez(path, images=np.zeros((40, 16, 16, channels), dtype))
  return str(path)


def _png_folder(folder, corrupt):
  folder.mkdir()
  for split in ('train', 'test'):
    (folder / split).mkdir()
    for i in range(20):
      if corrupt:
        (folder / split / f'{i}.png').write_bytes(b'not a png at all')
      else:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / split / f'{i}.png')
  return str(folder)


_TRAINED = {}


def _trained_tiny(workdir):
  """A copy, at ``workdir``, of a workdir trained with TINY (trained once per test process)."""
  if 'dir' not in _TRAINED:
    from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
    base = tempfile.mkdtemp(prefix='nvae_jax_trained_')
    atexit.register(shutil.rmtree, base, True)
    _TRAINED['dir'] = os.path.join(base, 'w')
    main_lib.main(['nvae-jax', *TINY, f'--workdir={_TRAINED["dir"]}'])
  shutil.copytree(_TRAINED['dir'], workdir)
  return str(workdir)


# (name, argv after the program name given tmp_path, the kind in the message, a pattern it has).
# Each is one of the malformed inputs of issue #8's trial.
USER_ERRORS = [
    ('bad enum value', lambda t: [*TINY, '--config.optim.name=sgd', f'--workdir={t}/w'],
     'config', r"optim\.name: expected one of .*got 'sgd'"),
    ('bad type', lambda t: [*TINY, '--config.train.num_steps=ten', f'--workdir={t}/w'],
     'flag', r'num_steps'),
    ('unknown field', lambda t: [*TINY, '--config.optim.lrr=1', f'--workdir={t}/w'],
     'flag', r'unknown config field .*lrr'),
    ('bad range', lambda t: [*TINY, '--config.optim.b2=1.5', f'--workdir={t}/w'],
     'config', r'optim\.b2: expected'),
    ('missing config file', lambda t: [f'--config={t}/nope.py', f'--workdir={t}/w'],
     'flag', r'--config=.*nope\.py: expected a config file .* found no such file'),
    ('broken config file', lambda t: [f'--config={_write(t / "broken.py", "def get_config(:")}',
                                      f'--workdir={t}/w'],
     'flag', r'syntax error in .*broken\.py, line 1'),
    ('no get_config', lambda t: [f'--config={_write(t / "empty.py", "X = 1")}',
                                 f'--workdir={t}/w'],
     'flag', r'expected .*empty\.py to define get_config'),
    ('unknown variant', lambda t: [f'--config={NVAE_MNIST}:large', f'--workdir={t}/w'],
     'flag', r'loading the config failed: .*large'),
    ('unknown model', lambda t: [*TINY, '--config.model.name=vqvae', f'--workdir={t}/w'],
     'config', r'unknown model .vqvae.'),
    ('unknown dataset', lambda t: [*TINY, '--config.data.name=no_such_dataset',
                                   f'--workdir={t}/w'],
     'data', r'no_such_dataset'),
    ('unprepared TFDS data', lambda t: [*TINY, '--config.data.name=mnist',
                                        f'--config.data.data_dir={t}', f'--workdir={t}/w'],
     'data', r"TFDS dataset 'mnist' .*is not prepared"),
    ('empty image folder', lambda t: [*TINY, '--config.data.name=folder',
                                      f'--config.data.data_dir={_mkdir(t / "empty")}',
                                      f'--workdir={t}/w'],
     'data', r'holds no'),
    ('corrupt image folder', lambda t: [*TINY, '--config.data.name=folder',
                                        f'--config.data.data_dir={_png_folder(t / "f", True)}',
                                        f'--workdir={t}/w'],
     'data', r'cannot read image file'),
    ('float npz', lambda t: [*TINY, '--config.data.name=npz',
                             f'--config.data.data_dir={_npz(t / "f.npz", np.float32)}',
                             f'--workdir={t}/w'],
     'data', r'uint8'),
    ('wrong-channel npz', lambda t: [*TINY, '--config.data.name=npz',
                                     f'--config.data.data_dir={_npz(t / "c.npz", np.uint8, 3)}',
                                     f'--workdir={t}/w'],
     'data', r'data\.channels=1'),
    ('eval without checkpoint', lambda t: [*TINY, '--mode=eval', f'--workdir={t}/w'],
     'checkpoint', r'no checkpoint in .*train first'),
    ('workdir is a file', lambda t: [*TINY, f'--workdir={_write(t / "file", "x")}'],
     'workdir', r'expected a directory .*found a file'),
    ('missing workdir', lambda t: [*TINY],
     'flag', r'--workdir: required for --mode=train'),
    ('NVAE image size', lambda t: [f'--config={NVAE_MNIST}:small', f'--workdir={t}/w',
                                   f'--config.data.data_dir={MNIST_TFDS}',
                                   '--config.data.image_size=30', '--config.data.pad=0'],
     'config', r'data\.image_size: expected .* multiples of 4 = 2\^\(model\.num_preprocess_blocks'
               r'=1 \+ model\.num_latent_scales=2 - 1\); found images of 30x30'),
    ('flow image size', lambda t: [f'--config={FLOW_MNIST}:small', f'--workdir={t}/w',
                                   f'--config.data.data_dir={MNIST_TFDS}',
                                   '--config.data.image_size=30'],
     'config', r'data\.image_size: expected .* multiples of \d+ = 2\^model\.num_levels'),
    ('resume with another architecture', lambda t: [
        *TINY_BASE, '--config.model.channels=(4, 8, 16)', f'--workdir={_trained_tiny(t / "a")}'],
     'checkpoint', r'does not fit the model .*shape mismatch'),
    ('resume with another decoder', lambda t: [
        *TINY, '--config.model.decoder=gaussian_shared', f'--workdir={_trained_tiny(t / "d")}'],
     'checkpoint', r'does not fit the model'),
    ('exploding learning rate', lambda t: [
        *TINY, '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
        '--config.optim.max_consecutive_skips=2', '--config.train.num_steps=8',
        f'--workdir={t}/w'],
     'training', r'optim\.max_consecutive_skips: 2 consecutive updates were skipped'),
]


def _mkdir(path):
  path.mkdir()
  return str(path)


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize('name,argv,kind,pattern', USER_ERRORS, ids=[e[0] for e in USER_ERRORS])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, name, argv, kind, pattern):
  from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  args = argv(tmp_path)
  before = _listing(tmp_path)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main_lib.run(['nvae-jax', *args])
  err = capsys.readouterr().err
  assert e.value.code == errors.USER_ERROR_EXIT, err
  lines = [line for line in err.splitlines() if line.startswith('nvae-jax:')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith(f'nvae-jax: {kind} error: '), lines[0]
  assert re.search(pattern, lines[0]), lines[0]
  if name != 'exploding learning rate':  # fails before its first step: the workdir is untouched
    assert _listing(tmp_path) == before, name


def test_debug_flag_shows_the_traceback(tmp_path):
  from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.ConfigError, match='optim.name'):
    main_lib.run(['nvae-jax', *TINY, '--config.optim.name=sgd', f'--workdir={tmp_path}',
                  '--debug'])


def test_every_user_error_is_a_library_error():
  from nvae_jax.config.validation import ConfigError  # pylint: disable=import-outside-toplevel
  from nvae_jax.train.optim import TooManySkipsError  # pylint: disable=import-outside-toplevel
  for cls in (ConfigError, ckpt_lib.CheckpointMismatchError, TooManySkipsError,
              errors.DataError, errors.DataNotFoundError, errors.NoCheckpointError,
              errors.CheckpointVersionError, errors.WorkdirError, errors.FlagError):
    assert issubclass(cls, errors.NvaeJaxError), cls
