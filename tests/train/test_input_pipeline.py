"""Tests of train/input_pipeline.py: determinism, resume, sharding, workers, held-out val."""

import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from train import input_pipeline


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(dir="", hr_size=32, scale=4, num_val=4, prefetch=2))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def retina():
  return input_pipeline.make_datasets(_cfg(), batch_size_per_process=4, seed=3)


def _take(it, n):
  with it:
    return [next(it) for _ in range(n)]


def test_shapes_range_and_area_downsampling(retina):
  (b,) = _take(retina.train_iter(0), 1)
  assert b.highres.shape == (4, 32, 32, 3) and b.highres.dtype == np.float32
  assert b.lowres.shape == (4, 8, 8, 3) and b.lowres.dtype == np.float32
  assert b.highres.min() >= -1.0 and b.highres.max() <= 1.0
  # Low-res = mean over 4x4 blocks of the high-res crop.
  blocks = b.highres.reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(b.lowres, blocks, atol=1e-6)
  assert retina.val.highres.shape == (4, 32, 32, 3)
  assert retina.val.lowres.shape == (4, 8, 8, 3)
  # Crops are mostly fundus, not the black background (-1).
  assert (retina.val.highres.mean(axis=-1) > -0.85).mean() > 0.8


def test_deterministic_and_seed_dependent(retina):
  again = input_pipeline.make_datasets(_cfg(), batch_size_per_process=4, seed=3)
  other = input_pipeline.make_datasets(_cfg(), batch_size_per_process=4, seed=4)
  a, b, c = (_take(d.train_iter(0), 3) for d in (retina, again, other))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.highres, y.highres)
    np.testing.assert_array_equal(x.lowres, y.lowres)
  assert not np.array_equal(a[0].highres, c[0].highres)
  assert not np.array_equal(a[0].highres, a[1].highres)
  # Validation does not depend on the training seed.
  np.testing.assert_array_equal(retina.val.highres, other.val.highres)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_equivalence(prefetch):
  ds = input_pipeline.make_datasets(_cfg(prefetch=prefetch), batch_size_per_process=2, seed=7)
  full = _take(ds.train_iter(0), 7)
  resumed = _take(ds.train_iter(4), 3)
  for x, y in zip(full[4:], resumed):
    np.testing.assert_array_equal(x.highres, y.highres)
    np.testing.assert_array_equal(x.lowres, y.lowres)


def test_process_shards_are_disjoint_and_compose_the_global_batch():
  single = input_pipeline.make_datasets(_cfg(), batch_size_per_process=6, seed=1)
  shards = [input_pipeline.make_datasets(_cfg(), batch_size_per_process=3, seed=1,
                               process_index=p, process_count=2) for p in range(2)]
  specs = [set(map(tuple, s.train_iter.plan_step(5))) for s in shards]
  assert len(specs[0]) == 3 and len(specs[1]) == 3
  assert not specs[0] & specs[1]
  g = _take(single.train_iter(2), 2)
  p = [_take(s.train_iter(2), 2) for s in shards]
  for k in range(2):
    np.testing.assert_array_equal(
        np.concatenate([p[0][k].highres, p[1][k].highres]), g[k].highres)
    assert not np.array_equal(p[0][k].highres, p[1][k].highres)


def test_val_region_is_held_out(retina):
  ((_, t0, t1),) = retina.train_iter.train_regions
  ((_, v0, v1),) = retina.train_iter.val_regions
  assert t1 <= v0  # regions do not overlap
  size = 32
  for step in range(50):
    for s in retina.train_iter.plan_step(step):
      assert t0 <= s.y and s.y + size <= t1
  for s in retina.train_iter.val_specs:
    assert v0 <= s.y and s.y + size <= v1


def test_restored_iterator_state_gives_the_next_batches():
  # The state is grain's plus the step; a fresh iterator (another process
  # after a restart) set to it continues exactly where the first one was.
  ds = input_pipeline.make_datasets(_cfg(**_DEGRADED), batch_size_per_process=2, seed=5)
  with ds.train_iter(0) as it:
    for _ in range(3):
      next(it)
    state = it.get_state()
    assert it.step == 3
    expected = [next(it) for _ in range(3)]
  with ds.train_iter(0) as again:
    again.set_state(state)
    assert again.step == 3
    got = [next(again) for _ in range(3)]
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x.highres, y.highres)
    np.testing.assert_array_equal(x.lowres, y.lowres)
  it.close()  # idempotent
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.slow
def test_one_worker_process_gives_the_same_batches_and_states():
  # data.num_workers=1: batches built in a spawned grain worker are the
  # in-process batches; its state resumes in a worker and, by step, in-process.
  import multiprocessing
  cfg = _cfg(**_DEGRADED)
  local = input_pipeline.make_datasets(cfg, batch_size_per_process=2, seed=5)
  cfg.num_workers = 1
  worker = input_pipeline.make_datasets(cfg, batch_size_per_process=2, seed=5)
  ref = _take(local.train_iter(0), 5)
  with worker.train_iter(0) as it:
    got = [next(it) for _ in range(2)]
    assert multiprocessing.active_children()  # the worker runs
    state = it.get_state()
    got += [next(it) for _ in range(3)]
  assert not multiprocessing.active_children()  # close() stopped it
  for x, y in zip(ref, got):
    np.testing.assert_array_equal(x.highres, y.highres)
    np.testing.assert_array_equal(x.lowres, y.lowres)
  for ds in (worker, local):
    with ds.train_iter(0) as it:
      it.set_state(state)
      resumed = [next(it) for _ in range(3)]
    for x, y in zip(ref[2:], resumed):
      np.testing.assert_array_equal(x.lowres, y.lowres)
  assert not multiprocessing.active_children()


# ---------------------------------------------------------------------------
# Folder source.


def _save(path, arr, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)


def _folder(tmp_path):
  """Valid images of every supported kind, plus broken files."""
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  rgb = rng.integers(0, 256, (40, 48, 3), np.uint8)
  _save(str(root / "a_rgb.png"), rgb)
  _save(str(root / "sub" / "b_gray16.png"),
        rng.integers(0, 65536, (40, 40), np.uint16).astype(np.uint16))
  _save(str(root / "sub" / "deeper" / "c_rgba.png"),
        rng.integers(0, 256, (36, 36, 4), np.uint8))
  _save(str(root / "d.jpg"), rgb, quality=90)
  _save(str(root / "e.tif"), rng.integers(0, 256, (40, 40), np.uint8))
  _save(str(root / "f_small.png"), rgb[:8, :8])  # smaller than a crop
  (root / "g_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
  good = (root / "a_rgb.png").read_bytes()
  (root / "h_truncated.png").write_bytes(good[: len(good) // 2])
  (root / "notes.txt").write_text("not an image")
  return root


def test_folder_reads_all_formats_and_counts_bad_files(tmp_path, caplog):
  root = _folder(tmp_path)
  with caplog.at_level(logging.WARNING):
    ds = input_pipeline.make_datasets(_cfg(dir=str(root), hr_size=16), batch_size_per_process=3, seed=0)
  st = ds.stats
  assert st.source == "folder"
  assert st.files_found == 8  # notes.txt is not a candidate
  assert st.files_read == 5 and st.files_skipped == 3
  skipped = {os.path.basename(p) for p, _ in st.skipped}
  assert skipped == {"f_small.png", "g_corrupt.png", "h_truncated.png"}
  assert "g_corrupt.png" in caplog.text and "h_truncated.png" in caplog.text
  (b,) = _take(ds.train_iter(0), 1)
  assert b.highres.shape == (3, 16, 16, 3)
  assert np.isfinite(b.highres).all() and b.highres.min() >= -1 and b.highres.max() <= 1


def test_folder_holds_out_whole_files(tmp_path):
  # Ten constant images with distinct values: every crop tells its file.
  root = tmp_path / "const"
  levels = [10 * (i + 1) for i in range(10)]
  for i, v in enumerate(levels):
    _save(str(root / f"img{i:02d}.png"), np.full((20, 20, 3), v, np.uint8))
  ds = input_pipeline.make_datasets(_cfg(dir=str(root), hr_size=16, num_val=3),
                          batch_size_per_process=8, seed=0)
  to_level = lambda x: set(np.round((x[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist())
  assert to_level(ds.val.highres) == {levels[9]}
  seen = set()
  for b in _take(ds.train_iter(0), 5):
    seen |= to_level(b.highres)
  assert levels[9] not in seen and len(seen) > 3


def test_lazy_folder_skips_files_that_fail_late_deterministically(tmp_path, caplog):
  # cache_bytes=0: headers only at start; a truncated file has a valid header
  # and fails when its pixels are first needed.
  root = _folder(tmp_path)
  cfg = _cfg(dir=str(root), hr_size=16, cache_bytes=0, prefetch=0)
  with caplog.at_level(logging.WARNING):
    ds = input_pipeline.make_datasets(cfg, batch_size_per_process=16, seed=0)
    assert ds.stats.lazy
    # f_small (size) and g_corrupt (header) are found at start; the truncated
    # file is still a candidate.
    assert {os.path.basename(p) for p, _ in ds.stats.skipped} >= {"f_small.png",
                                                                 "g_corrupt.png"}
    batches = _take(ds.train_iter(0), 6)
  assert "h_truncated.png" in {os.path.basename(p) for p, _ in ds.stats.skipped}
  assert ds.stats.files_skipped == len(ds.stats.skipped) == 3
  assert "h_truncated.png" in caplog.text
  for b in batches:
    assert np.isfinite(b.highres).all()
  # The replacement is deterministic: a fresh loader (another process, or a
  # resumed run) gives the same batches, also starting later.
  again = input_pipeline.make_datasets(cfg, batch_size_per_process=16, seed=0)
  for x, y in zip(batches[3:], _take(again.train_iter(3), 3)):
    np.testing.assert_array_equal(x.highres, y.highres)
  eager = input_pipeline.make_datasets(_cfg(dir=str(root), hr_size=16), batch_size_per_process=1, seed=0)
  assert not eager.stats.lazy


@pytest.mark.parametrize("case", ["missing", "empty", "only_bad"])
def test_folder_errors_name_data_dir(tmp_path, case):
  root = tmp_path / "d"
  if case != "missing":
    root.mkdir()
  if case == "only_bad":
    (root / "x.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="data.dir"):
    input_pipeline.make_datasets(_cfg(dir=str(root)), batch_size_per_process=1, seed=0)


_DEGRADED = dict(blur_sigma=1.2, noise_level=4.0, lr_bits=8)


def test_degraded_batches_are_sharded_resumed_and_held_out_alike():
  # The noise of a sample is a function of (seed, step, sample): process
  # shards compose the global batch and a resumed run sees the same LR.
  single = input_pipeline.make_datasets(_cfg(**_DEGRADED), batch_size_per_process=4, seed=1)
  shards = [input_pipeline.make_datasets(_cfg(**_DEGRADED), batch_size_per_process=2, seed=1,
                               process_index=p, process_count=2) for p in range(2)]
  g = _take(single.train_iter(0), 3)
  p = [_take(s.train_iter(2), 1)[0] for s in shards]
  np.testing.assert_array_equal(np.concatenate([p[0].lowres, p[1].lowres]), g[2].lowres)
  # The LR image is degraded (not the plain area average) and 8-bit.
  plain = g[2].highres.reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4))
  assert np.abs(g[2].lowres - plain).mean() > 2 / 255
  levels = (g[2].lowres + 1) * 255 / 2
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  # Validation noise is fixed, independent of the training seed.
  other = input_pipeline.make_datasets(_cfg(**_DEGRADED), batch_size_per_process=4, seed=9)
  np.testing.assert_array_equal(single.val.lowres, other.val.lowres)


def test_retina_downscale_halves_the_photograph():
  ds = input_pipeline.make_datasets(_cfg(retina_downscale=2), batch_size_per_process=1, seed=0)
  (_, row0, row1), = ds.train_iter.train_regions
  (_, v0, v1), = ds.train_iter.val_regions
  assert v1 == 1411 // 2 and row0 == 0 and row1 == v0


BAD_CONFIGS = [
    (dict(hr_size=30, scale=4), {}, "data.hr_size"),
    (dict(hr_size=0), {}, "data.hr_size"),
    (dict(scale=0), {}, "data.scale"),
    (dict(num_val=0), {}, "data.num_val"),
    (dict(val_fraction=0.0), {}, "data.val_fraction"),
    (dict(val_fraction=1.5), {}, "data.val_fraction"),
    (dict(prefetch=-1), {}, "data.prefetch"),
    (dict(num_workers=-1), {}, "data.num_workers"),
    (dict(num_workers=1.5), {}, "data.num_workers"),
    (dict(source="nope"), {}, "data.source"),
    (dict(source="folder"), {}, "data.dir"),
    (dict(hr_size=2048, scale=4), {}, "data.hr_size"),
    (dict(extensions=()), {}, "data.extensions"),
    (dict(blur_sigma=-0.5), {}, "data.blur_sigma"),
    (dict(noise_level="5"), {}, "data.noise_level"),
    (dict(lr_bits=20), {}, "data.lr_bits"),
    (dict(retina_downscale=0), {}, "data.retina_downscale"),
    (dict(), dict(batch_size_per_process=0), "batch_size_per_process"),
    (dict(), dict(process_index=2, process_count=2), "process_index"),
    (dict(), dict(process_index=-1, process_count=1), "process_index"),
]


@pytest.mark.parametrize("fields,kwargs,match", BAD_CONFIGS)
def test_bad_data_settings_name_the_field(fields, kwargs, match):
  kw = dict(batch_size_per_process=1, seed=0)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    input_pipeline.make_datasets(_cfg(**fields), **kw)


def test_bad_start_step_and_file_as_dir(tmp_path, retina):
  with pytest.raises(ValueError, match="start_step"):
    retina.train_iter(-1)
  f = tmp_path / "x.png"
  f.write_bytes(b"")
  with pytest.raises(ValueError, match="data.dir"):
    input_pipeline.make_datasets(_cfg(dir=str(f)), batch_size_per_process=1, seed=0)


def test_extensions_from_command_line_string(tmp_path):
  root = tmp_path / "d"
  _save(str(root / "a.png"), np.zeros((40, 40, 3), np.uint8))
  _save(str(root / "b.jpg"), np.zeros((40, 40, 3), np.uint8))
  ds = input_pipeline.make_datasets(_cfg(dir=str(root), hr_size=16, extensions="png"),
                          batch_size_per_process=1, seed=0)
  assert ds.stats.files_found == 1
