"""Super-resolution data: embedded retina crops or a folder of images.

Task: a high-resolution (HR) crop `[H, W, 3]` and its low-resolution (LR)
version `[H / scale, W / scale, 3]`, both float32 in [-1, 1]. The LR image is
made by `train.degradations.degrade`: optional Gaussian blur, AREA (box)
downsampling by `scale`, optional Gaussian noise and rounding to 8 bits
(`data.blur_sigma`, `data.noise_level`, `data.lr_bits`; all off by default,
which leaves the plain, exact area average). The noise of sample `i` at step
`s` is seeded by `(seed, s, i)`, like its crop.

Sources (`data_config.dir`, or `data_config.source`):

- embedded (`dir == ""` or `source == "retina"`): crops of the retinal fundus
  photograph `skimage.data.retina()` (1411 x 1411 RGB, shipped with
  scikit-image, no download), optionally area-downscaled by
  `data.retina_downscale` first. The bottom `val_fraction` of the rows is a
  held-out region: training crops lie entirely above it, validation crops
  entirely inside it, so they never share a pixel. Crops are drawn only where
  at least half of the crop is fundus (not black background).
- folder (`dir` set): PNG / JPEG / TIFF files found recursively (sorted paths).
  Grayscale -> RGB, RGBA / LA -> RGB (alpha dropped), 8- and 16-bit. Files that
  cannot be decoded or are smaller than one crop are skipped AND counted in
  `stats` (with a warning naming them). With two or more images, whole files
  are held out for validation (every 10th file, at least one); with one image,
  the bottom band of rows is held out as for the retina.

Determinism and sharding: the sample `i` of the GLOBAL batch at step `s` is a
pure function of `(seed, s, i)` (which image, where, which flips). Process `p`
of `P` builds only samples `[p * B, (p + 1) * B)` of each global batch of
`P * B`, so concatenating the process batches gives the same global batch for
any process count, and resuming at step `k` yields exactly the batches an
uninterrupted run sees from step `k`.

Prefetch: `train_iter(start_step)` returns a `BatchIterator` that builds
batches in a daemon thread into a bounded queue (`data_config.prefetch`
batches; 0 builds them synchronously). `close()` (or leaving a `with` block)
stops and joins the thread.

Memory: a folder whose decoded pixels fit in `data.cache_bytes` (1 GiB) is
decoded once at start and held as uint8 / uint16. A larger folder (EyeQ, say)
is only scanned for headers at start; each process then decodes just the files
its own samples need, with an LRU cache of `cache_bytes`. A file that fails to
decode only then is skipped, counted and warned about when first needed, and
its samples deterministically come from the next image instead (the same in
every process and in a resumed run, as it depends only on the files).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import queue
import threading
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from train import degradations as deg_lib

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Fraction of a retina crop that must be fundus (not the black background).
_RETINA_MIN_FOREGROUND = 0.5
_RETINA_FOREGROUND_LEVEL = 20  # uint8 gray level separating fundus from background
_VAL_SEED = 1234
# Folders whose decoded pixels fit are decoded at start (broken files found
# before training); larger ones are decoded on demand with an LRU cache this big.
DEFAULT_CACHE_BYTES = 1 << 30  # validation crops do not depend on the training seed


class Batch(NamedTuple):
  """One batch of super-resolution pairs (host numpy arrays).

  Attributes:
    lowres: float32 `[B, H / scale, W / scale, 3]` in [-1, 1].
    highres: float32 `[B, H, W, 3]` in [-1, 1].
  """
  lowres: np.ndarray
  highres: np.ndarray


@dataclasses.dataclass
class DataStats:
  """What the loader found.

  Attributes:
    source: "retina" or "folder".
    files_found: candidate files (folder source; 0 for the retina).
    files_read: files decoded successfully and large enough.
    files_skipped: files that could not be decoded or were too small.
    skipped: `(path, reason)` for each skipped file.
    train_images / val_images: images (or image regions) per split.
    lazy: folder decoded on demand (too large to hold); then files that fail
      to decode are found, counted and warned about when first needed.
    reduced_precision: 16-bit colour PNGs, which Pillow decodes to 8 bits
      (warned about; 16-bit TIFFs and 16-bit gray PNGs keep 16 bits).
  """
  source: str
  files_found: int = 0
  files_read: int = 0
  files_skipped: int = 0
  skipped: list = dataclasses.field(default_factory=list)
  train_images: int = 0
  val_images: int = 0
  lazy: bool = False
  reduced_precision: list = dataclasses.field(default_factory=list)


class Datasets(NamedTuple):
  """Returned by `make_datasets`.

  Attributes:
    train_iter: `train_iter(start_step) -> BatchIterator`, infinite, this
      process's shard of each global batch from `start_step` on.
    val: fixed validation `Batch` (the same in every process), `num_val` crops.
    stats: `DataStats`.
  """
  train_iter: Callable[[int], "BatchIterator"]
  val: Batch
  stats: DataStats


class _Region(NamedTuple):
  """A rectangle of rows `[row0, row1)` of one image that crops may come from."""
  image: int  # key of the image in the _ImageStore
  row0: int
  row1: int
  width: int
  # Flat indices (y * (width - size + 1) + x, y relative to row0) of allowed
  # crop corners, or None when every corner is allowed.
  corners: np.ndarray | None


class _Unreadable(Exception):
  """An image file failed to decode when it was first needed."""


class _ImageStore:
  """Images by key: held in memory, or decoded on demand with an LRU byte budget.

  On-demand decoding lets a folder larger than memory be used: a process only
  decodes the files its own samples need. A file that fails to decode is
  remembered, counted in `stats` and warned about once.
  """

  def __init__(self, *, arrays: dict | None = None, paths: Sequence[str] = (),
               cache_bytes: int = 0, stats: DataStats | None = None):
    self._arrays = dict(arrays or {})
    self._paths = list(paths)
    self._cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
    self._cache_bytes = int(cache_bytes)
    self._held = 0
    self._lock = threading.Lock()
    self._bad: dict[int, str] = {}
    self._stats = stats

  def get(self, key: int) -> np.ndarray:
    if key in self._arrays:
      return self._arrays[key]
    with self._lock:
      if key in self._bad:
        raise _Unreadable(self._bad[key])
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    path = self._paths[key]
    try:
      img = load_image(path)
    except Exception as e:  # pylint: disable=broad-except
      why = f"{type(e).__name__}: {e}"
      with self._lock:
        if key not in self._bad:
          self._bad[key] = why
          if self._stats is not None:
            self._stats.skipped.append((path, why))
            self._stats.files_skipped += 1
          logging.warning("skipping image file %s that failed to decode (%s); its samples "
                          "come from the next image", path, why)
      raise _Unreadable(why) from e
    with self._lock:
      self._cache[key] = img
      self._held += img.nbytes
      while self._held > self._cache_bytes and len(self._cache) > 1:
        _, old = self._cache.popitem(last=False)
        self._held -= old.nbytes
    return img


class SampleSpec(NamedTuple):
  """Where one sample comes from (exposed for tests and debugging)."""
  region: int
  y: int  # absolute row of the crop's top edge in the image
  x: int
  flip_h: bool
  flip_v: bool


# ----------------------------------------------------------------------------
# Config access (accepts both field spellings used in configs/).


def _cfg(config, names: Sequence[str], default):
  for name in names:
    if config is not None and name in config:
      return config[name]
  return default


# ----------------------------------------------------------------------------
# Image decoding.


def _to_rgb(arr: np.ndarray) -> np.ndarray:
  """Grayscale / LA / RGBA / RGB -> `[H, W, 3]`, dtype kept (uint8 / uint16)."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3:
    raise ValueError(f"unsupported image rank {arr.ndim}")
  c = arr.shape[-1]
  if c in (1, 2):  # gray, gray + alpha
    arr = np.repeat(arr[..., :1], 3, axis=-1)
  elif c in (3, 4):
    arr = arr[..., :3]
  else:
    raise ValueError(f"unsupported channel count {c}")
  if arr.dtype == np.uint8 or arr.dtype == np.uint16:
    return np.ascontiguousarray(arr)
  if arr.dtype == bool:
    return arr.astype(np.uint8) * 255
  if np.issubdtype(arr.dtype, np.integer):
    # int32 'I' mode PNGs are 16-bit data in a wider container.
    if arr.min() < 0 or arr.max() > 65535:
      raise ValueError(f"integer pixel values outside [0, 65535] ({arr.dtype})")
    return arr.astype(np.uint16)
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)):
      raise ValueError("non-finite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"float pixel values outside [0, 1] ({lo}, {hi})")
    return np.round(arr * 65535.0).astype(np.uint16)
  raise ValueError(f"unsupported pixel dtype {arr.dtype}")


_TIFF = (".tif", ".tiff")


def _tiff_to_hwc(arr: np.ndarray) -> np.ndarray:
  """tifffile's first page -> `[H, W]` or `[H, W, C]` (planar RGB moved last)."""
  if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
    arr = np.moveaxis(arr, 0, -1)
  return arr


def load_image(path: str) -> np.ndarray:
  """Decodes one image file to `[H, W, 3]` uint8 or uint16.

  TIFFs are read with tifffile (a scikit-image dependency): Pillow would
  silently truncate 16-bit RGB TIFFs to 8 bits. Multi-page files: first page.

  Raises:
    OSError / ValueError (and whatever the decoder raises) when the file is not
    a decodable image; callers skip and count such files.
  """
  if path.lower().endswith(_TIFF):
    import tifffile  # pylint: disable=g-import-not-at-top
    return _to_rgb(_tiff_to_hwc(np.asarray(tifffile.imread(path, key=0))))

  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    im.load()  # full decode: truncated files fail here, not mid-training
    if im.mode == "P" or im.mode == "PA":
      im = im.convert("RGBA")
    elif im.mode == "CMYK" or im.mode == "YCbCr":
      im = im.convert("RGB")
    arr = np.asarray(im)
  if im.mode.startswith("I;16") and arr.dtype != np.uint16:
    arr = arr.astype(np.uint16)
  return _to_rgb(arr)


def _to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 / uint16 -> float32 in [-1, 1]."""
  full = 255.0 if pixels.dtype == np.uint8 else 65535.0
  return pixels.astype(np.float32) * np.float32(2.0 / full) - np.float32(1.0)


# ----------------------------------------------------------------------------
# Regions and crop planning.


def _foreground_corners(image: np.ndarray, row0: int, row1: int, size: int,
                        min_fraction: float) -> np.ndarray:
  """Flat corner indices of `size` crops in rows [row0, row1) that are mostly fundus."""
  gray = image[row0:row1].astype(np.float32).mean(-1)
  if image.dtype == np.uint16:
    gray = gray / 257.0
  fg = (gray > _RETINA_FOREGROUND_LEVEL).astype(np.int64)
  # Integral image: foreground count of every size x size window in O(HW).
  ii = np.pad(fg.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  counts = ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]
  ok = counts >= min_fraction * size * size
  return np.flatnonzero(ok).astype(np.int64)


def _make_region(key: int, image: np.ndarray | None, row0: int, row1: int, width: int,
                 size: int, min_fraction: float) -> _Region | None:
  """A region, or None when it cannot hold one crop.

  `image` (pixels) is needed only for `min_fraction > 0` (foreground filter).
  """
  if row1 - row0 < size or width < size:
    return None
  corners = None
  if min_fraction > 0:
    corners = _foreground_corners(image, row0, row1, size, min_fraction)
    if corners.size == 0:
      corners = None  # nothing qualifies: fall back to every position
  return _Region(key, row0, row1, width, corners)


def _plan(rng: np.random.Generator, regions: Sequence[_Region], size: int, n: int,
          *, flips: bool, lo: int = 0, hi: int | None = None) -> list[SampleSpec]:
  """Draws `n` crop specs with `rng` (the same draws in every process).

  Only specs `[lo, hi)` are built: a process needs only its slice of the
  global batch, but draws the whole batch's random numbers to stay in step.
  """
  # Regions are picked in proportion to their number of valid corners, so
  # every allowed crop position is equally likely.
  weights = np.array([
      (r.corners.size if r.corners is not None
       else (r.row1 - r.row0 - size + 1) * (r.width - size + 1))
      for r in regions], np.float64)
  region_ids = rng.choice(len(regions), size=n, p=weights / weights.sum())
  u = rng.random((n, 2))
  fl = rng.random((n, 2)) < 0.5
  specs = []
  for k in range(lo, n if hi is None else hi):
    r = regions[region_ids[k]]
    wpos = r.width - size + 1
    if r.corners is not None:
      flat = int(r.corners[min(int(u[k, 0] * r.corners.size), r.corners.size - 1)])
      y, x = divmod(flat, wpos)
    else:
      hpos = r.row1 - r.row0 - size + 1
      y = min(int(u[k, 0] * hpos), hpos - 1)
      x = min(int(u[k, 1] * wpos), wpos - 1)
    specs.append(SampleSpec(int(region_ids[k]), r.row0 + y, x,
                            bool(flips and fl[k, 0]), bool(flips and fl[k, 1])))
  return specs


def _crop(store: _ImageStore, regions: Sequence[_Region], s: SampleSpec, size: int,
          where: str) -> np.ndarray:
  """The pixels of one spec; a file that fails to decode passes to the next region.

  The fallback depends only on which files decode, so every process (and a
  resumed run) makes the same choice.
  """
  n = len(regions)
  first = regions[s.region]
  for j in range(n):
    r = regions[(s.region + j) % n]
    try:
      img = store.get(r.image)
    except _Unreadable:
      continue
    if j == 0:
      y, x = s.y, s.x
    else:  # same relative position, clamped into the replacement region
      y = r.row0 + min(s.y - first.row0, r.row1 - r.row0 - size)
      x = min(s.x, r.width - size)
    crop = img[y:y + size, x:x + size]
    if s.flip_h:
      crop = crop[:, ::-1]
    if s.flip_v:
      crop = crop[::-1]
    return crop
  raise ValueError(f"{where}: none of the {n} images of this split could be decoded")


def _extract(store: _ImageStore, regions: Sequence[_Region], specs: Sequence[SampleSpec],
             size: int, degradation: deg_lib.Degradation, where: str,
             noise_seeds: Sequence[Sequence[int]]) -> Batch:
  """HR crops of `specs` and their LR images; `noise_seeds[k]` seeds sample k's noise."""
  hr = np.empty((len(specs), size, size, 3), np.float32)
  for k, s in enumerate(specs):
    hr[k] = _to_float(_crop(store, regions, s, size, where))
  rngs = ([np.random.default_rng(list(n)) for n in noise_seeds]
          if degradation.random else None)
  return Batch(lowres=deg_lib.degrade(hr, degradation, rngs), highres=hr)


# ----------------------------------------------------------------------------
# The prefetching iterator.


_END = object()


class BatchIterator(Iterator[Batch]):
  """Infinite iterator over batches from `start_step`, optionally prefetched.

  `close()` stops the producer thread and joins it; also a context manager.
  An exception raised while building a batch is re-raised by `next()`.
  """

  def __init__(self, make_batch: Callable[[int], Batch], start_step: int,
               prefetch: int):
    self._make = make_batch
    self._step = int(start_step)
    self._prefetch = int(prefetch)
    self._closed = False
    self._thread = None
    if self._prefetch > 0:
      self._queue: queue.Queue = queue.Queue(maxsize=self._prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._produce, name="ssim_jax-prefetch",
                                      daemon=True)
      self._thread.start()

  def _produce(self):
    step = self._step
    while not self._stop.is_set():
      try:
        item = self._make(step)
      except BaseException as e:  # pylint: disable=broad-except
        item = e
      # Bounded put that still notices close().
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return
      step += 1

  def __next__(self) -> Batch:
    if self._closed:
      raise StopIteration
    if self._thread is None:
      batch = self._make(self._step)
      self._step += 1
      return batch
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("data prefetch thread died without an error") from None
    if isinstance(item, BaseException):
      self.close()
      raise item
    self._step += 1
    return item

  @property
  def alive(self) -> bool:
    """Whether the producer thread is running (False without prefetch)."""
    return self._thread is not None and self._thread.is_alive()

  def close(self, timeout: float = 10.0) -> None:
    """Stops the producer thread and waits for it (idempotent)."""
    self._closed = True
    if self._thread is None:
      return
    self._stop.set()
    # Drain so that a producer blocked on put() wakes up.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close(timeout=1.0)
    except Exception:  # pylint: disable=broad-except
      pass


# ----------------------------------------------------------------------------
# Sources.


@functools.lru_cache(maxsize=4)
def _retina_source(size: int, val_fraction: float, downscale: int = 1):
  """(store, train regions, val regions) of the embedded retina image (cached: immutable).

  `downscale` > 1 area-downsamples the 1411 x 1411 photograph first (2: 705 x
  705, the resolution of the DRIVE / STARE fundus sets, where vessels are
  dense), rounded back to 8 bits as a stored photograph would be.
  """
  import skimage.data  # pylint: disable=g-import-not-at-top

  img = np.ascontiguousarray(skimage.data.retina()[..., :3]).astype(np.uint8)
  if downscale > 1:
    h, w = (img.shape[0] // downscale) * downscale, (img.shape[1] // downscale) * downscale
    small = deg_lib.area_downsample(img[:h, :w].astype(np.float32), downscale)
    img = np.clip(np.round(small), 0, 255).astype(np.uint8)
  h, w = img.shape[:2]
  split = h - int(round(val_fraction * h))
  train = _make_region(0, img, 0, split, w, size, _RETINA_MIN_FOREGROUND)
  # Validation crops are held to a stricter standard (mostly fundus) so that
  # the validation numbers are about the retina, not the background.
  val = _make_region(0, img, split, h, w, size, 0.9)
  if train is None or val is None:
    raise ValueError(f"data.hr_size={size} is too large for the retina image "
                     f"({h}x{w}) with data.val_fraction={val_fraction}")
  return _ImageStore(arrays={0: img}), [train], [val]


def _list_files(root: str, extensions: Sequence[str]) -> list[str]:
  exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(exts) and not f.startswith("."):
        out.append(os.path.join(dirpath, f))
  return sorted(out)


def _png_loses_bits(path: str) -> bool:
  """True for a 16-bit colour (or gray + alpha) PNG: Pillow decodes it to 8 bits."""
  if not path.lower().endswith(".png"):
    return False
  with open(path, "rb") as f:
    head = f.read(26)
  # Signature (8), IHDR length (4) + type (4), width (4), height (4), depth, colour type.
  return (len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16
          and head[25] in (2, 4, 6))


def _read_header(path: str) -> tuple[int, int, int]:
  """(height, width, bytes per decoded RGB pixel) from the file header only."""
  if path.lower().endswith(_TIFF):
    import tifffile  # pylint: disable=g-import-not-at-top
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      # A zero-cost view with the page's shape, oriented like load_image's.
      shape = _tiff_to_hwc(np.broadcast_to(np.zeros((), np.uint8), page.shape)).shape
      deep = np.dtype(page.dtype).itemsize > 1
    return int(shape[0]), int(shape[1]), (6 if deep else 3)

  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    w, h = im.size
    deep = im.mode.startswith("I") or im.mode.startswith("F")
  return h, w, (6 if deep else 3)


def _folder_source(root: str, size: int, val_fraction: float, extensions,
                   cache_bytes: int, stats: DataStats):
  """(store, train regions, val regions) of a folder of images."""
  if not os.path.isdir(root):
    raise ValueError(f"data.dir={root!r} is not a directory")
  files = _list_files(root, extensions)
  stats.files_found = len(files)
  if not files:
    raise ValueError(f"data.dir={root!r} contains no image files with extensions "
                     f"{tuple(extensions)} (searched recursively)")
  # Headers only: cheap, and the same answer in every process.
  paths, shapes = [], []
  for path in files:
    try:
      h, w, bpp = _read_header(path)
    except Exception as e:  # pylint: disable=broad-except
      stats.skipped.append((path, f"{type(e).__name__}: {e}"))
      continue
    if h < size or w < size:
      stats.skipped.append((path, f"smaller than one {size}x{size} crop ({h}x{w})"))
      continue
    if _png_loses_bits(path):
      stats.reduced_precision.append(path)
    paths.append(path)
    shapes.append((h, w, bpp))
  if stats.reduced_precision:
    logging.warning(
        "data.dir=%r: %d 16-bit colour PNG file(s) are decoded at 8-bit precision "
        "(a Pillow limitation), e.g. %s; save them as 16-bit TIFF to keep 16 bits",
        root, len(stats.reduced_precision), stats.reduced_precision[0])
  total = sum(h * w * bpp for h, w, bpp in shapes)
  stats.lazy = total > cache_bytes
  arrays = None
  if not stats.lazy:
    # Small enough to hold: decode everything now, so broken files are found
    # (and counted) before training starts.
    arrays, kept, kept_shapes = {}, [], []
    for path, shp in zip(paths, shapes):
      try:
        img = load_image(path)
      except Exception as e:  # pylint: disable=broad-except
        stats.skipped.append((path, f"{type(e).__name__}: {e}"))
        continue
      arrays[len(kept)] = img
      kept.append(path)
      kept_shapes.append(img.shape[:2] + (shp[2],))
    paths, shapes = kept, kept_shapes
  stats.files_read = len(paths)
  stats.files_skipped = len(stats.skipped)
  if stats.skipped:
    shown = "; ".join(f"{p} ({why})" for p, why in stats.skipped[:20])
    more = f" and {len(stats.skipped) - 20} more" if len(stats.skipped) > 20 else ""
    logging.warning("data.dir=%r: skipped %d of %d image files: %s%s", root,
                    stats.files_skipped, stats.files_found, shown, more)
  if not paths:
    raise ValueError(f"data.dir={root!r}: none of the {len(files)} image files could be "
                     f"used ({stats.files_skipped} unreadable or smaller than "
                     f"{size}x{size}); first: {stats.skipped[0][0]} "
                     f"({stats.skipped[0][1]})")
  store = _ImageStore(arrays=arrays, paths=paths, cache_bytes=cache_bytes, stats=stats)
  if len(paths) == 1:
    h, w, _ = shapes[0]
    split = h - max(size, int(round(val_fraction * h)))
    if split < size:
      raise ValueError(f"data.dir={root!r}: a single image of {h}x{w} is too small to "
                       f"hold out a validation band and still crop {size}x{size} training "
                       "crops; add images or lower data.hr_size")
    return (store, [_make_region(0, None, 0, split, w, size, 0.0)],
            [_make_region(0, None, split, h, w, size, 0.0)])
  # Whole files held out: every 10th (sorted order), at least one.
  val_idx = set(range(9, len(paths), 10)) or {len(paths) - 1}
  train = [_make_region(i, None, 0, h, w, size, 0.0)
           for i, (h, w, _) in enumerate(shapes) if i not in val_idx]
  val = [_make_region(i, None, 0, h, w, size, 0.0)
         for i, (h, w, _) in enumerate(shapes) if i in val_idx]
  return store, train, val


def make_datasets(data_config, *, batch_size_per_process: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  flips: bool = True) -> Datasets:
  """Builds the training iterator factory and the validation batch.

  Args:
    data_config: ml_collections ConfigDict (or dict) with fields `dir` ("" for
      the embedded retina), optional `source` ("retina" | "folder"),
      `hr_size` (or `image_size`, default 64), `scale` (4), `num_val` (or
      `val_size`, 16), `val_fraction` (0.2), `prefetch` (2), `extensions`,
      `cache_bytes` (folder images held in memory, 1 GiB), the degradation
      `blur_sigma` (0), `noise_level` (0), `lr_bits` (0) and
      `retina_downscale` (1, the embedded source only).
    batch_size_per_process: samples each process gets per step.
    seed: training data seed (crop positions and flips).
    process_index / process_count: this process and the number of processes;
      the global batch is `process_count * batch_size_per_process`.
    flips: random horizontal / vertical flips of training crops.

  Returns:
    `Datasets(train_iter, val, stats)`.

  Raises:
    ValueError: naming the field for a bad setting, `data.dir` when the folder
      is missing, empty or holds no usable image.
  """
  size = int(_cfg(data_config, ("hr_size", "image_size"), 64))
  scale = int(_cfg(data_config, ("scale",), 4))
  num_val = int(_cfg(data_config, ("num_val", "val_size"), 16))
  val_fraction = float(_cfg(data_config, ("val_fraction",), 0.2))
  prefetch = int(_cfg(data_config, ("prefetch",), 2))
  root = _cfg(data_config, ("dir",), "") or ""
  source = _cfg(data_config, ("source",), None) or ("folder" if root else "retina")
  extensions = _cfg(data_config, ("extensions",), DEFAULT_EXTENSIONS)
  if isinstance(extensions, str):  # "png,jpg" from the command line
    extensions = [e.strip() for e in extensions.split(",") if e.strip()]
  extensions = tuple(extensions)
  if not extensions or not all(isinstance(e, str) and e.strip(".") for e in extensions):
    raise ValueError(f"data.extensions must be non-empty file extensions, got {extensions!r}")
  cache_bytes = int(_cfg(data_config, ("cache_bytes",), DEFAULT_CACHE_BYTES))
  degradation = deg_lib.check(deg_lib.Degradation(
      scale=scale,
      blur_sigma=_cfg(data_config, ("blur_sigma",), 0.0),
      noise_level=_cfg(data_config, ("noise_level",), 0.0),
      lr_bits=_cfg(data_config, ("lr_bits",), 0)))
  downscale = _cfg(data_config, ("retina_downscale",), 1)
  if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
    raise ValueError(f"data.retina_downscale must be an int >= 1, got {downscale!r}")

  if size < 1 or scale < 1 or size % scale:
    raise ValueError(f"data.hr_size={size} must be a positive multiple of data.scale={scale}")
  if num_val < 1:
    raise ValueError(f"data.num_val must be >= 1, got {num_val}")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  if prefetch < 0:
    raise ValueError(f"data.prefetch must be >= 0, got {prefetch}")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process must be >= 1, got {batch_size_per_process}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")

  stats = DataStats(source=source)
  if source == "retina":
    store, train_regions, val_regions = _retina_source(size, val_fraction, downscale)
  elif source == "folder":
    # data.retina_downscale is an option of the embedded photograph (as
    # data.extensions is one of folders): a folder's images keep their size.
    if not root:
      raise ValueError("data.source='folder' needs data.dir (a folder of PNG/JPEG/TIFF)")
    store, train_regions, val_regions = _folder_source(root, size, val_fraction, extensions,
                                                       cache_bytes, stats)
  else:
    raise ValueError(f"data.source must be 'retina' or 'folder', got {source!r}")
  stats.train_images = len(train_regions)
  stats.val_images = len(val_regions)

  val_specs = _plan(np.random.default_rng(_VAL_SEED), val_regions, size, num_val, flips=False)
  val = _extract(store, val_regions, val_specs, size, degradation,
                 f"data.dir={root!r} (validation)" if root else "retina",
                 [(_VAL_SEED, k) for k in range(num_val)])

  global_batch = batch_size_per_process * process_count
  lo = process_index * batch_size_per_process
  hi = lo + batch_size_per_process

  def plan_step(step: int) -> list[SampleSpec]:
    """This process's sample specs at `step` (slice of the global plan)."""
    rng = np.random.default_rng([int(seed), int(step)])
    return _plan(rng, train_regions, size, global_batch, flips=flips, lo=lo, hi=hi)

  def make_batch(step: int) -> Batch:
    return _extract(store, train_regions, plan_step(step), size, degradation,
                    f"data.dir={root!r} (training)" if root else "retina",
                    [(int(seed), int(step), k) for k in range(lo, hi)])

  def train_iter(start_step: int = 0) -> BatchIterator:
    if int(start_step) < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    return BatchIterator(make_batch, int(start_step), prefetch)

  # For tests / debugging: where samples come from.
  train_iter.plan_step = plan_step  # type: ignore[attr-defined]
  train_iter.val_specs = val_specs  # type: ignore[attr-defined]
  train_iter.train_regions = [(r.image, r.row0, r.row1) for r in train_regions]  # type: ignore
  train_iter.val_regions = [(r.image, r.row0, r.row1) for r in val_regions]  # type: ignore
  return Datasets(train_iter=train_iter, val=val, stats=stats)
