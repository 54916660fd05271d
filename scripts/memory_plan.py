"""Prints the per-device memory plan of a config's train steps without training.

  python scripts/memory_plan.py --config=configs/pod.py --topology=v5p:2x2x2 \\
      [--num_slices=2] [--stages=flow] [--config.dit.depth=12 ...]
  python scripts/memory_plan.py --config=configs/pod_7b.py --topology=h100:8 \\
      --stages=flow --config.batch_size=8 --config.mesh.fsdp=8
  python scripts/memory_plan.py --config=configs/pod.py --devices=8 --stages=flow

Lowers and compiles each stage's step on abstract arrays (nothing is
allocated, no weights needed unless vae.pretrained is set) laid out as a run
lays them out, and prints per stage the line the trainer prints before step
1, the model's parameter count, the peak against the device's memory, and
the step's matmul FLOPs per device with the least step time they allow at
the chip's peak bf16 rate (`memory.step_flops`, `memory.peak_flops_per_second`;
divide by the MFU you expect, e.g. 0.4, for an estimate).

`--topology=NAME` compiles for accelerators this machine does not have
(`memory.topology_devices`), on any CPU-only machine with the `plan` extra
(`pip install -e ".[plan]"`; the script sets JAX_PLATFORMS=cpu itself, so the
plugins stay quiet):
- a TPU slice: any name `jax.experimental.topologies.get_topology_desc`
  accepts (`v5e:16x16`, `v5p:2x2x2`, `v4:2x2x1`, `v6e:4x4`, ...), through
  libtpu's compile-only client. The figures are the TPU compiler's own
  (`memory_analysis()`, its peak included), and a step that does not fit the
  chip's HBM fails here as it would on the pod.
- H100 80 GB hosts: `h100:N` (one host with N GPUs) or `h100:HxN` (H hosts),
  compiled by XLA:GPU with no GPU (deviceless AOT). The limit is the share of
  HBM JAX's GPU allocator takes: 75% (59.36 GiB) unless XLA_CLIENT_MEM_FRACTION
  is set, as it would be for the run. cuDNN/cuBLAS calls are compiled untuned
  (no workspace): temporaries are a close lower bound (DEVELOPERS.md).
`--devices=N` instead fakes N CPU devices (XLA:CPU buffer assignment: an
order of magnitude only). Exits with status 2 and the fit error (naming the
config fields to change) when a stage does not fit.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "CPU only: fake this many CPU devices.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "Compile for this topology without it: a TPU "
                                "slice (v5e:16x16, v5p:2x2x2) or H100 hosts (h100:8, h100:2x8).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: slices (multislice).")
_STAGES = flags.DEFINE_list("stages", ["vae", "flow"], "Stages to plan.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if _TOPOLOGY.value and _DEVICES.value:
    raise app.UsageError("--topology and --devices exclude each other")
  if _NUM_SLICES.value < 1:
    raise app.UsageError(f"--num_slices must be >= 1, got {_NUM_SLICES.value}")
  import jax  # pylint: disable=g-import-not-at-top
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import memory  # pylint: disable=g-import-not-at-top
  try:
    devices = (memory.topology_devices(_TOPOLOGY.value, num_slices=_NUM_SLICES.value)
               if _TOPOLOGY.value else jax.devices())
  except ValueError as e:
    raise app.UsageError(f"--topology: {e}") from None
  try:
    limit = memory.device_limit(devices[0])
    note = memory.limit_note(devices[0])
  except ValueError as e:  # a GPU memory fraction in the environment that is not one
    raise app.UsageError(str(e)) from None
  peak_rate = memory.peak_flops_per_second(devices[0])
  where = (f"{_TOPOLOGY.value}" + (f" x {_NUM_SLICES.value} slices" if _NUM_SLICES.value > 1
                                   else "") if _TOPOLOGY.value else devices[0].platform)
  print(f"{len(devices)} {devices[0].device_kind} devices ({where}), "
        + (f"{limit / 2**30:.2f} GiB each" if limit else "memory per device unknown")
        + (f" ({note})" if note else ""), flush=True)
  try:
    for name in _STAGES.value:
      t0 = time.perf_counter()
      plans = loop.memory_plans(_CONFIG.value, devices, stages=(name,))
      for stage, plan in plans.items():
        print(plan.line(name=f"stage {stage}", limit=limit), flush=True)
        print(f"stage {stage}: {plan.params_text()}, peak {memory.format_bytes(plan.peak)} per chip"
              + (f" of {memory.format_bytes(limit)}" if limit else "")
              + f", compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"stage {stage}: {_flop_text(plan.flops)} per step per device (matmuls and "
              "convolutions, remat included)"
              + (f": at least {plan.flops / peak_rate:.3g} s per step at the chip's peak "
                 f"{peak_rate / 1e12:.0f} TFLOP/s bf16, {plan.flops / (0.4 * peak_rate):.3g} s "
                 "at 40% MFU" if peak_rate else ""), flush=True)
        memory.check_fit(plan, limit=limit, name=f"stage {stage}", note=note)
  except memory.MemoryPlanError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flop_text(n: float) -> str:
  """`123.4 TFLOP`, `5.67 GFLOP`, `890 FLOP`."""
  for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if n >= scale:
      return f"{n / scale:.4g} {unit}"
  return f"{n:.0f} FLOP"


def _plan_quietly(argv: list[str]) -> None:
  """With --topology, JAX_PLATFORMS=cpu before anything imports jax.

  The compile-only clients need no local accelerator; without it, a planning
  machine with libtpu or the CUDA plugin installed would try to start them
  and print their initialisation errors.
  """
  if any(a == "--topology" or a.startswith("--topology=") for a in argv[1:]):
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _plan_quietly(sys.argv)
  app.run(main)
