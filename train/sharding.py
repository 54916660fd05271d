"""The device mesh and every sharding of the trainer, declared in one place.

Mesh: 2-D `('data', 'fsdp')` from `config.mesh.fsdp = N` (N divides the device
count, `data` takes the rest; N = 1 is plain data parallelism).

- Batch: the leading (example) axis is split over BOTH axes, so every device
  sees `batch_size / device_count` examples whatever N is.
- Train state (params and optimizer state): each array is split over `fsdp`
  along its largest axis whose size N divides; arrays with fewer than
  `min_shard_size` elements (biases, norms, scalars such as step counters) and
  arrays with no such axis are replicated. The rule looks only at the shape,
  so Adam's moments get the layout of their parameter.
  Stacked layers (any leaf under a `STACKED` key: the DiT's and FLUX's
  `[depth, ...]` block parameters, and Adam's moments of them) are never split along their
  leading depth axis: the rule applies to one layer's shape `shape[1:]`, so
  that each scan iteration gathers one layer's shards (train/step.py).
- Everything else (frozen VAE params, validation data): replicated.

`per_device_bytes` measures what the arrays occupy on one device from their
own shards (`addressable_shards`), or from `sharding.shard_shape` for
abstract arrays: this is what the memory plan reports.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the example axis of a batch is split over both
# Arrays below this many elements stay replicated (4 KiB in float32): their
# all-gather would cost more in latency than it saves in memory.
MIN_SHARD_SIZE = 1024
# Params keys of stacked [depth, ...] layers applied with a scan: the DiT's
# `blocks` (train/models/dit.py), FLUX's two stacks (train/models/flux.py).
STACKED = ("blocks", "transformer_blocks", "single_transformer_blocks")


def make_mesh(*, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp)` mesh (Auto axes) over `devices` (all by default).

  Args:
    fsdp: devices that share one copy of the train state (`config.mesh.fsdp`).
    devices: the mesh's devices; `data = len(devices) // fsdp`.

  Raises:
    ValueError: `fsdp` is not a positive divisor of the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp!r} must be a positive int dividing the device "
                     f"count {n}")
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def state_spec(shape: Sequence[int], fsdp: int, *,
               min_shard_size: int = MIN_SHARD_SIZE) -> P:
  """PartitionSpec of one train-state array of `shape` over an `fsdp`-way axis.

  The largest axis that `fsdp` divides (the first of equal ones) is split; an
  array with fewer than `min_shard_size` elements, or without such an axis,
  is replicated (`P()`).
  """
  shape = tuple(int(d) for d in shape)
  if fsdp == 1 or not shape or math.prod(shape) < min_shard_size:
    return P()
  axes = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * axis + [FSDP]))


def is_stacked(path) -> bool:
  """Whether a leaf at `path` (a `jax.tree_util` key path) is a stacked layer's."""
  return any(getattr(k, "key", getattr(k, "name", None)) in STACKED for k in path)


def leaf_spec(path, shape: Sequence[int], fsdp: int, *,
              min_shard_size: int = MIN_SHARD_SIZE) -> P:
  """`state_spec`, or for a stacked leaf `P(None, *state_spec(shape[1:]))`."""
  if is_stacked(path) and len(shape) >= 1:
    inner = state_spec(tuple(shape)[1:], fsdp, min_shard_size=min_shard_size)
    return P(None, *inner) if inner != P() else P()
  return state_spec(shape, fsdp, min_shard_size=min_shard_size)


def state_specs(tree, mesh: Mesh, *, min_shard_size: int = MIN_SHARD_SIZE):
  """`leaf_spec` of every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape[FSDP]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_spec(path, np.shape(x), fsdp, min_shard_size=min_shard_size),
      tree)


def state_shardings(tree, mesh: Mesh, *, min_shard_size: int = MIN_SHARD_SIZE):
  """NamedShardings of a train state (or its params / optimizer state)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      state_specs(tree, mesh, min_shard_size=min_shard_size),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The example axis split over ('data', 'fsdp'), other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(tree, shardings):
  """Places `tree` with `shardings` (one sharding, or a pytree of them).

  Host arrays are `device_put` (every process passes the same values);
  device arrays, possibly spanning several processes, are resharded by a
  jitted identity, which all processes run together.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  on_device = [isinstance(x, jax.Array) for x in jax.tree.leaves(tree)]
  if any(on_device):
    # Copies (never the input buffers forwarded): the train step donates its
    # state, which must not delete the arrays it was placed from.
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)
  return jax.device_put(tree, shardings)


def per_device_bytes(tree) -> int:
  """Largest number of bytes that the leaves of `tree` occupy on one device.

  Concrete arrays are measured from their addressable shards (what really
  sits on each local device); `jax.ShapeDtypeStruct`s from their sharding's
  `shard_shape`. Host (numpy) leaves count whole.
  """
  per_device: dict[Any, int] = {}
  whole = 0
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array):
      for shard in x.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    elif isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
      nbytes = math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      whole += nbytes  # the same shard size on every device of a NamedSharding
    else:
      whole += np.asarray(x).nbytes
  return whole + max(per_device.values(), default=0)
