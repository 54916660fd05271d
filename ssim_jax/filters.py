"""Gaussian windows and separable filtering of NHWC images.

Every local statistic in ssim_jax (means, variances, covariance, mask mass) is
one separable Gaussian blur of an image-sized map. This module owns that blur:

- `gaussian_kernel` builds the normalised 1-D window;
- `blur` applies it along H then W, with 'valid' or zero-'same' borders;
- `choose_method` is the ONE place that decides which lowering runs.

Lowerings (all compute the same separable filter; tests pin them to the
reference to 1e-6):

- ``"conv"``: `jax.lax.conv_general_dilated`, the reference path.

The input is float32 `[B, H, W, C]`; channels are filtered independently.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Padding = Literal["valid", "same"]
Method = Literal["auto", "conv"]

METHODS = ("conv",)


@functools.lru_cache(maxsize=None)
def _gaussian_kernel_np(window_size: int, sigma: float) -> np.ndarray:
  # Built in float64 on the host: the kernel is a compile-time constant.
  coords = np.arange(window_size, dtype=np.float64) - (window_size - 1) / 2.0
  g = np.exp(-(coords**2) / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def gaussian_kernel(window_size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian window.

  Args:
    window_size: odd number of taps.
    sigma: standard deviation in pixels.

  Returns:
    float32 numpy array `[window_size]` summing to 1.
  """
  return _gaussian_kernel_np(int(window_size), float(sigma))


def choose_method(shape: tuple[int, ...], *, backend: str | None = None) -> str:
  """Picks the lowering of the separable blur for an input shape and backend.

  This is the one place where the choice is made; `blur(..., method="auto")`
  calls it at trace time. Users force a lowering with `method=`.

  Args:
    shape: `[B, H, W, C]` of the image to be blurred.
    backend: `jax.default_backend()` when None.

  Returns:
    One of `METHODS`.
  """
  del shape, backend
  return "conv"


def _blur_conv(x: jax.Array, kernel: np.ndarray, padding: Padding) -> jax.Array:
  """Reference lowering: two depthwise `conv_general_dilated` passes."""
  b, h, w, c = x.shape
  k = kernel.shape[0]
  # Channels folded into the batch: one single-feature conv instead of a
  # grouped (depthwise) one.
  x = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.asarray(kernel.reshape(k, 1, 1, 1))
  kw = jnp.asarray(kernel.reshape(1, k, 1, 1))
  pad_h = "VALID" if padding == "valid" else [(k // 2, k // 2), (0, 0)]
  pad_w = "VALID" if padding == "valid" else [(0, 0), (k // 2, k // 2)]
  y = jax.lax.conv_general_dilated(
      x, kh, (1, 1), pad_h, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  y = jax.lax.conv_general_dilated(
      y, kw, (1, 1), pad_w, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  ho, wo = y.shape[1], y.shape[2]
  return jnp.moveaxis(y.reshape(b, c, ho, wo), 1, -1)


def blur(
    x: jax.Array,
    kernel: np.ndarray,
    *,
    padding: Padding = "valid",
    method: Method | str = "auto",
) -> jax.Array:
  """Separable Gaussian blur of `x` along H and W.

  Args:
    x: float32 `[B, H, W, C]`.
    kernel: 1-D window `[K]` (K odd), from `gaussian_kernel`.
    padding: ``"valid"`` gives `[B, H-K+1, W-K+1, C]`; ``"same"`` zero-pads
      and gives `[B, H, W, C]`.
    method: lowering, ``"auto"`` defers to `choose_method`.

  Returns:
    The filtered maps, float32.
  """
  if method == "auto":
    method = choose_method(x.shape)
  if method == "conv":
    return _blur_conv(x, kernel, padding)
  raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
