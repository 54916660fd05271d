"""How a low-resolution (LR) image is made from a high-resolution (HR) crop.

The super-resolution task of the trainer is a classical first-order
degradation of the SR literature (the blur -> downsample -> noise -> 8-bit
chain that BSRGAN and Real-ESRGAN sample at random, here with one fixed
setting so that every number is reproducible):

  1. Gaussian blur of the HR crop, std `blur_sigma` HR pixels (0: none),
     reflected at the crop border (the optics of a fundus camera);
  2. area (box) downsampling by `scale`: the mean of each `scale x scale`
     block (the sensor's pixel integration; alias-free);
  3. additive Gaussian noise, std `noise_level` 8-bit grey levels (of 255)
     in every channel (sensor noise), drawn per sample from a generator the
     caller seeds, so batches are a pure function of (seed, step, sample);
  4. rounding to `lr_bits` bits (0: keep float32), as an 8-bit file stores it.

All images are float32 in [-1, 1] (one 8-bit level is 2 / 255 there).

`kind="mri"` (`data.degradation="mri"`) is the low-resolution acquisition of
MR instead (a scanner does not blur then sample pixels; it samples k-space):

  1. optional Gaussian blur `blur_sigma` as above (0 by default);
  2. k-space truncation by `scale`: the crop's 2-D Fourier transform keeps
     only its central `H / scale x W / scale` frequencies (fewer phase and
     frequency encodes) and is transformed back at that size; the magnitude
     is kept, as MR images are magnitude images (Gibbs ringing at edges, as
     in a real low-resolution scan; the crop is treated as periodic);
  3. Rician noise: the magnitude of (image + n1, n2) with n1, n2 Gaussian of
     std `noise_level` grey levels (of 255) of the [0, 1] intensity: MR's
     noise is Gaussian in the complex k-space data, Rician in the magnitude
     (biased upwards in dark background, nearly Gaussian in tissue);
  4. rounding to `lr_bits` as above.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Degradation(NamedTuple):
  """Settings of `degrade` (see the module docstring).

  Attributes:
    scale: integer downsampling factor >= 1.
    blur_sigma: Gaussian blur std in HR pixels, >= 0 (0: no blur).
    noise_level: Gaussian noise std in 8-bit grey levels (of 255), >= 0.
    lr_bits: bits the LR image is rounded to (0: no rounding, else 1..16).
    kind: "camera" (blur -> area -> Gaussian noise) or "mri" (k-space
      truncation -> Rician noise), see the module docstring.
  """
  scale: int
  blur_sigma: float = 0.0
  noise_level: float = 0.0
  lr_bits: int = 0
  kind: str = "camera"

  @property
  def random(self) -> bool:
    """Whether `degrade` draws random numbers (noise)."""
    return self.noise_level > 0


def check(d: Degradation) -> Degradation:
  """Validates the settings; raises ValueError naming the `data.` field."""
  if isinstance(d.scale, bool) or not isinstance(d.scale, (int, np.integer)) or d.scale < 1:
    raise ValueError(f"data.scale must be an int >= 1, got {d.scale!r}")
  for name in ("blur_sigma", "noise_level"):
    v = getattr(d, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
      raise ValueError(f"data.{name} must be a finite number >= 0, got {v!r}")
  if (isinstance(d.lr_bits, bool) or not isinstance(d.lr_bits, (int, np.integer))
      or not 0 <= d.lr_bits <= 16):
    raise ValueError(f"data.lr_bits must be an int in [0, 16] (0: no rounding), "
                     f"got {d.lr_bits!r}")
  if d.kind not in KINDS:
    raise ValueError(f"data.degradation must be one of {KINDS}, got {d.kind!r}")
  return d


KINDS = ("camera", "mri")


def gaussian_taps(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian `[2r + 1]`, r = ceil(3 sigma) (float64)."""
  r = max(1, int(np.ceil(3.0 * sigma)))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of `[N, H, W, C]`, reflected borders, float32."""
  if sigma <= 0:
    return np.asarray(images, np.float32)
  k = gaussian_taps(sigma)
  r = len(k) // 2
  out = np.asarray(images, np.float64)
  for axis in (1, 2):
    if out.shape[axis] <= r:
      raise ValueError(f"data.blur_sigma={sigma} needs crops larger than {r} pixels, "
                       f"got {out.shape[axis]}")
    pad = [(0, 0)] * out.ndim
    pad[axis] = (r, r)
    p = np.pad(out, pad, mode="reflect")
    n = out.shape[axis]
    out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(len(k)))
  return out.astype(np.float32)


def area_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
  """Box (area) downsampling: mean over `scale x scale` blocks.

  Args:
    hr: float `[..., H, W, C]`, H and W divisible by `scale`.
    scale: integer factor >= 1.

  Returns:
    float32 `[..., H / scale, W / scale, C]`.
  """
  *lead, h, w, c = hr.shape
  if h % scale or w % scale:
    raise ValueError(f"scale={scale} does not divide the image size {h}x{w}")
  blocks = hr.reshape(*lead, h // scale, scale, w // scale, scale, c)
  return blocks.mean(axis=(-4, -2), dtype=np.float32).astype(np.float32)


def degrade(highres: np.ndarray, d: Degradation,
            rngs: Sequence[np.random.Generator] | None = None) -> np.ndarray:
  """The LR images of HR crops.

  Args:
    highres: float32 `[N, H, W, C]` in [-1, 1], H and W divisible by `d.scale`.
    d: the degradation.
    rngs: one generator per image (the noise of image `i` comes from
      `rngs[i]` alone, so a process that builds only some samples of a batch
      draws the same noise for them); required when `d.random`.

  Returns:
    float32 `[N, H / scale, W / scale, C]` in [-1, 1].
  """
  if d.kind == "mri":
    return _degrade_mri(highres, d, rngs)
  lr = area_downsample(blur(highres, d.blur_sigma), d.scale)
  if d.noise_level > 0:
    _check_rngs(rngs, len(lr))
    std = np.float32(2.0 * d.noise_level / 255.0)
    lr = lr + std * np.stack([g.standard_normal(lr.shape[1:], np.float32) for g in rngs])
  return _round_bits(lr, d)


def _check_rngs(rngs, n: int) -> None:
  if rngs is None or len(rngs) != n:
    raise ValueError(f"degrade with noise needs one generator per image ({n}), "
                     f"got {None if rngs is None else len(rngs)}")


def kspace_truncate(images: np.ndarray, scale: int) -> np.ndarray:
  """Keeps the central `H / scale x W / scale` of k-space: `[N, H, W, C]` -> `[N, h, w, C]`.

  Complex float64 result at the low resolution, normalised so that a constant
  image keeps its value (the DC term divided by scale^2). scale=1: the identity.
  """
  n, h, w, c = images.shape
  if h % scale or w % scale:
    raise ValueError(f"scale={scale} does not divide the image size {h}x{w}")
  k = np.fft.fftshift(np.fft.fft2(np.asarray(images, np.float64), axes=(1, 2)), axes=(1, 2))
  lh, lw = h // scale, w // scale
  top, left = h // 2 - lh // 2, w // 2 - lw // 2
  k = k[:, top:top + lh, left:left + lw]
  return np.fft.ifft2(np.fft.ifftshift(k, axes=(1, 2)), axes=(1, 2)) / (scale * scale)


def _degrade_mri(highres: np.ndarray, d: Degradation, rngs) -> np.ndarray:
  """k-space truncation -> Rician noise -> bits (module docstring), on [0, 1] intensities."""
  x = (blur(highres, d.blur_sigma).astype(np.float64) + 1.0) * 0.5
  lr = kspace_truncate(x, d.scale)
  real, imag = lr.real, lr.imag
  if d.noise_level > 0:
    _check_rngs(rngs, len(lr))
    std = d.noise_level / 255.0
    noise = np.stack([g.standard_normal((2,) + lr.shape[1:]) for g in rngs])
    real, imag = real + std * noise[:, 0], imag + std * noise[:, 1]
  mag = np.sqrt(real * real + imag * imag)
  return _round_bits((mag * 2.0 - 1.0).astype(np.float32), d)


def _round_bits(lr: np.ndarray, d: Degradation) -> np.ndarray:
  """Rounds to `d.lr_bits` (if set) and clips to [-1, 1]: float32."""
  if d.lr_bits:
    levels = float(2 ** d.lr_bits - 1)
    lr = np.round((np.clip(lr, -1.0, 1.0) + 1.0) * (levels / 2.0)) * (2.0 / levels) - 1.0
  return np.clip(lr, -1.0, 1.0).astype(np.float32)
