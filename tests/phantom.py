"""A synthetic CT-like phantom: ellipsoids of different intensity in air.

Used by the 3-D SSIM tests, `scripts/make_figures.py` and
`benchmarks/bench_ssim3d.py`, so that every volume is made by the project
(deterministic, no downloads).
"""

import numpy as np

# (centre z, y, x), (semi-axes z, y, x) in [-1, 1] coordinates, intensity.
# Painted in order, later ellipsoids replace earlier ones.
_ELLIPSOIDS = (
    ((0.0, 0.0, 0.0), (0.85, 0.75, 0.9), 0.55),     # body (soft tissue)
    ((0.05, -0.1, -0.4), (0.5, 0.35, 0.25), 0.25),  # lung-like, darker
    ((0.05, -0.1, 0.4), (0.5, 0.35, 0.25), 0.25),
    ((-0.1, 0.25, 0.1), (0.35, 0.2, 0.25), 0.7),    # organ, brighter
    ((0.0, 0.45, 0.0), (0.8, 0.12, 0.12), 1.0),     # spine-like (bone)
    ((0.3, -0.2, 0.15), (0.12, 0.1, 0.1), 0.85),    # small lesion
)


def phantom(shape, *, seed=None):
  """Ellipsoid phantom volume in [0, 1], air = 0.

  Args:
    shape: `(D, H, W)` voxels.
    seed: None for the plain phantom; an int jitters each ellipsoid's
      centre by up to 0.05 and its intensity by up to 0.05 (a second,
      different but similar volume).

  Returns:
    float32 `[D, H, W]`.
  """
  rng = None if seed is None else np.random.default_rng(seed)
  axes = [np.linspace(-1.0, 1.0, n) for n in shape]
  z, y, x = np.meshgrid(*axes, indexing="ij")
  vol = np.zeros(shape, np.float64)
  for centre, semi, value in _ELLIPSOIDS:
    c = np.asarray(centre)
    if rng is not None:
      c = c + rng.uniform(-0.05, 0.05, 3)
      value = float(np.clip(value + rng.uniform(-0.05, 0.05), 0.0, 1.0))
    r2 = (((z - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2
          + ((x - c[2]) / semi[2]) ** 2)
    vol[r2 <= 1.0] = value
  return vol.astype(np.float32)


def distort(vol, *, seed=0, noise=0.05):
  """Blur along W, add Gaussian noise, clip to [0, 1]: a 'restoration'
  output to compare with the phantom. float32, same shape."""
  rng = np.random.default_rng(seed)
  blurred = (np.roll(vol, 1, axis=-1) + vol + np.roll(vol, -1, axis=-1)) / 3
  out = blurred + noise * rng.normal(size=vol.shape)
  return np.clip(out, 0.0, 1.0).astype(np.float32)
