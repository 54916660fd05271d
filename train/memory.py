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

from typing import NamedTuple

import jax

from train import config as config_lib
from train import sharding as sharding_lib

# The config fields that change a step's memory, named by the fit error.
FIELDS = ("batch_size", "chunk_size", "mesh.fsdp", "precision")


class MemoryPlan(NamedTuple):
  """Bytes per device of one compiled train step.

  params, opt_state: the train state's parameters and optimizer state, from
    their arrays' shards (what one device holds between steps).
  arguments, outputs, temp, alias: `memory_analysis()` of the compiled step
    (arguments = state + batch + frozen params; temp = the step's
    temporaries: activations, all-gathered params, gradients).
  """
  params: int
  opt_state: int
  arguments: int
  outputs: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    """Estimated peak: inputs and outputs live together with the temporaries."""
    return self.arguments + self.outputs - self.alias + self.temp

  def line(self, *, name: str = "", limit: int | None = None) -> str:
    """One log line, e.g. `memory plan (flow): per device 1.2 MiB params + ...`."""
    head = f"memory plan ({name})" if name else "memory plan"
    fit = (f" of {_fmt(limit)} on the device" if limit else
           " (the device reports no memory limit: not checked)")
    return (f"{head}: per device {_fmt(self.params)} params + {_fmt(self.opt_state)} "
            f"optimizer state, step arguments {_fmt(self.arguments)}, outputs "
            f"{_fmt(self.outputs)}, temporaries {_fmt(self.temp)}; peak ~{_fmt(self.peak)}"
            + fit)


class MemoryPlanError(config_lib.ConfigError):
  """The compiled step will not fit in device memory; names the fields to change."""


def _fmt(n: int) -> str:
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
                    alias=get("alias_size_in_bytes"))


def device_limit(device: jax.Device | None = None) -> int | None:
  """Bytes the device can allocate (`memory_stats()['bytes_limit']`), None if unknown."""
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    return None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def check_fit(p: MemoryPlan, *, limit: int | None, name: str = "") -> None:
  """Raises `MemoryPlanError` when the plan's peak exceeds `limit` bytes (None: no check).

  The message gives the numbers and the fields that change them.
  """
  if limit is None or p.peak <= limit:
    return
  raise MemoryPlanError(
      f"{p.line(name=name, limit=limit)}: the step needs ~{_fmt(p.peak)} per device but "
      f"the device has {_fmt(limit)}. Lower config.batch_size (activations), "
      "config.chunk_size (images decoded at once for the pixel/SSIM loss), raise "
      "config.mesh.fsdp (splits params and optimizer state over more devices), or set "
      "config.precision='bfloat16' (halves activations)")
