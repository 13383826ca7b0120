"""Replays a reference fixture of the original NVAE and reports the relative error of everything.

Usage (from the project root)::

  python -m nvae_jax.convert.check_reference ../shared/fixtures/nvae_reference/cifar_tiny_s0 \
      [--tolerance 1e-5] [--grad_tolerance 1e-4] [--depthwise_impl auto|lax|shift] [--json]

A fixture folder (format: ``shared/fixtures/nvae_reference/README.md``) holds the original's
arguments (``summary.json``), its initial ``state_dict`` (``params.npz``), the input and the
reparameterisation noise (``io.npz``), its outputs, the gradients of ``nelbo_loss``
(``grads.npz``), the spectral power-iteration vectors (``sr.npz``) and the BN statistics after the
train-mode forward (``bn_after_train_fwd.npz``).  The check builds the model from the arguments,
converts the weights (``from_torch_names``), replays ``x`` and ``eps_*`` in train mode at
``global_step`` 100 of 10,000 and compares: logits, log_q, log_p, kl_all, kl_diag, recon,
balanced_kl, kl_coeffs (gamma), alpha_i, kl_coeff (beta), nelbo_loss, norm_loss, norm_loss_exact,
bn_loss, wdn_coeff, total_loss, the BN running statistics, the eval-mode importance-weighted
log-likelihood (K = 4 with ``eps_eval_<k G + g>`` and the BN statistics of
``bn_after_train_fwd.npz``) and the gradient of nelbo_loss w.r.t. every parameter (mapped back to
the original names).

Errors are relative in the 2-norm, ||ours - ref|| / ||ref||, except for the quantities that are
exactly zero in exact arithmetic, whose fixture values are float32 round-off (relative errors of
order 1 between two round-offs mean nothing).  These are the places where a batch norm follows
through linear maps only, and batch norm removes per-channel shifts and scales:

* the gradients of ``bias`` and ``log_weight_norm`` of the first conv of every BN-Swish-conv cell
  (``_ops.0.conv_0``, followed by the BN of ``_ops.1``), measured against the norm of the
  gradient of the same conv's ``weight``;
* the gradient of the input BN's ``bias`` of every MBConv cell (followed by the bias-free 1x1
  expansion conv and a BN), measured against the norm of the gradient of the same BN's ``weight``;
* the running mean of the BN after that expansion conv (its input has zero batch mean), measured
  against momentum * ||batch standard deviation|| recovered from the reference running variance.

Tolerances: ``--tolerance`` for the forward quantities, ``--grad_tolerance`` for gradients.

The spectral regulariser: the fixture's u, v are the vectors *after* the step's power iterations
and the original evaluates sigma = u^T W v with exactly those vectors, so ``norm_loss`` is
reproduced by loading them as the ``'spectral'`` state and running 0 further iterations.
``norm_loss_exact`` (exact top singular values) is compared with the exact singular values of the
same effective kernels (the power iteration is ~0.2 % below it).

Exit status: 0 when every quantity is within tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

# The fixtures' schedule position (fixture README: global_step 100 of total_iter 10000).
GLOBAL_STEP = 100
TOTAL_ITER = 10_000



def config_from_fixture_args(args: dict[str, Any], depthwise_impl: str = 'auto'):
  """An nvae_jax config for a fixture's ``summary.json`` ``args``: the converter's mapping of the
  original arguments (so any dataset it supports), with the faithful DML likelihood and the
  fixtures' schedule horizon."""
  from nvae_jax.config import nvae as nvae_base  # pylint: disable=import-outside-toplevel

  c = nvae_base.config_from_original_args(args, faithful_dml=True)
  c.model.depthwise_impl = depthwise_impl
  c.model.total_steps = TOTAL_ITER
  c.train.num_steps = TOTAL_ITER
  return c


def rel_err(ours, ref) -> float:
  """||ours - ref|| / ||ref|| in float64 (absolute when ref is all zeros)."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'shape mismatch: ours {ours.shape}, reference {ref.shape}')
  den = np.linalg.norm(ref.ravel())
  num = np.linalg.norm((ours - ref).ravel())
  return float(num / den) if den > 0 else float(num)


def _nchw_to_nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


@dataclasses.dataclass
class Fixture:
  """A reference fixture loaded and converted (arrays NHWC, variables as jnp arrays).

  ``variables`` holds the converted ``params``, the initial ``batch_stats`` and the ``spectral``
  state of ``sr.npz``; ``eval_variables`` the params with the BN statistics after the train-mode
  forward (for the importance-weighted evaluation); ``conversion`` the name mapping.
  """
  name: str
  summary: dict
  io: dict
  grads: dict
  bn_after: dict
  task: Any
  x: Any
  eps: list
  eps_eval: list
  variables: dict
  eval_variables: dict
  conversion: Any


def load_fixture(folder: str, depthwise_impl: str = 'auto', config_overrides=None) -> Fixture:
  """Reads a fixture folder, builds the task from its arguments and converts its weights.

  ``config_overrides`` is an optional callable applied to the config before the task is built.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from nvae_jax.convert import from_torch_names as ftn  # pylint: disable=import-outside-toplevel
  from nvae_jax.models.nvae.task import NVAETask  # pylint: disable=import-outside-toplevel

  def npz(name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{folder}: missing {name} (see the fixture README)')
    return dict(np.load(path))

  with open(os.path.join(folder, 'summary.json')) as f:
    summary = json.load(f)
  io, state_dict = npz('io.npz'), npz('params.npz')
  config = config_from_fixture_args(summary['args'], depthwise_impl)
  if config_overrides is not None:
    config_overrides(config)
  task = NVAETask(config)
  x = jnp.asarray(_nchw_to_nhwc(io['x']), jnp.float32)
  num_groups = io['kl_all'].shape[1]
  eps = [jnp.asarray(_nchw_to_nhwc(io[f'eps_{g}'])) for g in range(num_groups)]
  num_iw = len([k for k in io if k.startswith('eps_eval_')]) // num_groups
  eps_eval = [[jnp.asarray(_nchw_to_nhwc(io[f'eps_eval_{k * num_groups + g}']))
               for g in range(num_groups)] for k in range(num_iw)]
  template = jax.eval_shape(task.init, jax.random.key(0), {'image': x})
  conv = ftn.convert_state_dict(state_dict, template, strict=True)
  params = jax.tree.map(jnp.asarray, conv.variables['params'])
  variables = {'params': params,
               'batch_stats': jax.tree.map(jnp.asarray, conv.variables['batch_stats']),
               'spectral': jax.tree.map(jnp.asarray,
                                        ftn.spectral_state_from_sr(npz('sr.npz'), params))}
  bn_after = npz('bn_after_train_fwd.npz')
  after = ftn.convert_state_dict({**state_dict, **bn_after}, template, strict=True).variables
  eval_variables = {'params': params,
                    'batch_stats': jax.tree.map(jnp.asarray, after['batch_stats'])}
  return Fixture(name=os.path.basename(os.path.normpath(folder)), summary=summary, io=io,
                 grads=npz('grads.npz'), bn_after=bn_after, task=task, x=x, eps=eps,
                 eps_eval=eps_eval, variables=variables, eval_variables=eval_variables,
                 conversion=conv)


def jit_compile(fn, compiler_options, *args):
  """jit-compiles ``fn`` for ``args`` (with optional XLA ``compiler_options``) and calls it."""
  import jax  # pylint: disable=import-outside-toplevel
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile(compiler_options=compiler_options) if compiler_options else (
      lowered.compile())
  return compiled


def run_check(folder, depthwise_impl: str = 'auto',
              compiler_options: dict | None = None) -> list[dict[str, Any]]:
  """Replays a fixture; returns records {name, kind, err, ref_norm[, scale]} (see docstring).

  Args:
    folder: the fixture folder, or a :class:`Fixture` already loaded.
    depthwise_impl: for a folder, the depthwise conv implementation.
    compiler_options: passed to XLA (e.g. ``{'xla_backend_optimization_level': 0}`` halves the
      CPU compile time in tests).
  """
  import jax  # pylint: disable=import-outside-toplevel

  from nvae_jax.convert import from_torch_names as ftn  # pylint: disable=import-outside-toplevel
  from nvae_jax.models import nvae  # pylint: disable=import-outside-toplevel

  fx = folder if isinstance(folder, Fixture) else load_fixture(folder, depthwise_impl)
  io, task, conv = fx.io, fx.task, fx.conversion
  grads_ref, bn_ref = fx.grads, fx.bn_after
  num_groups = io['kl_all'].shape[1]
  batch_stats, spectral = fx.variables['batch_stats'], fx.variables['spectral']

  with jax.default_matmul_precision('highest'):

    def train_step(params):
      def nelbo(p):
        variables = {'params': p, 'batch_stats': batch_stats, 'spectral': spectral}
        _, aux = task.objective(variables, fx.x, None, GLOBAL_STEP, eps=fx.eps,
                                spectral_iters=0)
        return aux['nelbo_loss'], aux
      return jax.grad(nelbo, has_aux=True)(params)

    params = fx.variables['params']
    grads, aux = jit_compile(train_step, compiler_options, params)(params)

    def eval_log_w(eps_k):
      out, _ = task.forward(fx.eval_variables, fx.x, False, eps=eps_k)
      return -out['recon'] - out['log_q'] + out['log_p']

    eval_fn = jit_compile(eval_log_w, compiler_options, fx.eps_eval[0])
    log_w = np.stack([np.asarray(eval_fn(e)) for e in fx.eps_eval])
    iw_log_px = -np.asarray(jax.jit(nvae.importance_weighted_nll)(log_w))

  # Post-processing in numpy (eager jnp ops would each be compiled).
  aux = jax.tree.map(np.asarray, aux)
  grads = jax.tree.map(np.asarray, grads)
  out = aux['out']
  records = []

  def add(name, ours, ref, kind='forward', scale=None):
    ref_norm = float(np.linalg.norm(np.asarray(ref, np.float64).ravel()))
    rec = dict(name=name, kind=kind, ref_norm=ref_norm)
    if scale is None:
      rec['err'] = rel_err(ours, ref)
    else:  # a structural zero: absolute error against the layer's scale
      diff = np.asarray(ours, np.float64) - np.asarray(ref, np.float64)
      rec['err'] = float(np.linalg.norm(diff.ravel()) / scale)
      rec['scale'] = float(scale)
    records.append(rec)

  key_to_flax = {key: target for target, (key, _) in conv.names.items()}

  def structural_zero_scale(key, ref_dict):
    """The comparison scale of a structurally-zero quantity (module docstring), else None."""
    target = key_to_flax.get(key)
    if target is None:
      return None
    col, path = target[0], target[1:]
    if col == 'params' and path[-2:] in (('conv_0', 'bias'), ('conv_0', 'log_weight_norm')):
      ref_key = conv.names[('params',) + path[:-1] + ('kernel',)][0]
      return float(np.linalg.norm(ref_dict[ref_key]))
    if col == 'params' and path[-2:] == ('bn_in', 'bias'):
      ref_key = conv.names[('params',) + path[:-1] + ('scale',)][0]
      return float(np.linalg.norm(ref_dict[ref_key]))
    if col == 'batch_stats' and path[-2:] == ('bn_expand', 'mean'):
      var = ref_dict[conv.names[('batch_stats',) + path[:-1] + ('var',)][0]]
      m = 0.05
      return float(m * np.linalg.norm(np.sqrt(np.maximum(var - (1 - m), 0) / m)))
    return None

  add('logits', out['net_out'], _nchw_to_nhwc(io['logits']))
  for name in ('log_q', 'log_p', 'kl_all', 'recon'):
    add(name, out[name], io[name])
  add('kl_diag', out['kl_diag'], np.stack([io[f'kl_diag_{g}'] for g in range(num_groups)]))
  add('balanced_kl', aux['balanced_kl'], io['balanced_kl'])
  add('kl_coeffs', aux['gamma'], io['kl_coeffs'])
  add('alpha_i', aux['alpha'], io['alpha_i'])
  add('kl_coeff', aux['beta'], io['kl_coeff'])
  add('nelbo_loss', aux['nelbo_loss'], io['nelbo_loss'])
  add('norm_loss', aux['norm_loss'], io['norm_loss'])
  exact = sum(np.linalg.svd(np.asarray(k, np.float64).reshape(-1, k.shape[-1]),
                            compute_uv=False)[0]
              for k in jax.tree.leaves(aux['conv_kernels']))
  add('norm_loss_exact', exact, io['norm_loss_exact'])
  add('bn_loss', aux['bn_loss'], io['bn_loss'])
  add('wdn_coeff', aux['wdn_coeff'], io['wdn_coeff'])
  total = aux['nelbo_loss'] + aux['wdn_coeff'] * (aux['norm_loss'] + aux['bn_loss'])
  add('total_loss', total, io['total_loss'])
  add('iw_log_px', iw_log_px, io['iw_log_px'])

  bn_ours = ftn.to_torch_names(aux['batch_stats'], conv.names, 'batch_stats')
  bn_keys = [k for k in bn_ref if k.endswith(('running_mean', 'running_var'))]
  missing = sorted(set(bn_keys) - set(bn_ours))
  if missing:
    raise ValueError(f'BN statistics not produced by the model: {missing}')
  for k in sorted(bn_keys):
    add(f'bn:{k}', bn_ours[k], bn_ref[k], kind='bn_stats', scale=structural_zero_scale(k, bn_ref))

  g_ours = ftn.to_torch_names(grads, conv.names, 'params')
  missing = sorted(set(grads_ref) - set(g_ours))
  extra = sorted(set(g_ours) - set(grads_ref))
  if missing or extra:
    raise ValueError(f'gradients: reference keys without a model parameter {missing}; model '
                     f'parameters without a reference gradient {extra}')
  for k in sorted(grads_ref):
    add(f'grad:{k}', g_ours[k], grads_ref[k], kind='grad',
        scale=structural_zero_scale(k, grads_ref))
  return records


def evaluate_records(records, tolerance: float, grad_tolerance: float):
  """Marks each record with its tolerance and ``ok``; returns (records, all_ok)."""
  ok = True
  for r in records:
    r['tol'] = grad_tolerance if r['kind'] == 'grad' else tolerance
    r['ok'] = bool(np.isfinite(r['err']) and r['err'] <= r['tol'])
    ok &= r['ok']
  return records, ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folder', nargs='+', help='fixture folder(s)')
  parser.add_argument('--tolerance', type=float, default=1e-5,
                      help='relative tolerance of forward quantities and BN statistics')
  parser.add_argument('--grad_tolerance', type=float, default=1e-4,
                      help='relative tolerance of gradients')
  parser.add_argument('--depthwise_impl', default='auto', choices=('auto', 'lax', 'shift'))
  parser.add_argument('--json', action='store_true', help='print JSON lines instead of a table')
  parser.add_argument('--all', action='store_true',
                      help='list every gradient and BN statistic (default: the worst of each kind)')
  args = parser.parse_args(argv)
  all_ok = True
  for folder in args.folder:
    records, ok = evaluate_records(run_check(folder, args.depthwise_impl), args.tolerance,
                                   args.grad_tolerance)
    all_ok &= ok
    shown = records
    if not args.all:
      shown = [r for r in records if r['kind'] == 'forward' or not r['ok']]
      for kind in ('bn_stats', 'grad'):
        sub = [r for r in records if r['kind'] == kind]
        if sub:
          worst = max(sub, key=lambda r: r['err'])
          shown.append(dict(worst, name=f'{kind} (worst of {len(sub)}: {worst["name"]})'))
    name = os.path.basename(os.path.normpath(folder))
    if args.json:
      for r in shown:
        print(json.dumps(dict(fixture=name, **r)))
    else:
      print(f'== {name}: {"OK" if ok else "FAILED"}')
      for r in shown:
        print(f'  {"ok  " if r["ok"] else "FAIL"} {r["err"]:10.3e} (tol {r["tol"]:.0e})  '
              f'{r["name"]}')
  return 0 if all_ok else 1


if __name__ == '__main__':
  sys.exit(main())
