"""The training input pipeline on grain: crop plans -> samples -> batches, in worker processes.

Task: a high-resolution (HR) crop `[H, W, 3]` and its low-resolution (LR)
version `[H / scale, W / scale, 3]`, both float32 in [-1, 1]. The LR image is
made by `train.degradations.degrade`: optional Gaussian blur, AREA (box)
downsampling by `scale`, optional Gaussian noise and rounding to 8 bits
(`data.blur_sigma`, `data.noise_level`, `data.lr_bits`; all off by default,
which leaves the plain, exact area average). The images come from
`train.sources` (the embedded retina photograph or a folder).

Determinism and sharding: sample `k` of the GLOBAL batch at step `s` is a pure
function of `(seed, s, k)` (which image, where, which flips, its noise).
Process `p` of `P` builds only samples `[p * B, (p + 1) * B)` of each global
batch of `P * B`, so concatenating the process batches gives the same global
batch for any process count, and a run resumed at step `k` sees exactly the
batches an uninterrupted run sees from step `k`, with any `data.num_workers`.

The pipeline (grain): `MapDataset.range` over this process's sample indices
`j` (step `j // B`, sample `p * B + j % B`) -> our sample transform (crop plan
of the step, crop, flips, degradation) -> `batch(B)` -> `to_iter_dataset`
(`data.prefetch` batches built ahead by one thread; 0: built when asked) ->
`mp_prefetch` with `data.num_workers` worker processes (0: in this process),
each building whole batches (worker `w` of `n` builds every `n`-th batch).

What is ours, and why (grain does not do it):

- The crop plan. Samples are random crops of a few large images, regions
  weighted by their number of allowed crop corners; grain samples records.
- The per-process slice of every global batch. grain's sharding
  (`ShardByJaxProcess`) gives each process a contiguous part of the index
  space, which would not compose the global batch of one process.
- The step position (`TrainIterator`). grain's iterator state is the state of
  its worker layout: it cannot be restored with another `data.num_workers`,
  and with 2 or more workers it cannot seek to a step
  (`set_next_index` is not supported there). A `TrainIterator` knows its
  step; its state is grain's plus that step, so a checkpoint written with one
  worker count resumes with another (positioned by step, the same batches).

The state is saved with each orbax checkpoint by grain's checkpoint handler
(`grain.checkpoint.CheckpointSave`, one JSON file per process; see
`train/checkpoint.py`), and restored on resume.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, NamedTuple, Sequence

import grain
import numpy as np

from train import degradations as deg_lib
from train import sources

_VAL_SEED = 1234  # validation crops do not depend on the training seed
# The index space of a training run: "infinite" (2^40 steps).
_MAX_STEPS = 1 << 40


class Batch(NamedTuple):
  """Super-resolution pairs (host numpy arrays); one sample without the leading axis.

  Attributes:
    lowres: float32 `[B, H / scale, W / scale, 3]` in [-1, 1].
    highres: float32 `[B, H, W, 3]` in [-1, 1].
  """
  lowres: np.ndarray
  highres: np.ndarray


class Datasets(NamedTuple):
  """Returned by `make_datasets`.

  Attributes:
    train_iter: `train_iter(start_step=0) -> TrainIterator`, infinite, this
      process's shard of each global batch from `start_step` on.
    val: fixed validation `Batch` (the same in every process), `num_val` crops.
    stats: `sources.DataStats`.
  """
  train_iter: Callable[..., "TrainIterator"]
  val: Batch
  stats: sources.DataStats


class SampleSpec(NamedTuple):
  """Where one sample comes from (exposed for tests and debugging)."""
  region: int
  y: int  # absolute row of the crop's top edge in the image
  x: int
  flip_h: bool
  flip_v: bool


# ----------------------------------------------------------------------------
# Crop planning and samples.


def _region_probabilities(regions: Sequence[sources.Region], size: int) -> np.ndarray:
  """Regions in proportion to their valid corners: every allowed crop is equally likely."""
  weights = np.array([
      (r.corners.size if r.corners is not None
       else (r.row1 - r.row0 - size + 1) * (r.width - size + 1))
      for r in regions], np.float64)
  return weights / weights.sum()


def _plan(rng: np.random.Generator, regions: Sequence[sources.Region], size: int, n: int,
          *, flips: bool, p: np.ndarray, lo: int = 0, hi: int | None = None) -> list[SampleSpec]:
  """Draws `n` crop specs with `rng` (the same draws in every process).

  Only specs `[lo, hi)` are built: a process needs only its slice of the
  global batch, but draws the whole batch's random numbers to stay in step.
  """
  region_ids = rng.choice(len(regions), size=n, p=p)
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


def _crop(store: sources.ImageStore, regions: Sequence[sources.Region], s: SampleSpec,
          size: int, where: str) -> np.ndarray:
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
    except sources.Unreadable:
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


def _sample(store, regions, spec: SampleSpec, size: int, degradation: deg_lib.Degradation,
            where: str, noise_seed: Sequence[int]) -> Batch:
  """One HR crop `[H, W, 3]` and its LR image; `noise_seed` seeds its noise alone."""
  hr = sources.to_float(_crop(store, regions, spec, size, where))
  rngs = [np.random.default_rng(list(noise_seed))] if degradation.random else None
  return Batch(lowres=deg_lib.degrade(hr[None], degradation, rngs)[0], highres=hr)


class _TrainSamples:
  """Sample index `j` of this process -> `Batch` of one sample (grain's map transform).

  Pickled to each input worker process (with the image store's paths, not
  its decoded folder images).
  """

  def __init__(self, *, store, regions, size, degradation, seed, flips, per_process,
               global_batch, lo, where):
    self.store, self.regions, self.size = store, list(regions), int(size)
    self.degradation, self.seed, self.flips = degradation, int(seed), bool(flips)
    self.per_process, self.global_batch, self.lo = per_process, global_batch, lo
    self.where = where
    self.p = _region_probabilities(self.regions, self.size)
    self._last = (None, None)  # (step, plan): the B samples of a step share one plan

  def plan_step(self, step: int) -> list[SampleSpec]:
    """This process's sample specs at `step` (slice of the global plan)."""
    last_step, plan = self._last
    if last_step != step:
      rng = np.random.default_rng([self.seed, int(step)])
      plan = _plan(rng, self.regions, self.size, self.global_batch, flips=self.flips, p=self.p,
                   lo=self.lo, hi=self.lo + self.per_process)
      self._last = (step, plan)
    return plan

  def __call__(self, j) -> Batch:
    step, i = divmod(int(j), self.per_process)
    return _sample(self.store, self.regions, self.plan_step(step)[i], self.size,
                   self.degradation, self.where, (self.seed, step, self.lo + i))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_last"] = (None, None)
    return state


def _grain_flags_usable() -> None:
  """grain 0.2.18 reads the absl flag below when starting workers, whether or not
  absl flags were parsed (they are not when the trainer is a library: a notebook, a
  test); it then raises UnparsedFlagAccessError. Its default is what we want."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = "grain_enable_multiprocess_worker_profiling"
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
    flags.FLAGS[name].present = max(flags.FLAGS[name].present, 1)


def _batches(samples: _TrainSamples, origin: int, *, num_workers: int,
             prefetch: int) -> grain.IterDataset:
  """grain pipeline of this process's batches from step `origin`."""
  b = samples.per_process
  ds = grain.MapDataset.range(origin * b, _MAX_STEPS * b).map(samples).batch(b)
  if num_workers == 0:
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                                prefetch_buffer_size=prefetch))
  _grain_flags_usable()
  # Each worker builds its batches in turn; its buffer is the prefetch.
  in_worker = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return in_worker.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)))


class TrainIterator:
  """This process's training batches from a step on: grain's iterator and its step.

  `get_state()` / `set_state()` are what grain's orbax checkpoint handler
  saves and restores (JSON bytes: `step`, the step `origin` grain's state is
  relative to, `num_workers` and grain's own `state`). A state written with
  another `num_workers` is restored by step (the same batches; grain's state
  cannot move between worker layouts). `close()` stops the worker processes
  and prefetch thread; also a context manager.

  Attributes:
    step: the step of the batch the next `next()` returns.
  """

  def __init__(self, samples: _TrainSamples, start_step: int, *, num_workers: int,
               prefetch: int):
    self._samples, self._num_workers, self._prefetch = samples, num_workers, prefetch
    self._open(int(start_step))

  def _open(self, origin: int, grain_state: Any = None) -> None:
    self._origin = self.step = origin
    self._it = iter(_batches(self._samples, origin, num_workers=self._num_workers,
                             prefetch=self._prefetch))
    if grain_state is not None:
      self._it.set_state(grain_state)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      raise StopIteration  # closed
    batch = next(self._it)
    if self._num_workers:
      # Out of grain's shared memory: a batch kept after its iterator closes
      # (a test, export statistics) would otherwise pin and leak the segment.
      batch = Batch(*(np.array(x) for x in batch))
    self.step += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step, "origin": self._origin,
                       "num_workers": self._num_workers,
                       "state": self._it.get_state()}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if not isinstance(state, dict):
      state = json.loads(state)
    self.close()
    if state["num_workers"] == self._num_workers:
      self._open(int(state["origin"]), state["state"])
      self.step = int(state["step"])
    else:
      logging.info("data iterator state of data.num_workers=%s restored by step (%s) with "
                   "data.num_workers=%s", state["num_workers"], state["step"],
                   self._num_workers)
      self._open(int(state["step"]))

  def start_prefetch(self) -> None:
    """Starts building batches now (grain's handler calls it after a restore)."""
    start = getattr(self._it, "start_prefetch", None) if self._it is not None else None
    if start is not None:
      start()

  def close(self) -> None:
    """Stops grain's worker processes and threads (idempotent)."""
    if self._it is not None:
      # Dropped now, while the interpreter is whole: grain's iterators close
      # themselves again when collected, which fails at interpreter exit.
      self._it.close()
      self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------
# Config access (accepts both field spellings used in configs/).


def _cfg(config, names: Sequence[str], default):
  for name in names:
    if config is not None and name in config:
      return config[name]
  return default


def make_datasets(data_config, *, batch_size_per_process: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  flips: bool = True) -> Datasets:
  """Builds the training iterator factory and the validation batch.

  Args:
    data_config: ml_collections ConfigDict (or dict) with fields `dir` ("" for
      the embedded retina), optional `source` ("retina" | "folder"),
      `hr_size` (or `image_size`, default 64), `scale` (4), `num_val` (or
      `val_size`, 16), `val_fraction` (0.2), `prefetch` (2 batches),
      `num_workers` (0: batches built in this process), `extensions`,
      `cache_bytes` (folder images held in memory, 1 GiB), the degradation
      `blur_sigma` (0), `noise_level` (0), `lr_bits` (0) and
      `retina_downscale` (1, the embedded source only).
    batch_size_per_process: samples each process gets per step.
    seed: training data seed (crop positions, flips and noise).
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
  prefetch = _cfg(data_config, ("prefetch",), 2)
  num_workers = _cfg(data_config, ("num_workers",), 0)
  root = _cfg(data_config, ("dir",), "") or ""
  source = _cfg(data_config, ("source",), None) or ("folder" if root else "retina")
  extensions = _cfg(data_config, ("extensions",), sources.DEFAULT_EXTENSIONS)
  if isinstance(extensions, str):  # "png,jpg" from the command line
    extensions = [e.strip() for e in extensions.split(",") if e.strip()]
  extensions = tuple(extensions)
  if not extensions or not all(isinstance(e, str) and e.strip(".") for e in extensions):
    raise ValueError(f"data.extensions must be non-empty file extensions, got {extensions!r}")
  cache_bytes = int(_cfg(data_config, ("cache_bytes",), sources.DEFAULT_CACHE_BYTES))
  degradation = deg_lib.check(deg_lib.Degradation(
      scale=scale,
      blur_sigma=_cfg(data_config, ("blur_sigma",), 0.0),
      noise_level=_cfg(data_config, ("noise_level",), 0.0),
      lr_bits=_cfg(data_config, ("lr_bits",), 0),
      kind=_cfg(data_config, ("degradation",), "camera")))
  downscale = _cfg(data_config, ("retina_downscale",), 1)
  for name, v in (("retina_downscale", downscale), ("prefetch", prefetch),
                  ("num_workers", num_workers)):
    lowest = 1 if name == "retina_downscale" else 0
    if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
      raise ValueError(f"data.{name} must be an int >= {lowest}, got {v!r}")

  if size < 1 or scale < 1 or size % scale:
    raise ValueError(f"data.hr_size={size} must be a positive multiple of data.scale={scale}")
  if num_val < 1:
    raise ValueError(f"data.num_val must be >= 1, got {num_val}")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process must be >= 1, got {batch_size_per_process}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")

  stats = sources.DataStats(source=source)
  if source == "retina":
    store, train_regions, val_regions = sources.retina_source(size, val_fraction, downscale)
  elif source == "folder":
    # data.retina_downscale is an option of the embedded photograph (as
    # data.extensions is one of folders): a folder's images keep their size.
    if not root:
      raise ValueError("data.source='folder' needs data.dir (a folder of PNG/JPEG/TIFF)")
    store, train_regions, val_regions = sources.folder_source(root, size, val_fraction,
                                                              extensions, cache_bytes, stats)
  elif source == "dicom":
    if not root:
      raise ValueError("data.source='dicom' needs data.dir (a folder of .dcm files)")
    store, train_regions, val_regions = sources.dicom_source(
        root, size, val_fraction, stats,
        window=_cfg(data_config, ("dicom_window",), "header"))
  else:
    raise ValueError(f"data.source must be 'retina', 'folder' or 'dicom', got {source!r}")
  stats.train_images = len(train_regions)
  stats.val_images = len(val_regions)

  val_specs = _plan(np.random.default_rng(_VAL_SEED), val_regions, size, num_val, flips=False,
                    p=_region_probabilities(val_regions, size))
  where = f"data.dir={root!r}" if root else "retina"
  val_samples = [_sample(store, val_regions, s, size, degradation, f"{where} (validation)",
                         (_VAL_SEED, k)) for k, s in enumerate(val_specs)]
  val = Batch(*(np.stack(x) for x in zip(*val_samples)))

  samples = _TrainSamples(
      store=store, regions=train_regions, size=size, degradation=degradation, seed=seed,
      flips=flips, per_process=batch_size_per_process,
      global_batch=batch_size_per_process * process_count,
      lo=process_index * batch_size_per_process, where=f"{where} (training)")

  def train_iter(start_step: int = 0) -> TrainIterator:
    if int(start_step) < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    return TrainIterator(samples, int(start_step), num_workers=num_workers, prefetch=prefetch)

  # For tests / debugging: where samples come from.
  train_iter.plan_step = samples.plan_step  # type: ignore[attr-defined]
  train_iter.val_specs = val_specs  # type: ignore[attr-defined]
  train_iter.train_regions = [(r.image, r.row0, r.row1) for r in train_regions]  # type: ignore
  train_iter.val_regions = [(r.image, r.row0, r.row1) for r in val_regions]  # type: ignore
  return Datasets(train_iter=train_iter, val=val, stats=stats)
