"""Fault injection for the trainer's reliability tests and soak runs (off by default).

Config (`config.faults`, see configs/base.py; validated by `train/config.py`, which this
module does not import); step numbers are GLOBAL and
1-based: the vae stage runs steps `1..vae.steps`, the flow stage continues
with `vae.steps + 1 .. vae.steps + flow.steps` (so one list covers both).

- `nan_batch_steps`: the batch of these steps gets one NaN pixel in its first
  sample and one +Inf pixel in its last sample (of every floating array), so
  with several devices the first and the last device both see a bad value.
- `nan_model_steps`: NaN produced INSIDE the model: the loss multiplies the
  model output (flow: the predicted velocity; vae: the reconstruction) of
  sample 0 by a factor fed in the batch (`batch['fault_scale']`, float32
  `[B]`, 1.0 except NaN at those steps). The factor is present at EVERY step
  when the option is on, so the step is traced once.
- `kill_at_step`: `SIGKILL` to this process right after that step's update is
  computed, before its checkpoint is written (a hard crash / OOM kill). A
  marker `<workdir>/faults/killed_at_step_<k>` makes it one-shot, so running
  the same command again resumes instead of dying again.

Free when off: `wrap_train_step` returns the step function itself and
`model_fault` is the identity on a batch without `fault_scale`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCALE_KEY = "fault_scale"


def _faults(config):
  return config.get("faults", None) if hasattr(config, "get") else None


def _steps(faults, name: str) -> tuple[int, ...]:
  v = faults.get(name, ()) if faults is not None else ()
  if v is None:
    return ()
  if isinstance(v, int) and not isinstance(v, bool):
    v = (v,)
  return tuple(v)


def enabled(config) -> bool:
  """Whether any fault is configured."""
  faults = _faults(config)
  return bool(_steps(faults, "nan_batch_steps") or _steps(faults, "nan_model_steps")
              or (faults is not None and int(faults.get("kill_at_step", 0) or 0) > 0))


def model_fault(x: jax.Array, batch) -> jax.Array:
  """`x [B, ...] * batch['fault_scale'][:, None...]`; `x` itself when there is no factor.

  Called by the stage losses on the model output, inside the traced loss.
  """
  if not isinstance(batch, dict) or SCALE_KEY not in batch:
    return x
  s = batch[SCALE_KEY].astype(x.dtype)
  return x * s.reshape(s.shape + (1,) * (x.ndim - 1))


def _poison(batch):
  """One NaN pixel in sample 0 and one +Inf in the last sample of each floating leaf.

  Keeps each leaf's sharding, so the train step is not traced again.
  """
  def bad(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
      return x
    idx = (0,) * (x.ndim - 1)
    return x.at[(0,) + idx].set(jnp.nan).at[(-1,) + idx].set(jnp.inf)
  shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), batch)
  return jax.jit(lambda b: jax.tree.map(bad, b), out_shardings=shardings)(batch)


def _scale_array(like: jax.Array, nan: bool) -> jax.Array:
  """float32 `[B]` with the sharding of `like`'s leading axis: 1.0, NaN at 0 if `nan`."""
  host = np.ones((like.shape[0],), np.float32)
  if nan:
    host[0] = np.nan
  sharding = like.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *sharding.spec[:1]))
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
  return jnp.asarray(host)


def wrap_train_step(train_step: Callable, config, *, stage: str, workdir: str) -> Callable:
  """Injects the configured faults around `train_step(state, batch, frozen, key)`.

  Args:
    train_step: the jitted step of `stage`.
    config: the trainer config (`config.faults`).
    stage: 'vae' or 'flow' (sets the global step offset).
    workdir: the run directory (for the one-shot kill marker).

  Returns:
    `train_step` itself when no fault is configured, else a wrapper.
  """
  if not enabled(config):
    return train_step
  faults = _faults(config)
  offset = 0 if stage == "vae" else int(config.vae.steps)
  nan_batch = set(_steps(faults, "nan_batch_steps"))
  nan_model = set(_steps(faults, "nan_model_steps"))
  kill = int(faults.get("kill_at_step", 0) or 0)
  marker = os.path.join(workdir, "faults",
                        f"killed_at_step_{kill}_p{jax.process_index()}")

  def step(state, batch, frozen, key):
    n = offset + int(state.step) + 1  # global 1-based number of the step being run
    if n in nan_batch:
      logging.warning("faults: NaN/Inf batch at global step %d (stage %s)", n, stage)
      batch = _poison(batch)
    if nan_model:
      if n in nan_model:
        logging.warning("faults: NaN inside the model at global step %d (stage %s)", n, stage)
      like = next(x for x in jax.tree.leaves(batch) if jnp.ndim(x) >= 1)
      batch = dict(batch, **{SCALE_KEY: _scale_array(like, n in nan_model)})
    out = train_step(state, batch, frozen, key)
    if kill and n == kill and not os.path.exists(marker):
      jax.block_until_ready(out)
      os.makedirs(os.path.dirname(marker), exist_ok=True)
      with open(marker, "w") as f:
        f.write(f"{n}\n")
        f.flush()
        os.fsync(f.fileno())
      logging.warning("faults: SIGKILL after global step %d (stage %s)", n, stage)
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  for attr in ("trace_count",):
    if hasattr(train_step, attr):
      setattr(step, attr, getattr(train_step, attr))
  return step

