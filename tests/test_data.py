"""Tests of nvae_jax.data: sources, transforms, determinism, sharding, resume and errors.

Images are made so that their index can be read back from the pixels, which lets the tests check
order, coverage and sharding from the batches alone, independently of the pipeline's bookkeeping.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import SHARED
from nvae_jax.config import base_config
from nvae_jax.data import image_shape, make_pipeline, make_pipeline_from_arrays

MNIST_DIR = os.path.join(SHARED, 'data', 'tfds')
CIFAR_NPZ = os.path.join(SHARED, 'data', 'cifar10_subset', 'cifar10_train_subset.npz')


def cfg(**kw):
  c = base_config().data
  c.update(kw)
  return c


def indexed_images(n, h=4, w=5, c=1, seed=0):
  """uint8 [n, h, w, c]: pixel [0, 0, 0] holds the index, the rest is random."""
  x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
  x[:, 0, 0, 0] = np.arange(n)
  return x


def ids(batch):
  """Indices encoded in pixel [0, 0, 0] of the mask=1 rows (8-bit data, no flip)."""
  rows = batch['image'][batch['mask'] == 1]
  return np.round(rows[:, 0, 0, 0] * 255).astype(int).tolist()


def take(pipe, k):
  return [next(pipe) for _ in range(k)]


def arrays(images, train, seed=0, pi=0, pc=1, **kw):
  return make_pipeline_from_arrays(images, cfg(**kw), train=train, seed=seed, process_index=pi,
                                   process_count=pc)


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize('bits', [8, 5, 3])
def test_quantisation_matches_closed_form(bits):
  k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  batch = next(arrays(k, train=False, num_bits=bits, eval_batch_size=1))
  expected = np.floor(k / 2.0**(8 - bits)) / (2**bits - 1)
  np.testing.assert_allclose(batch['image'], expected, rtol=0, atol=1e-7)
  assert batch['image'].dtype == np.float32
  levels = np.unique(batch['image'])
  assert len(levels) == 2**bits and levels[0] == 0 and levels[-1] == 1


def test_dynamic_binarisation_statistics_and_resampling():
  # 4 images, each holding all 256 intensities; 300 batches of 4 = 1200 draws per intensity.
  k = np.tile(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), (4, 1, 1, 1))
  pipe = arrays(k, train=True, binarize='dynamic', batch_size=4)
  draws = np.concatenate([next(pipe)['image'] for _ in range(300)])
  assert set(np.unique(draws)) <= {0.0, 1.0}
  p = np.arange(256) / 255.0
  mean = draws.reshape(len(draws), 256).mean(0)
  sd = np.sqrt(p * (1 - p) / len(draws))
  assert np.all(np.abs(mean - p) <= 5 * sd + 1e-12), np.max(np.abs(mean - p) / (sd + 1e-12))
  # Resampled every pass: two epochs of the same image differ; neighbouring pixels uncorrelated.
  assert not np.array_equal(draws[0], draws[4])
  centred = draws.reshape(len(draws), 256)[:, 1:-1] - p[1:-1]
  corr = np.mean(centred[:, :-1] * centred[:, 1:]) / np.mean(centred**2)
  assert abs(corr) < 0.02


def test_eval_binarisation_is_fixed_per_seed():
  k = np.full((6, 8, 8, 1), 128, np.uint8)
  first = [b['image'] for b in arrays(k, train=False, binarize='dynamic', eval_batch_size=3)]
  again = [b['image'] for b in arrays(k, train=False, binarize='dynamic', eval_batch_size=2)]
  other = [b['image'] for b in arrays(k, train=False, seed=1, binarize='dynamic',
                                      eval_batch_size=3)]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))  # any batch size
  assert not np.array_equal(np.concatenate(first), np.concatenate(other))
  assert not np.array_equal(first[0][0], first[0][1])  # independent across examples


def test_threshold_binarisation():
  k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  batch = next(arrays(k, train=False, binarize='threshold', eval_batch_size=1))
  np.testing.assert_array_equal(batch['image'], (k >= 128).astype(np.float32))


def test_random_flip_is_a_mirror_about_half_the_time():
  x = indexed_images(40, 3, 6)
  x[:, 0, -1, 0] = 255  # makes every image asymmetric
  pipe = arrays(x, train=True, random_flip=True, batch_size=8)
  flipped = total = 0
  for _ in range(25):
    e, s = pipe.get_state()['epoch'], pipe.get_state()['step']
    idx = pipe.indices_at(e, s)
    got = np.round(next(pipe)['image'] * 255).astype(np.uint8)
    for row, i in zip(got, idx):
      plain, mirror = np.array_equal(row, x[i]), np.array_equal(row, x[i][:, ::-1])
      assert plain != mirror
      flipped += mirror
      total += 1
  assert abs(flipped / total - 0.5) < 5 * 0.5 / np.sqrt(total)
  # No flips in evaluation.
  rows = np.concatenate([b['image'][b['mask'] == 1]
                         for b in arrays(x, train=False, random_flip=True)])
  np.testing.assert_array_equal(np.round(rows * 255).astype(np.uint8), x)


# ----------------------------------------------------------------------------- order, resume

def test_train_epochs_are_shuffled_permutations_and_deterministic():
  x = indexed_images(22)
  pipe = arrays(x, train=True, seed=3, batch_size=4)
  assert (pipe.num_examples, pipe.batches_per_epoch) == (22, 5)
  epochs = [sum((ids(b) for b in take(pipe, 5)), []) for _ in range(3)]
  for e in epochs:
    assert len(set(e)) == 20 and set(e) <= set(range(22))  # drop remainder, no repeats
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert epochs[0] != sorted(epochs[0])
  again = arrays(x, train=True, seed=3, batch_size=4)
  assert sum((ids(b) for b in take(again, 5)), []) == epochs[0]
  other = arrays(x, train=True, seed=4, batch_size=4)
  assert sum((ids(b) for b in take(other, 5)), []) != epochs[0]
  assert all(b['mask'].sum() == 4 for b in take(pipe, 3))


def test_resume_is_exact():
  x = indexed_images(13, 6, 6)
  kw = dict(train=True, seed=7, random_flip=True, binarize='dynamic', batch_size=4)
  ref = take(arrays(x, **kw), 10)  # 3 batches per epoch: crosses epoch boundaries
  first = arrays(x, **kw)
  take(first, 4)
  state = json.loads(json.dumps(first.get_state()))
  resumed = arrays(x, **kw)
  resumed.set_state(state)
  for want, got in zip(ref[4:], take(resumed, 6)):
    np.testing.assert_array_equal(want['image'], got['image'])
  # An eval pass resumes too.
  ev = arrays(x, train=False, eval_batch_size=4)
  all_ev = list(ev)
  ev2 = arrays(x, train=False, eval_batch_size=4)
  next(ev2)
  ev3 = arrays(x, train=False, eval_batch_size=4)
  ev3.set_state(ev2.get_state())
  rest = list(ev3)
  assert len(rest) == len(all_ev) - 1
  np.testing.assert_array_equal(rest[-1]['image'], all_ev[-1]['image'])


def test_set_state_rejects_a_different_setup():
  x = indexed_images(13)
  state = arrays(x, train=True, seed=1, batch_size=4).get_state()
  with pytest.raises(ValueError, match=r'seed=1 was saved.*seed=2'):
    arrays(x, train=True, seed=2, batch_size=4).set_state(state)
  with pytest.raises(ValueError, match='batch_size'):
    arrays(x, train=True, seed=1, batch_size=2).set_state(state)


def test_train_host_shards_are_disjoint_equal_and_cover_the_epoch():
  x = indexed_images(24)
  per_host = []
  for pi in range(4):
    pipe = arrays(x, train=True, seed=5, pi=pi, pc=4, batch_size=8)
    assert (pipe.batch_size, pipe.num_examples, pipe.batches_per_epoch) == (2, 6, 3)
    per_host.append([ids(b) for b in take(pipe, 6)])  # two epochs
  for epoch in range(2):
    seen = [sum(h[3 * epoch:3 * epoch + 3], []) for h in per_host]
    assert all(len(s) == 6 for s in seen)
    assert sorted(sum(seen, [])) == list(range(24))  # disjoint and covering
  # The global batch (hosts concatenated) is the single-host batch of the same seed.
  single = take(arrays(x, train=True, seed=5, batch_size=8), 6)
  for step in range(6):
    assert sum((per_host[pi][step] for pi in range(4)), []) == ids(single[step])


def test_resume_on_another_host_count_continues_the_global_stream():
  x = indexed_images(30)
  ref = take(arrays(x, train=True, seed=2, batch_size=4, binarize='dynamic'), 9)
  one = arrays(x, train=True, seed=2, batch_size=4, binarize='dynamic')
  take(one, 5)
  halves = []
  for pi in range(2):
    pipe = arrays(x, train=True, seed=2, pi=pi, pc=2, batch_size=4, binarize='dynamic')
    pipe.set_state(one.get_state())
    halves.append(take(pipe, 4))
  for k in range(4):
    np.testing.assert_array_equal(
        ref[5 + k]['image'], np.concatenate([halves[0][k]['image'], halves[1][k]['image']]))


def test_eval_covers_every_example_once_across_hosts():
  x = indexed_images(23)
  per_host, total_mask = [], 0
  for pi in range(3):
    pipe = arrays(x, train=False, pi=pi, pc=3, eval_batch_size=6)
    batches = list(pipe)
    assert len(batches) == pipe.batches_per_epoch == 4  # ceil(23 / 6), on every host
    for b in batches:
      assert b['image'].shape == (2, 4, 5, 1) and b['mask'].shape == (2,)
      assert not b['image'][b['mask'] == 0].any()
    total_mask += sum(b['mask'].sum() for b in batches)
    assert pipe.num_examples == sum(b['mask'].sum() for b in batches)
    per_host.append([ids(b) for b in batches])
    with pytest.raises(StopIteration):
      next(pipe)
    pipe.reset()
    assert len(list(pipe)) == 4
  assert total_mask == 23
  seen = [i for step in range(4) for pi in range(3) for i in per_host[pi][step]]
  assert seen == list(range(23))  # in order, exactly once


# ----------------------------------------------------------------------------- sources

def test_digits_splits_and_values():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  raw = load_digits().images
  c = cfg(name='digits', eval_batch_size=8)
  assert image_shape(c) == (8, 8, 1)
  train = make_pipeline(c, 'train', train=False, seed=0, process_index=0, process_count=1)
  test = make_pipeline(c, 'test', train=False, seed=0, process_index=0, process_count=1)
  assert (train.num_examples, test.num_examples) == (1500, len(raw) - 1500)
  np.testing.assert_allclose(next(train)['image'][:, :, :, 0],
                             np.round(raw[:8] * 255 / 16) / 255, atol=1e-7)
  np.testing.assert_allclose(next(test)['image'][0, :, :, 0], np.round(raw[1500] * 255 / 16) / 255,
                             atol=1e-7)
  part = make_pipeline(c, 'all[:10%]', train=False, seed=0, process_index=0, process_count=1)
  assert part.num_examples == len(raw) // 10


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_source(tmp_path):
  colours = np.random.default_rng(0).integers(0, 256, (30, 3), dtype=np.uint8)
  names = []
  for i, col in enumerate(colours):
    # 8 x 16 images: the centre 8 x 8 holds the colour, the sides are white.
    img = np.full((8, 16, 3), 255, np.uint8)
    img[:, 4:12] = col
    name = f'sub{i % 3}/img_{i:02d}.png'
    _write_png(str(tmp_path / name), img)
    names.append(name)
  test_names = sorted(n for n in names if
                      int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], 'big') % 10 == 0)
  train_names = sorted(set(names) - set(test_names))
  assert test_names and train_names  # the rule puts 3 of these 30 names in the test split
  c = cfg(name='folder', data_dir=str(tmp_path), channels=3, image_size=8, eval_batch_size=4)
  assert image_shape(c) == (8, 8, 3)
  for split, expected in (('train', train_names), ('test', test_names)):
    pipe = make_pipeline(c, split, train=False, seed=0, process_index=0, process_count=1)
    rows = np.concatenate([b['image'][b['mask'] == 1] for b in pipe])
    want = np.stack([colours[names.index(n)] for n in expected])
    np.testing.assert_array_equal(np.round(rows * 255).astype(np.uint8),
                                  np.broadcast_to(want[:, None, None], rows.shape))
  # Grayscale: ITU-R 601-2 luma, resized from the 8 x 8 centre to 4 x 4 (constant stays constant).
  c1 = cfg(name='folder', data_dir=str(tmp_path), channels=1, image_size=4, eval_batch_size=30)
  batch = next(make_pipeline(c1, 'all', train=False, seed=0, process_index=0, process_count=1))
  order = sorted(names)
  luma = np.array([colours[names.index(n)] @ np.array([0.299, 0.587, 0.114]) for n in order])
  np.testing.assert_allclose(batch['image'][:, :, :, 0] * 255,
                             np.broadcast_to(luma[:, None, None], (30, 4, 4)), atol=1.0)


def test_folder_errors(tmp_path):
  c = cfg(name='folder', data_dir=str(tmp_path), channels=3, image_size=8)
  with pytest.raises(ValueError, match='holds no'):
    make_pipeline(c, 'all', train=False, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='image_size=0'):
    image_shape(cfg(name='folder', data_dir=str(tmp_path), channels=3))
  _write_png(str(tmp_path / 'good.png'), np.zeros((8, 8, 3), np.uint8))
  (tmp_path / 'broken.png').write_bytes(b'not a png at all')
  pipe = make_pipeline(cfg(name='folder', data_dir=str(tmp_path), channels=3, image_size=8,
                           eval_batch_size=2), 'all', train=False, seed=0, process_index=0,
                       process_count=1)
  with pytest.raises(ValueError, match='broken.png'):
    next(pipe)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    make_pipeline(cfg(name='folder', data_dir=str(tmp_path / 'nope'), channels=3, image_size=8),
                  'all', train=False, seed=0, process_index=0, process_count=1)


def test_npz_source_autodetects_key_and_splits(tmp_path):
  x = indexed_images(50, 6, 6, 3)
  path = str(tmp_path / 'd.npz')
  np.savez(path, images_nhwc_uint8=x, labels=np.arange(50))
  c = cfg(name='npz', data_dir=path, channels=3, eval_batch_size=50)
  assert image_shape(c) == (6, 6, 3)
  test = make_pipeline(c, 'test', train=False, seed=0, process_index=0, process_count=1)
  train = make_pipeline(c, 'train', train=False, seed=0, process_index=0, process_count=1)
  assert ids(next(test)) == list(range(45, 50)) and ids(next(train)) == list(range(45))
  np.savez(path, images=x[:10], other=x)  # 'images' wins over another uint8 array
  assert make_pipeline(c, 'all', train=False, seed=0, process_index=0,
                       process_count=1).num_examples == 10
  c.npz_key = 'other'
  assert make_pipeline(c, 'all', train=False, seed=0, process_index=0,
                       process_count=1).num_examples == 50


def test_npz_errors(tmp_path):
  path = str(tmp_path / 'bad.npz')
  c = cfg(name='npz', data_dir=path, channels=3)

  def build():
    return make_pipeline(c, 'all', train=False, seed=0, process_index=0, process_count=1)

  np.savez(path, a=np.zeros((4, 6, 6, 3), np.uint8), b=np.zeros((4, 6, 6, 3), np.uint8))
  with pytest.raises(ValueError, match='cannot tell which array'):
    build()
  np.savez(path, images=np.zeros((4, 6, 6, 3), np.float32))
  with pytest.raises(ValueError, match='uint8.*float32'):
    build()
  np.savez(path, images=np.zeros((4, 6, 6), np.uint8))
  with pytest.raises(ValueError, match='rank 3'):
    build()
  np.savez(path, images=np.zeros((4, 6, 6, 1), np.uint8))
  with pytest.raises(ValueError, match='channels=3.*1 channels'):
    build()
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    image_shape(cfg(name='npz', data_dir=str(tmp_path / 'missing.npz'), channels=3))


def test_cifar10_subset_npz():
  c = cfg(name='npz', data_dir=CIFAR_NPZ, channels=3, batch_size=8, random_flip=True)
  assert image_shape(c) == (32, 32, 3)
  pipe = make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1)
  idx = pipe.indices_at(0, 0)
  batch = next(pipe)
  with np.load(CIFAR_NPZ) as f:
    raw = f['images_nhwc_uint8'][idx]
  got = np.round(batch['image'] * 255).astype(np.uint8)
  for row, ref in zip(got, raw):
    assert np.array_equal(row, ref) or np.array_equal(row, ref[:, ::-1])
  assert pipe.num_examples == 5085 - 508


def test_array_errors():
  x = indexed_images(8)
  with pytest.raises(ValueError, match=r'rank 3.*images\[\.\.\., None\]'):
    arrays(x[..., 0], train=False)
  with pytest.raises(ValueError, match='uint8.*float64'):
    arrays(x / 255.0, train=False)
  with pytest.raises(ValueError, match='channels=3 but the images have 1'):
    arrays(x, train=False, channels=3)


def test_config_errors():
  x = indexed_images(16)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by process_count=4'):
    arrays(x, train=True, batch_size=6, pc=4)
  with pytest.raises(ValueError, match='eval_batch_size=6 is not divisible by process_count=4'):
    arrays(x, train=False, eval_batch_size=6, pc=4)
  with pytest.raises(ValueError, match='process_index=4'):
    arrays(x, train=True, batch_size=8, pi=4, pc=4)
  with pytest.raises(ValueError, match='num_bits=5 has no meaning'):
    arrays(x, train=True, num_bits=5, binarize='dynamic')
  with pytest.raises(ValueError, match='data.binarize'):
    arrays(x, train=True, binarize='stochastic')
  with pytest.raises(ValueError, match='image_size=4 leaves no room for data.pad=2'):
    arrays(x, train=True, image_size=4, pad=2)
  with pytest.raises(ValueError, match='fewer than one batch'):
    arrays(x, train=True, batch_size=32)


# ----------------------------------------------------------------------------- TFDS

def test_tfds_mock_mnist_pad_and_binarise():
  c = cfg(name='mnist', pad=2, batch_size=4, eval_batch_size=4)
  assert image_shape(c) == (32, 32, 1)
  with tfds.testing.mock_data(num_examples=10):
    ds = tfds.data_source('mnist', split='test')
    pipe = make_pipeline(c, 'test', train=False, seed=0, process_index=0, process_count=1)
    batches = list(pipe)
    assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 10
    first = batches[0]['image'][0]
    assert not first[:2].any() and not first[-2:].any() and not first[:, :2].any()
    np.testing.assert_allclose(first[2:30, 2:30], ds[0]['image'] / 255.0, atol=1e-7)
    c.binarize = 'dynamic'
    tr = next(make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1))
    assert tr['image'].shape == (4, 32, 32, 1) and set(np.unique(tr['image'])) <= {0.0, 1.0}


def test_threaded_reads_give_the_same_batches():
  c = cfg(name='mnist', pad=2, batch_size=32, random_flip=True, binarize='dynamic')
  with tfds.testing.mock_data(num_examples=40):
    got = [next(make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1,
                              num_workers=w))['image'] for w in (1, 2)]
  np.testing.assert_array_equal(got[0], got[1])


def test_tfds_mock_cifar10_and_resized_sources():
  with tfds.testing.mock_data(num_examples=8):
    c = cfg(name='cifar10', channels=3, batch_size=4, random_flip=True)
    b = next(make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1))
    assert b['image'].shape == (4, 32, 32, 3) and set(b) == {'image', 'mask'}  # 'id' dropped
    # downsampled_imagenet: random sizes under mock -> needs image_size; resized to 16.
    c = cfg(name='downsampled_imagenet/32x32', channels=3, batch_size=4, image_size=16)
    assert image_shape(c) == (16, 16, 3)
    b = next(make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1))
    assert b['image'].shape == (4, 16, 16, 3)
    c.image_size = 0
    with pytest.raises(ValueError, match='varying size'):
      image_shape(c)
    # celeb_a: NVAE's crop box, then bilinear resize.
    c = cfg(name='celeb_a', channels=3, eval_batch_size=2, image_size=16)
    ds = tfds.data_source('celeb_a', split='validation')
    b = next(make_pipeline(c, 'validation', train=False, seed=0, process_index=0,
                           process_count=1))
    ref = Image.fromarray(ds[1]['image']).crop((15, 40, 163, 188)).resize((16, 16),
                                                                           Image.BILINEAR)
    np.testing.assert_array_equal(np.round(b['image'][1] * 255).astype(np.uint8), np.asarray(ref))
    # binarized_mnist stores {0, 1}: read as {0, 255}.
    c = cfg(name='binarized_mnist', eval_batch_size=2)
    ds = tfds.data_source('binarized_mnist', split='test')
    b = next(make_pipeline(c, 'test', train=False, seed=0, process_index=0, process_count=1))
    np.testing.assert_array_equal(b['image'][0], (ds[0]['image'] > 0).astype(np.float32))


def test_tfds_errors(tmp_path):
  c = cfg(name='mnist', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=rf"'mnist'.*{tmp_path}.*--config.data.data_dir"):
    make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="data.name='no_such_dataset'"):
    image_shape(cfg(name='no_such_dataset'))
  with pytest.raises(ValueError, match='channels=3'):
    image_shape(cfg(name='mnist', channels=3))


def test_real_mnist_first_example_matches_tfds():
  c = cfg(name='mnist', data_dir=MNIST_DIR, eval_batch_size=8, batch_size=8)
  assert image_shape(c) == (28, 28, 1)
  ds = tfds.data_source('mnist', split='test', data_dir=MNIST_DIR,
                        builder_kwargs={'file_format': 'array_record'}, download=False)
  pipe = make_pipeline(c, 'test', train=False, seed=0, process_index=0, process_count=1)
  assert pipe.num_examples == 10000 and pipe.batches_per_epoch == 1250
  b = next(pipe)
  assert b['image'].shape == (8, 28, 28, 1) and b['image'].dtype == np.float32
  assert b['image'].min() == 0.0 and b['image'].max() == 1.0
  np.testing.assert_allclose(b['image'][0], ds[0]['image'] / 255.0, atol=1e-7)
  train = make_pipeline(c, 'train', train=True, seed=0, process_index=0, process_count=1)
  assert train.num_examples == 60000 and next(train)['mask'].sum() == 8
