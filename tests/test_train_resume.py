"""Kill-and-resume equals an uninterrupted run; checkpoints that do not fit fail clearly; the loop
stops on too many skipped updates.  Real data: scikit-learn's 8x8 digits through the pipeline."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from nvae_jax.config import base_config
from nvae_jax.data import make_pipeline
from nvae_jax.train import checkpoint as ckpt_lib
from nvae_jax.train import loop
from nvae_jax.train import optim
from nvae_jax.train import build
from nvae_jax.train import step as step_lib
from nvae_jax.train.testing import TinyVAETask


def _config(features=4, **train):
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(name='tiny_test_vae', features=features, latent=2))
  c.data.name = 'digits'
  c.data.train_split, c.data.eval_split = 'train[:90%]', 'train[90%:]'
  c.data.batch_size, c.data.eval_batch_size = 16, 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.optim.schedule = 'cosine'
  c.train.update(dict(num_steps=6, log_every=3, eval_every=0, checkpoint_every=3,
                      images_every=0, num_eval_batches=2, num_images=8,
                      async_checkpoints=True))
  c.train.update(train)
  return c


def _restore(config, workdir, step):
  run = build.build(config, TinyVAETask(config))
  abstract, _ = build.abstract_state(run, build.batch_spec((8, 8, 1), 16))
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(workdir))
  try:
    state, data_state, saved_config = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return step_lib.to_host(state), data_state, saved_config


def _train_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Workdir A: 6 steps in one go.  Workdir B: 3 steps, 'killed', then resumed to 6 by new
  objects (new task, pipeline, jitted functions and checkpoint manager)."""
  a = str(tmp_path_factory.mktemp('uninterrupted'))
  b = str(tmp_path_factory.mktemp('resumed'))
  result_a = loop.train_and_evaluate(_config(), a, task=TinyVAETask(_config()))
  first = loop.train_and_evaluate(_config(), b, task=TinyVAETask(_config()), stop_after_steps=3)
  assert first['step'] == 3
  ckpt = ckpt_lib.Checkpointer(build.checkpoint_dir(b))
  assert ckpt.all_steps() == [3]
  ckpt.close()
  result_b = loop.train_and_evaluate(_config(), b, task=TinyVAETask(_config()))
  return a, b, result_a, result_b


def test_resume_equals_uninterrupted(runs):
  a, b, result_a, result_b = runs
  assert result_a['step'] == result_b['step'] == 6
  state_a, data_a, _ = _restore(_config(), a, 6)
  state_b, data_b, saved_config = _restore(_config(), b, 6)
  assert data_a == data_b and (data_a['epoch'], data_a['step']) == (0, 6)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  flat_b = jax.tree.leaves(state_b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert int(state_a['step']) == 6
  assert saved_config['optim']['lr'] == pytest.approx(3e-3)
  # the run did learn something, and the logged losses agree too
  train_a = [r for r in _train_lines(a) if r['split'] == 'train']
  train_b = [r for r in _train_lines(b) if r['split'] == 'train']
  assert [r['step'] for r in train_a] == [3, 6] == [r['step'] for r in train_b]
  assert train_a[-1]['loss'] == train_b[-1]['loss']
  assert train_a[-1]['lr'] == pytest.approx(float(optim.make_schedule(_config().optim, 6)(5)))


def test_first_record_has_no_rate_and_every_value_is_a_finite_number(tmp_path):
  """The first step compiles and is left out of ``steps_per_sec``, so the record of that step
  alone has no rate (it held the string "nan" before, and TensorBoard warned about it)."""
  config = _config(num_steps=3, log_every=1, checkpoint_every=3)
  loop.train_and_evaluate(config, str(tmp_path), task=TinyVAETask(config))
  train = [r for r in _train_lines(str(tmp_path)) if r['split'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3]
  assert 'steps_per_sec' not in train[0]
  assert all(r['steps_per_sec'] > 0 for r in train[1:])
  for r in train:
    for k, v in r.items():
      if k != 'split':
        assert isinstance(v, (int, float)) and np.isfinite(v), (r['step'], k, v)


def test_async_checkpoint_is_not_corrupted_by_donation(runs):
  """A saved step 3 asynchronously and then donated the state to step 4; B stopped at 3."""
  a, b, _, _ = runs
  state_a, _, _ = _restore(_config(), a, 3)
  state_b, _, _ = _restore(_config(), b, 3)
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(x, y)


def test_workdir_outputs(runs):
  a, _, result_a, _ = runs
  lines = _train_lines(a)
  evals = [r for r in lines if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [6]  # eval_every=0: only at the end
  assert evals[0]['num_examples'] == 32  # 2 batches of 16 (num_eval_batches=2)
  assert evals[0]['bits_per_dim'] == pytest.approx(
      evals[0]['nats_per_image'] / (np.log(2) * 64))
  assert result_a['eval']['nats_per_image'] == pytest.approx(evals[0]['nats_per_image'])
  for name in ('samples.png', 'recon.png', 'samples_step6.png', 'recon_step6.png'):
    assert os.path.exists(os.path.join(a, name)), name
  samples = np.asarray(Image.open(os.path.join(a, 'samples.png')))
  # 8 images -> 3x3 tiles of 8 pixels shown 4x (32) + 1 pixel gaps
  assert samples.shape == (3 * 33 - 1, 3 * 33 - 1)
  recon = np.asarray(Image.open(os.path.join(a, 'recon.png')))
  assert recon.shape == (6 * 33 - 1, 3 * 33 - 1)  # 3 rows of originals interleaved with recons
  # row 0 holds eval images, row 1 their reconstructions (in [0, 1], not identical)
  assert 0 < np.abs(recon[:32].astype(int) - recon[33:65].astype(int)).mean() < 128
  assert any(f.startswith('events') for f in os.listdir(os.path.join(a, 'tb')))


def test_mismatched_checkpoint_names_the_entries(runs):
  a, _, _, _ = runs
  wider = _config(features=6)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    loop.train_and_evaluate(wider, a, task=TinyVAETask(wider))
  msg = str(e.value)
  assert 'shape mismatch at params.conv.kernel: expected (3, 3, 1, 6), found (3, 3, 1, 4)' in msg
  assert 'shape mismatch at opt_state.inner_state.0.mu.conv.kernel' in msg  # Adam's moments
  assert 'model_state.batch_stats.bn.mean: expected (6,), found (4,)' in msg


def test_structure_mismatch_lists_missing_and_unexpected_entries():
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
  expected = {'params': {'dense': {'kernel': sds(3, 4), 'bias': sds(4)}},
              'rng': jax.ShapeDtypeStruct((), jax.random.key(0).dtype)}
  stored = {'params': {'dense': {'kernel': sds(3, 4)}, 'extra': {'w': sds(2)}}, 'rng': sds(2)}
  assert ckpt_lib.compare_structures(expected, stored) == [
      'missing in checkpoint: params.dense.bias (expected shape (4,))',
      'unexpected in checkpoint: params.extra.w (found shape (2,))']


def test_loop_stops_after_too_many_consecutive_skips(tmp_path):
  def nan_after_two(data, split, **kw):
    pipe = make_pipeline(data, split, **kw)
    if not kw['train']:
      return pipe

    class Poisoned:
      count = 0

      def __next__(self):
        batch = next(pipe)
        self.count += 1
        if self.count > 2:
          batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        return batch

      def get_state(self):
        return pipe.get_state()

      def set_state(self, s):
        pipe.set_state(s)

    return Poisoned()

  c = _config(num_steps=20, log_every=100, checkpoint_every=0)
  c.optim.max_consecutive_skips = 3
  with pytest.raises(optim.TooManySkipsError,
                     match=r'optim\.max_consecutive_skips: 3 consecutive updates were skipped'):
    loop.train_and_evaluate(c, str(tmp_path), task=TinyVAETask(c), pipeline_fn=nan_after_two)
  assert not os.path.exists(os.path.join(str(tmp_path), 'checkpoints', '20'))
