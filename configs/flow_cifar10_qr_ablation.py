r"""The 1x1-convolution ablation of Hoogeboom et al. 2019 on CIFAR-10, 8-bit: plain vs PLU vs QR.

``get_config('qr')``, ``get_config('plu')`` or ``get_config('conv1x1')`` (plain); add ``,small`` for
2 CPU cores.  Official setting (emerging_spec.md §3): 3 levels x 8 steps, width 512, 3500 epochs,
otherwise the CIFAR-10 recipe of ``configs/flow_cifar10.py``.

Published result: QR ~ PLU ~ standard 1x1, QR equal or slightly better and more stable
[memory: the exact bits/dim are not in the spec; take them from the paper's table].

  for p in conv1x1 plu qr; do
    python -m nvae_jax.main --config=configs/flow_cifar10_qr_ablation.py:$p \
      --workdir=$WORKDIR/$p --config.data.data_dir=$TFDS_DIR
  done
"""

from nvae_jax.config import flow as flow_base

_CHOICES = ('conv1x1', 'plu', 'qr')


def get_config(arg='qr'):
  small, permutation = flow_base.parse_arg(arg or 'qr', 'configs/flow_cifar10_qr_ablation.py',
                                           default_permutation='qr')
  if permutation not in _CHOICES:
    raise ValueError(f'configs/flow_cifar10_qr_ablation.py: the ablation compares {_CHOICES}, '
                     f'got {permutation!r}')
  c = flow_base.glow_config(dataset='cifar10', image_size=32, channels=3, levels=3, steps=8,
                            width=512, global_batch=256, epochs=3500, permutation=permutation,
                            random_flip=True)
  c.seed = 2
  if small:
    flow_base.make_small(c)
  return c
