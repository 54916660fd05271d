"""Throughput of the train loop's logging intervals: step time, images/s, tokens/s, MFU.

Per logging interval (`config.log_every` steps) the loop writes, per stage:

- `step_time_s`, `steps_per_sec`: wall time between two logging points (the
  host waits for the device only there) over the steps between them;
- `images_per_sec`: images of the global batch (all processes and devices;
  `batch_size * grad_accum_steps` per step) per second;
- `tokens_per_sec`: the tokens the velocity model's transformer processes per
  image (`VelocityModel.sequence_length`: the DiT's latent patches; FLUX's
  target, condition and text tokens) times images/s (flow stage);
- `mfu`: FLOPs utilisation, `flops / (step time x peak FLOP/s of one
  device)`. `flops` is one device's matmul and convolution FLOPs of the step,
  counted once from its traced program before optimisation
  (`memory.step_flops`: scan bodies times their length, which XLA's own
  `cost_analysis()` counts once, and it is None for compile-only GPU/TPU
  plans); rematerialised forward passes are included (hardware FLOPs). The
  peak is the chip's dense bf16 peak (`memory.peak_flops_per_second`); where
  it is unknown (CPU, an unlisted chip) no MFU is written, never a zero.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax


class Meter:
  """Times the loop's logging intervals; `interval(steps)` gives their scalars.

  Args:
    images_per_step: images of the global batch per step.
    tokens_per_image: the velocity model's tokens per image (None: no tokens/s).
    flops: one device's FLOPs per step (`memory.step_flops`; None: no MFU).
    peak: one device's peak FLOP/s (`memory.peak_flops_per_second`; None: no MFU).
  """

  def __init__(self, *, images_per_step: int, tokens_per_image: int | None = None,
               flops: float | None = None, peak: float | None = None):
    self.images_per_step = images_per_step
    self.tokens_per_image = tokens_per_image
    self.flops = flops
    self.peak = peak
    self._t = None

  def start(self) -> None:
    """Starts an interval now (after a host sync: the device has finished)."""
    self._t = time.perf_counter()

  def interval(self, steps: int) -> dict[str, float]:
    """Scalars of the `steps` steps since `start` (or the last call), then restarts.

    Call it right after a host sync (the device has finished those steps).
    Empty when no step or no start was timed.
    """
    now = time.perf_counter()
    t, self._t = self._t, now
    if t is None or steps <= 0 or now <= t:
      return {}
    step_time = (now - t) / steps
    out = {"step_time_s": step_time, "steps_per_sec": 1.0 / step_time,
           "images_per_sec": self.images_per_step / step_time}
    if self.tokens_per_image:
      out["tokens_per_sec"] = self.images_per_step * self.tokens_per_image / step_time
    if self.flops and self.peak:
      out["mfu"] = self.flops / (step_time * self.peak)
    return out


class Profiler:
  """A `jax.profiler` trace of steps `first..last` (1-based, inclusive) into `logdir`.

  `before(n)` before step n is dispatched, `after(n, out)` after (it waits for
  `out` at the last step so that the trace holds the device's work), `close()`
  in a `finally`. One trace per run: it starts at the first step in the range
  that runs (a resumed run starts inside it) and ends at `last`, or earlier
  where the loop leaves the steps (an evaluation point, the stage's end).
  """

  def __init__(self, first: int, last: int, logdir: str):
    if not 1 <= first <= last:
      raise ValueError(f"profile steps must be 1 <= first <= last, got {first},{last}")
    self.first, self.last, self.logdir = int(first), int(last), logdir
    self._on = self._done = False

  def before(self, n: int) -> None:
    if not self._on and not self._done and self.first <= n <= self.last:
      os.makedirs(self.logdir, exist_ok=True)
      jax.profiler.start_trace(self.logdir)
      self._on = True

  def after(self, n: int, out: Any) -> None:
    if self._on and n >= self.last:
      jax.block_until_ready(out)
      self.close()
      logging.info("profile of steps %d..%d written to %s", self.first, self.last, self.logdir)

  def close(self) -> None:
    if self._on:
      self._on, self._done = False, True
      jax.profiler.stop_trace()
