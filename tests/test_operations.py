"""Operations: checkpoint layout versions and migrations, damaged checkpoints, preemption, one-line
errors, metrics on resume, and a SIGKILL fault-injection run.

The old-layout checkpoint (``tests/data/nvae_layout_v1/``) was written by the code before commit
df9ff56 (see its ``make_fixture.py``); the sigmas it must give come from that code too.
"""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import nvae_mnist
from nvae_jax import errors
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
  c = nvae_mnist.get_config('small')
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
  loss, _, sigmas = spectral.spectral_loss(kernels, state['model_state']['spectral'], 0)
  groups = spectral.conv_groups(kernels)
  assert sum(len(p) for p in groups.values()) == 26
  for key, paths in groups.items():
    expected = [float(old['sigma:' + '/'.join(p)]) for p in paths]
    np.testing.assert_allclose(np.asarray(sigmas[key]), expected, rtol=2e-5, err_msg=key)
  assert float(loss) == pytest.approx(sum(float(old[k]) for k in old.files
                                          if k.startswith('sigma:')), rel=1e-5)

  # Saved again, it is a version-2 checkpoint that restores without migration.
  again = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False, model='nvae')
  again.save(2, state, data_state=data_state, config=config, force=True)
  again.wait()
  restored, _, _ = again.restore(abstract, 2)
  again.close()
  with open(tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata', encoding='utf-8') as f:
    assert json.load(f) == {'model': 'nvae', 'layout_version': 2}
  for a, b in zip(jax.tree.leaves(step_host(state)), jax.tree.leaves(step_host(restored))):
    np.testing.assert_array_equal(a, b)


def step_host(state):
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x), state)


def test_newer_checkpoint_version_fails_naming_both_versions(v1_checkpoint, tmp_path):
  directory, abstract, _ = v1_checkpoint
  ckpt = ckpt_lib.Checkpointer(directory, model='nvae')
  state, data_state, _ = ckpt.restore(abstract, 2)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, model='nvae')
  ckpt.save(2, state, data_state=data_state, force=True)
  ckpt.wait()
  with open(tmp_path / '2' / 'meta' / 'metadata', 'w', encoding='utf-8') as f:
    json.dump({'model': 'nvae', 'layout_version': 7}, f)
  with pytest.raises(errors.CheckpointVersionError,
                     match=r'nvae train-state layout version 7, but this nvae_jax writes version '
                           r'2.*register a migration 7 -> 2'):
    ckpt.restore(abstract, 2)
  ckpt.close()


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
  return step_host(state)


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

  # Evaluation (and sampling) use the newest readable checkpoint, and keep the damaged one.
  config = _tiny_config()
  run = build.build(config)
  _, _, step, _ = build.restore_latest(run, workdir, (8, 8, 1), 16)
  assert step == 3
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


def test_sigterm_checkpoints_the_current_step_and_resumes_bit_identically(long_reference,
                                                                          tmp_path):
  workdir = str(tmp_path)
  out = _run_until(_start_child(workdir), 12, signal.SIGTERM)
  m = re.search(r'Stopped by SIGTERM after step (\d+): checkpoint (\S+) written', out)
  assert m, out[-3000:]
  stopped = int(m.group(1))
  assert 12 <= stopped < LONG_STEPS
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(workdir))
  assert ckpt.latest_step() == stopped  # nothing lost
  ckpt.close()
  proc = _start_child(workdir)
  out2 = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out2[-3000:]
  assert f'Resumed from {build.checkpoint_dir(workdir)}/{stopped}.' in out2
  _assert_same_run(long_reference, workdir)


def test_preempted_exit_status(long_reference, tmp_path):
  """The status that launch/slurm_gpu.sbatch turns into a requeue (checked on the first child)."""
  proc = _start_child(str(tmp_path))
  out = _run_until(proc, 3, signal.SIGINT)
  assert proc.returncode == errors.PREEMPTED_EXIT == 75, out[-3000:]
  assert 'Stopped by SIGINT' in out


def test_sigkill_at_random_steps_then_resume(long_reference, tmp_path):
  """Fault injection: 3 SIGKILLs at random steps (some during async checkpoint writes)."""
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


def test_slurm_script_requeues_a_preempted_run(tmp_path):
  """launch/slurm_gpu.sbatch with stand-ins for srun and scontrol: SIGTERM to the batch shell
  reaches the training process, which checkpoints and exits 75; the script requeues the job."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
  (bin_dir / 'scontrol').write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.txt\n')
  for name in ('srun', 'scontrol'):
    os.chmod(bin_dir / name, 0o755)
  workdir = str(tmp_path / 'work')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242',
             NVAE_JAX_DISTRIBUTED='0')
  proc = subprocess.Popen(
      ['bash', os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch'), f'--config={TINY_CONFIG}:long',
       f'--workdir={workdir}', '--nodistributed'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  out = _run_until(proc, 3, signal.SIGTERM)
  assert proc.returncode == 0, out[-3000:]
  assert 'Stopped by SIGTERM after step' in out and 'requeueing job 4242' in out
  assert (tmp_path / 'scontrol.txt').read_text().split() == ['requeue', '4242']
