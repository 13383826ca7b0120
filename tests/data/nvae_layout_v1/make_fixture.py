"""Makes this folder's files; run at the commit *before* df9ff56 (the per-conv spectral layout).

  git worktree add --detach /tmp/old df9ff56~1
  cd /tmp/old && PYTHONPATH=$PWD python <this file> /tmp/v1 <this folder>

1. trains a tiny NVAE (configs/nvae_mnist.py:small shrunk to 4 channels, 1 scale of 2 groups of 2
   latents, batch 4, 2 steps, on MNIST from ../shared/data/tfds) and keeps its checkpoint as
   ``checkpoint_v1.tar.gz`` (``checkpoints/2/``: layout version 1, no ``meta`` item);
2. restores it with the old code and stores, in ``old_spectral.npz``, every conv's effective kernel
   (``kernel:<conv path>/kernel``) and the old code's sigma = u^T M v of the stored vectors with no power
   iteration (``sigma:<conv path>``): the independent values that the migrated state must give.
"""
import os
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nvae_jax import main as main_lib

WORKDIR, OUT = sys.argv[1], sys.argv[2]
ARGV = ['nvae-jax', '--config=configs/nvae_mnist.py:small', f'--workdir={WORKDIR}',
        '--config.data.data_dir=../shared/data/tfds',
        '--config.model.num_channels_enc=4', '--config.model.num_channels_dec=4',
        '--config.model.num_latent_scales=1', '--config.model.num_groups_per_scale=2',
        '--config.model.min_groups_per_scale=1', '--config.model.num_latent_per_group=2',
        '--config.data.batch_size=4', '--config.data.eval_batch_size=4',
        '--config.train.num_steps=2', '--config.train.checkpoint_every=2',
        '--config.train.eval_every=0', '--config.train.images_every=0',
        '--config.train.log_every=1', '--config.train.num_eval_batches=1',
        '--config.train.async_checkpoints=False']

main_lib.main(ARGV)
with tarfile.open(os.path.join(OUT, 'checkpoint_v1.tar.gz'), 'w:gz') as tar:
  tar.add(os.path.join(WORKDIR, 'checkpoints'), arcname='checkpoints')

from nvae_jax.train import setup  # pylint: disable=wrong-import-position
from nvae_jax.train import state as state_lib  # pylint: disable=wrong-import-position

fv = main_lib._define_flags(ARGV)  # pylint: disable=protected-access
fv(ARGV)
run = setup.build(main_lib._finalize(fv))  # pylint: disable=protected-access
state, _, _, _ = setup.restore_latest(run, WORKDIR, (32, 32, 1), 4)
_, aux = run.task.objective(state_lib.variables_of(state), jnp.zeros((2, 32, 32, 1)),
                            jax.random.key(0), 0, spectral_iters=0)
out = {f'kernel:{"/".join(p)}': np.asarray(k)
       for p, k in traverse_util.flatten_dict(dict(aux['conv_kernels'])).items()}
out.update({f'sigma:{"/".join(p)}': np.float32(s) for p, s in aux['sigmas'].items()})
np.savez_compressed(os.path.join(OUT, 'old_spectral.npz'), **out)
