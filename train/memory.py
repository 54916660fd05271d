"""The memory plan of a compiled train step, and the fit check before step 1.

`plan(compiled, state)` combines what XLA says the compiled (SPMD-partitioned,
so per-device) program needs (`compiled.memory_analysis()`: arguments,
outputs, temporaries) with what the train state's arrays occupy on one device,
measured from their shards (`sharding.per_device_bytes`). The loop logs
`MemoryPlan.line` (it contains "per device") before the first step and calls
`check_fit` with the device's own limit: GPUs and TPUs report `bytes_limit` in
`device.memory_stats()`; the CPU reports nothing, and then nothing is checked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from train import config as config_lib
from train import sharding as sharding_lib

# The config fields that change a step's memory, named by the fit error.
FIELDS = ("batch_size", "chunk_size", "mesh.fsdp", "dit.remat", "precision")


class MemoryPlan(NamedTuple):
  """Bytes per device of one compiled train step.

  params, opt_state: the train state's parameters and optimizer state, from
    their arrays' shards (what one device holds between steps).
  arguments, outputs, temp, alias: `memory_analysis()` of the compiled step
    (arguments = state + batch + frozen params; temp = the step's
    temporaries: activations, all-gathered params, gradients).
  compiler_peak: on TPU, `memory_analysis().peak_memory_in_bytes`: the peak
    of the TPU compiler's own buffer assignment, inputs included (its `temp`
    can read 0 on v5e/v6e); 0 elsewhere (XLA:CPU's figure leaves temporaries
    out).
  num_params: parameters of the trained model (elements, whole, not per device).
  """
  params: int
  opt_state: int
  arguments: int
  outputs: int
  temp: int
  alias: int
  compiler_peak: int = 0
  num_params: int = 0

  @property
  def peak(self) -> int:
    """The compiler's peak when it gives one, else arguments + outputs - aliased + temporaries."""
    if self.compiler_peak:
      return self.compiler_peak
    return self.arguments + self.outputs - self.alias + self.temp

  def line(self, *, name: str = "", limit: int | None = None) -> str:
    """One log line, e.g. `memory plan (flow): per device 1.2 MiB params + ...`."""
    head = f"memory plan ({name})" if name else "memory plan"
    fit = (f" of {format_bytes(limit)} on the device" if limit else
           " (the device reports no memory limit: not checked)")
    return (f"{head}: per device {format_bytes(self.params)} params + {format_bytes(self.opt_state)} "
            f"optimizer state, step arguments {format_bytes(self.arguments)}, outputs "
            f"{format_bytes(self.outputs)}, temporaries {format_bytes(self.temp)}; peak ~{format_bytes(self.peak)}"
            + fit)


class MemoryPlanError(config_lib.ConfigError):
  """The compiled step will not fit in device memory; names the fields to change."""


def format_bytes(n: int) -> str:
  """`1.23 GiB`, `4.56 MiB`, `7.89 KiB`, `12 B`."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def plan(compiled, state) -> MemoryPlan:
  """The memory plan of `compiled` (a `jax.stages.Compiled` train step) and `state`.

  Args:
    compiled: `train_step.lower(state, batch, frozen, key).compile()`.
    state: the `TrainState` passed in (arrays or ShapeDtypeStructs with
      shardings); its params and optimizer state are measured from their shards.
  """
  ma = compiled.memory_analysis()
  get = lambda field: int(getattr(ma, field, 0) or 0) if ma is not None else 0
  return MemoryPlan(params=sharding_lib.per_device_bytes(state.params),
                    opt_state=sharding_lib.per_device_bytes(state.opt_state),
                    arguments=get("argument_size_in_bytes"),
                    outputs=get("output_size_in_bytes"),
                    temp=get("temp_size_in_bytes"),
                    alias=get("alias_size_in_bytes"),
                    compiler_peak=get("peak_memory_in_bytes") if _platform(state) == "tpu" else 0,
                    num_params=sum(math.prod(np.shape(x))
                                   for x in jax.tree.leaves(state.params)))


def _platform(state) -> str:
  """The platform of the devices `state`'s arrays (or ShapeDtypeStructs) are laid out on."""
  for x in jax.tree.leaves(state):
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      return next(iter(sharding.device_set)).platform
  return ""


# HBM per chip by `device.device_kind`, for devices that cannot report it (the
# compile-only TPU client's topology devices). Public figures; the compiler
# checks its own exact limit and fails with RESOURCE_EXHAUSTED above it.
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v5p": 95 * 2**30, "TPU v6 lite": 32 * 2**30, "TPU v6e": 32 * 2**30}


def topology_devices(name: str, *, num_slices: int = 1) -> list:
  """The chips of TPU topology `name` (e.g. 'v5e:16x16'), from libtpu's compile-only client.

  No TPU is needed: a step jitted over a mesh of these devices lowers and
  compiles with the TPU compiler (`memory_analysis()`, `cost_analysis()`,
  out-of-HBM errors) but cannot run. Needs libtpu (`pip install -e ".[tpu]"`).

  Raises:
    ValueError: naming the topology, when libtpu is missing or rejects it.
  """
  import os  # pylint: disable=g-import-not-at-top
  # libtpu reads these when it starts: no metadata server, one local "host".
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu otherwise takes a machine-wide lock: a second compile-only process
  # (another plan, a test worker) would fail to load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"topology {name!r} (num_slices={num_slices}): {type(e).__name__}: "
                     f"{e} (is libtpu installed? pip install -e '.[tpu]')") from None
  return list(topo.devices)


def format_count(n: int) -> str:
  """`6.71 B`, `458.1 M`, `12.3 K` parameters."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.{2 if unit == 'B' else 1}f} {unit}"
  return str(n)


def compile_step(lowered, *, name: str = ""):
  """`lowered.compile()`; an out-of-memory compile raises `MemoryPlanError` naming the fields.

  The TPU compiler refuses a program whose buffers exceed the chip's HBM
  (`RESOURCE_EXHAUSTED ... exceeds available HBM`); that is a fit error, not a
  crash, and is reported as one.
  """
  try:
    return lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and friends)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "exceeds available" not in msg:
      raise
    head = f"memory plan ({name})" if name else "memory plan"
    raise MemoryPlanError(f"{head}: the compiler ran out of device memory: "
                          f"{msg.strip().splitlines()[0][:400].rstrip('.')}. {_FIX}") from None


def device_limit(device: jax.Device | None = None) -> int | None:
  """Bytes the device can allocate, None if unknown.

  `memory_stats()['bytes_limit']` (GPUs, TPUs); for a device that cannot
  report it (a compile-only TPU topology's), its kind's HBM (`HBM_BYTES`).
  """
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    return HBM_BYTES.get(getattr(device, "device_kind", ""))
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def check_fit(p: MemoryPlan, *, limit: int | None, name: str = "") -> None:
  """Raises `MemoryPlanError` when the plan's peak exceeds `limit` bytes (None: no check).

  The message gives the numbers and the fields that change them.
  """
  if limit is None or p.peak <= limit:
    return
  raise MemoryPlanError(
      f"{p.line(name=name, limit=limit)}: the step needs ~{format_bytes(p.peak)} per device but "
      f"the device has {format_bytes(limit)}. {_FIX}")


_FIX = ("Lower config.batch_size (activations), config.chunk_size (images decoded at once "
        "for the pixel/SSIM loss), raise config.mesh.fsdp (splits params and optimizer "
        "state over more devices), set config.dit.remat='full' (recomputes each block's "
        "activations in the backward pass) or config.precision='bfloat16' (halves "
        "activations)")
