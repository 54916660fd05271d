"""TensorBoard metric writer (tensorboardX: event files without TensorFlow).

Only one process writes: `MetricWriter(logdir, enabled=jax.process_index() == 0)`.
A disabled writer accepts every call and writes nothing (it does not even
create `logdir`). Values are converted on the host; non-finite scalars are
written as they are (NaN stays NaN in TensorBoard, never 0).
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Any, Mapping

import numpy as np


def _to_float(name: str, value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"scalar {name!r} has shape {arr.shape}; write_scalars takes scalars")
  return float(arr.reshape(()))


def _to_uint8_hwc(name: str, image: Any) -> np.ndarray:
  """HWC float in [0, 1] or uint8 -> uint8 HWC (1 or 3 channels)."""
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {name!r} must be [H, W, C] with C in (1, 3, 4), got {arr.shape}")
  if arr.dtype == np.uint8:
    return arr
  if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"image {name!r} has dtype {arr.dtype}; use float in [0, 1] or uint8")
  arr = arr.astype(np.float32)
  # NaN pixels are shown black; they are a symptom, the scalars carry the NaN.
  arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
  return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


class MetricWriter:
  """Writes scalars and images to TensorBoard event files in `logdir`.

  Args:
    logdir: directory of the event files (created when enabled).
    enabled: False on non-zero processes: nothing is written.
    flush_secs: tensorboardX's background flush period.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, flush_secs: int = 30):
    self.logdir = logdir
    self.enabled = bool(enabled)
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=logdir, flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes `name -> scalar` (python / numpy / jax 0-d values) at `step`."""
    if self._writer is None:
      return
    for name, value in scalars.items():
      # NaN / Inf are written as they are (tensorboardX keeps them).
      self._writer.add_scalar(name, _to_float(name, value), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes `name -> image` (HWC float in [0, 1], or uint8) at `step`."""
    if self._writer is None:
      return
    for name, image in images.items():
      self._writer.add_image(name, _to_uint8_hwc(name, image), global_step=int(step),
                             dataformats="HWC")

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes `name -> text` (e.g. the config, the validation table)."""
    if self._writer is None:
      return
    for name, text in texts.items():
      self._writer.add_text(name, str(text), global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` of the scalars in the event files under `logdir`.

  Reads the TFRecord files back with tensorboardX's protos (no TensorFlow), in
  file then write order: for notebooks and tests comparing runs.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    with open(path, "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):  # records: length (8), crc (4), payload, crc (4)
      (length,) = struct.unpack("<Q", buf[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(buf[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out
