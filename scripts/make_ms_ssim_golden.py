"""Regenerates tests/fixtures/ms_ssim_golden.npz from pytorch-msssim.

The golden values are computed by an established implementation,
pytorch-msssim (`pytorch_msssim.ms_ssim`), in float64 on crops of the retinal
fundus image shipped with scikit-image (`skimage.data.retina()`), with
Gaussian noise of a fixed seed. Only crop coordinates, noise seeds and the
resulting values are stored; the test rebuilds the images.

pytorch-msssim builds its window in float32 even for float64 inputs; its
kernel sum then differs from 1 by ~1e-7, which biases E[x^2] - E[x]^2 by
~1e-7 on bright channels (2e-5 in SSIM against C2 = 9e-4). We pass the same
window built in float64 (`win=`), which makes its single-scale SSIM agree
with skimage to 1e-14.

Usage (needs torch and pytorch-msssim, the "bench" extra):
    python scripts/make_ms_ssim_golden.py [--out tests/fixtures/ms_ssim_golden.npz]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

# (name, (height, width), crop rows/cols of pair 0 and 1, noise std,
#  window_size, weights or None for the default five levels, data_range)
CASES = (
    ("default_even", (176, 192), ((500, 400), (700, 300)), 0.05, 11, None,
     1.0),
    ("default_odd", (171, 183), ((420, 610), (880, 520)), 0.08, 11, None,
     1.0),
    # pytorch-msssim asserts side > (win - 1) * 16 whatever the levels.
    ("three_levels_w7", (97, 101), ((650, 650), (300, 700)), 0.03, 7,
     (0.2, 0.5, 0.3), 1.0),
    ("range_255", (161, 165), ((600, 300), (640, 900)), 0.04, 11, None,
     255.0),
)


def make_pair(shape, crops, noise, seed, scale):
  """Two image pairs `[2, H, W, 3]` float64 from retina() crops."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  img = data.retina().astype(np.float64) / 255.0
  h, w = shape
  rng = np.random.default_rng(seed)
  xs = np.stack([img[r:r + h, c:c + w] for r, c in crops])
  ys = np.clip(xs + rng.normal(0.0, noise, xs.shape), 0.0, 1.0)
  return xs * scale, ys * scale


def gaussian64(size, sigma=1.5):
  coords = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-(coords ** 2) / (2 * sigma ** 2))
  return g / g.sum()


def main():
  import torch  # pylint: disable=g-import-not-at-top
  import pytorch_msssim  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument("--out", default=os.path.join(
      here, "..", "tests", "fixtures", "ms_ssim_golden.npz"))
  args = parser.parse_args()
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"pytorch_msssim_version": np.asarray(
      metadata.version("pytorch-msssim"))}
  for seed, (name, shape, crops, noise, ws, weights, scale) in enumerate(
      CASES):
    xs, ys = make_pair(shape, crops, noise, seed, scale)
    win = torch.tensor(gaussian64(ws)).reshape(1, 1, ws).repeat(3, 1, 1, 1)
    to_t = lambda a: torch.tensor(a).permute(0, 3, 1, 2).double()
    vals = pytorch_msssim.ms_ssim(
        to_t(xs), to_t(ys), data_range=scale, size_average=False, win=win,
        weights=None if weights is None else list(weights)).numpy()
    out[name] = vals.astype(np.float64)
    print(name, vals)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez(args.out, **out)
  print("wrote", os.path.normpath(args.out))


if __name__ == "__main__":
  main()
