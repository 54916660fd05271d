"""Stacked `[depth, ...]` blocks applied with `jax.lax.scan`, and their remat policies.

A transformer's repeated blocks are ONE module whose parameters carry a
leading depth axis. The compiled program then holds one block whatever the
depth, and each scan iteration is where a sharded step gathers that block's
parameters (`prepare_block`, see train/step.py: ZeRO-3 keeps only the running
block whole). Used by the DiT (one stack, `blocks`) and FLUX (two stacks,
`transformer_blocks` and `single_transformer_blocks`).

`remat` picks what the backward pass recomputes per block: 'none' (keep every
activation), 'full' (keep only the block inputs, recompute the rest, gathers
included) or 'dots_saveable' (keep the matmul outputs, recompute the
elementwise ops).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_block(fn, policy: str):
  """`fn` (a scan body) under `jax.checkpoint` with the named policy (`REMAT_POLICIES`)."""
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
  if policy == "dots_saveable":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable)
  raise ValueError(f"remat: must be one of {REMAT_POLICIES}, got {policy!r}")


def stack(modules: list[nnx.Module]) -> nnx.Module:
  """One module of `modules[0]`'s structure whose every parameter is stacked `[depth, ...]`.

  The modules are initialised one by one (so block i gets the numbers it
  would get unstacked), then their states stacked.
  """
  splits = [nnx.split(m) for m in modules]
  return nnx.merge(splits[0][0], jax.tree.map(lambda *xs: jax.numpy.stack(xs),
                                              *[state for _, state in splits]))


def stack_init(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int,
               rngs: nnx.Rngs) -> nnx.Module:
  """`depth` blocks `make_block(rngs)` built in ONE vmapped call: parameters `[depth, ...]`.

  Each block gets its own split of `rngs`. Tracing (and `nnx.eval_shape` of a
  12 B model for a memory plan) costs one block whatever the depth; `stack`
  of separately built blocks costs `depth` of them.
  """
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(r):
    return make_block(r)

  return create(rngs)


def scan(stacked: nnx.Module, carry, apply: Callable, *, remat: str = "none",
         prepare_block: Callable | None = None):
  """Runs `carry = apply(block_i, carry)` for every block of `stacked`, in one scan.

  Args:
    stacked: a module from `stack` (parameters `[depth, ...]`).
    carry: the activations (any pytree) entering block 0.
    apply: `apply(block, carry) -> carry`, one block (closing over whatever
      every block shares: time embedding, rotary tables).
    remat: the per-block policy (`REMAT_POLICIES`).
    prepare_block: optional `prepare_block(params) -> params` applied to one
      block's parameters (a pure dict without the depth axis) inside the scan
      body before the block runs: a sharded step all-gathers them there.

  Returns:
    the carry after the last block.
  """
  block_def, block_state = nnx.split(stacked)
  carry = _same_varying_axes(carry)

  def body(c, params):
    if prepare_block is not None:
      params = prepare_block(params)
    return apply(nnx.merge(block_def, params), c), None

  out, _ = jax.lax.scan(remat_block(body, remat), carry, nnx.to_pure_dict(block_state))
  return out


def _varying_axes(x) -> frozenset:
  """The mesh axes `x` varies over inside `jax.shard_map` (empty outside)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _same_varying_axes(carry):
  """`carry` with every leaf varying over the union of its leaves' axes.

  Inside shard_map, a scan's carry must keep its type: a leaf that enters
  invariant (FLUX's text stream, embedded from the replicated prompt) but
  mixes with a varying one (the image stream) in the block would change type.
  Outside shard_map this is the identity.
  """
  leaves = jax.tree.leaves(carry)
  axes = frozenset().union(*(_varying_axes(x) for x in leaves))
  if not axes:
    return carry
  return jax.tree.map(
      lambda x: (jax.lax.pcast(x, tuple(sorted(axes - _varying_axes(x))), to="varying")
                 if axes - _varying_axes(x) else x), carry)
