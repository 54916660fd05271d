"""Gaussian windows and separable filtering of NHWC images.

Every local statistic in ssim_jax (means, variances, covariance, mask mass) is
one separable Gaussian blur of an image-sized map. This module owns that blur:

- `gaussian_kernel` builds the normalised 1-D window;
- `blur` applies it along H then W, with 'valid' or zero-'same' borders;
- `blur_adjoint` applies its transpose (for analytic derivatives);
- `choose_method` is the ONE place that decides which lowering runs.

Lowerings (all compute the same separable filter; tests pin them to the
reference to 1e-6):

- ``"conv"``: `jax.lax.conv_general_dilated`, the reference path.
- ``"matmul"``: the 1-D filter as a banded (Toeplitz) matrix product along
  each axis; long axes are cut into blocks of `_BLOCK` outputs (each block
  reads `_BLOCK + K - 1` inputs), so the wasted FLOPs on zeros stay bounded.
- ``"slices"``: the 1-D filter as a sum of K shifted slices (symmetric taps
  paired), one fused elementwise loop per axis, with a `jax.custom_vjp` whose
  backward is the same filter with the flipped kernel (the adjoint), because
  XLA's autodiff of slices (pad + add per tap) is an order of magnitude
  slower than the forward pass. Being a custom_vjp, it supports reverse mode
  (to any order) but not forward mode (`jax.jvp`, `jax.jacfwd`): force
  ``method="matmul"`` there.

The input is float32 `[B, H, W, C]` or `[B, C, H, W]`; channels are filtered
independently. All lowerings work on planes `[N, H, W]`, where both filtered
axes are the two minor ones: the band matmuls are then plain gemms with no
transposes (W: contraction over the minor axis; H: over the middle axis).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Padding = Literal["valid", "same"]
Method = Literal["auto", "conv", "matmul", "slices"]
Layout = Literal["NHWC", "NCHW"]

METHODS = ("conv", "matmul", "slices")

# Outputs per block of the blocked banded matmul: the dense band costs
# 2 (_BLOCK + K - 1) FLOPs per output instead of 2 K, in exchange for a gemm.
_BLOCK = 64
# Axes with at most this many outputs use one unblocked Toeplitz matrix.
_MAX_UNBLOCKED = 128
# The H pass contracts the middle axis of the planes directly (no transpose)
# when the planes are at least this wide (the free dimension of the gemm).
_MIN_ROW_GEMM = 128


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

  On CPU (benchmarks/README.md, quiet 2-core machine, full SSIM
  forward+backward): XLA's CPU convolution is 9-24x slower than the blocked
  banded matmul, and the shifted-slice sums lose to it at every benchmarked
  shape (9-16x: XLA re-fuses the slice sums into their consumers), so CPU
  uses "matmul". (Before the statistics got their hand-written clamp
  derivative, autodiff of the clamps made the matmul backward so slow that
  slices won at 1080p; that is no longer so.) Other backends keep the
  reference convolution: cuDNN / TPU convolutions are fast there and no GPU
  measurement exists yet. (Whether the SSIM gradient is the fused analytic
  one, rather than autodiff of these blurs, is `fused.choose_chunk`.)

  Args:
    shape: `[B, H, W, C]` of the image to be blurred.
    backend: `jax.default_backend()` when None.

  Returns:
    One of `METHODS`.
  """
  if backend is None:
    backend = jax.default_backend()
  del shape  # One answer per backend so far; the shape is the hook for more.
  if backend == "cpu":
    return "matmul"
  return "conv"


def _blur_conv(x: jax.Array, kernel: np.ndarray, padding: Padding) -> jax.Array:
  """Reference lowering: two single-feature `conv_general_dilated` passes.

  Works on planes `[N, H, W]` (channels already folded into N, so one
  single-feature conv replaces a grouped, depthwise one).
  """
  n, h, w = x.shape
  k = kernel.shape[0]
  x = x.reshape(n, h, w, 1)
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
  return y[..., 0]


def _pad_same(x: jax.Array, k: int, axes: tuple[int, ...]) -> jax.Array:
  pads = [(0, 0)] * x.ndim
  for a in axes:
    pads[a] = (k // 2, k // 2)
  return jnp.pad(x, pads)


@functools.lru_cache(maxsize=None)
def _band_np(taps: tuple[float, ...], n_in: int, n_out: int) -> np.ndarray:
  """`[n_in, n_out]` matrix M with (v @ M)[i] = sum_j taps[j] v[i + j]."""
  m = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    m[i:i + len(taps), i] = taps
  return m


def _matmul_axis(x: jax.Array, taps: tuple[float, ...], axis: int
                 ) -> jax.Array:
  """'valid' 1-D filter along axis -1 or -2 as a (blocked) band matmul.

  Along -1 the contraction is over the minor axis; along -2 it is over the
  middle axis with the last axis contiguous, i.e. one ordinary gemm
  (band^T @ rows) per block. Neither needs a transpose.
  """
  k = len(taps)
  tail = "w" if axis == -2 else ""   # einsum letter of the contiguous axis
  a = x.ndim + axis                  # the filtered axis, counted from 0
  n = x.shape[a]
  n_out = n - k + 1
  if n_out <= _MAX_UNBLOCKED:
    band = jnp.asarray(_band_np(taps, n, n_out))
    return jnp.einsum(f"...l{tail},lo->...o{tail}", x, band,
                      precision=jax.lax.Precision.HIGHEST)
  bo = max(_BLOCK, k - 1)
  nb = -(-n_out // bo)
  # Zero tail so that block j and the first K-1 inputs of block j+1 exist.
  pads = [(0, 0)] * x.ndim
  pads[a] = (0, (nb + 1) * bo - n)
  xp = jnp.pad(x, pads)
  blocks = xp.reshape(x.shape[:a] + (nb + 1, bo) + x.shape[a + 1:])
  this = jax.lax.slice_in_dim(blocks, 0, nb, axis=a)
  after = jax.lax.slice_in_dim(
      jax.lax.slice_in_dim(blocks, 1, nb + 1, axis=a), 0, k - 1, axis=a + 1)
  windows = jnp.concatenate([this, after], axis=a + 1)  # nb x (bo + K - 1)
  band = jnp.asarray(_band_np(taps, bo + k - 1, bo))
  y = jnp.einsum(f"...nl{tail},lo->...no{tail}", windows, band,
                 precision=jax.lax.Precision.HIGHEST)
  y = y.reshape(x.shape[:a] + (nb * bo,) + x.shape[a + 1:])
  return jax.lax.slice_in_dim(y, 0, n_out, axis=a)


def _blur_matmul(x: jax.Array, kernel: np.ndarray, padding: Padding
                 ) -> jax.Array:
  """Banded-matmul lowering on planes `[N, H, W]`: W as the minor axis, then
  H as the middle axis, both plain gemms with no transposes."""
  taps = tuple(float(t) for t in kernel)
  if padding == "same":
    x = _pad_same(x, len(taps), (1, 2))
  y = _matmul_axis(x, taps, -1)
  if y.shape[-1] >= _MIN_ROW_GEMM:
    return _matmul_axis(y, taps, -2)
  # Narrow planes: per-plane gemms of a few dozen columns are slow; one
  # transpose buys a single tall gemm instead.
  return jnp.swapaxes(_matmul_axis(jnp.swapaxes(y, -1, -2), taps, -1), -1, -2)


def _slices_axis(x: jax.Array, taps: tuple[float, ...], axis: int
                 ) -> jax.Array:
  """'valid' 1-D filter along `axis` as a sum of shifted slices."""
  k = len(taps)
  n_out = x.shape[axis] - k + 1

  def sl(start):
    return jax.lax.slice_in_dim(x, start, start + n_out, axis=axis)

  if all(taps[j] == taps[k - 1 - j] for j in range(k)):
    # Symmetric window: pair mirrored taps, (K+1)/2 multiplies instead of K.
    r = k // 2
    acc = taps[r] * sl(r)
    for j in range(r):
      acc = acc + taps[j] * (sl(j) + sl(k - 1 - j))
    return acc
  acc = taps[0] * sl(0)
  for j in range(1, k):
    acc = acc + taps[j] * sl(j)
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _blur_slices(x: jax.Array, taps: tuple[float, ...], padding: str
                 ) -> jax.Array:
  """Shifted-slice lowering on planes `[N, H, W]`, adjoint-filter backward."""
  if padding == "same":
    x = _pad_same(x, len(taps), (1, 2))
  return _slices_axis(_slices_axis(x, taps, 1), taps, 2)


def _blur_slices_fwd(x, taps, padding):
  # Linear in x: nothing but the shape is needed for the backward.
  return _blur_slices(x, taps, padding), None


def _full_pad(g: jax.Array, k: int, padding: str) -> jax.Array:
  """Adjoint of correlation with `taps` is correlation with the flipped taps:
  'same' (zero padding) maps to 'same'; 'valid' maps to 'valid' on the
  cotangent zero-padded by K-1 on both spatial (two minor) axes ('full')."""
  if padding == "same":
    return g
  pads = [(0, 0)] * (g.ndim - 2) + [(k - 1, k - 1)] * 2
  return jnp.pad(g, pads)


def _blur_slices_bwd(taps, padding, _, g):
  return (_blur_slices(_full_pad(g, len(taps), padding), taps[::-1], padding),)


_blur_slices.defvjp(_blur_slices_fwd, _blur_slices_bwd)


def blur(
    x: jax.Array,
    kernel: np.ndarray,
    *,
    padding: Padding = "valid",
    method: Method | str = "auto",
    layout: Layout = "NHWC",
) -> jax.Array:
  """Separable Gaussian blur of `x` along H and W.

  Every lowering filters planes `[N, H, W]`; "NCHW" input reshapes to planes
  for free, "NHWC" costs a transpose in and out. Pipelines that blur several
  maps of the same images (the SSIM statistics) therefore convert once and
  use `layout="NCHW"`.

  Args:
    x: float32 `[B, H, W, C]` ("NHWC") or `[B, C, H, W]` ("NCHW").
    kernel: 1-D window `[K]` (K odd), from `gaussian_kernel`; a host
      (numpy) array, since it is baked into the compiled filter.
    padding: ``"valid"`` shrinks H and W by K-1; ``"same"`` zero-pads and
      keeps them.
    method: lowering, ``"auto"`` defers to `choose_method`.
    layout: "NHWC" or "NCHW", of `x` and of the result.

  Returns:
    The filtered maps, float32, in the layout of `x`.
  """
  if padding not in ("valid", "same"):
    raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if x.ndim != 4:
    dims = "[B, H, W, C]" if layout == "NHWC" else "[B, C, H, W]"
    raise ValueError(f"x must be {dims}, got shape {x.shape}")
  kernel = np.asarray(kernel, np.float32)
  if kernel.ndim != 1 or kernel.shape[0] % 2 != 1:
    raise ValueError(f"kernel must be 1-D with an odd length, got shape "
                     f"{kernel.shape}")
  if layout == "NHWC":
    b, h, w, c = x.shape
    planes = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w)
  else:
    b, c, h, w = x.shape
    planes = x.reshape(b * c, h, w)
  if padding == "valid" and min(h, w) < kernel.shape[0]:
    raise ValueError(f"'valid' padding needs H and W >= window size "
                     f"{kernel.shape[0]}, got x of shape {x.shape} ({layout})")
  if method == "auto":
    method = choose_method((b, h, w, c))
  if method == "conv":
    out = _blur_conv(planes, kernel, padding)
  elif method == "matmul":
    out = _blur_matmul(planes, kernel, padding)
  elif method == "slices":
    out = _blur_slices(planes, tuple(float(t) for t in kernel), padding)
  else:
    raise ValueError(
        f"method must be 'auto' or one of {METHODS}, got {method!r}")
  out = out.reshape((b, c) + out.shape[1:])
  return jnp.transpose(out, (0, 2, 3, 1)) if layout == "NHWC" else out


def blur_adjoint(
    g: jax.Array,
    kernel: np.ndarray,
    *,
    padding: Padding = "valid",
    method: Method | str = "auto",
) -> jax.Array:
  """Adjoint (transpose) of `blur(., kernel, padding=padding)` on NCHW maps.

  For a cotangent `g` of the blurred maps, `blur_adjoint(g)` is the
  cotangent of the input: the blur with the flipped kernel, on `g`
  zero-padded by K-1 per side for 'valid' padding (so the result has the
  input's size). Used by the analytic SSIM derivative (`fused`).

  Args:
    g: float32 `[B, C, H', W']`, blur output sized.
    kernel: the 1-D window `[K]` of the forward blur.
    padding: padding of the forward blur.
    method: lowering, as in `blur`.

  Returns:
    float32 `[B, C, H, W]`, the forward blur's input size.
  """
  kernel = np.asarray(kernel, np.float32)
  return blur(_full_pad(g, kernel.shape[0], padding),
              np.ascontiguousarray(kernel[::-1]), padding=padding,
              method=method, layout="NCHW")
