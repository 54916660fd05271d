"""Prints the per-device memory plan of a config's train steps without training.

  python scripts/memory_plan.py --config=configs/pod.py [--devices=8] \\
      [--stages=flow] [--config.dit.depth=12 ...]

Lowers and compiles each stage's step on abstract arrays (nothing is
allocated, no weights needed unless vae.pretrained is set) laid out as a run
lays them out, and prints the line the trainer prints before step 1. On a
CPU-only machine `--devices=N` fakes N CPU devices (mesh.fsdp must divide N),
so the plan of an 8-GPU run can be read on a laptop; XLA's CPU buffer
assignment differs from the GPU/TPU one, so take CPU figures as the order of
magnitude. On an accelerator the plan is the device's and is checked against
its memory (`memory.check_fit`).
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
_STAGES = flags.DEFINE_list("stages", ["vae", "flow"], "Stages to plan.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import memory  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  limit = memory.device_limit()
  for name, plan in loop.memory_plans(_CONFIG.value, stages=_STAGES.value).items():
    print(plan.line(name=f"stage {name}", limit=limit), flush=True)
    memory.check_fit(plan, limit=limit, name=f"stage {name}")
  print(f"({jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
