"""Images/s of the training input pipeline on a folder of 512x512 fundus JPEGs.

Writes `--images` 512x512 JPEGs (quality 90) cut from `skimage.data.retina()` to a temporary
folder, then times the training iterator of `make_datasets` (JPEG decode + crop + flips +
degradation + batching) with `data.num_workers` = 0, 1 and 2. `data.cache_bytes=0` decodes a
file for every sample, as with a folder too large to hold (EyeQ). The time to the first batch
(worker start-up) is reported apart and not counted in images/s.

    python benchmarks/bench_input.py                    # the run of benchmarks/README.md
    python benchmarks/bench_input.py --batches 8 --workers 0   # smoke run

Run against a checkout without `train/input_pipeline.py` (the hand-written pipeline of
`train/data.py`: one prefetch thread) with `PYTHONPATH=<checkout>`; `--workers` is then ignored.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

# `train` runs from the checkout (it is not installed): put the checkout first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

# By file, not by import: an editable install of another checkout can resolve a missing module.
GRAIN = os.path.exists(os.path.join(os.path.dirname(train.__file__), "input_pipeline.py"))
if GRAIN:
  from train import input_pipeline as pipeline  # pylint: disable=g-import-not-at-top
else:  # the hand-written pipeline (before grain)
  from train import data as pipeline  # pylint: disable=g-import-not-at-top


def write_jpegs(folder: str, n: int, size: int = 512, seed: int = 0) -> None:
  """`n` JPEGs of `size` x `size`: random crops of the fundus photograph, each resized."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  retina = Image.fromarray(skimage.data.retina()[..., :3])
  rng = np.random.default_rng(seed)
  for i in range(n):
    side = int(rng.integers(700, 1411))
    y, x = (int(v) for v in rng.integers(0, 1411 - side + 1, 2))
    crop = retina.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    crop.save(os.path.join(folder, f"fundus_{i:04d}.jpg"), quality=90)


def measure(folder: str, *, workers: int, batch: int, hr_size: int, batches: int,
            repeats: int) -> tuple[float, float]:
  """`(images/s median over repeats, seconds to the first batch)`."""
  cfg = ml_collections.ConfigDict(dict(
      dir=folder, hr_size=hr_size, scale=4, num_val=4, prefetch=2, cache_bytes=0,
      blur_sigma=1.6, noise_level=5.0, lr_bits=8))
  if GRAIN:
    cfg.num_workers = workers
  ds = pipeline.make_datasets(cfg, batch_size_per_process=batch, seed=0)
  it = ds.train_iter(0)
  try:
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
      t = time.perf_counter()
      for _ in range(batches):
        next(it)
      rates.append(batches * batch / (time.perf_counter() - t))
  finally:
    it.close()
  return statistics.median(rates), first


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--hr_size", type=int, default=128)
  p.add_argument("--batches", type=int, default=60, help="batches timed per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workers", default="0,1,2")
  a = p.parse_args()
  workers = [int(w) for w in a.workers.split(",")] if GRAIN else [None]
  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, a.images)
    print(f"{a.images} JPEGs 512x512 q90, batch {a.batch}, {a.hr_size}px crops, x4 with "
          f"blur 1.6 / noise 5 / 8 bits, decode per sample (cache_bytes=0); "
          f"{a.repeats} x {a.batches} batches")
    print(f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()}")
    for w in workers:
      rate, first = measure(folder, workers=w or 0, batch=a.batch, hr_size=a.hr_size,
                            batches=a.batches, repeats=a.repeats)
      name = f"grain, num_workers={w}" if GRAIN else "hand-written (prefetch thread)"
      assert pipeline.__file__.startswith(os.path.dirname(train.__file__))
      print(f"{name:32s} {rate:8.1f} images/s   first batch {first:6.2f} s")


if __name__ == "__main__":
  main()
