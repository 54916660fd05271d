"""Prints the per-device memory plan of a config's train steps without training.

  python scripts/memory_plan.py --config=configs/pod.py --topology=v5p:2x2x2 \\
      [--num_slices=2] [--stages=flow] [--config.dit.depth=12 ...]
  python scripts/memory_plan.py --config=configs/pod.py --devices=8 --stages=flow

Lowers and compiles each stage's step on abstract arrays (nothing is
allocated, no weights needed unless vae.pretrained is set) laid out as a run
lays them out, and prints per stage the line the trainer prints before step
1, the model's parameter count and the chip's memory.

`--topology=NAME` (any name `jax.experimental.topologies.get_topology_desc`
accepts: `v5e:16x16`, `v5p:2x2x2`, `v4:2x2x1`, `v6e:4x4`, ...; needs libtpu,
`pip install -e ".[tpu]"`) compiles for that TPU slice through libtpu's
compile-only client, on any CPU-only machine: the figures are the TPU
compiler's own (`memory_analysis()`, its peak included), and a step that does
not fit the chip's HBM fails here as it would on the pod. `--devices=N`
instead fakes N CPU devices (XLA:CPU buffer assignment: an order of
magnitude only). Exits with status 2 and the fit error (naming the config
fields to change) when a stage does not fit.
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
_TOPOLOGY = flags.DEFINE_string("topology", "", "Compile for this TPU topology (e.g. "
                                "v5e:16x16, v5p:2x2x2) with the compile-only client.")
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
  limit = memory.device_limit(devices[0])
  where = (f"{_TOPOLOGY.value}" + (f" x {_NUM_SLICES.value} slices" if _NUM_SLICES.value > 1
                                   else "") if _TOPOLOGY.value else devices[0].platform)
  print(f"{len(devices)} {devices[0].device_kind} devices ({where}), "
        + (f"{limit / 2**30:.2f} GiB each" if limit else "memory per device unknown"),
        flush=True)
  try:
    for name in _STAGES.value:
      t0 = time.perf_counter()
      plans = loop.memory_plans(_CONFIG.value, devices, stages=(name,))
      for stage, plan in plans.items():
        print(plan.line(name=f"stage {stage}", limit=limit), flush=True)
        print(f"stage {stage}: {memory.format_count(plan.num_params)} parameters, "
              f"peak {memory.format_bytes(plan.peak)} per chip"
              + (f" of {memory.format_bytes(limit)} HBM" if limit else "")
              + f", compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        memory.check_fit(plan, limit=limit, name=f"stage {stage}")
  except memory.MemoryPlanError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
