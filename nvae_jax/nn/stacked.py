"""One module run over the stacked variables of several identical children, as a ``lax.scan``.

A deep hierarchical model repeats one block many times (NVAE's latent groups), each repeat with
its own variables under its own name.  Traced repeat by repeat, XLA compiles every one of them; as
a scan it compiles one.  :func:`scan_children` leaves the variable tree as it is (one subtree per
child, the layout that checkpoints and converters know): it stacks the children's variables along
a new leading axis, runs ``template`` (an unbound module whose submodules stand in for the
children) once per step inside ``lax.scan``, and writes the collections the template updated
(batch statistics, sown values) back under the children's names.  The body is traced under
``nvae_jax.nn.conv.loop_body_convs`` (XLA:CPU needs its convolutions' gradients spelled out in a
loop).

The result equals calling the children one after another: the same modules compute the same
operations on the same variables, in the same order.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nvae_jax.nn.conv import loop_body_convs


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def scan_children(parent: nn.Module, template: nn.Module, steps: Sequence[Mapping[str, str]],
                  carry: Any, xs: Any, *, args: tuple = (), read: Sequence[str] = ('params',),
                  mutable: Sequence[str] = (), method: Optional[str] = None,
                  policy: Optional[Callable] = None) -> tuple[Any, Any]:
  """``carry, y_i = template(carry, x_i, *args)`` with the variables of step i's children.

  Args:
    parent: the bound module that owns the children (its ``variables`` hold their subtrees).
    template: an unbound module; its call (or ``method``) maps ``(carry, x, *args)`` to
      ``(carry, y)``.
    steps: per step, {template submodule name: name of the parent's child it stands for}.  Every
      step's children must have variables of the same structure and shapes.
    carry: the initial carry.
    xs: the per-step inputs, a pytree whose leaves have a leading axis of ``len(steps)`` (or None).
    args: inputs shared by every step (closed over, not scanned).
    read: the parent's collections the template reads (the children's subtrees of each).
    mutable: collections the template may update; each update is written back to the parent
      under the child's name (each must be mutable in the parent).
    policy: a ``jax.checkpoint`` policy for the step: what the backward pass keeps of each
      step (None: everything autodiff would keep).  A scan stores every value its backward pass
      reads for every step, elementwise intermediates included, where XLA would have fused those
      into their consumers in unrolled code: ``dots_saveable`` (keep matmul and conv outputs,
      recompute the elementwise rest) brings the scan back to the unrolled memory and time.

  Returns (carry, ys) with the leaves of ys stacked over the steps.
  """
  if not steps:
    raise ValueError('scan_children: no steps')
  variables = parent.variables

  def step_variables(names: Mapping[str, str]) -> dict:
    out = {}
    for col in read:
      tree = variables.get(col, {})
      out[col] = {t: tree[p] for t, p in names.items() if p in tree}
    return out

  stacked = _stack([step_variables(names) for names in steps])
  method_fn = getattr(type(template), method) if method else None

  def body(c, inputs):
    v, x = inputs
    with loop_body_convs():
      return _apply(v, c, x)

  def _apply(v, c, x):
    if mutable:
      (c, y), updates = template.apply(v, c, x, *args, method=method_fn, mutable=list(mutable))
    else:
      c, y = template.apply(v, c, x, *args, method=method_fn)
      updates = {}
    return c, (y, updates)

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  carry, (ys, updates) = lax.scan(body, carry, (stacked, xs), length=len(steps))
  for i, names in enumerate(steps):
    for col, tree in updates.items():
      for t, p in names.items():
        if t in tree:
          parent.put_variable(col, p, jax.tree.map(lambda a, i=i: a[i], tree[t]))
  return carry, ys
