"""Command line: `python -m train --config=configs/default.py --workdir=DIR`.

Config fields are overridden with `--config.<field>=value`, e.g.
`--config.ssim_loss_weight=0.5 --config.data.dir=/data/eyeq`.

The console shows progress bars, one line per stage start and end, the final
table and where the files are; `--verbosity=0` adds absl/orbax INFO logs.

`--compile_only`: compile each stage's step on this host's devices, print
its memory plan and parameter count, exit (status 2 if it does not fit).

`--profile_steps=N,M`: a `jax.profiler` trace of steps N..M (1-based, inclusive)
of the flow stage (the vae stage of a run without one) in WORKDIR/profile, for
TensorBoard's profile plugin or Perfetto.

Multi-host: `--coordinator_address=host:port --num_processes=N --process_id=i`
(or the `SSIM_JAX_*` environment variables, see train/distributed.py), or
`--distributed_auto` for JAX's cluster auto-detection. `jax.distributed` is
initialised before anything else touches JAX.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumed when it exists).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process' index.")
_AUTO = flags.DEFINE_bool("distributed_auto", False,
                          "jax.distributed.initialize() with cluster auto-detection.")
_CPU_COLL = flags.DEFINE_string("cpu_collectives", None,
                                "CPU collectives for multi-process CPU runs ('gloo').")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile each stage's step on these devices, print its memory "
    "plan (and the fit error if it does not fit), then exit without training.")
_PROFILE = flags.DEFINE_string(
    "profile_steps", None, "N,M: write a jax.profiler trace of steps N..M (1-based, "
    "inclusive) of the flow stage to WORKDIR/profile.")
flags.mark_flags_as_required(["config"])


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
  """'N,M' -> (N, M) with 1 <= N <= M; None for None / ''."""
  if not value:
    return None
  try:
    first, last = (int(v) for v in value.split(","))
  except ValueError:
    raise app.UsageError(f"--profile_steps={value!r}: expected N,M (two step numbers)") from None
  if not 1 <= first <= last:
    raise app.UsageError(f"--profile_steps={value!r}: expected 1 <= N <= M")
  return first, last


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  profile_steps = parse_profile_steps(_PROFILE.value)
  if not flags.FLAGS["verbosity"].present:
    # A clean console by default (progress bars, stage lines, the table);
    # --verbosity=0 shows absl/orbax INFO (checkpoint saves, ...) again.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize(distributed.merge(
      distributed.DistributedConfig(_COORD.value, _NPROC.value, _PID.value, _CPU_COLL.value),
      distributed.from_env()), auto=_AUTO.value)
  import jax  # pylint: disable=g-import-not-at-top
  from train import config as config_lib  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  if _COMPILE_ONLY.value:
    from train import memory  # pylint: disable=g-import-not-at-top
    limit = memory.device_limit()
    try:
      for name, plan in loop.memory_plans(_CONFIG.value).items():
        print(plan.line(name=f"stage {name}", limit=limit))
        print(f"stage {name}: {plan.params_text()}")
        memory.check_fit(plan, limit=limit, name=f"stage {name}",
                         note=memory.limit_note(jax.local_devices()[0]))
    except config_lib.ConfigError as e:  # MemoryPlanError is one
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (unless --compile_only)")
  try:
    results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                      profile_steps=profile_steps)
  except (config_lib.ConfigError, loop.TooManySkipsError, ckpt_lib.WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if results.get("preempted"):
    print("preempted: checkpoint saved; run the same command again to resume",
          file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
