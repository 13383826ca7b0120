"""The published NVAE configs against the original's numbers (nvae_spec.md §1.10, §3).

* the schedule arithmetic against the spec table's iterations (epochs x iters/epoch);
* the official ``state_dict`` listings: parameter counts against the spec's table;
* every published config through ``jax.eval_shape`` of the task's init (no compilation): its
  ``'params'`` size equals the count of the official listing, and the core name mapping places
  every official key (zero state_dict built from the listed shapes).
"""

import argparse
import importlib
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED
from nvae_jax.config import datasets
from nvae_jax.config import nvae as nvae_base
from nvae_jax.config import validation as config_validation
from nvae_jax.convert import official_keys as ok
from nvae_jax.convert import torch_checkpoint as tc
from nvae_jax.models.nvae import NVAETask

KEYS_DIR = os.path.join(SHARED, 'fixtures', 'nvae_reference', 'official_keys')

# nvae_spec.md §3: (global batch, iterations per epoch, total iterations, warm-up epochs, lr,
# lambda, lambda anneal, bits, channels, scales, groups, num_nf).
SPEC = {
    'mnist': (400, 150, 60_000, 5, 1e-2, 1e-2, False, 8, 32, 2, 10, 0),
    'cifar10': (256, 195, 78_000, 5, 1e-2, 1e-2, False, 8, 128, 1, 30, 1),
    'celeba64': (128, 1271, 114_390, 5, 1e-2, 1e-1, False, 8, 64, 3, 20, 1),
    'imagenet32': (576, 2224, 100_080, 1, 1e-2, 1e-2, True, 8, 192, 1, 28, 1),
    'celebahq256': (96, 281, 84_300, 5, 1e-2, 1e-2, True, 5, 30, 5, 16, 2),
    'ffhq256': (96, 656, 131_200, 5, 8e-3, 1e-1, True, 5, 30, 5, 16, 2),
}


@pytest.mark.parametrize('name', sorted(SPEC))
def test_published_hyperparameters(name):
  batch, spe, total, warm_ep, lr, wdn, anneal, bits, ch, scales, groups, nf = SPEC[name]
  c = ok.load_published_config(name)
  assert c.data.batch_size == batch
  assert c.train.num_steps == total
  assert c.model.total_steps == total  # the KL warm-up horizon follows num_steps
  assert c.optim.warmup_steps == warm_ep * spe
  assert c.optim.lr == lr and c.optim.min_lr == 1e-4
  assert (c.optim.name, c.optim.eps, c.optim.weight_decay, c.optim.weight_decay_mode) == (
      'adamax', 1e-3, 3e-4, 'coupled')
  assert c.optim.schedule == 'cosine'
  assert c.model.weight_decay_norm == wdn and c.model.weight_decay_norm_anneal == anneal
  if anneal:
    assert c.model.weight_decay_norm_init == 1.0
  assert c.data.num_bits == bits
  assert c.model.num_channels_enc == c.model.num_channels_dec == ch
  assert (c.model.num_latent_scales, c.model.num_groups_per_scale, c.model.num_nf) == (
      scales, groups, nf)
  assert c.model.num_latent_per_group == 20
  assert c.model.use_se and c.model.res_dist
  assert c.precision.compute_dtype == 'bfloat16'
  config_validation.validate(c)


def test_override_moves_kl_horizon():
  c = importlib.import_module('configs.nvae_cifar10').get_config()
  c.train.num_steps = 123
  assert c.model.total_steps == 123


def test_variants_and_bad_arg():
  c = importlib.import_module('configs.nvae_ffhq256').get_config('24ch')
  assert c.model.num_channels_enc == 24 and c.data.batch_size == 48
  assert c.train.num_steps == 200 * (63_000 // 48)
  for mod in ('nvae_mnist', 'nvae_cifar10', 'nvae_celeba64', 'nvae_imagenet32',
              'nvae_celebahq256', 'nvae_ffhq256'):
    m = importlib.import_module(f'configs.{mod}')
    small = m.get_config('small')
    assert small.model.num_channels_enc <= 16 and small.model.num_latent_scales <= 2
    assert small.precision.compute_dtype == 'float32'
    config_validation.validate(small)
    with pytest.raises(ValueError, match='unknown variant'):
      m.get_config('huge')


@pytest.mark.parametrize('name', sorted(ok.PUBLISHED))
def test_official_listing_counts(name):
  file, _, _, expected = ok.PUBLISHED[name]
  keys = ok.parse_keys(os.path.join(KEYS_DIR, file))
  # The listing's own arithmetic, checked independently of parameter_keys().
  total = sum(math.prod(k.shape) for k in keys
              if not k.name.endswith(('running_mean', 'running_var', 'num_batches_tracked',
                                      'weight_normalized')))
  assert ok.count_parameters(keys) == total == expected


def test_parse_errors(tmp_path):
  bad = tmp_path / 'bad.txt'
  bad.write_text('stem.weight\t(32, 1, 3)\n')
  with pytest.raises(ValueError, match='3 tab-separated fields'):
    ok.parse_keys(bad)
  bad.write_text('stem.weight\t[32, 1]\ttorch.float32\n')
  with pytest.raises(ValueError, match='expected a shape'):
    ok.parse_keys(bad)


@pytest.fixture(scope='module')
def abstract():
  """Abstract variables of every published architecture (FFHQ shares CelebA-HQ's)."""
  return {name: ok.abstract_variables(ok.load_published_config(name))
          for name in ok.PUBLISHED if name != 'ffhq256'}


@pytest.mark.parametrize('name', [n for n in sorted(ok.PUBLISHED) if n != 'ffhq256'])
def test_describe_matches_official_count(abstract, name):
  file, _, _, expected = ok.PUBLISHED[name]
  assert ok.count_flax_params(abstract[name]) == expected


def test_main_describe_mnist(capsys):
  """``--mode=describe`` of the command line reports the original's parameter count."""
  from nvae_jax import main as main_lib
  res = main_lib.main(['nvae-jax', '--config=configs/nvae_mnist.py', '--mode=describe'])
  assert res['num_params'] == ok.PUBLISHED['mnist'][3]
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['num_params'] == (
      res['num_params'])
  # 15 groups of 20 channels: 5 at 4x4 (top), 10 at 8x8.
  assert [tuple(s) for s in res['latents']] == [(4, 4, 20)] * 5 + [(8, 8, 20)] * 10


@pytest.mark.parametrize('name', [n for n in sorted(ok.PUBLISHED) if n != 'ffhq256'])
def test_every_official_key_is_placed(abstract, name):
  keys = ok.parse_keys(os.path.join(KEYS_DIR, ok.PUBLISHED[name][0]))
  res = ok.check_placement(keys, ok.load_published_config(name), abstract[name])
  assert res['unplaced'] == []
  assert res['unfilled'] == []
  # What was dropped is exactly the aliases and the BN step counters.
  assert res['dropped'] == sorted(k.name for k in keys if ok.is_alias(k.name)
                                  or k.name.endswith('num_batches_tracked'))


def test_ffhq_architecture_is_celebahq():
  a = ok.load_published_config('ffhq256').model.to_dict()
  b = ok.load_published_config('celebahq256').model.to_dict()
  arch = [k for k in a if k.startswith('num_') or k in ('ada_groups', 'use_se', 'res_dist')]
  assert {k: a[k] for k in arch} == {k: b[k] for k in arch}


def test_steps_per_epoch_rejects_bad_batch():
  with pytest.raises(ValueError, match='global_batch'):
    nvae_base.steps_per_epoch(100, 0)



# ---------------------------------------------------------------------------------------------
# The .pt converter (only where PyTorch is installed; it is an optional extra).

FIXTURE = os.path.join(SHARED, 'fixtures', 'nvae_reference', 'mnist_tiny_s0')


def test_config_from_args_backfill_and_errors():
  args = json.load(open(os.path.join(FIXTURE, 'summary.json')))['args']
  old = {k: v for k, v in args.items()
         if k not in ('ada_groups', 'min_groups_per_scale', 'num_mixture_dec')}
  c = tc.config_from_args(argparse.Namespace(**old))
  # evaluate.py's back-fill for old checkpoints.
  assert (c.model.ada_groups, c.model.min_groups_per_scale, c.model.num_mixture_dec) == (
      False, 1, 10)
  c = tc.config_from_args(args, data_dir='/data')
  assert c.model.ada_groups and c.model.num_channels_enc == 16
  assert (c.data.name, c.data.pad, c.data.binarize, c.data.data_dir) == (
      'mnist', 2, 'dynamic', '/data')
  assert c.model.faithful_dml
  # argparse defaults: batch 200 on 1 GPU, 200 epochs of 60000 // 200 = 300 steps.
  assert c.data.batch_size == 200 and c.train.num_steps == 200 * 300
  assert tc.config_from_args(dict(args, dataset='lsun_church_64')).data.image_size == 64
  with pytest.raises(ValueError, match='args.dataset'):
    tc.config_from_args(dict(args, dataset='svhn'))
  with pytest.raises(ValueError, match='arch_instance'):
    tc.config_from_args(dict(args, arch_instance='res_bnswish'))
  with pytest.raises(ValueError, match='num_channels_enc'):
    tc.config_from_args({k: v for k, v in args.items() if k != 'num_channels_enc'})


def test_torch_checkpoint_converts_to_a_workdir(tmp_path):
  """A fake original checkpoint.pt from the mnist_tiny fixture: the converted workdir restores
  through the platform, and its forward pass reproduces the original's logits."""
  torch = pytest.importorskip('torch')
  from nvae_jax.data import image_shape
  from nvae_jax.train import build
  from nvae_jax.train import state as state_lib

  summary = json.load(open(os.path.join(FIXTURE, 'summary.json')))
  params = np.load(os.path.join(FIXTURE, 'params.npz'))
  io = np.load(os.path.join(FIXTURE, 'io.npz'))
  pt = str(tmp_path / 'checkpoint.pt')
  torch.save({'state_dict': {k: torch.from_numpy(np.array(params[k])) for k in params.files},
              'args': argparse.Namespace(**summary['args']), 'global_step': 1234, 'epoch': 7,
              'optimizer': {}, 'scheduler': {}, 'grad_scalar': {},
              'arch_instance': 'res_mbconv'}, pt)
  out = str(tmp_path / 'work')
  res = tc.convert_checkpoint(pt, out)
  assert res['unused'] == [] and res['unfilled'] == [] and res['step'] == 1234
  assert res['num_params'] == summary['n_params']

  spec = importlib.util.spec_from_file_location('converted_config', res['config'])
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  run = build.build(config)
  state, _, step, _ = build.restore_latest(run, out, image_shape(config.data),
                                           config.data.batch_size)
  assert step == 1234
  variables = jax.device_get(state_lib.variables_of(state))
  # BN running statistics came across (no layout change for vectors).
  flat = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]
  assert len(flat) == 2 * sum(k.endswith('running_mean') for k in params.files)
  np.testing.assert_array_equal(variables['batch_stats']['pre_process_0']['bn_0']['mean'],
                                params['pre_process.0._ops.0.bn_act.running_mean'])

  x = jnp.asarray(np.transpose(io['x'], (0, 2, 3, 1)))
  eps = [jnp.asarray(np.transpose(io[f'eps_{g}'], (0, 2, 3, 1)))
         for g in range(len(summary['eps_shapes']))]
  fwd = jax.jit(lambda v, x, eps: run.task.forward(v, x, True, eps=eps)[0])
  got = fwd(variables, x, eps)
  ref = np.transpose(io['logits'], (0, 2, 3, 1))
  err = np.linalg.norm(np.asarray(got['net_out']) - ref) / np.linalg.norm(ref)
  assert err < 1e-5
  np.testing.assert_allclose(got['recon'], io['recon'], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference check accepts a fixture of any dataset the converter knows (one dataset table).

def _fixture_args(name):
  return json.load(open(os.path.join(SHARED, 'fixtures', 'nvae_reference', name,
                                     'summary.json')))['args']


@pytest.mark.parametrize('dataset', sorted(datasets.DATASETS) + ['lsun_church_64'])
def test_check_reference_config_for_every_converter_dataset(dataset):
  """The fixture's model arguments carry over unchanged whatever its dataset; the data fields are
  the converter's for that dataset."""
  from nvae_jax.convert import check_reference as cr  # pylint: disable=import-outside-toplevel
  args = _fixture_args('cifar_tiny_s0')
  ref = cr.config_from_fixture_args(args, 'lax')
  c = cr.config_from_fixture_args(dict(args, dataset=dataset), 'lax')
  assert c.model.to_dict() == ref.model.to_dict()
  assert (c.model.total_steps, c.model.faithful_dml) == (cr.TOTAL_ITER, True)
  conv = tc.config_from_args(dict(args, dataset=dataset))
  assert c.data.to_dict() == conv.data.to_dict()
  assert c.data.num_bits == args['num_x_bits']


def test_check_reference_loads_a_celeba64_fixture(tmp_path):
  """A fixture whose summary.json names celeba_64 (rejected before: the check knew only mnist and
  cifar10) loads, converts strictly and builds the same likelihood and architecture."""
  from nvae_jax.convert import check_reference as cr  # pylint: disable=import-outside-toplevel
  src = os.path.join(SHARED, 'fixtures', 'nvae_reference', 'cifar_tiny_s0')
  for f in os.listdir(src):
    if f != 'summary.json':
      os.symlink(os.path.join(src, f), tmp_path / f)
  summary = json.load(open(os.path.join(src, 'summary.json')))
  summary['args']['dataset'] = 'celeba_64'
  json.dump(summary, open(tmp_path / 'summary.json', 'w'))
  fx = cr.load_fixture(str(tmp_path), 'lax')
  assert fx.task.config.data.name == 'celeb_a' and fx.conversion.unused == []
  ref = cr.config_from_fixture_args(_fixture_args('cifar_tiny_s0'), 'lax')
  assert (fx.task.likelihood_name, fx.task.likelihood_options, fx.task.hparams) == (
      NVAETask(ref).likelihood_name, NVAETask(ref).likelihood_options, NVAETask(ref).hparams)


def test_published_configs_come_from_the_library():
  """configs/nvae_<name>.py is nvae_jax.config.nvae.published_config('<name>', arg)."""
  assert sorted(ok.PUBLISHED) == sorted(nvae_base.PUBLISHED)
  for name in nvae_base.PUBLISHED:
    module = importlib.import_module(f'configs.nvae_{name}')
    for arg in (None, 'small'):
      assert module.get_config(arg).to_dict() == nvae_base.published_config(name, arg).to_dict()


def test_converter_and_reference_check_work_outside_the_checkout(tmp_path):
  """From a folder where only the installed package is importable (no top-level ``configs``),
  the published configs, the converter's mapping and the reference check's config still build."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  site = tmp_path / 'site'
  site.mkdir()
  os.symlink(os.path.dirname(os.path.abspath(nvae_base.__file__)).rsplit(os.sep, 1)[0],
             site / 'nvae_jax')
  fixture = os.path.join(SHARED, 'fixtures', 'nvae_reference', 'cifar_tiny_s0')
  script = f'''
import importlib.util, json
assert importlib.util.find_spec('configs') is None, 'configs/ must not be importable here'
from nvae_jax.convert import check_reference, official_keys, torch_checkpoint
for name in official_keys.PUBLISHED:
  official_keys.load_published_config(name)
args = json.load(open({os.path.join(fixture, 'summary.json')!r}))['args']
c = check_reference.config_from_fixture_args(dict(args, dataset='celeba_64'))
print(c.data.name, torch_checkpoint.config_from_args(args).data.name)
'''
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['celeb_a', 'cifar10']


def test_converted_config_py_fills_fields_added_since(tmp_path):
  """A converted workdir's config.py reads config.json over base_config(): a config.json saved
  before sample.output_mode/output_temperature/readjust_bn_momentum existed still validates."""
  args = _fixture_args('mnist_tiny_s0')
  saved = json.loads(tc.config_from_args(args).copy_and_resolve_references().to_json())
  for field in ('output_mode', 'output_temperature', 'readjust_bn_momentum'):
    del saved['sample'][field]
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'config.py').write_text(tc._CONFIG_PY % dict(dir=tmp_path))  # pylint: disable=protected-access
  spec = importlib.util.spec_from_file_location('converted', tmp_path / 'config.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  config_validation.validate(c)
  assert (c.sample.output_mode, c.sample.readjust_bn_momentum) == ('auto', 0.05)
  assert c.model.to_dict() == saved['model'] and c.data.name == 'mnist'
  import ml_collections  # pylint: disable=import-outside-toplevel
  with pytest.raises(config_validation.ConfigError, match=r'sample\.output_\w+: .*with_defaults'):
    config_validation.validate(ml_collections.ConfigDict(saved))


@pytest.mark.parametrize('field,value,match', [
    ('output_mode', 'median', r"sample\.output_mode: expected one of \('auto', 'sample', 'mean'\), "
                              r"got 'median'"),
    ('output_temperature', -0.5, r'sample\.output_temperature: expected a finite temperature >= 0'),
    ('readjust_bn_momentum', 1.5, r'sample\.readjust_bn_momentum: expected a value in \[0, 1\]'),
])
def test_sample_options_are_validated(field, value, match):
  c = nvae_base.published_config('mnist', 'small')
  c.sample[field] = value
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.validate(c)
