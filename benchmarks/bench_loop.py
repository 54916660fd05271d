"""Steps/s of the train loop: the old per-step device read vs the loop that never waits.

The old loop read `int(state.consecutive_skips)` after every step (and, with several
processes, all-gathered the preemption flag): the host waited for step N before it
prepared and dispatched step N+1. The loop now reads device values only at its sync
points (logging, checkpoint, preemption agreement steps). Both run here in ONE process on
the same config, programs, data and devices: the same `loop._run_stage` (the flow stage),
"old" with the train step wrapped to do the old per-step read, "new" as it is. Rounds
alternate old/new so that a machine shared with other work slows both alike; the
compilation is done before the first round and not timed.

    python benchmarks/bench_loop.py                          # tiny config, 8 CPU devices
    python benchmarks/bench_loop.py --steps 100 --rounds 5
    python benchmarks/bench_loop.py --config configs/default.py --steps 20
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched

# `train` runs from the checkout (it is not installed): put the checkout first on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train import checkpoint as ckpt_lib  # noqa: E402
from train import input_pipeline  # noqa: E402
from train import loop  # noqa: E402
from train import step as step_lib  # noqa: E402
from train import throughput  # noqa: E402
from train import writer as writer_lib  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def old_per_step_read(train_step):
  """The old loop's pattern: the skip counter read after every step (a host sync)."""
  def step(state, *args):
    state, metrics = train_step(state, *args)
    int(state.consecutive_skips)
    return state, metrics
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
  parser.add_argument("--steps", type=int, default=60, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="old/new rounds (alternating)")
  parser.add_argument("--log_every", type=int, default=20)
  args = parser.parse_args()

  cfg = load_config(args.config)
  cfg.log_every = args.log_every
  cfg.progress_bar = False
  cfg.flow.steps = 10**6  # the stage never ends inside a round
  cfg.ckpt_every = 10**6  # no checkpoint inside a round: the loop alone is timed
  devices = jax.devices()
  mesh = step_lib.make_mesh(devices, fsdp=cfg.mesh.fsdp)
  progs = loop.build_programs(cfg, mesh)
  datasets = input_pipeline.make_datasets(
      cfg.data, batch_size_per_process=loop.global_batch_size(cfg), seed=cfg.seed)
  frozen = loop.frozen_inputs(progs, progs.vae[1], mesh, min_shard_size=cfg.mesh.min_shard_size)
  key = jax.random.PRNGKey(cfg.seed)
  state = step_lib.place_state(progs.initial_state("flow"), mesh, min_shard_size=cfg.mesh.min_shard_size)
  steps = {"old": old_per_step_read(progs.flow_step), "new": progs.flow_step}
  rates = {"old": [], "new": []}
  with tempfile.TemporaryDirectory() as tmp:
    writer = writer_lib.MetricWriter(os.path.join(tmp, "logs"), enabled=False)

    def run(name, state, n):
      ckpt = ckpt_lib.Checkpointer(os.path.join(tmp, f"ckpt_{time.monotonic_ns()}"),
                                   save_interval_steps=cfg.ckpt_every,
                                   install_sigterm_handler=False)
      start = int(state.step)
      t = time.perf_counter()
      state, _ = loop._run_stage(  # pylint: disable=protected-access
          "flow", cfg, state=state, train_step=steps[name],
          make_batch=lambda b: {"lowres": b.lowres, "highres": b.highres}, frozen=frozen,
          key=key, stop=start + n, total=cfg.flow.steps, checkpointer=ckpt, writer=writer,
          datasets=datasets, mesh=mesh, plan_memory=False,
          meter=throughput.Meter(images_per_step=loop.global_batch_size(cfg)))
      jax.block_until_ready(state)
      seconds = time.perf_counter() - t
      ckpt.close()
      return state, seconds

    state, _ = run("new", state, 3)  # compiles (both variants share the jitted step)
    for _ in range(args.rounds):
      for name in ("old", "new"):
        state, seconds = run(name, state, args.steps)
        rates[name].append(args.steps / seconds)
  print(f"config {os.path.relpath(args.config, ROOT)}: batch {loop.global_batch_size(cfg)}, "
        f"{len(devices)} {devices[0].platform} devices (mesh data={mesh.shape['data']} x "
        f"fsdp={mesh.shape['fsdp']}), {args.steps} steps x {args.rounds} rounds, "
        f"log_every={cfg.log_every}, {os.cpu_count()} CPU cores")
  for name, label in (("old", "old: device read every step"),
                      ("new", "new: reads at sync points only")):
    r = rates[name]
    print(f"  {label:32s} median {statistics.median(r):7.2f} steps/s  "
          f"(rounds: {', '.join(f'{x:.2f}' for x in r)})")
  print(f"  new / old: {statistics.median(rates['new']) / statistics.median(rates['old']):.3f}")


if __name__ == "__main__":
  main()
