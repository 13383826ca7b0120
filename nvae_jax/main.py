r"""The command line: ``nvae-jax`` / ``python -m nvae_jax.main``.

  nvae-jax --config=configs/quickstart.py --workdir=/tmp/quickstart            # train (resumes)
  nvae-jax --config=configs/nvae_mnist.py:small --workdir=W --config.train.num_steps=100
  nvae-jax --config=... --workdir=W --mode=eval       # one JSON line: nats/image, bits/dim
  nvae-jax --config=... --workdir=W --mode=sample --config.sample.temperature=0.7
      [--config.sample.output_temperature=1.0 --config.sample.output_mode=auto|sample|mean
       --config.sample.readjust_bn_steps=500 --config.sample.readjust_bn_batch=16
       --config.sample.readjust_bn_momentum=0.05]   # output_* and readjust_bn_*: NVAE
  nvae-jax --config=... --mode=describe               # one JSON line: parameters and shapes

``--config`` is an ml_collections config file ``path.py[:arg]`` (default: the offline quickstart);
any field can be overridden with ``--config.section.field=value`` and unknown fields are errors.
``--distributed`` (or ``NVAE_JAX_DISTRIBUTED=1``) calls ``jax.distributed.initialize()`` first,
for multi-process runs (see ``launch/``).  This module only parses flags; the work is done in
``nvae_jax.train.loop``, ``nvae_jax.train.evaluate``, ``nvae_jax.train.sample`` and ``nvae_jax.train.build``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

from nvae_jax import errors
from nvae_jax.config import files as config_files

MODES = ('train', 'eval', 'sample', 'describe')
# Inside the package, so that a bare `nvae-jax` also works outside a checkout.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'quickstart.py')


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_files.define_config_file(
      'config', 'Config file path.py[:arg] (default: the offline quickstart, '
      'nvae_jax/config/quickstart.py = configs/quickstart.py); override fields '
      'with --config.section.field=value.', flag_values=fv, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Output folder: checkpoints, metrics, images.',
                      flag_values=fv)
  flags.DEFINE_enum('mode', 'train', MODES, 'What to do.', flag_values=fv)
  flags.DEFINE_string('output', '', '--mode=sample: PNG path (default in --workdir).',
                      flag_values=fv)
  flags.DEFINE_bool('distributed', os.environ.get('NVAE_JAX_DISTRIBUTED', '') == '1',
                    'Call jax.distributed.initialize() (multi-process runs).', flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for --distributed '
                      '(default: auto-detected on SLURM/Open MPI/TPU, or JAX_COORDINATOR_ADDRESS).',
                      flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Number of processes for --distributed '
                       '(default: auto-detected).', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process for --distributed (default: '
                       'auto-detected).', flag_values=fv)
  flags.DEFINE_bool('debug', False, 'Show the Python traceback of user errors too.',
                    flag_values=fv)
  return fv


def _config_arg(argv: Sequence[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``None``: not given, the default is used)."""
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith('--config='):
      return a[len('--config='):]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(value: str) -> None:
  """Clear errors for a config file that is missing, broken or has no ``get_config``."""
  import ast  # pylint: disable=import-outside-toplevel
  path = value.split(':', 1)[0]
  if not os.path.isfile(path):
    found = 'a directory' if os.path.isdir(path) else 'no such file'
    raise errors.FlagError(f'--config={value}: expected a config file path.py[:arg], found '
                           f'{found} at {path!r}')
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=path)
  except SyntaxError as e:
    raise errors.FlagError(f'--config={value}: syntax error in {path}, line {e.lineno}: '
                           f'{e.msg}') from e
  except (OSError, UnicodeDecodeError) as e:
    raise errors.FlagError(f'--config={value}: cannot read {path}: {e}') from e
  if not any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body):
    raise errors.FlagError(f'--config={value}: expected {path} to define get_config(arg=None) '
                           'returning the config; found no get_config')


def _initialize_distributed(fv: flags.FlagValues) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  given = dict(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
               process_id=fv.process_id)
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def _finalize(fv: flags.FlagValues):
  """Applies the config file's optional ``finalize(config)`` hook after the overrides.

  A config file may derive fields from others once ``--config.*`` overrides are in (e.g.
  ``configs/sigma_vae_mnist.py`` switches on dynamic binarisation for a Bernoulli decoder).
  """
  config = fv.config
  path = config_flags.get_config_filename(fv['config']).split(':', 1)[0]
  module = config_files.load_module(path)
  hook = getattr(module, 'finalize', None)
  return hook(config) if callable(hook) else config


def _emit(record: dict[str, Any]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """Parses ``argv`` (``argv[0]`` is the program name), runs the mode, returns its result.

  Raises :class:`nvae_jax.errors.NvaeJaxError` subclasses (or ``absl.flags.Error``) for user
  errors: bad flags and config files, config values (checked before anything is compiled), data,
  checkpoints.  A train run stopped by SIGTERM/SIGINT returns ``{'preempted': ..., ...}``.
  """
  argv = list(argv)
  config_value = _config_arg(argv)
  if config_value is not None:
    _check_config_file(config_value)
  else:
    argv.insert(1, f'--config={DEFAULT_CONFIG}')
  try:
    fv = _define_flags(argv)
    if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
      print(__doc__)
      print(fv.get_help())
      return {}
    fv(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' not in str(e):
      raise
    # ml_collections puts the config code's traceback into the message: keep its last line.
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise errors.FlagError(f'--config={config_value or DEFAULT_CONFIG}: loading the config '
                           f'failed: {last}') from e
  except errors.NvaeJaxError:
    raise
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]
    detail = str(detail).replace('\n', '; ')
    raise errors.FlagError(f'unknown config field in a --config.* override: {detail}') from e
  except Exception as e:  # pylint: disable=broad-except  # raised by the config file's code
    raise errors.FlagError(f'--config={config_value or DEFAULT_CONFIG}: loading the config '
                           f'failed: {type(e).__name__}: {e}') from e
  mode = fv.mode
  if mode != 'describe' and not fv.workdir:
    raise errors.FlagError(f'--workdir: required for --mode={mode}; expected a directory path, '
                           'got none')
  if fv.distributed:
    _initialize_distributed(fv)
  config = _finalize(fv)
  # pylint: disable=import-outside-toplevel
  if mode == 'train':
    from nvae_jax.train import loop
    return loop.train_and_evaluate(config, fv.workdir)
  if mode == 'eval':
    from nvae_jax.train import evaluate
    result = evaluate.evaluate_checkpoint(config, fv.workdir)
  elif mode == 'sample':
    from nvae_jax.train import sample
    result = sample.sample_checkpoint(config, fv.workdir, output=fv.output)
  else:
    from nvae_jax.train import build
    result = build.describe(config)
  _emit(result)
  return result


def _one_line(message: str) -> str:
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  return '; '.join(lines)


def run(argv: Sequence[str] | None = None) -> None:
  """Console-script entry point; exits with the statuses below.

  0: done.  2 (``errors.USER_ERROR_EXIT``): a user error (bad flag, config, data, checkpoint,
  workdir, a diverging run), printed as one line ``nvae-jax: <kind> error: <message>`` (with its
  traceback under ``--debug``).  75 (``errors.PREEMPTED_EXIT``): stopped by SIGTERM/SIGINT after
  checkpointing; rerun (requeue) to resume.  1: a bug (Python traceback).
  """
  argv = list(sys.argv if argv is None else argv)
  debug = any(a in ('--debug', '--debug=true', '--debug=True', '--debug=1') for a in argv[1:])
  try:
    result = main(argv)
  except (errors.NvaeJaxError, flags.Error) as e:
    if debug:
      raise
    kind = e.kind if isinstance(e, errors.NvaeJaxError) else 'flag'
    print(f'nvae-jax: {kind} error: {_one_line(str(e))}', file=sys.stderr, flush=True)
    sys.exit(errors.USER_ERROR_EXIT)
  if isinstance(result, dict) and result.get('preempted'):
    sys.exit(errors.PREEMPTED_EXIT)


if __name__ == '__main__':
  run()
