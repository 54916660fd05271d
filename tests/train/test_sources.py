"""Tests of train/sources.py: decoding (8/16-bit PNG, TIFF, DICOM), worker pickling of the store."""

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


# ----------------------------------------------------------------------------
# DICOM: real MR slices from pydicom-data (found offline).

import pydicom  # noqa: E402  a trainer dependency; pydicom-data (test extra) holds the files
import pydicom.data  # noqa: E402  pylint: disable=g-import-not-at-top

SHOULDER = "MR2_UNCI.dcm"  # 1024 x 1024, slope 3.774114, window 1000 / 2000
ABDOMEN = "MR-SIEMENS-DICOM-WithOverlays.dcm"  # 484 x 484, windows [450, 790] / [200, 443]


def _mr(name):
  return pydicom.data.get_testdata_file(name)


def test_dicom_rescale_and_header_window_of_a_real_mr_slice():
  ds = pydicom.dcmread(_mr(SHOULDER))
  img = sources.load_dicom(_mr(SHOULDER))[0]
  assert img.shape == (1024, 1024, 3) and img.dtype == np.uint16
  assert (img[..., 0] == img[..., 2]).all()  # gray replicated
  # Physical value = 3.774114 * stored + 0.000061, window [0, 2000] -> [0, 65535].
  phys = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  expect = np.round(np.clip(phys / 2000.0, 0, 1) * 65535).astype(np.uint16)
  np.testing.assert_array_equal(img[..., 0], expect)
  # Without the slope the window would clip far less: the slope matters.
  assert (img[..., 0] == 65535).sum() > (ds.pixel_array >= 2000).sum()


def test_dicom_first_of_multiple_windows_and_percentile_mode():
  img = sources.load_dicom(_mr(ABDOMEN))[0][..., 0].astype(np.float64) / 65535
  raw = pydicom.dcmread(_mr(ABDOMEN)).pixel_array.astype(np.float64)
  np.testing.assert_allclose(img, np.clip((raw - (450 - 790 / 2)) / 790, 0, 1), atol=1e-5)
  pct = sources.load_dicom(_mr(ABDOMEN), window="percentile")[0][..., 0] / 65535
  lo, hi = np.percentile(raw, [0.5, 99.5])
  np.testing.assert_allclose(pct, np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)
  with pytest.raises(ValueError, match="data.dicom_window"):
    sources.load_dicom(_mr(ABDOMEN), window="auto")


def test_dicom_slope_intercept_and_monochrome1_written_out(tmp_path):
  ds = pydicom.dcmread(_mr(ABDOMEN))
  ds.RescaleSlope, ds.RescaleIntercept = 2, -100
  ds.WindowCenter, ds.WindowWidth = 500, 1000
  ds.PhotometricInterpretation = "MONOCHROME1"
  path = str(tmp_path / "m1.dcm")
  ds.save_as(path)
  img = sources.load_dicom(path)[0][..., 0].astype(np.float64) / 65535
  phys = ds.pixel_array.astype(np.float64) * 2 - 100
  np.testing.assert_allclose(img, 1 - np.clip(phys / 1000, 0, 1), atol=1e-5)


def _dicom_folder(tmp_path, broken=True):
  root = tmp_path / "dicom"
  (root / "sub").mkdir(parents=True)
  os.symlink(_mr(SHOULDER), root / "a.dcm")
  os.symlink(_mr(ABDOMEN), root / "sub" / "b.dcm")
  if broken:
    (root / "broken.dcm").write_bytes(b"not a dicom file")
  (root / "notes.txt").write_text("ignored: not .dcm")
  return root


def test_dicom_folder_holds_out_the_middle_band_and_skips_bad_files(tmp_path, caplog):
  root = _dicom_folder(tmp_path)
  stats = sources.DataStats(source="dicom")
  with caplog.at_level(logging.WARNING):
    store, train, val = sources.dicom_source(str(root), 32, 0.2, stats)
  assert (stats.files_found, stats.files_read, stats.files_skipped) == (3, 2, 1)
  assert "broken.dcm" in caplog.text and "broken.dcm" in stats.skipped[0][0]
  heights = {0: 1024, 1: 484}
  for v in val:
    h = heights[v.image]
    assert (v.row0, v.row1) == (h // 2, h // 2 + round(0.2 * h))
  for t in train:  # entirely above or entirely below the band, never inside
    v = next(r for r in val if r.image == t.image)
    assert t.row1 <= v.row0 or t.row0 >= v.row1
  assert store.get(1).shape == (484, 484, 3)


def test_dicom_datasets_are_gray_crops_from_the_folder(tmp_path):
  root = _dicom_folder(tmp_path, broken=False)
  ds = input_pipeline.make_datasets(_cfg(dir=str(root), source="dicom", num_val=6),
                                    batch_size_per_process=4, seed=0)
  assert ds.val.highres.shape == (6, 32, 32, 3) and ds.val.lowres.shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(ds.val.highres[..., 0], ds.val.highres[..., 1])
  assert ds.stats.val_images == 2 and ds.val.highres.std() > 0.05
  with ds.train_iter(0) as it:
    b = next(it)
  assert b.highres.shape == (4, 32, 32, 3)


@pytest.mark.parametrize("setup,match", [
    ("missing", "data.dir"), ("empty", "data.dir"), ("only_broken", "data.dir"),
    ("too_small", "data.dir"), ("no_dir", "data.dir")])
def test_bad_dicom_folders_name_data_dir(tmp_path, setup, match):
  root = tmp_path / "d"
  root.mkdir()
  if setup == "only_broken":
    (root / "x.dcm").write_bytes(b"\x00" * 200)
  elif setup == "empty":
    (root / "a.png").write_bytes(b"")
  elif setup == "too_small":
    os.symlink(_mr(ABDOMEN), root / "b.dcm")
  cfg = _cfg(dir="" if setup == "no_dir" else str(tmp_path / "nope") if setup == "missing"
             else str(root), source="dicom", hr_size=256 if setup == "too_small" else 32)
  with pytest.raises(ValueError, match=match):
    input_pipeline.make_datasets(cfg, batch_size_per_process=2, seed=0)
