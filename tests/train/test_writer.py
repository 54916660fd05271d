"""Tests of train/writer.py: the event file read back with tensorboardX's protos."""

import glob
import io
import math
import os
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from train import writer


def _read_events(logdir):
  """Parses TFRecord event files (length, crc, payload, crc) into Event protos."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      (length,) = struct.unpack("<Q", buf[pos:pos + 8])
      payload = buf[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      ev = event_pb2.Event()
      ev.ParseFromString(payload)
      events.append(ev)
  return events


def _values(events):
  out = {}
  for ev in events:
    for v in ev.summary.value:
      out.setdefault(v.tag, []).append((ev.step, v))
  return out


def test_scalars_and_images_round_trip(tmp_path):
  logdir = str(tmp_path / "tb")
  w = writer.MetricWriter(logdir)
  w.write_scalars(3, {"loss/ssim": 0.25, "skipped": np.int32(2), "lr": np.float32(1e-3)})
  w.write_scalars(4, {"loss/ssim": float("nan")})
  img = np.zeros((6, 5, 3), np.float32)
  img[..., 0] = 1.0
  w.write_images(4, {"grid": img, "gray": np.full((4, 4), 128, np.uint8)})
  w.flush()
  w.close()
  vals = _values(_read_events(logdir))
  ssim = vals["loss/ssim"]
  assert [s for s, _ in ssim] == [3, 4]
  assert ssim[0][1].simple_value == pytest.approx(0.25)
  assert math.isnan(ssim[1][1].simple_value)  # NaN is written as NaN, not 0
  assert vals["skipped"][0][1].simple_value == 2.0
  assert vals["lr"][0][1].simple_value == pytest.approx(1e-3)
  (step, v), = vals["grid"]
  assert step == 4 and (v.image.height, v.image.width) == (6, 5)
  png = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
  assert png.shape[:2] == (6, 5) and (png[..., 0] == 255).all() and (png[..., 1] == 0).all()
  assert (vals["gray"][0][1].image.height, vals["gray"][0][1].image.width) == (4, 4)


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "tb"
  w = writer.MetricWriter(str(logdir), enabled=False)
  w.write_scalars(1, {"a": 1.0})
  w.write_images(1, {"g": np.zeros((2, 2, 3))})
  w.flush()
  w.close()
  assert not logdir.exists()


def test_bad_values_are_rejected(tmp_path):
  with writer.MetricWriter(str(tmp_path / "tb")) as w:
    with pytest.raises(ValueError, match="'v'"):
      w.write_scalars(0, {"v": np.zeros(3)})
    with pytest.raises(ValueError, match="'img'"):
      w.write_images(0, {"img": np.zeros((2, 3, 4, 5))})
