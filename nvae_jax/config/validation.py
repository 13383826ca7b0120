"""Checks of the common config fields (``nvae_jax.config.schema``), run before anything compiles.

Every failure is a :class:`ConfigError` (a ``ValueError``) whose message starts with the dotted
field name and states the expected and the found value, e.g.
``optim.name: expected one of ('adam', 'adamax', 'adamw'), got 'sgd'``.  The sections of ``base_config()`` other than ``model`` must hold exactly its fields
(a typo in a config file is caught here; a typo on the command line is caught by the locked
config); ``model`` fields belong to the model family and are checked by its ModelTask.
"""

from __future__ import annotations

from typing import Any

from nvae_jax import policy
from nvae_jax.config import schema
from nvae_jax.config.schema import base_config
from nvae_jax.errors import ConfigError  # noqa: F401 (defined there, re-exported here)


def _fail(field: str, expected: str, found: Any) -> None:
  raise ConfigError(f'{field}: expected {expected}, got {found!r}')


def _check_schema(config) -> None:
  ref = base_config()
  for section in ref.keys():
    if section not in config:
      _fail(section, 'a section of the config (nvae_jax/config/schema.py: base_config)', None)
  for section in ref.keys():
    ref_val, val = ref[section], config[section]
    if not hasattr(ref_val, 'keys'):
      _check_type(section, ref_val, val)
      continue
    if not hasattr(val, 'keys'):
      _fail(section, 'a ConfigDict section', val)
    if section == 'model':
      if 'name' not in val:
        _fail('model.name', 'a model family name', None)
      continue
    unknown = sorted(set(val.keys()) - set(ref_val.keys()))
    if unknown:
      raise ConfigError(f'{section}.{unknown[0]}: unknown field; expected one of '
                       f'{sorted(ref_val.keys())} (found unknown fields {unknown})')
    missing = sorted(set(ref_val.keys()) - set(val.keys()))
    if missing:
      _fail(f'{section}.{missing[0]}',
            'a value (start configs from nvae_jax.config.base_config(); a config saved by an '
            'older nvae_jax, e.g. the config.json of a converted workdir, gets the defaults of '
            'newer fields from nvae_jax.config.schema.with_defaults)', None)
    for key in ref_val.keys():
      _check_type(f'{section}.{key}', ref_val[key], val[key])


def _check_type(field: str, ref: Any, val: Any) -> None:
  if isinstance(ref, bool):
    ok = isinstance(val, bool)
    kind = 'a bool'
  elif isinstance(ref, int):
    ok = isinstance(val, int) and not isinstance(val, bool)
    kind = 'an int'
  elif isinstance(ref, float):
    ok = isinstance(val, (int, float)) and not isinstance(val, bool)
    kind = 'a number'
  elif isinstance(ref, str):
    ok = isinstance(val, str)
    kind = 'a string'
  else:
    return
  if not ok:
    _fail(field, kind, val)


def _enum(field: str, val: Any, allowed) -> None:
  if val not in allowed:
    _fail(field, f'one of {tuple(allowed)}', val)


def _at_least(field: str, val, low, what: str = '') -> None:
  if val < low:
    _fail(field, what or f'>= {low}', val)


def validate(config, *, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Raises :class:`ConfigError` naming the first bad common field of ``config``.

  ``num_devices``/``num_processes`` (e.g. ``jax.device_count()``/``jax.process_count()``) enable
  the divisibility checks of the batch sizes and the mesh.
  """
  _check_schema(config)
  d, o, t = config.data, config.optim, config.train

  if not 0 <= config.compile_worker_nice <= schema.MAX_NICE:
    _fail('compile_worker_nice', f'an int in 0..{schema.MAX_NICE}', config.compile_worker_nice)
  if not d.name:
    _fail('data.name', 'a dataset name', d.name)
  if not 1 <= d.num_bits <= 8:
    _fail('data.num_bits', 'an int in 1..8', d.num_bits)
  _enum('data.binarize', d.binarize, schema.BINARIZE_MODES)
  _enum('data.channels', d.channels, (1, 3))
  _at_least('data.image_size', d.image_size, 0, '>= 0 (0 keeps the native size)')
  _at_least('data.pad', d.pad, 0)
  for name in ('batch_size', 'eval_batch_size'):
    size = d[name]
    _at_least(f'data.{name}', size, 1, 'a positive int')
    if num_devices and size % num_devices:
      _fail(f'data.{name}', f'a multiple of the number of devices ({num_devices})', size)
    if num_processes > 1 and size % num_processes:
      _fail(f'data.{name}', f'a multiple of the number of processes ({num_processes})', size)

  _enum('optim.name', o.name, schema.OPTIMIZERS)
  _enum('optim.schedule', o.schedule, schema.SCHEDULES)
  _enum('optim.weight_decay_mode', o.weight_decay_mode, schema.WEIGHT_DECAY_MODES)
  if o.name == 'adamw' and o.weight_decay_mode == 'coupled':
    _fail('optim.weight_decay_mode', "'decoupled' with optim.name='adamw' (use 'adam' for "
          'coupled L2)', o.weight_decay_mode)
  if not o.lr > 0:
    _fail('optim.lr', 'a positive learning rate', o.lr)
  if not 0 <= o.min_lr <= o.lr:
    _fail('optim.min_lr', f'0 <= min_lr <= optim.lr ({o.lr})', o.min_lr)
  for name in ('b1', 'b2'):
    if not 0 <= o[name] < 1:
      _fail(f'optim.{name}', 'a value in [0, 1)', o[name])
  if not o.eps > 0:
    _fail('optim.eps', 'a positive value', o.eps)
  for name in ('warmup_steps', 'weight_decay', 'grad_clip', 'skip_threshold',
               'max_consecutive_skips'):
    _at_least(f'optim.{name}', o[name], 0)

  _at_least('train.num_steps', t.num_steps, 1, 'a positive int')
  _at_least('train.log_every', t.log_every, 1, 'a positive int')
  for name in ('eval_every', 'checkpoint_every', 'images_every', 'num_eval_batches'):
    _at_least(f'train.{name}', t[name], 0, '>= 0 (0 = off / whole split)')
  _at_least('train.keep_checkpoints', t.keep_checkpoints, 1, 'a positive int')
  _at_least('train.num_images', t.num_images, 1, 'a positive int')
  _enum('train.update_programs', t.update_programs, schema.UPDATE_PROGRAMS)

  _enum('precision.compute_dtype', config.precision.compute_dtype, schema.COMPUTE_DTYPES)
  try:
    policy.checkpoint_policy(config.remat.policy)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  m = config.mesh
  if m.data != -1:
    _at_least('mesh.data', m.data, 1, '-1 (all devices) or a positive int')
  _at_least('mesh.fsdp', m.fsdp, 1, 'a positive int')
  if num_devices:
    if num_devices % m.fsdp:
      _fail('mesh.fsdp', f'a divisor of the number of devices ({num_devices})', m.fsdp)
    if m.data != -1 and m.data * m.fsdp != num_devices:
      _fail('mesh.data', f'-1 or number of devices / mesh.fsdp = {num_devices // m.fsdp}', m.data)

  _at_least('eval.num_importance_samples', config.eval.num_importance_samples, 1,
            'a positive int')
  _at_least('eval.importance_chunk', config.eval.importance_chunk, 1, 'a positive int')
  _at_least('sample.num', config.sample.num, 1, 'a positive int')
  if not config.sample.temperature > 0:
    _fail('sample.temperature', 'a positive temperature', config.sample.temperature)
  _at_least('sample.readjust_bn_steps', config.sample.readjust_bn_steps, 0, 'an int >= 0')
  _at_least('sample.readjust_bn_batch', config.sample.readjust_bn_batch, 2, 'an int >= 2')
  if not 0 <= config.sample.output_temperature < float('inf'):
    _fail('sample.output_temperature', 'a finite temperature >= 0',
          config.sample.output_temperature)
  _enum('sample.output_mode', config.sample.output_mode, schema.SAMPLE_OUTPUT_MODES)
  if not 0 <= config.sample.readjust_bn_momentum <= 1:
    _fail('sample.readjust_bn_momentum', 'a value in [0, 1] (0 = a plain average)',
          config.sample.readjust_bn_momentum)
