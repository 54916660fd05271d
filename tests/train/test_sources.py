"""Tests of train/sources.py: decoding (8/16-bit PNG, TIFF), worker pickling of the store."""

import logging
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from train import input_pipeline
from train import sources


def _save(path, arr, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(dir="", hr_size=32, scale=4, num_val=4, prefetch=2))
  c.update(kw)
  return c


def test_folder_decoding_16bit_gray_and_rgba(tmp_path):
  p16 = tmp_path / "g16.png"
  Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(p16)
  img = sources.load_image(str(p16))
  assert img.shape == (4, 5, 3) and img.dtype == np.uint16 and (img == 65535).all()
  prgba = tmp_path / "rgba.png"
  arr = np.zeros((3, 3, 4), np.uint8)
  arr[..., 0] = 255
  arr[..., 3] = 7
  Image.fromarray(arr).save(prgba)
  img = sources.load_image(str(prgba))
  assert img.shape == (3, 3, 3) and (img[..., 0] == 255).all() and (img[..., 1:] == 0).all()
  np.testing.assert_array_equal(sources.to_float(np.array([0, 65535], np.uint16)), [-1.0, 1.0])


def _png16_rgb(path, rgb16):
  """A minimal 16-bit RGB PNG (Pillow cannot write one)."""
  import struct
  import zlib
  h, w, _ = rgb16.shape
  be = rgb16.astype(">u2")
  raw = b"".join(b"\x00" + be[i].tobytes() for i in range(h))
  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
  path.write_bytes(b"\x89PNG\r\n\x1a\n"
                   + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_colour_png_is_flagged(tmp_path, caplog):
  root = tmp_path / "p"
  root.mkdir()
  _png16_rgb(root / "deep.png", np.full((20, 20, 3), 40000, np.uint16))
  _save(str(root / "gray16.png"), np.full((20, 20), 40000, np.uint16))
  with caplog.at_level(logging.WARNING):
    ds = input_pipeline.make_datasets(_cfg(dir=str(root), hr_size=16), batch_size_per_process=1, seed=0)
  assert [os.path.basename(p) for p in ds.stats.reduced_precision] == ["deep.png"]
  assert "8-bit precision" in caplog.text and "deep.png" in caplog.text
  assert ds.stats.files_read == 2  # still used, at 8 bits: 40000 / 65535 ~ 156 / 255
  deep = sources.load_image(str(root / "deep.png"))
  assert deep.dtype == np.uint8 and (deep == 40000 >> 8).all()
  gray = sources.load_image(str(root / "gray16.png"))
  assert gray.dtype == np.uint16 and (gray == 40000).all()


@pytest.mark.parametrize("planar", [False, True])
def test_16bit_rgb_tiff_keeps_16_bits(tmp_path, planar):
  import tifffile
  rgb = (np.arange(20 * 24 * 3).reshape(20, 24, 3) * 97 % 65536).astype(np.uint16)
  path = str(tmp_path / "x.tif")
  if planar:
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), planarconfig="separate", photometric="rgb")
  else:
    tifffile.imwrite(path, rgb, photometric="rgb")
  img = sources.load_image(path)
  assert img.dtype == np.uint16
  np.testing.assert_array_equal(img, rgb)  # Pillow would truncate to 8 bits
  assert sources._read_header(path) == (20, 24, 6)




def test_store_sent_to_a_worker_carries_paths_not_decoded_folder_images(tmp_path):
  root = tmp_path / "f"
  for i in range(2):
    _save(str(root / f"{i}.png"), np.full((20, 20, 3), 50 * (i + 1), np.uint8))
  store, train, _ = sources.folder_source(str(root), 16, 0.2, (".png",), 1 << 20,
                                          sources.DataStats(source="folder"))
  assert store._arrays  # small folder: decoded at start
  copy = pickle.loads(pickle.dumps(store))
  assert not copy._arrays
  for r in train:  # decoded again on demand, the same pixels
    np.testing.assert_array_equal(copy.get(r.image), store.get(r.image))
  retina, _, _ = sources.retina_source(32, 0.2)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(retina)).get(0), retina.get(0))
