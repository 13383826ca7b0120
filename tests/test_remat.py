"""Rematerialisation (``nvae_jax.policy.remat``): the same gradients, and less memory.

The network is a chain of residual conv / batch-norm / swish cells, each wrapped by
``policy.remat`` and called outside any ``lax.scan`` (as NVAE's pre- and post-processing cells
are), compiled with the platform's options for model programs
(``nvae_jax.compile_options.for_platform``).  The memory is XLA's own account of the compiled
gradient program (``memory_analysis().temp_size_in_bytes``), the figure that bounds device memory
on accelerators.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvae_jax import compile_options, policy

POLICIES = ('none', 'nothing_saveable', 'dots_saveable')


class _Cell(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    h = nn.Conv(16, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.swish(h)
    h = nn.Conv(x.shape[-1], (3, 3))(h)
    return x + nn.swish(h)


def _network(policy_name: str) -> nn.Module:
  cell = policy.remat(_Cell, policy_name, static_argnums=(2,))

  class Chain(nn.Module):

    @nn.compact
    def __call__(self, x, train=True):
      for i in range(4):  # named: the same variables whatever the wrapper's class name
        x = cell(name=f'cell_{i}')(x, train)
      return jnp.sum(x ** 2)

  return Chain()


@pytest.fixture(scope='module')
def compiled():
  """policy -> (compiled gradient program, its gradients at fixed variables and input)."""
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 4))
  out = {}
  for name in POLICIES:
    net = _network(name)
    variables = net.init(jax.random.key(0), x, False)  # the same for every policy

    def loss(params, batch_stats, x, net=net):
      y, _ = net.apply({'params': params, 'batch_stats': batch_stats}, x, True,
                       mutable=['batch_stats'])
      return y

    options = compile_options.for_platform(jax.devices()[0].platform)
    program = jax.jit(jax.grad(loss), compiler_options=options).lower(
        variables['params'], variables['batch_stats'], x).compile()
    out[name] = program, program(variables['params'], variables['batch_stats'], x)
  return out


@pytest.mark.parametrize('name', POLICIES[1:])
def test_remat_gives_the_gradients_of_the_plain_network(compiled, name):
  reference = jax.tree_util.tree_flatten_with_path(compiled['none'][1])[0]
  grads = jax.tree_util.tree_flatten_with_path(compiled[name][1])[0]
  assert [p for p, _ in grads] == [p for p, _ in reference]
  # A conv bias in front of batch norm has a zero gradient; what float32 computes for it is the
  # rounding of sums of terms as large as the biggest gradients, hence the absolute tolerance.
  scale = max(float(np.max(np.abs(g))) for _, g in reference)
  for (path, want), (_, got) in zip(reference, grads):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_remat_outside_a_scan_lowers_the_temporary_memory(compiled):
  """With ``prevent_cse=False`` XLA merged the recomputation back into the forward pass and the
  temporary memory stayed at 96-100 % of the plain network's (measured: 1280 and 1328 KB against
  1328 KB); with CSE prevention it is 31 % (nothing_saveable) and 48 % (dots_saveable).  jax
  0.10's XLA:CPU also merged them unless its ``cse_barrier_expander`` pass is disabled, as the
  platform's CPU options do (``compile_options.KEEP_REMAT_BARRIERS``)."""
  temp = {k: compiled[k][0].memory_analysis().temp_size_in_bytes for k in POLICIES}
  assert temp['nothing_saveable'] <= 0.5 * temp['none'], temp
  assert temp['dots_saveable'] <= 0.75 * temp['none'], temp
