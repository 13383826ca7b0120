"""NVAE for the training platform: config -> module, loss, evaluation, sampling, description.

:class:`NVAETask` (registered as ``'nvae'``) wraps :class:`~nvae_jax.models.nvae.network.NVAE`
for the training platform: KL warm-up and balancing, spectral and BN regularisation
(``nvae_jax.objectives``), importance-weighted evaluation and sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nvae_jax import host_init
from nvae_jax import objectives
from nvae_jax import policy
from nvae_jax.config import nvae as nvae_config
from nvae_jax.distributions import make_output_distribution
from nvae_jax.models.base import ModelTaskBase, register
from nvae_jax.models.nvae import sampling as nvae_sampling
from nvae_jax.models.nvae.network import NVAE, importance_weighted_nll
from nvae_jax.models.nvae.plan import NVAEArch, groups_per_scale
from nvae_jax.nn.conv import CONV_KERNELS, DEPTHWISE_IMPLS


# The architecture arguments are required; the other model fields default to the one NVAE
# defaults table (``nvae_jax.config.nvae.MODEL_DEFAULTS``).
_OPTIONAL_FIELDS = tuple(k for k in nvae_config.MODEL_DEFAULTS if k not in nvae_config.ARCH_ARGS)


def _get(cfg, name, default=None):
  return cfg[name] if name in cfg else default


def resolve_depthwise_impl(name: str) -> str:
  """``auto`` -> ``shift`` on CPU, ``lax`` on accelerators."""
  if name == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'lax'
  if name not in DEPTHWISE_IMPLS:
    raise ValueError(f'model.depthwise_impl: expected "auto" or one of {DEPTHWISE_IMPLS}, '
                     f'got {name!r}')
  return name


def likelihood_from_config(config) -> tuple[str, tuple]:
  """(name, options) of the output distribution for ``config.model.decoder``.

  ``auto``: Bernoulli for binarised data, the discretized logistic mixture for
  ``num_mixture_dec > 1`` (``faithful_dml`` selects the original's quirks) and NVAE's Normal
  decoder for ``num_mixture_dec == 1``; any other value is a name of the output-distribution
  registry.
  """
  m, data = config.model, config.data
  name = _get(m, 'decoder', nvae_config.MODEL_DEFAULTS['decoder'])
  mix = int(_get(m, 'num_mixture_dec', nvae_config.MODEL_DEFAULTS['num_mixture_dec']))
  bits = int(_get(data, 'num_bits', 8))
  if name == 'auto':
    if _get(data, 'binarize', 'none') != 'none':
      name = 'bernoulli'
    elif mix > 1:
      name = 'logistic_mixture'
    elif mix == 1:
      name = 'nvae_normal'
    else:
      raise ValueError(f'model.num_mixture_dec: expected a positive int, got {mix}')
  if name == 'logistic_mixture':
    opts = dict(num_mixture=mix, num_bits=bits, faithful=bool(_get(m, 'faithful_dml', False)))
  elif name == 'categorical':
    opts = dict(num_bits=bits)
  else:
    opts = {}
  return name, tuple(sorted(opts.items()))


@register('nvae')
class NVAETask(ModelTaskBase):
  """NVAE for the training platform (``nvae_jax.models.base.ModelTask``).

  ``config.model`` fields are named as the original command-line arguments (see
  ``nvae_jax/config/nvae.py``); ``total_steps`` (the KL warm-up horizon N) defaults to
  ``config.train.num_steps`` when 0.  The image geometry is read from the batch (and from the
  variables in ``sample``; ``describe`` and ``num_dims`` take it as an argument), so one task
  serves any input size.

  Loss = mean_b(recon_b + beta balanced_KL_b) + lambda (L_SR + L_BN); metrics: ``loss``,
  ``recon``, ``kl``, ``balanced_kl``, ``kl_coeff``, ``norm_loss``, ``bn_loss``, ``wdn_coeff``,
  ``nelbo`` (negative ELBO, nats), ``kl_group_<d>``.
  """

  mutable_collections = ('batch_stats', 'spectral')

  def __init__(self, config):
    self.config = config
    m = config.model
    for f in nvae_config.ARCH_ARGS:
      if f not in m:
        raise ValueError(f'config.model.{f}: missing (NVAE needs the original arguments; see '
                         'nvae_jax/config/nvae.py)')
    self.hparams = {f: m[f] for f in nvae_config.ARCH_ARGS}
    for f in _OPTIONAL_FIELDS:
      setattr(self, f, _get(m, f, nvae_config.MODEL_DEFAULTS[f]))
    total = int(self.total_steps or config.train.num_steps)
    if total <= 0:
      raise ValueError(f'config.model.total_steps / config.train.num_steps: expected a positive '
                       f'number of steps for the KL warm-up, got {total}')
    self.total_steps = total
    self.likelihood_name, self.likelihood_options = likelihood_from_config(config)
    self.dtype = policy.compute_dtype(config.precision.compute_dtype)
    self.remat_policy = config.remat.policy
    policy.checkpoint_policy(self.remat_policy)  # validates the name
    self.depthwise = resolve_depthwise_impl(self.depthwise_impl)
    self.crop = int(_get(config.data, 'pad', 0))
    self.num_importance = int(config.eval.num_importance_samples)
    self.importance_chunk = int(_get(config.eval, 'importance_chunk', 1)) or self.num_importance
    if self.num_importance < 1 or self.num_importance % self.importance_chunk:
      raise ValueError(f'config.eval: num_importance_samples={self.num_importance} must be a '
                       f'positive multiple of importance_chunk={self.importance_chunk}')
    self._models: dict[tuple, NVAE] = {}
    self._input_shape = None  # the shape init saw (for describe())
    sample = config.sample
    self.sample_output_mode = str(_get(sample, 'output_mode', 'auto'))
    self.sample_output_temperature = float(_get(sample, 'output_temperature', 1.0))
    nvae_sampling.use_output_mean(self, self.sample_output_mode)  # validates the mode

  # -- construction ---------------------------------------------------------------------------

  def arch(self, image_shape) -> NVAEArch:
    dist = make_output_distribution(self.likelihood_name, **dict(self.likelihood_options))
    out_c = dist.num_channels(int(image_shape[-1]))
    return NVAEArch(image_shape=tuple(int(s) for s in image_shape), output_channels=out_c,
                    crop=self.crop, **self.hparams)

  def model(self, image_shape) -> NVAE:
    """The flax module for images of shape (H, W, C)."""
    key = tuple(int(s) for s in image_shape)
    if key not in self._models:
      self._models[key] = NVAE(self.arch(key), self.likelihood_name, self.likelihood_options,
                               dtype=self.dtype, depthwise_impl=self.depthwise,
                               remat_policy=self.remat_policy,
                               scan_groups=bool(self.scan_groups))
    return self._models[key]

  @staticmethod
  def _images(batch) -> jax.Array:
    x = batch['image']
    if x.ndim != 4:
      raise ValueError(f"batch['image']: expected [B, H, W, C], got shape {tuple(x.shape)}")
    return jnp.asarray(x, jnp.float32)

  def alpha(self) -> np.ndarray:
    """The KL-balancing alpha per group (decoder order)."""
    h = self.hparams
    return objectives.kl_balance_alpha(groups_per_scale(
        h['num_latent_scales'], h['num_groups_per_scale'], h['ada_groups'],
        h['min_groups_per_scale']))

  # -- ModelTask ------------------------------------------------------------------------------

  def init(self, rng, batch):
    x = self._images(batch)
    self._input_shape = tuple(int(s) for s in x.shape[1:])
    model = self.model(x.shape[1:])
    k_param, k_sample, k_sr = jax.random.split(rng, 3)
    variables = dict(model.init({'params': k_param, 'sample': k_sample}, x, True))
    kernels = variables.pop(CONV_KERNELS)
    variables.pop('intermediates', None)
    variables.setdefault('batch_stats', {})
    variables['spectral'] = objectives.init_spectral_state(kernels, k_sr)
    return variables

  def init_host(self, seed: int, batch) -> dict:
    """The variables of :meth:`init` drawn on the host (numpy), compiling nothing.

    Same tree and the same initial distributions as :meth:`init` (``nvae_jax.host_init``),
    other random streams; ``batch`` may be abstract (``jax.ShapeDtypeStruct``).
    """
    x = jax.ShapeDtypeStruct(tuple(batch['image'].shape), jnp.float32)
    model = self.model(x.shape[1:])
    key = jax.eval_shape(jax.random.key, 0)

    def init(k, images):
      return model.init({'params': k, 'sample': k}, images, True)

    values, abstract = host_init.initialise(init, seed, ('params', 'batch_stats'), key, x)
    values.setdefault('batch_stats', {})
    values['spectral'] = objectives.init_spectral_state_host(
        abstract[CONV_KERNELS], host_init.path_seed(seed, ('spectral',)))
    return values

  def forward(self, variables, x, train: bool, rng=None, eps=None, mutable=()):
    """``NVAE.__call__`` with the task's module; returns (outputs, updated collections)."""
    model = self.model(x.shape[1:])
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    rngs = {'sample': rng} if rng is not None else {}
    out, upd = model.apply(v, x, train, eps, rngs=rngs, mutable=list(mutable))
    return out, upd

  def objective(self, variables, x, rng, step, eps=None, spectral_iters=None):
    """The training loss and everything it is made of (used by ``loss`` and the reference check).

    Returns (loss, aux) with aux holding the model outputs and ``beta``, ``gamma``, ``alpha``,
    ``balanced_kl`` [B], ``nelbo_loss``, ``norm_loss``, ``bn_loss``, ``wdn_coeff`` and the
    updated ``batch_stats`` and ``spectral`` state.
    """
    out, upd = self.forward(variables, x, True, rng=rng, eps=eps,
                            mutable=('batch_stats', CONV_KERNELS, 'intermediates'))
    beta = objectives.kl_coeff(step, self.total_steps, self.kl_anneal_portion,
                               self.kl_const_portion, self.kl_const_coeff)
    alpha = self.alpha()
    balanced_kl, gamma, kl_vals = objectives.kl_balance(out['kl_all'], beta, alpha)
    nelbo_loss = jnp.mean(out['recon'] + balanced_kl)
    norm_loss, spectral, _ = objectives.spectral_loss(
        upd[CONV_KERNELS], variables['spectral'], spectral_iters)
    bn_loss = objectives.batchnorm_loss(variables['params'], variables.get('batch_stats', {}))
    wdn = objectives.regularizer_weight(beta, self.weight_decay_norm,
                                        self.weight_decay_norm_anneal,
                                        self.weight_decay_norm_init)
    loss = nelbo_loss + wdn * (norm_loss + bn_loss)
    aux = dict(out=out, beta=beta, gamma=gamma, alpha=alpha, kl_vals=kl_vals,
               balanced_kl=balanced_kl, nelbo_loss=nelbo_loss, norm_loss=norm_loss,
               bn_loss=bn_loss, wdn_coeff=wdn, conv_kernels=upd[CONV_KERNELS],
               batch_stats=upd.get('batch_stats', {}), spectral=spectral)
    return loss, aux

  def loss(self, variables, batch, rng, step):
    x = self._images(batch)
    loss, aux = self.objective(variables, x, rng, step)
    out = aux['out']
    kl = jnp.sum(out['kl_all'], axis=1)
    metrics = dict(loss=loss, recon=jnp.mean(out['recon']), kl=jnp.mean(kl),
                   balanced_kl=jnp.mean(aux['balanced_kl']), kl_coeff=aux['beta'],
                   norm_loss=aux['norm_loss'], bn_loss=aux['bn_loss'],
                   wdn_coeff=aux['wdn_coeff'], nelbo=jnp.mean(out['recon'] + kl))
    for d in range(out['kl_all'].shape[1]):
      metrics[f'kl_group_{d}'] = aux['kl_vals'][d]
    new_state = {'batch_stats': aux['batch_stats'], 'spectral': aux['spectral']}
    return loss, (metrics, new_state)

  def evaluate(self, variables, batch, rng):
    """Eval-mode (running BN statistics) negative ELBO and importance-weighted NLL.

    K = ``config.eval.num_importance_samples`` posterior samples per image, drawn
    ``importance_chunk`` at a time (the batch is tiled chunk times) under ``lax.map``:
    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),  nll = -(logsumexp_k log w_k - log K),
    nelbo = mean_k (recon_k + sum_g KL_g,k) (negative ELBO, nats).
    """
    x = self._images(batch)
    b = x.shape[0]
    chunk, k = self.importance_chunk, self.num_importance
    xt = jnp.tile(x, (chunk, 1, 1, 1))

    def one(key):
      out, _ = self.forward(variables, xt, False, rng=key)
      log_w = -out['recon'] - out['log_q'] + out['log_p']
      nelbo = out['recon'] + jnp.sum(out['kl_all'], axis=1)
      return log_w.reshape(chunk, b), nelbo.reshape(chunk, b), out['recon'].reshape(chunk, b)

    log_w, nelbo, recon = lax.map(one, jax.random.split(rng, k // chunk))
    log_w = log_w.reshape(k, b)
    return dict(nll=importance_weighted_nll(log_w), nelbo=jnp.mean(nelbo.reshape(k, b), axis=0),
                recon=jnp.mean(recon.reshape(k, b), axis=0))

  def sample(self, variables, rng, num, temperature):
    """``num`` images in [0, 1] at latent temperature ``temperature``, eval-mode BN.

    The output distribution then gives its mean or a draw at ``config.sample.output_temperature``
    as ``config.sample.output_mode`` says (``auto``: the mean for Bernoulli, as the original
    shows binary samples, and a draw otherwise); see ``nvae_jax.models.nvae.sampling``.
    """
    shape = nvae_sampling.image_shape_from_variables(self, variables)
    model = self.model(shape)
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    k_z, k_x = jax.random.split(rng)
    net_out = model.apply(v, num, temperature, False, rngs={'sample': k_z},
                          method=NVAE.sample_logits)
    if nvae_sampling.use_output_mean(self, self.sample_output_mode):
      return model.apply(v, net_out, method=NVAE.output_mean)
    return model.apply(v, net_out, k_x, self.sample_output_temperature,
                       method=NVAE.output_sample)

  def prepare_sampling(self, variables, rng, temperature, cache_dir):
    """Decoder BN statistics re-estimated at ``temperature`` (``nvae_jax.models.nvae.sampling``)
    with ``config.sample.readjust_bn_*``, cached as ``cache_dir/bn_t<t>.npz``;
    ``readjust_bn_steps = 0`` keeps the training ones."""
    s = self.config.sample
    steps = int(s.get('readjust_bn_steps', 0))
    if steps <= 0 or 'batch_stats' not in variables:
      return variables
    momentum = float(s.get('readjust_bn_momentum', 0.05)) or None  # 0: a plain average
    stats, _ = nvae_sampling.cached_bn_stats(
        self, variables, rng, temperature, cache_dir, steps=steps,
        batch=int(s.get('readjust_bn_batch', 16)), momentum=momentum)
    return {**variables, 'batch_stats': stats}

  def reconstruct(self, variables, batch, rng):
    x = self._images(batch)
    out, _ = self.forward(variables, x, False, rng=rng)
    model = self.model(x.shape[1:])
    v = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
    return model.apply(v, out['net_out'], method=NVAE.output_mean)

  def image_size_multiple(self):
    """NVAE halves the resolution in each pre-processing block and between latent scales."""
    pre, scales = self.hparams['num_preprocess_blocks'], self.hparams['num_latent_scales']
    return 2 ** (pre + scales - 1), (f'2^(model.num_preprocess_blocks={pre} + '
                                     f'model.num_latent_scales={scales} - 1)')

  def num_dims(self, image_shape):
    """(H - 2 crop)(W - 2 crop) C: the likelihood covers the image without its ``data.pad``
    padding (784 for MNIST padded from 28x28 to 32x32)."""
    h, w, c = (int(s) for s in image_shape)
    return (h - 2 * self.crop) * (w - 2 * self.crop) * c

  def describe(self, image_shape=None):
    if image_shape is None:
      if self._input_shape is None:
        raise ValueError('NVAETask.describe: the input shape is unknown; pass image_shape (H, W, '
                         'C) or call init first')
      image_shape = self._input_shape
    shape = tuple(int(s) for s in image_shape)
    arch = self.arch(shape)
    dist = make_output_distribution(self.likelihood_name, **dict(self.likelihood_options))
    return {'inputs': shape, 'latents': arch.latent_shapes(),
            'outputs': shape[:2] + (arch.output_channels,),
            'likelihood': {'name': self.likelihood_name,
                           'continuous': bool(getattr(dist, 'continuous', False))}}
