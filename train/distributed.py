"""Multi-host start-up: `jax.distributed.initialize` before anything touches JAX.

Sources, first match wins:
1. explicit arguments (the CLI flags `--coordinator_address`, `--num_processes`,
   `--process_id`);
2. the environment variables `SSIM_JAX_COORDINATOR_ADDRESS`,
   `SSIM_JAX_NUM_PROCESSES`, `SSIM_JAX_PROCESS_ID` (what a launch script sets);
3. JAX's own cluster auto-detection (SLURM, Cloud TPU, Open MPI, ...) when
   `auto=True`.
With none of them the run is single-process and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_PREFIX = "SSIM_JAX_"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  cpu_collectives: str | None = None  # "gloo" for multi-process CPU runs


def from_env(environ=None) -> DistributedConfig:
  """Reads `SSIM_JAX_COORDINATOR_ADDRESS` / `_NUM_PROCESSES` / `_PROCESS_ID`."""
  env = os.environ if environ is None else environ
  get = lambda k: env.get(ENV_PREFIX + k) or None
  num, pid = get("NUM_PROCESSES"), get("PROCESS_ID")
  return DistributedConfig(coordinator_address=get("COORDINATOR_ADDRESS"),
                           num_processes=int(num) if num else None,
                           process_id=int(pid) if pid else None,
                           cpu_collectives=get("CPU_COLLECTIVES"))


def merge(flags: DistributedConfig, env: DistributedConfig) -> DistributedConfig:
  """Flags override the environment, field by field."""
  return DistributedConfig(**{f.name: getattr(flags, f.name) if getattr(flags, f.name)
                              is not None else getattr(env, f.name)
                              for f in dataclasses.fields(DistributedConfig)})


def initialize(cfg: DistributedConfig, *, auto: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when configured; returns whether it did.

  Must run before any JAX computation (and before `jax.devices()`).

  Raises:
    ValueError: a partial setting (e.g. a coordinator without a process id),
      naming the missing field.
  """
  given = [cfg.coordinator_address, cfg.num_processes, cfg.process_id]
  if cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if all(v is None for v in given):
    if auto:
      jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU, MPI)
      return True
    return False
  names = ("coordinator_address", "num_processes", "process_id")
  missing = [n for n, v in zip(names, given) if v is None]
  if missing:
    raise ValueError(f"multi-host: {', '.join(missing)} not set (flags --{missing[0]} or "
                     f"env {ENV_PREFIX}{missing[0].upper()}); all three are needed")
  if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
    raise ValueError(f"multi-host: process_id={cfg.process_id} not in "
                     f"[0, num_processes={cfg.num_processes})")
  if cfg.num_processes == 1:
    return False
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                             num_processes=cfg.num_processes, process_id=cfg.process_id)
  return True
