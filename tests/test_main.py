"""End to end through the command line: train, eval, sample and describe on mock MNIST, and bad
configs rejected before anything compiles."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from nvae_jax import errors
from nvae_jax import main as main_lib
from nvae_jax.config.validation import ConfigError

NUM_EXAMPLES = 20  # per mock split; eval batches of 8 -> the last one is padded
ROOT = os.path.join(os.path.dirname(__file__), '..')
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
# The quickstart conv VAE (optimal-sigma Gaussian decoder), shrunk, on mock MNIST resized to 16.
TINY_QUICKSTART = (
    f'--config={QUICKSTART}', '--config.data.name=mnist', '--config.data.image_size=16',
    '--config.data.batch_size=8', '--config.data.eval_batch_size=8',
    '--config.model.channels=(4, 8, 8)', '--config.train.num_steps=1',
    '--config.train.log_every=1', '--config.train.eval_every=1',
    '--config.train.checkpoint_every=1', '--config.train.images_every=1',
    '--config.train.num_eval_batches=1', '--config.train.num_images=4', '--config.sample.num=6',
    '--config.sample.temperature=0.8')

# A config file for the platform's own tiny test model (exact parameter count by hand).
TINY_TEST_MODEL = '''
import ml_collections
from nvae_jax.config import base_config
import nvae_jax.train.testing  # registers tiny_test_vae


def get_config(arg=None):
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(name='tiny_test_vae', features=4, latent=2))
  c.data.name = 'mnist'
  c.data.image_size = 16
  c.data.batch_size = 8
  return c
'''


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('cfg') / 'tiny_mnist.py'
  path.write_text(TINY_TEST_MODEL)
  return str(path)


def _main(*args):
  return main_lib.main(['nvae-jax', *args])


def _json_lines(text):
  return [json.loads(line) for line in text.splitlines() if line.startswith('{')]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir'))
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    result = _main(*TINY_QUICKSTART, f'--workdir={workdir}', '--mode=train')
  return workdir, result


def test_train_writes_checkpoint_metrics_and_images(trained):
  workdir, result = trained
  assert result['step'] == 1
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1']
  for name in ('samples.png', 'recon.png', 'samples_step1.png', 'recon_step1.png'):
    assert Image.open(os.path.join(workdir, name)).size[0] > 16
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]
  assert [(r['step'], r['split']) for r in lines] == [(1, 'train'), (1, 'eval')]
  assert np.isfinite(lines[0]['loss']) and lines[0]['num_skipped'] == 0
  assert lines[1]['num_examples'] == 8  # num_eval_batches=1
  assert os.listdir(os.path.join(workdir, 'tb'))


def test_eval_prints_one_json_line(trained, capsys):
  workdir, _ = trained
  capsys.readouterr()
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    result = _main(*TINY_QUICKSTART, f'--workdir={workdir}', '--mode=eval')
  records = _json_lines(capsys.readouterr().out)
  assert len(records) == 1 and records[0] == json.loads(json.dumps(result))
  r = records[0]
  assert {'split', 'nats_per_image', 'bits_per_dim', 'num_examples', 'step',
          'continuous'} <= set(r)
  # a Gaussian decoder: a continuous density, said so next to the number
  assert (r['split'], r['num_examples'], r['step'], r['continuous']) == ('test', NUM_EXAMPLES, 1,
                                                                        True)
  assert r['bits_per_dim'] == pytest.approx(r['nats_per_image'] / (math.log(2) * 16 * 16))


def test_sample_writes_a_grid(trained, capsys):
  workdir, _ = trained
  capsys.readouterr()
  out = os.path.join(workdir, 'mine.png')
  _main(*TINY_QUICKSTART, f'--workdir={workdir}', '--mode=sample', f'--output={out}')
  (r,) = _json_lines(capsys.readouterr().out)
  assert r == {'path': out, 'num': 6, 'temperature': 0.8, 'step': 1}
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 33 - 1, 3 * 33 - 1)  # 6 samples of 16x16 shown 2x, 2 x 3 tiles


def test_describe_counts_parameters_without_training(config_file, capsys):
  capsys.readouterr()
  _main(f'--config={config_file}', '--mode=describe', '--config.model.features=8')
  (r,) = _json_lines(capsys.readouterr().out)
  # independent count: 3x3x1x8 conv (no bias) + BN scale/bias 2x8 + 1x1 head 8->4 with bias
  # + 3x3 transpose conv 2->1 with bias
  assert r['num_params'] == 72 + 16 + (32 + 4) + (18 + 1)
  assert r['collections'] == {'batch_stats': 16}
  assert r['inputs'] == [16, 16, 1] and r['latents'] == [[8, 8, 2]]
  assert r['likelihood'] == {'name': 'bernoulli', 'continuous': False}


def test_describe_quickstart(capsys):
  capsys.readouterr()
  _main(f'--config={QUICKSTART}', '--mode=describe')
  (r,) = _json_lines(capsys.readouterr().out)
  assert r['model'] == 'conv_vae' and r['inputs'] == [16, 16, 1] and r['latents'] == [[4]]
  assert r['likelihood'] == {'name': 'gaussian_optimal', 'continuous': True}
  assert r['num_params'] > 0 and r['collections'] == {'batch_stats': 2}


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if anything gets jitted."""
  # Libraries jit some functions when first imported (optax's bias correction): import what main
  # imports lazily first, so that only calls made by the command count, whatever ran before.
  import nvae_jax.models  # pylint: disable=import-outside-toplevel,unused-import
  import nvae_jax.train.loop  # pylint: disable=import-outside-toplevel,unused-import
  import nvae_jax.train.sample  # pylint: disable=import-outside-toplevel,unused-import

  def forbidden(*a, **k):
    raise AssertionError('compiled before validating the config')
  monkeypatch.setattr(jax, 'jit', forbidden)


@pytest.mark.parametrize('override,error,pattern', [
    ('--config.optim.name=sgd', ConfigError, r"optim\.name: expected one of .*adam.*got 'sgd'"),
    ('--config.optim.schedule=linear', ConfigError, r'optim\.schedule: .*got .linear.'),
    ('--config.data.num_bits=9', ConfigError, r'data\.num_bits: expected an int in 1\.\.8, got 9'),
    ('--config.data.batch_size=12', ConfigError,
     r'data\.batch_size: expected a multiple of the number of devices \(8\), got 12'),
    ('--config.precision.compute_dtype=float16', ConfigError, r'precision\.compute_dtype'),
    ('--config.remat.policy=everything', ConfigError, r'remat\.policy'),
    ('--config.optim.lrr=0.1', errors.FlagError,  # unknown field: the config is locked
     r'unknown config field .*lrr.*Did you mean "lr"'),
    ('--config.optim.lr=abc', flags.Error, r'--config\.optim\.lr=abc.*float'),  # wrong type
])
def test_bad_config_fails_before_compiling(tmp_path, no_compile, override, error, pattern):
  with pytest.raises(error, match=pattern):
    _main(f'--config={QUICKSTART}', f'--workdir={tmp_path}', override)


def test_unknown_field_in_a_config_file(tmp_path, no_compile):
  path = tmp_path / 'typo.py'
  path.write_text('''
from configs import quickstart


def get_config(arg=None):
  c = quickstart.get_config(arg)
  c.optim.learning_rate = 0.1  # a typo of optim.lr: not caught by the lock, which comes later
  return c
''')
  with pytest.raises(ConfigError, match=r'optim\.learning_rate: unknown field; expected one of'):
    _main(f'--config={path}', f'--workdir={tmp_path}')


def test_default_config_ships_with_the_package(tmp_path):
  """A bare `nvae-jax` loads the quickstart from the package, whatever the working directory."""
  package = os.path.dirname(os.path.abspath(main_lib.__file__))
  assert os.path.commonpath([package, main_lib.DEFAULT_CONFIG]) == package
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  from nvae_jax.config import quickstart as packaged  # pylint: disable=import-outside-toplevel
  for arg in (None, 'bernoulli'):
    assert quickstart.get_config(arg).to_json() == packaged.get_config(arg).to_json()
  proc = subprocess.run([sys.executable, '-m', 'nvae_jax.main', '--mode=describe'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (r,) = _json_lines(proc.stdout)
  assert r['model'] == 'conv_vae' and r['inputs'] == [16, 16, 1]


def test_missing_workdir_and_module_entry_point():
  with pytest.raises(errors.FlagError, match='--workdir'):
    _main(f'--config={QUICKSTART}', '--mode=eval')
  # `python -m nvae_jax.main` works: a bad enum exits with status 2 and a one-line message.
  proc = subprocess.run(
      [sys.executable, '-m', 'nvae_jax.main', '--mode=describe',  # default config: quickstart
       '--config.optim.name=sgd'], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "nvae-jax: config error: optim.name: expected one of" in proc.stderr


@pytest.mark.parametrize('section,field,value,pattern', [
    ('train', 'num_steps', 10.5, r'train\.num_steps: expected an int, got 10\.5'),
    ('data', 'random_flip', 1, r'data\.random_flip: expected a bool, got 1'),
    ('optim', 'lr', 'fast', r"optim\.lr: expected a number, got 'fast'"),
    ('optim', 'min_lr', 1.0, r'optim\.min_lr: expected 0 <= min_lr <= optim\.lr'),
    ('optim', 'b2', 1.0, r'optim\.b2: expected a value in \[0, 1\), got 1\.0'),
    ('mesh', 'fsdp', 3, r'mesh\.fsdp: expected a divisor of the number of devices \(8\), got 3'),
    ('sample', 'temperature', 0.0, r'sample\.temperature: expected a positive temperature'),
])
def test_validate_types_and_ranges_of_config_files(section, field, value, pattern):
  """What a config *file* can get wrong (command-line overrides are type-checked by the flags)."""
  from configs.quickstart import get_config  # pylint: disable=import-outside-toplevel
  from nvae_jax.config.validation import validate  # pylint: disable=import-outside-toplevel
  c = get_config()
  validate(c, num_devices=8)  # the quickstart itself is valid
  # A ConfigDict keeps a field's type once set, so a file gets a wrong type by building a
  # section from a dict; that is what is rebuilt here.
  fields = c[section].to_dict()
  fields[field] = value
  c[section] = ml_collections.ConfigDict(fields)
  with pytest.raises(ConfigError, match=pattern):
    validate(c, num_devices=8)


def test_config_finalize_hook_applies_after_overrides():
  """A Bernoulli decoder chosen by override gets dynamic binarisation from the file's hook."""
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  from nvae_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  argv = ['prog', '--config=configs/sigma_vae_mnist.py', '--config.model.decoder=bernoulli']
  fv = main_lib._define_flags(argv)  # pylint: disable=protected-access
  fv(argv)
  assert isinstance(fv, absl_flags.FlagValues)
  assert fv.config.data.binarize == 'none'  # before the hook
  assert main_lib._finalize(fv).data.binarize == 'dynamic'  # pylint: disable=protected-access
