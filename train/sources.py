"""Image sources of the super-resolution data: decoding, the retina photograph, folders.

A source is `(store, train regions, val regions)`: an `ImageStore` (pixels by
key, uint8 / uint16 `[H, W, 3]`) and the rectangles crops may be cut from.
`train.input_pipeline` plans crops in these regions and builds the batches.

- embedded (`retina_source`): the retinal fundus photograph
  `skimage.data.retina()` (1411 x 1411 RGB, shipped with scikit-image, no
  download), optionally area-downscaled by `data.retina_downscale` first. The
  bottom `val_fraction` of the rows is a held-out region: training crops lie
  entirely above it, validation crops entirely inside it, so they never share
  a pixel. Crops are drawn only where at least half of the crop is fundus (not
  black background).
- folder (`folder_source`): PNG / JPEG / TIFF files found recursively (sorted
  paths). Grayscale -> RGB, RGBA / LA -> RGB (alpha dropped), 8- and 16-bit.
  Files that cannot be decoded or are smaller than one crop are skipped AND
  counted in `stats` (with a warning naming them). With two or more images,
  whole files are held out for validation (every 10th file, at least one);
  with one image, the bottom band of rows is held out as for the retina.
- DICOM (`dicom_source`, `data.source="dicom"`): a folder of `.dcm` files
  (found recursively), e.g. MR or CT slices as a scanner or PACS exports
  them. Each file's stored values (8-16 bit, signed or not) are mapped to
  physical values with RescaleSlope / RescaleIntercept, then windowed to
  [0, 1] (`data.dicom_window`: "header" uses the file's first WindowCenter /
  WindowWidth and falls back to "percentile", the 0.5 - 99.5 % percentiles of
  the slice), MONOCHROME1 inverted, kept as uint16 gray replicated to RGB.
  Multi-frame files give one image per frame. Every slice holds out the band
  of rows `[h / 2, h / 2 + val_fraction h)` (the middle, where the anatomy is;
  the retina's bottom band would be background in an axial slice): training
  crops lie entirely above or below it, validation crops inside it. Crops are
  drawn where at least half of the crop is body (validation: 90 %), as for
  the retina. Unreadable files, colour images and slices smaller than a crop
  are skipped and counted, with a warning naming them.

Memory: a folder whose decoded pixels fit in `data.cache_bytes` (1 GiB) is
decoded once at start and held as uint8 / uint16. A larger folder (EyeQ, say)
is only scanned for headers at start; each process then decodes just the files
its own samples need, with an LRU cache of `cache_bytes`. A file that fails to
decode only then is skipped, counted and warned about when first needed.

An `ImageStore` sent to an input worker process (pickled) carries the file
paths, not the decoded folder images: each worker decodes the files its
samples need, with its own LRU cache of `cache_bytes`. The embedded photograph
(no file) travels as pixels. A file that fails to decode only in a worker is
warned about in that worker's log and counted in the worker's copy of `stats`,
not in the training process's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import threading
from typing import NamedTuple, Sequence

import numpy as np

from train import degradations as deg_lib

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Fraction of a retina crop that must be fundus (not the black background).
_RETINA_MIN_FOREGROUND = 0.5
_RETINA_FOREGROUND_LEVEL = 20  # uint8 gray level separating fundus from background
# Folders whose decoded pixels fit are decoded at start (broken files found
# before training); larger ones are decoded on demand with an LRU cache this big.
DEFAULT_CACHE_BYTES = 1 << 30


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



class Region(NamedTuple):
  """A rectangle of rows `[row0, row1)` of one image that crops may come from."""
  image: int  # key of the image in the ImageStore
  row0: int
  row1: int
  width: int
  # Flat indices (y * (width - size + 1) + x, y relative to row0) of allowed
  # crop corners, or None when every corner is allowed.
  corners: np.ndarray | None


class Unreadable(Exception):
  """An image file failed to decode when it was first needed."""


class ImageStore:
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

  def __getstate__(self):
    # To an input worker: decoded files would be copied to every worker at its
    # start; their paths are enough (each worker decodes what it needs).
    state = dict(self.__dict__)
    state["_arrays"] = {k: v for k, v in self._arrays.items() if k >= len(self._paths)}
    state["_cache"] = collections.OrderedDict()
    state["_held"] = 0
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def get(self, key: int) -> np.ndarray:
    if key in self._arrays:
      return self._arrays[key]
    with self._lock:
      if key in self._bad:
        raise Unreadable(self._bad[key])
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
      raise Unreadable(why) from e
    with self._lock:
      self._cache[key] = img
      self._held += img.nbytes
      while self._held > self._cache_bytes and len(self._cache) > 1:
        _, old = self._cache.popitem(last=False)
        self._held -= old.nbytes
    return img



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


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 / uint16 -> float32 in [-1, 1]."""
  full = 255.0 if pixels.dtype == np.uint8 else 65535.0
  return pixels.astype(np.float32) * np.float32(2.0 / full) - np.float32(1.0)



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


def make_region(key: int, image: np.ndarray | None, row0: int, row1: int, width: int,
                 size: int, min_fraction: float) -> Region | None:
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
  return Region(key, row0, row1, width, corners)



@functools.lru_cache(maxsize=4)
def retina_source(size: int, val_fraction: float, downscale: int = 1):
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
  train = make_region(0, img, 0, split, w, size, _RETINA_MIN_FOREGROUND)
  # Validation crops are held to a stricter standard (mostly fundus) so that
  # the validation numbers are about the retina, not the background.
  val = make_region(0, img, split, h, w, size, 0.9)
  if train is None or val is None:
    raise ValueError(f"data.hr_size={size} is too large for the retina image "
                     f"({h}x{w}) with data.val_fraction={val_fraction}")
  return ImageStore(arrays={0: img}), [train], [val]


def _list_files(root: str, extensions: Sequence[str]) -> list[str]:
  exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(exts) and not f.startswith("."):
        out.append(os.path.join(dirpath, f))
  return sorted(out)


def _folder_files(root: str, extensions: Sequence[str], stats: "DataStats", *,
                  kind: str) -> list[str]:
  """The files of folder `root` (data.dir) with `extensions`, counted in `stats`.

  Raises:
    ValueError naming `data.dir` when it is not a directory or holds no such file.
  """
  if not os.path.isdir(root):
    raise ValueError(f"data.dir={root!r} is not a directory")
  files = _list_files(root, extensions)
  stats.files_found = len(files)
  if not files:
    raise ValueError(f"data.dir={root!r} contains no {kind} files with extensions "
                     f"{tuple(extensions)} (searched recursively)")
  return files


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


def folder_source(root: str, size: int, val_fraction: float, extensions,
                   cache_bytes: int, stats: DataStats):
  """(store, train regions, val regions) of a folder of images."""
  files = _folder_files(root, extensions, stats, kind="image")
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
  store = ImageStore(arrays=arrays, paths=paths, cache_bytes=cache_bytes, stats=stats)
  if len(paths) == 1:
    h, w, _ = shapes[0]
    split = h - max(size, int(round(val_fraction * h)))
    if split < size:
      raise ValueError(f"data.dir={root!r}: a single image of {h}x{w} is too small to "
                       f"hold out a validation band and still crop {size}x{size} training "
                       "crops; add images or lower data.hr_size")
    return (store, [make_region(0, None, 0, split, w, size, 0.0)],
            [make_region(0, None, split, h, w, size, 0.0)])
  # Whole files held out: every 10th (sorted order), at least one.
  val_idx = set(range(9, len(paths), 10)) or {len(paths) - 1}
  train = [make_region(i, None, 0, h, w, size, 0.0)
           for i, (h, w, _) in enumerate(shapes) if i not in val_idx]
  val = [make_region(i, None, 0, h, w, size, 0.0)
         for i, (h, w, _) in enumerate(shapes) if i in val_idx]
  return store, train, val




DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_WINDOWS = ("header", "percentile")


def _first(value) -> float:
  """A DICOM value that may be multi-valued (e.g. two windows): the first, as float."""
  try:
    return float(value[0])
  except TypeError:
    return float(value)


def load_dicom(path: str, *, window: str = "header") -> list[np.ndarray]:
  """Decodes one DICOM file to windowed uint16 `[H, W, 3]` images (one per frame).

  Stored values -> RescaleSlope * v + RescaleIntercept (physical units, e.g.
  Hounsfield for CT) -> window [c - w / 2, c + w / 2] -> [0, 65535], gray
  replicated to three channels (the trainer's images are RGB).

  Args:
    path: a DICOM file.
    window: "header" (the file's first WindowCenter / WindowWidth; the
      percentiles when it has none) or "percentile" (0.5 - 99.5 % of each frame).

  Raises:
    ValueError: a colour (SamplesPerPixel > 1) or empty image, or a bad `window`;
    pydicom's errors for files that are not DICOM or hold no pixel data.
  """
  if window not in DICOM_WINDOWS:
    raise ValueError(f"data.dicom_window must be one of {DICOM_WINDOWS}, got {window!r}")
  import pydicom  # pylint: disable=g-import-not-at-top

  ds = pydicom.dcmread(path)
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise ValueError(f"colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}); only "
                     "grayscale slices are supported")
  raw = np.asarray(ds.pixel_array)
  frames = raw if raw.ndim == 3 else raw[None]
  if frames.ndim != 3 or frames.size == 0:
    raise ValueError(f"unexpected pixel array shape {raw.shape}")
  slope = float(ds.get("RescaleSlope", 1) or 1)
  intercept = float(ds.get("RescaleIntercept", 0) or 0)
  centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
  out = []
  for frame in frames:
    v = frame.astype(np.float64) * slope + intercept
    if window == "header" and centre is not None and width is not None \
        and _first(width) > 0:
      lo = _first(centre) - _first(width) / 2
      hi = lo + _first(width)
    else:
      lo, hi = np.percentile(v, [0.5, 99.5])
      if hi <= lo:  # a constant slice
        hi = lo + 1.0
    x = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
      x = 1.0 - x  # MONOCHROME1: low values are white
    out.append(_to_rgb(np.round(x * 65535.0).astype(np.uint16)))
  return out


def _band_regions(key: int, img: np.ndarray, size: int, val_fraction: float):
  """Training regions above / below the held-out middle band, and the band."""
  h, w = img.shape[:2]
  v0 = h // 2
  v1 = min(h, v0 + max(size, int(round(val_fraction * h))))
  train = [r for r in (make_region(key, img, 0, v0, w, size, _RETINA_MIN_FOREGROUND),
                       make_region(key, img, v1, h, w, size, _RETINA_MIN_FOREGROUND))
           if r is not None]
  val = make_region(key, img, v0, v1, w, size, 0.9)
  return train, val


def dicom_source(root: str, size: int, val_fraction: float, stats: DataStats, *,
                 window: str = "header"):
  """(store, train regions, val regions) of a folder of DICOM slices (module docstring).

  Raises:
    ValueError naming `data.dir` when the folder is missing, holds no `.dcm`
    file or no usable slice, `data.dicom_window` for a bad window mode.
  """
  if window not in DICOM_WINDOWS:
    raise ValueError(f"data.dicom_window must be one of {DICOM_WINDOWS}, got {window!r}")
  files = _folder_files(root, DICOM_EXTENSIONS, stats, kind="DICOM")
  arrays, train, val = {}, [], []
  for path in files:
    try:
      frames = load_dicom(path, window=window)
    except Exception as e:  # pylint: disable=broad-except
      stats.skipped.append((path, f"{type(e).__name__}: {e}"))
      continue
    used = False
    for img in frames:
      h, w = img.shape[:2]
      if w < size or h // 2 < size or h - h // 2 < size:
        # The band split leaves a crop's worth of rows above and inside it.
        stats.skipped.append((path, f"a frame of {h}x{w} is too small for {size}x{size} "
                              "crops above and inside the held-out band"))
        continue
      key = len(arrays)
      t, v = _band_regions(key, img, size, val_fraction)
      if not t or v is None:
        stats.skipped.append((path, f"no room for {size}x{size} crops ({h}x{w})"))
        continue
      arrays[key] = img
      train += t
      val.append(v)
      used = True
    stats.files_read += int(used)
  stats.files_skipped = len(stats.skipped)
  if stats.skipped:
    shown = "; ".join(f"{p} ({why})" for p, why in stats.skipped[:20])
    logging.warning("data.dir=%r: skipped %d DICOM file(s) or frame(s): %s", root,
                    stats.files_skipped, shown)
  if not arrays:
    raise ValueError(f"data.dir={root!r}: none of the {len(files)} DICOM files could be "
                     f"used; first: {stats.skipped[0][0]} ({stats.skipped[0][1]})")
  return ImageStore(arrays=arrays), train, val
