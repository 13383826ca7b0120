"""The training platform: train state, optimizers, the sharded update step, checkpoints, the loop.

Modules: :mod:`state` (plain-dict train state), :mod:`optim` (optax chains, schedules, update
skipping), :mod:`step` (mesh, shardings, the jitted update), :mod:`checkpoint` (orbax),
:mod:`build` (config -> task, mesh, optimizer; restore; describe), :mod:`evaluate` (a split ->
nats/image and bits/dim), :mod:`sample` (sample and reconstruction grids), :mod:`loop`
(``train_and_evaluate``), :mod:`testing` (a tiny ModelTask for tests).
"""
