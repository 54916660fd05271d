"""The memory plan of a compiled train step, and the fit check before step 1.

`plan(compiled, state)` combines what XLA says the compiled (SPMD-partitioned,
so per-device) program needs (`compiled.memory_analysis()`: arguments,
outputs, temporaries) with what the train state's arrays occupy on one device,
measured from their shards (`sharding.per_device_bytes`). The loop logs
`MemoryPlan.line` (it contains "per device") before the first step and calls
`check_fit` with the device's own limit: GPUs and TPUs report `bytes_limit` in
`device.memory_stats()`; the CPU reports nothing, and then nothing is checked.

Plans for accelerators this machine does not have (`topology_devices`): TPU
slices through libtpu's compile-only client, H100 hosts through XLA:GPU with
no GPU (deviceless AOT, the target described by `gpu_specs/h100_sxm.txtpb`).
`step_flops` counts a step's matmul and convolution FLOPs per device from its
jaxpr, and `peak_flops_per_second` is the chip's peak bf16 rate, for a step
time estimate (and an MFU).
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple

import jax
import numpy as np

from train import config as config_lib
from train import sharding as sharding_lib

# The config fields that change a step's memory, named by the fit error.
FIELDS = ("batch_size", "grad_accum_steps", "chunk_size", "mesh.fsdp", "dit.remat",
          "flux.remat", "precision", "lora.rank")


class MemoryPlan(NamedTuple):
  """Bytes per device of one compiled train step.

  params, opt_state: the train state's parameters and optimizer state, from
    their arrays' shards (what one device holds between steps).
  arguments, outputs, temp, alias: `memory_analysis()` of the compiled step
    (arguments = state + batch + frozen params; temp = the step's
    temporaries: activations, all-gathered params, gradients).
  compiler_peak: on TPU, `memory_analysis().peak_memory_in_bytes`: the peak
    of the TPU compiler's own buffer assignment, inputs included (its `temp`
    can read 0 on v5e/v6e); 0 elsewhere: XLA:CPU's figure leaves temporaries
    out, and XLA:GPU's is the live-buffer peak, below what the GPU runtime
    allocates (arguments, outputs and the whole temporary slab at once).
  num_params: parameters of the trained model (elements, whole, not per device).
  frozen_params: parameters of a frozen base the trained ones adapt (LoRA), 0 without.
  flops: matmul + convolution FLOPs of one step on one device (`step_flops`),
    0 when not counted.
  """
  params: int
  opt_state: int
  arguments: int
  outputs: int
  temp: int
  alias: int
  compiler_peak: int = 0
  num_params: int = 0
  flops: float = 0.0
  frozen_params: int = 0

  def params_text(self) -> str:
    """`11.90 B parameters`, or `261.5 M parameters trained (LoRA) on a frozen 11.90 B base`."""
    text = f"{format_count(self.num_params)} parameters"
    if self.frozen_params:
      text += f" trained (LoRA) on a frozen {format_count(self.frozen_params)} base"
    return text

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


def plan(compiled, state, *, flops: float = 0.0, frozen=None) -> MemoryPlan:
  """The memory plan of `compiled` (a `jax.stages.Compiled` train step) and `state`.

  Args:
    compiled: `train_step.lower(state, batch, frozen, key).compile()`.
    state: the `TrainState` passed in (arrays or ShapeDtypeStructs with
      shardings); its params and optimizer state are measured from their shards.
    flops: the step's FLOPs per device (`step_flops`), carried into the plan.
    frozen: the frozen base's params (LoRA; arrays or ShapeDtypeStructs), counted.
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
                    num_params=_count(state.params), frozen_params=_count(frozen),
                    flops=float(flops))


def _count(tree) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def _platform(state) -> str:
  """The platform of the devices `state`'s arrays (or ShapeDtypeStructs) are laid out on."""
  for x in jax.tree.leaves(state):
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      return next(iter(sharding.device_set)).platform
  return ""


# HBM per chip by `device.device_kind`, for devices that cannot report it (the
# compile-only topology devices). Public figures; the TPU compiler checks its
# own exact limit and fails with RESOURCE_EXHAUSTED above it. The H100's is the
# `device_memory_size` of gpu_specs/h100_sxm.txtpb (what CUDA reports: 79.14 GiB);
# JAX's GPU allocator takes only a fraction of it (`gpu_memory_fraction`).
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v5p": 95 * 2**30, "TPU v6 lite": 32 * 2**30, "TPU v6e": 32 * 2**30,
             "NVIDIA H100 80GB HBM3": 84978434048}

# Peak dense bf16 matmul FLOP/s per chip by `device.device_kind` prefix (the
# longest matching prefix wins; the vendors' datasheets: TPU v4 275, v5e 197,
# v5p 459, v6e 918 TFLOP/s; H100 SXM 989.4 TFLOP/s, half the 1979 quoted with
# 2:4 sparsity; H100 PCIe 756, NVL 835; A100 312).
PEAK_BF16_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                   "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
                   "TPU v6e": 918e12, "NVIDIA H100": 989.4e12, "NVIDIA H100 PCIe": 756e12,
                   "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989.4e12, "NVIDIA A100": 312e12}

# GPU hosts `topology_devices` compiles for without a GPU: the name's prefix ->
# (the XLA:GPU target description in gpu_specs/, GPUs per host at most: an HGX
# H100 board holds 8).
GPU_TARGETS = {"h100": ("h100_sxm.txtpb", 8)}

# JAX's GPU allocator takes this fraction of the GPU's memory unless
# XLA_CLIENT_MEM_FRACTION (or the older XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise.
DEFAULT_GPU_MEMORY_FRACTION = 0.75

_GPU_TOPOLOGY = re.compile(r"^(?P<gpu>[a-z0-9]+):(?:(?P<hosts>\d+)x)?(?P<per_host>\d+)$")


def peak_flops_per_second(device: jax.Device | None = None) -> float | None:
  """The chip's peak dense bf16 matmul FLOP/s (`PEAK_BF16_FLOPS`), None when unknown (CPUs).

  For a step time estimate (step FLOPs per device / (MFU x peak)) and the
  loop's MFU (train/throughput.py). `device`: the first device by default.
  """
  device = jax.devices()[0] if device is None else device
  kind = str(getattr(device, "device_kind", ""))
  matches = [k for k in PEAK_BF16_FLOPS if kind.startswith(k)]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def gpu_memory_fraction() -> float:
  """The fraction of each GPU's memory JAX's allocator takes: the environment's
  XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_MEM_FRACTION (the names jaxlib reads),
  else JAX's default 0.75. A plan for a run that sets it must be made with the same value.

  Raises:
    ValueError: naming the variable, when it is not a number in (0, 1].
  """
  for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    value = os.environ.get(var, "")
    if value:
      try:
        fraction = float(value)
      except ValueError:
        fraction = -1.0
      if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{var}={value!r}: must be a fraction of the GPU's memory in (0, 1], "
                         "e.g. 0.9")
      return fraction
  return DEFAULT_GPU_MEMORY_FRACTION


def _gpu_spec(prefix: str) -> str:
  """The text of `gpu_specs/<file>` for GPU name `prefix` (a key of `GPU_TARGETS`)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs",
                      GPU_TARGETS[prefix][0])
  with open(path, encoding="utf-8") as f:
    return f.read()


def _gpu_topology_devices(name: str, match: re.Match | None, num_slices: int) -> list:
  """The GPUs of `h100:N` / `h100:HxN` from XLA:GPU's compile-only client (see `topology_devices`)."""
  prefix = name.split(":", 1)[0]
  max_per_host = GPU_TARGETS[prefix][1]
  hosts = int(match["hosts"] or 1) if match else 0
  per_host = int(match["per_host"]) if match else 0
  if not (match and match["gpu"] == prefix and hosts >= 1 and 1 <= per_host <= max_per_host):
    raise ValueError(f"topology {name!r}: a {prefix} topology is '{prefix}:N' (one host with N "
                     f"GPUs, 1 <= N <= {max_per_host}) or '{prefix}:HxN' (H such hosts), "
                     f"e.g. '{prefix}:8' or '{prefix}:2x8'")
  if num_slices != 1:
    raise ValueError(f"topology {name!r}: num_slices={num_slices} is for TPU slices; give "
                     f"GPU hosts in the name ('{prefix}:{num_slices}x{per_host}')")
  gpu_memory_fraction()  # a bad XLA_CLIENT_MEM_FRACTION also stops jaxlib's CUDA plugin
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=_gpu_spec(prefix),
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"topology {name!r}: {type(e).__name__}: {e} (compiling for GPUs without one needs "
        "jax-cuda12-plugin and jax-cuda12-pjrt at the installed jaxlib's version: "
        "pip install -e '.[plan]'; run with JAX_PLATFORMS=cpu)") from None
  return list(topo.devices)


def topology_devices(name: str, *, num_slices: int = 1) -> list:
  """The devices of topology `name`, from a compile-only client: no accelerator needed.

  - A TPU slice, e.g. 'v5e:16x16', 'v5p:2x2x2' (any name
    `jax.experimental.topologies.get_topology_desc` takes), `num_slices` of
    them (multislice), from libtpu's compile-only client (needs libtpu:
    `pip install -e ".[plan]"` or `".[tpu]"`).
  - H100 80 GB (SXM) hosts: 'h100:N' (one host with N GPUs) or 'h100:HxN'
    (H hosts of N), compiled by XLA:GPU for the target in
    gpu_specs/h100_sxm.txtpb (needs jax-cuda12-plugin and jax-cuda12-pjrt
    at the installed jaxlib's version, `pip install -e ".[plan]"`, and
    `JAX_PLATFORMS=cpu` in the environment before jax is imported).

  A step jitted over a mesh of these devices lowers and compiles with the
  chip's own compiler (`memory_analysis()`; the TPU compiler also refuses a
  program over its HBM) but cannot run.

  Raises:
    ValueError: naming the topology and what to do, when its spelling is
      unknown or the compile-only client is missing or rejects it.
  """
  prefix = name.split(":", 1)[0]
  if prefix in GPU_TARGETS:
    return _gpu_topology_devices(name, _GPU_TOPOLOGY.match(name), num_slices)
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
    gpus = ", ".join(f"'{g}:N', '{g}:HxN'" for g in GPU_TARGETS)
    raise ValueError(f"topology {name!r} (num_slices={num_slices}): {type(e).__name__}: "
                     f"{e} (a TPU topology such as 'v5e:16x16' needs libtpu: pip install -e "
                     f"'.[plan]'; GPU hosts are {gpus})") from None
  return list(topo.devices)


def is_compile_only(device: jax.Device) -> bool:
  """Whether `device` is a compile-only topology's (`topology_devices`): it has no local hardware."""
  return getattr(device, "local_hardware_id", 0) is None


def compiler_options(devices) -> dict[str, bool]:
  """XLA options for compiling a step for `devices` (`compile_step(compiler_options=...)`).

  For a compile-only GPU topology: Triton GEMM fusions off (cuBLAS for every
  matmul). Without a GPU, XLA:GPU cannot autotune and fails on some fused
  bf16 matmuls it would otherwise tile ("Couldn't find output tile sizes",
  e.g. in `jax.image.resize` of a bf16 image); a run on real GPUs autotunes
  and is compiled with its defaults. {} for every other device.
  """
  device = list(devices)[0]
  if device.platform == "gpu" and is_compile_only(device):
    return {"xla_gpu_enable_triton_gemm": False}
  return {}


def step_flops(jaxpr, *, num_devices: int) -> float:
  """Matmul and convolution FLOPs of one call of `jaxpr`, per device.

  Counts `dot_general` (2 x output elements x contracted size) and
  `conv_general_dilated` (2 x output elements x the kernel's input features
  x the window taps that meet the input; XLA's count), the work the chips'
  matmul units do and their peak FLOP/s is quoted for; elementwise work is
  left out. Equal to XLA's HloCostAnalysis on loop-free programs. Recomputation under remat is
  in the jaxpr and counted (hardware FLOPs; an MFU's model FLOPs leave it
  out).

  Sub-programs are walked: a `scan` body counts `length` times (XLA's
  `cost_analysis()` counts a loop body once: for a scanned model it is off
  by the depth), `cond` its costliest branch, a `while` body once (its trip
  count is not static; the trainer's loops are scans). Inside `shard_map`
  the shapes are one device's; outside it they are global and the count is
  divided by `num_devices` (evenly partitioned).

  Args:
    jaxpr: a `jax.extend.core.ClosedJaxpr` or `Jaxpr`, e.g.
      `train_step.trace(state, batch, frozen, key).jaxpr`.
    num_devices: devices the program is partitioned over.

  Returns:
    FLOPs per device (a float: configs/pod_7b.py's flow step with one image
    per device is 4.6e13).
  """
  return _jaxpr_flops(jaxpr, num_devices)


def _jaxpr_flops(jaxpr, divisor: int) -> float:
  """`step_flops` of `jaxpr` whose global shapes are split over `divisor` devices."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in lhs_contract) / divisor
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn) / divisor
    inner = 1 if name == "shard_map" else divisor
    subs = [_jaxpr_flops(v, inner) for v in _sub_jaxprs(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    else:
      total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
  return total


def _conv_flops(eqn) -> float:
  """2 x (output position, window tap) pairs that meet an input element (not padding, not
  a dilation hole) x batch x output features x input features per group: XLA's count
  (HloCostAnalysis), so a strided conv's input gradient is not charged for its zeros."""
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  pairs = 1
  for d, (lhs_d, rhs_d, out_d) in enumerate(zip(lhs_spec[2:], rhs_spec[2:], out_spec[2:])):
    lhs_dil = p["lhs_dilation"][d] if p["lhs_dilation"] else 1
    rhs_dil = p["rhs_dilation"][d] if p["rhs_dilation"] else 1
    # Where each (output position, tap) reads in the dilated input, padding not counted.
    pos = (np.arange(out[out_d])[:, None] * p["window_strides"][d]
           + np.arange(rhs[rhs_d])[None, :] * rhs_dil - p["padding"][d][0])
    pairs *= int(np.sum((pos >= 0) & (pos <= (lhs[lhs_d] - 1) * lhs_dil) & (pos % lhs_dil == 0)))
  per_pair = (math.prod(out) / math.prod(out[d] for d in out_spec[2:])  # batch x out features
              * rhs[rhs_spec[1]])  # input features per group
  return 2.0 * pairs * per_pair


def _sub_jaxprs(params: dict) -> list:
  """The jaxprs among an equation's params (pjit, scan, cond branches, remat, shard_map, ...)."""
  found = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
        found.append(v)
  return found


def format_count(n: int) -> str:
  """`6.71 B`, `458.1 M`, `12.3 K` parameters."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.{2 if unit == 'B' else 1}f} {unit}"
  return str(n)


def compile_step(lowered, *, name: str = "", compiler_options: dict | None = None):
  """`lowered.compile(compiler_options)`; an out-of-memory compile raises `MemoryPlanError`.

  The TPU compiler refuses a program whose buffers exceed the chip's HBM
  (`RESOURCE_EXHAUSTED ... exceeds available HBM`); that is a fit error, not a
  crash, and is reported as one, naming the fields. XLA:GPU compiles such a
  program (it warns that rematerialisation could not bring it under the
  GPU's memory); `check_fit` against `device_limit` is what refuses it.
  """
  try:
    return lowered.compile(compiler_options or None)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and friends)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "exceeds available" not in msg:
      raise
    head = f"memory plan ({name})" if name else "memory plan"
    raise MemoryPlanError(f"{head}: the compiler ran out of device memory: "
                          f"{msg.strip().splitlines()[0][:400].rstrip('.')}. {_FIX}") from None


def device_limit(device: jax.Device | None = None) -> int | None:
  """Bytes the device can allocate, None if unknown.

  `memory_stats()['bytes_limit']` (GPUs, TPUs: on a GPU, the pool JAX's
  allocator took). For a device that cannot report it (a compile-only
  topology's), its kind's HBM (`HBM_BYTES`); for a GPU, times the fraction
  JAX's allocator would take (`gpu_memory_fraction`: 0.75 unless
  XLA_CLIENT_MEM_FRACTION says otherwise), so an H100 80GB is planned at
  0.75 x 79.14 = 59.36 GiB by default.
  """
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    hbm = HBM_BYTES.get(getattr(device, "device_kind", ""))
    if hbm is not None and device.platform == "gpu":
      return int(hbm * gpu_memory_fraction())
    return hbm
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def limit_note(device: jax.Device) -> str:
  """Where `device_limit(device)` comes from and how to raise it, on GPUs; '' elsewhere."""
  if device.platform != "gpu":
    return ""
  hbm = HBM_BYTES.get(device.device_kind)
  return (f"{gpu_memory_fraction() * 100:.3g}% of "
          + (f"the {format_bytes(hbm)} HBM" if hbm else "the GPU's memory")
          + ", the share JAX's GPU allocator takes: set XLA_CLIENT_MEM_FRACTION (default "
          f"{DEFAULT_GPU_MEMORY_FRACTION}), e.g. to 0.9, for the run and for its plan to give it more")


def check_fit(p: MemoryPlan, *, limit: int | None, name: str = "", note: str = "") -> None:
  """Raises `MemoryPlanError` when the plan's peak exceeds `limit` bytes (None: no check).

  The message gives the numbers, the fields that change them and `note`
  (`limit_note`: where the limit comes from and how to raise it).
  """
  if limit is None or p.peak <= limit:
    return
  raise MemoryPlanError(
      f"{p.line(name=name, limit=limit)}: the step needs ~{format_bytes(p.peak)} per device but "
      f"the device has {format_bytes(limit)}" + (f" ({note})" if note else "") + f". {_FIX}")


_FIX = ("Lower config.batch_size (activations; keep the images per update with "
        "config.grad_accum_steps), config.chunk_size (images decoded at once for the "
        "pixel/SSIM loss), raise config.mesh.fsdp (splits params and optimizer state over "
        "more devices), set config.dit.remat='full' or config.flux.remat='full' (recomputes "
        "each block's activations in the backward pass), config.precision='bfloat16' "
        "(halves activations) or train adapters with config.lora.rank > 0 (no optimizer "
        "state or gradients for the frozen base)")
