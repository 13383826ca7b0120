r"""Early posterior collapse of the sigma-VAE conv VAE on MNIST: KL and sigma over the first steps.

    nice -n 15 taskset -c 1 python benchmarks/sigma_vae_collapse.py --steps 400 \
      --workdir /work/runs/collapse > collapse.jsonl

Trains ``configs/sigma_vae_mnist.py`` (the paper's recipe unless a variant says otherwise) for
``--steps`` steps per variant with ``python -m nvae_jax.main``, logging every ``--log_every``
steps, and prints one JSON line per variant: the training KL (nats per image) and decoder sigma at
each logged step, the first logged step with KL < 0.1 (collapsed) and the last logged KL.  A
killed run resumes from its checkpoint; a variant whose ``trajectory.json`` exists is not re-run.
Variants (``--variants``, comma-separated):

* ``default``: ``gaussian_optimal``, the recipe as configured (no ReLU after the decoder's dense
  input layer, as in the reference code);
* ``relu``: the recipe on the earlier network, with that ReLU (``model.dec_in_relu=True``); every
  variant below runs that network too, as they were measured before the fix:
* ``stop_grad``: ``model.sigma_stop_gradient=True`` (the option the sigma-VAE author mentions
  "may help stability sometimes");
* ``lr3e-4``: Adam learning rate 3e-4 instead of 1e-3;
* ``batch64``: batch 64 (the short sweep's batch; full-size network);
* ``half_b64``: filters 16/32/64 and batch 64 (the short sweep's configuration, which did not
  collapse in 600 steps);
* ``seed1``, ``seed2``: the recipe with seeds 1 and 2 (other initialisations and data orders);
* ``sigma1``: ``gaussian_fixed`` with sigma = 1 (MSE), for comparison;
* ``shared``: ``gaussian_shared`` (learned sigma, starting at 1).

Other modes: ``--inspect WORKDIR`` (see ``inspect``: posterior, ReLU activity, sigmoid saturation
and Adam's normalised step in a checkpoint), ``--reset_adam WORKDIR`` (continue a checkpoint with
fresh Adam moments) and ``--torch_init`` (train from PyTorch's default initialisation); the last
two run ``--reset_steps`` steps and print the training KL, sigma and gradient norm every
``--log_every`` steps.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

from nvae_jax.config import files as config_files
from nvae_jax.train.loop import read_metrics

_SWEEP = config_files.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sigma_vae_mnist_sweep.py'),
    'sigma_vae_mnist_sweep')
CONFIG, ROOT, _montage, _run = _SWEEP.CONFIG, _SWEEP.ROOT, _SWEEP._montage, _SWEEP._run

# The variants measured before the fix ran the earlier network, with a ReLU after the decoder's
# dense input layer (``model.dec_in_relu``); the reference code and the configs now have none.
RELU = ['--config.model.dec_in_relu=True']
VARIANTS = {
    'default': ('gaussian_optimal', []),
    'relu': ('gaussian_optimal', RELU),
    'stop_grad': ('gaussian_optimal', RELU + ['--config.model.sigma_stop_gradient=True']),
    'lr3e-4': ('gaussian_optimal', RELU + ['--config.optim.lr=0.0003']),
    'batch64': ('gaussian_optimal', RELU + ['--config.data.batch_size=64']),
    'half_b64': ('gaussian_optimal', RELU + ['--config.data.batch_size=64',
                                             '--config.model.channels=(16,32,64)']),
    'seed1': ('gaussian_optimal', RELU + ['--config.seed=1']),
    'seed2': ('gaussian_optimal', RELU + ['--config.seed=2']),
    'sigma1': ('gaussian_fixed', RELU),
    'shared': ('gaussian_shared', RELU),
}


def trajectory(workdir: str) -> list[dict]:
  return [{k: rec.get(k) for k in ('step', 'kl', 'sigma', 'recon', 'grad_norm')}
          for rec in read_metrics(workdir, 'train')]


def adam_step_ratio(opt_state, b1: float, b2: float) -> dict:
  """Adam's normalised step |m_hat| / (sqrt(v_hat) + 1e-8) (1 = a full ``lr`` step), median and
  90th percentile over all parameters, from the first Adam state in ``opt_state``.  A value far
  below 1 means the second moment still remembers gradients much larger than today's."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np

  def find(o):
    if hasattr(o, 'mu') and hasattr(o, 'nu') and hasattr(o, 'count'):
      return o
    children = o.values() if isinstance(o, dict) else o if isinstance(o, (tuple, list)) else ()
    for c in children:
      found = find(c)
      if found is not None:
        return found
    return None

  adam = find(opt_state)
  if adam is None:
    return {}
  t = int(adam.count)
  ratios = np.concatenate([
      (np.abs(np.asarray(m)) / (1 - b1 ** t) / (np.sqrt(np.asarray(v) / (1 - b2 ** t)) + 1e-8)
       ).ravel() for m, v in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu))])
  return dict(adam_step_ratio_median=float(np.median(ratios)),
              adam_step_ratio_p90=float(np.percentile(ratios, 90)))


def inspect(workdir: str, data_dir: str, decoder: str, overrides: list[str],
            num_images: int = 256) -> dict:
  """Inside the latest checkpoint of ``workdir``, on the first ``num_images`` test images:
  the posterior (mean |mu|, mean sigma_q, KL), the fraction of ReLU units active (> 0) after each
  decoder layer, the decoder's pre-sigmoid output logits at z = mu (mean, min, max), the mean
  sigmoid slope mu (1 - mu) there (how much gradient reaches the network through the mean), the
  MSE; the same decoder mean, slope and MSE at z ~ N(0, I) (``prior_*``: what training decodes
  once q(z|x) has collapsed to the prior); and the MSE of the constant and pixelwise-mean images
  for reference."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nvae_jax.data import make_pipeline
  from nvae_jax.models import conv_vae
  from nvae_jax.train import build
  from nvae_jax.train import state as state_lib

  config = _config_with(decoder, data_dir, overrides)
  run = build.build(config)
  pipe = make_pipeline(config.data, 'test', train=False, seed=0)
  x = np.concatenate([b['image'] for b, _ in zip(iter(pipe), range(
      -(-num_images // config.data.eval_batch_size)))])[:num_images]
  x = jnp.asarray(x, jnp.float32)
  state, _, step, _ = build.restore_latest(run, workdir, pipe.image_shape, config.data.batch_size)
  variables = state_lib.variables_of(state)
  module = run.task._module(tuple(x.shape[1:]))  # pylint: disable=protected-access

  def probe(m, x):
    mu, log_sigma = m.encode(x)
    h = m.dec_in(mu)
    if m.dec_in_relu:
      h = jax.nn.relu(h)
    active = [jnp.mean(h > 0)]  # with no ReLU there: the fraction of positive units
    h = h.reshape((x.shape[0],) + m.feat_shape)
    for i, layer in enumerate(m.dec):
      h = layer(h)
      if i < len(m.dec) - 1:
        h = jax.nn.relu(h)
        active.append(jnp.mean(h > 0))
    logits = h[..., :x.shape[-1]]
    mean = jax.nn.sigmoid(logits)
    return dict(step=step, mean_abs_mu=jnp.mean(jnp.abs(mu)),
                mean_sigma_q=jnp.mean(jnp.exp(log_sigma)),
                kl=jnp.mean(conv_vae.analytic_kl(mu, log_sigma)),
                active_relu_fraction=jnp.stack(active), logit_mean=jnp.mean(logits),
                logit_min=jnp.min(logits), logit_max=jnp.max(logits),
                sigmoid_slope=jnp.mean(mean * (1 - mean)),
                mse_at_posterior_mean=jnp.mean(jnp.square(mean - x)), image_mean=jnp.mean(x),
                decoder_mean=jnp.mean(mean),
                mse_of_constant_image_mean=jnp.mean(jnp.square(x - jnp.mean(x))),
                mse_of_pixelwise_mean=jnp.mean(jnp.square(x - jnp.mean(x, axis=0))))

  def at_prior(m, z):
    mean = jax.nn.sigmoid(m.decode(z)[..., :x.shape[-1]])
    return dict(prior_decoder_mean=jnp.mean(mean), prior_sigmoid_slope=jnp.mean(mean * (1 - mean)),
                prior_mse=jnp.mean(jnp.square(mean - x[:z.shape[0]])))

  out = jax.jit(lambda v, x: module.apply(v, x, method=probe))(variables, x)
  out.update(adam_step_ratio(state['opt_state'], config.optim.b1, config.optim.b2))
  z = jax.random.normal(jax.random.key(0), (x.shape[0], run.task.latent_dim))
  out.update(jax.jit(lambda v, z: module.apply(v, z, method=at_prior))(variables, z))
  return {k: np.asarray(v).round(5).tolist() for k, v in out.items()}


def _config_with(decoder: str, data_dir: str, overrides: list[str]):
  # pylint: disable=import-outside-toplevel
  sigma_vae_mnist = config_files.load_module(os.path.join(ROOT, CONFIG), 'sigma_vae_mnist')
  config = sigma_vae_mnist.get_config(decoder)
  config.data.data_dir = data_dir
  for o in overrides:  # '--config.a.b=value'
    key, value = o[len('--config.'):].split('=', 1)
    *path, leaf = key.split('.')
    node = config
    for k in path:
      node = node[k]
    node[leaf] = ast.literal_eval(value)
  return config


def torch_like_init(params: dict, rng) -> dict:
  """PyTorch's default initialisation (the sigma-VAE reference code's) of the conv VAE's layers:
  weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), where
  fan_in is in * k * k for convolutions and dense layers and, as PyTorch computes it for
  ConvTranspose2d weights [in, out, k, k], out * k * k for the transposed convolutions."""
  # pylint: disable=import-outside-toplevel
  import jax
  out = {}
  for i, (name, layer) in enumerate(sorted(params.items())):
    if 'kernel' not in layer:  # e.g. the shared decoder's log sigma: unchanged
      out[name] = layer
      continue
    k = layer['kernel']
    if name.startswith('dec_') and k.ndim == 4:
      fan_in = k.shape[0] * k.shape[1] * k.shape[3]
    else:
      fan_in = int(math.prod(k.shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    rk, rb = jax.random.split(jax.random.fold_in(rng, i))
    new = dict(layer)
    new['kernel'] = jax.random.uniform(rk, k.shape, k.dtype, -bound, bound)
    if 'bias' in layer:
      new['bias'] = jax.random.uniform(rb, layer['bias'].shape, k.dtype, -bound, bound)
    out[name] = new
  return out


def reset_adam(workdir: str, data_dir: str, decoder: str, overrides: list[str], steps: int,
               log_every: int) -> dict:
  """Continues the latest checkpoint of ``workdir`` for ``steps`` steps with the same loss, data
  and learning rate but a *fresh* Adam state (zero moments), logging the training KL, sigma and
  gradient norm.  A causal test of the stall: if the collapsed run moves again, the parameters
  were held by Adam's memory of the early gradients rather than by a stationary point."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import optax
  from nvae_jax.data import make_pipeline
  from nvae_jax.train import build, optim
  from nvae_jax.train import state as state_lib

  config = _config_with(decoder, data_dir, overrides)
  run = build.build(config)
  if workdir:
    pipe = make_pipeline(config.data, config.data.train_split, train=True, seed=config.seed + 1)
    state, _, step0, _ = build.restore_latest(run, workdir, pipe.image_shape,
                                              config.data.batch_size)
    variables = state_lib.variables_of(state)
  else:  # a fresh start with the reference code's (PyTorch's default) initialisation
    pipe = make_pipeline(config.data, config.data.train_split, train=True, seed=config.seed)
    first = {k: jnp.asarray(v) for k, v in next(iter(pipe)).items()}
    variables = run.task.init(state_lib.stream_key(config.seed, state_lib.INIT_STREAM), first)
    variables = dict(variables, params=torch_like_init(variables['params'],
                                                       jax.random.key(config.seed)))
    step0 = 0
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, model_state, opt_state, batch, rng):
    def f(p):
      return run.task.loss({'params': p, **model_state}, batch, rng, jnp.int32(0))
    (_, (metrics, new_state)), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = dict(metrics, grad_norm=optim.global_norm(grads))
    return optax.apply_updates(params, updates), {**model_state, **new_state}, opt_state, metrics

  traj = []
  rng = jax.random.key(config.seed + 1)
  for i, batch in zip(range(1, steps + 1), iter(pipe)):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params, model_state, opt_state, metrics = train_step(
        params, model_state, opt_state, batch, jax.random.fold_in(rng, i))
    if i % log_every == 0:
      traj.append(dict(step=int(step0) + i, **{k: float(metrics[k]) for k in
                                               ('kl', 'sigma', 'recon', 'grad_norm')}))
      print(json.dumps(traj[-1]), flush=True)
  return dict(workdir=workdir, from_step=int(step0), fresh_adam_steps=steps, trajectory=traj)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--workdir', default='/tmp/sigma_vae_collapse')
  p.add_argument('--data_dir', default='../shared/data/tfds')
  p.add_argument('--variants', default='default,relu')
  p.add_argument('--steps', type=int, default=400)
  p.add_argument('--log_every', type=int, default=10)
  p.add_argument('--figure', default='', help='montage of the variants\' reconstructions here')
  p.add_argument('--inspect', default='', help='only print inspect() of this workdir')
  p.add_argument('--inspect_variant', default='default',
                 help='the variant whose network and overrides the checkpoint was trained with')
  p.add_argument('--reset_adam', default='', help='only run reset_adam() on this workdir')
  p.add_argument('--reset_steps', type=int, default=100)
  p.add_argument('--torch_init', action='store_true',
                 help='train --reset_steps steps from a fresh PyTorch-style initialisation')
  args = p.parse_args(argv)
  if args.torch_init:
    decoder, extra = VARIANTS[args.inspect_variant]
    print(json.dumps(reset_adam('', args.data_dir, decoder, extra, args.reset_steps,
                                args.log_every)))
    return
  if args.reset_adam:
    decoder, extra = VARIANTS[args.inspect_variant]
    print(json.dumps(reset_adam(args.reset_adam, args.data_dir, decoder, extra, args.reset_steps,
                                args.log_every)))
    return
  if args.inspect:
    decoder, extra = VARIANTS[args.inspect_variant]
    print(json.dumps(dict(workdir=args.inspect, variant=args.inspect_variant,
                          **inspect(args.inspect, args.data_dir, decoder, extra))))
    return
  names = [v for v in args.variants.split(',') if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    raise ValueError(f'--variants: unknown {unknown}; expected names from {list(VARIANTS)}')
  os.makedirs(args.workdir, exist_ok=True)
  # pylint: disable-next=consider-using-with
  log = open(os.path.join(args.workdir, 'collapse.log'), 'a', encoding='utf-8')
  for name in names:
    workdir = os.path.join(args.workdir, name)
    done = os.path.join(workdir, 'trajectory.json')
    if not os.path.exists(done):
      decoder, extra = VARIANTS[name]
      _run([sys.executable, '-m', 'nvae_jax.main', f'--config={CONFIG}:{decoder}',
            f'--workdir={workdir}', f'--config.data.data_dir={args.data_dir}',
            f'--config.train.num_steps={args.steps}', f'--config.train.log_every={args.log_every}',
            f'--config.train.eval_every={args.steps}', '--config.train.num_eval_batches=5',
            f'--config.train.checkpoint_every={min(args.steps, 100)}',
            f'--config.train.images_every={args.steps}'] + extra, log)
      traj = trajectory(workdir)
      collapsed = [r['step'] for r in traj if r['kl'] is not None and r['kl'] < 0.1]
      row = dict(variant=name, decoder=decoder, overrides=extra, steps=args.steps,
                 first_collapsed_step=collapsed[0] if collapsed else None,
                 last_kl=traj[-1]['kl'], last_sigma=traj[-1]['sigma'], trajectory=traj)
      with open(done, 'w', encoding='utf-8') as f:
        json.dump(row, f)
    with open(done, encoding='utf-8') as f:
      print(f.read(), flush=True)
  if args.figure:
    panels = []
    for name in names:
      with open(os.path.join(args.workdir, name, 'trajectory.json'), encoding='utf-8') as f:
        row = json.load(f)
      panels.append((f'{name}: step {row["trajectory"][-1]["step"]}, train KL '
                     f'{row["last_kl"]:.3g}, sigma {row["last_sigma"]:.3f}\n'
                     'odd rows test images, even rows reconstructions',
                     os.path.join(args.workdir, name, 'recon.png')))
    _montage(panels, args.figure, cols=min(3, len(panels)), shrink=2)


if __name__ == '__main__':
  main()
