"""Gaussian windows and separable filtering of images and volumes.

Every local statistic in ssim_jax (means, variances, covariance, mask mass) is
one separable Gaussian blur of an image-sized map. This module owns that blur:

- `gaussian_kernel` builds the normalised 1-D window;
- `blur` applies one window per spatial axis (H, W; or D, H, W for volumes),
  with 'valid' or zero-'same' borders;
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

The input is float32 `[B, H, W, C]` or `[B, C, H, W]` (volumes: `[B, D, H, W,
C]` or `[B, C, D, H, W]`); channels are filtered independently. All lowerings
work on planes `[N, H, W]`, where both filtered axes are the two minor ones:
the band matmuls are then plain gemms with no transposes (W: contraction over
the minor axis; H: over the middle axis). Volumes `[N, D, H, W]` are filtered
as `N D` planes, then along D as `[N, D, H W]` (again a gemm with a
contiguous free axis), so 2-D images run exactly the 2-D code.
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
  one, rather than autodiff of these blurs, is `route.choose_chunk`.)

  Args:
    shape: `[B, H, W, C]` (or `[B, D, H, W, C]`) of the image to be blurred.
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


def _blur_conv(x: jax.Array, kernel_h: np.ndarray, kernel_w: np.ndarray,
               padding: tuple[Padding, Padding]) -> jax.Array:
  """Reference lowering: two single-feature `conv_general_dilated` passes.

  Works on planes `[N, H, W]` (channels already folded into N, so one
  single-feature conv replaces a grouped, depthwise one).
  """
  n, h, w = x.shape
  k, k_w = kernel_h.shape[0], kernel_w.shape[0]
  x = x.reshape(n, h, w, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.asarray(kernel_h.reshape(k, 1, 1, 1))
  kw = jnp.asarray(kernel_w.reshape(1, k_w, 1, 1))
  pad_h = "VALID" if padding[0] == "valid" else [(k // 2, k // 2), (0, 0)]
  pad_w = "VALID" if padding[1] == "valid" else [(0, 0),
                                                 (k_w // 2, k_w // 2)]
  y = jax.lax.conv_general_dilated(
      x, kh, (1, 1), pad_h, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  y = jax.lax.conv_general_dilated(
      y, kw, (1, 1), pad_w, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  return y[..., 0]


def _pad_same(x: jax.Array, ks: tuple[int, ...], axes: tuple[int, ...],
              paddings: tuple[str, ...]) -> jax.Array:
  """Zero-pads axis `axes[i]` by `ks[i] // 2` per side where `paddings[i]`
  is 'same' (so that a 'valid' filter then gives the 'same' result)."""
  if "same" not in paddings:
    return x
  pads = [(0, 0)] * x.ndim
  for a, k, p in zip(axes, ks, paddings):
    if p == "same":
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


def _blur_matmul(x: jax.Array, kernel_h: np.ndarray, kernel_w: np.ndarray,
                 padding: tuple[Padding, Padding]) -> jax.Array:
  """Banded-matmul lowering on planes `[N, H, W]`: W as the minor axis, then
  H as the middle axis, both plain gemms with no transposes."""
  taps_h = tuple(float(t) for t in kernel_h)
  taps_w = tuple(float(t) for t in kernel_w)
  x = _pad_same(x, (len(taps_h), len(taps_w)), (1, 2), padding)
  y = _matmul_axis(x, taps_w, -1)
  if y.shape[-1] >= _MIN_ROW_GEMM:
    return _matmul_axis(y, taps_h, -2)
  # Narrow planes: per-plane gemms of a few dozen columns are slow; one
  # transpose buys a single tall gemm instead.
  return jnp.swapaxes(_matmul_axis(jnp.swapaxes(y, -1, -2), taps_h, -1), -1,
                      -2)


def _depth_pass(y: jax.Array, kernel_d: np.ndarray, padding: Padding,
                method: str) -> jax.Array:
  """The D pass of a volume blur on `[N, D, H, W]` (H, W already filtered).

  Viewed as `[N, D, H W]`, D is the middle axis with a long contiguous free
  axis: for "matmul" one gemm per block of D, for "conv" one single-feature
  convolution.
  """
  n, d, h, w = y.shape
  k = kernel_d.shape[0]
  y = _pad_same(y.reshape(n, d, h * w), (k,), (1,), (padding,))
  if method == "matmul":
    out = _matmul_axis(y, tuple(float(t) for t in kernel_d), -2)
  else:
    out = jax.lax.conv_general_dilated(
        y[..., None], jnp.asarray(kernel_d.reshape(k, 1, 1, 1)), (1, 1),
        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)[..., 0]
  return out.reshape(n, out.shape[1], h, w)


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
def _blur_slices(x: jax.Array, taps: tuple[tuple[float, ...], ...],
                 padding: str) -> jax.Array:
  """Shifted-slice lowering on planes `[N, *S]` (one taps tuple and one
  padding per spatial axis of S, in order), adjoint-filter backward."""
  axes = tuple(range(1, x.ndim))
  x = _pad_same(x, tuple(len(t) for t in taps), axes, padding)
  for a, t in zip(axes, taps):
    x = _slices_axis(x, t, a)
  return x


def _blur_slices_fwd(x, taps, padding):
  # Linear in x: nothing but the shape is needed for the backward.
  return _blur_slices(x, taps, padding), None


def _full_pad(g: jax.Array, ks: tuple[int, ...], padding: tuple[str, ...]
              ) -> jax.Array:
  """Adjoint of correlation with `taps` is correlation with the flipped taps:
  'same' (zero padding) maps to 'same'; 'valid' maps to 'valid' on the
  cotangent zero-padded by K-1 on that axis ('full'). The spatial axes are
  the `len(ks)` minor ones, `ks` their window sizes, `padding` theirs."""
  if all(p == "same" for p in padding):
    return g
  pads = [(0, 0)] * (g.ndim - len(ks)) + [
      (k - 1, k - 1) if p == "valid" else (0, 0) for k, p in zip(ks, padding)]
  return jnp.pad(g, pads)


def _blur_slices_bwd(taps, padding, _, g):
  flipped = tuple(t[::-1] for t in taps)
  return (_blur_slices(_full_pad(g, tuple(len(t) for t in taps), padding),
                       flipped, padding),)


_blur_slices.defvjp(_blur_slices_fwd, _blur_slices_bwd)


def as_kernels(kernel, spatial_dims: int) -> tuple[np.ndarray, ...]:
  """One float32 1-D window per spatial axis.

  Args:
    kernel: one 1-D window `[K]` (used on every axis) or a tuple/list of
      `spatial_dims` windows (D, H, W order), each of odd length.
    spatial_dims: number of spatial axes (2 or 3).

  Returns:
    Tuple of `spatial_dims` float32 numpy arrays.
  """
  if isinstance(kernel, (tuple, list)) and kernel and all(
      np.ndim(k) == 1 for k in kernel):
    kernels = tuple(np.asarray(k, np.float32) for k in kernel)
  else:
    kernels = (np.asarray(kernel, np.float32),) * spatial_dims
  if len(kernels) != spatial_dims:
    raise ValueError(f"kernel must be one window or one per spatial axis "
                     f"({spatial_dims}), got {len(kernels)}")
  for k in kernels:
    if k.ndim != 1 or k.shape[0] % 2 != 1:
      raise ValueError(f"kernel must be 1-D with an odd length, got shape "
                       f"{k.shape}")
  return kernels


def as_paddings(padding, spatial_dims: int) -> tuple[str, ...]:
  """One padding ('valid' or 'same') per spatial axis."""
  paddings = (tuple(padding) if isinstance(padding, (tuple, list))
              else (padding,) * spatial_dims)
  if len(paddings) != spatial_dims or any(
      p not in ("valid", "same") for p in paddings):
    raise ValueError(f"padding must be 'valid' or 'same' (or one per "
                     f"spatial axis), got {padding!r}")
  return paddings


def _blur_planes(planes: jax.Array, kernels: tuple[np.ndarray, ...],
                 padding: tuple[str, ...], method: str) -> jax.Array:
  """Filters planes `[N, H, W]` or volumes `[N, D, H, W]` (one kernel and
  one padding per spatial axis)."""
  if method == "slices":
    return _blur_slices(planes, tuple(tuple(float(t) for t in k)
                                      for k in kernels), padding)
  if method == "conv":
    plane_blur = _blur_conv
  elif method == "matmul":
    plane_blur = _blur_matmul
  else:
    raise ValueError(
        f"method must be 'auto' or one of {METHODS}, got {method!r}")
  if planes.ndim == 3:
    return plane_blur(planes, kernels[0], kernels[1], padding)
  n, d = planes.shape[:2]
  y = plane_blur(planes.reshape((n * d,) + planes.shape[2:]), kernels[1],
                 kernels[2], padding[1:])
  return _depth_pass(y.reshape((n, d) + y.shape[1:]), kernels[0], padding[0],
                     method)


def blur(
    x: jax.Array,
    kernel: np.ndarray | tuple[np.ndarray, ...],
    *,
    padding: Padding | tuple[Padding, ...] = "valid",
    method: Method | str = "auto",
    layout: Layout = "NHWC",
) -> jax.Array:
  """Separable Gaussian blur of `x` along its spatial axes.

  Every lowering filters planes `[N, H, W]` (volumes `[N, D, H, W]`);
  channels-first input reshapes to planes for free, channels-last costs a
  transpose in and out. Pipelines that blur several maps of the same images
  (the SSIM statistics) therefore convert once and use `layout="NCHW"`.

  Args:
    x: float32 `[B, H, W, C]` ("NHWC") or `[B, C, H, W]` ("NCHW"); volumes
      `[B, D, H, W, C]` ("NHWC": channels last) or `[B, C, D, H, W]`
      ("NCHW": channels first).
    kernel: 1-D window `[K]` (K odd) for every spatial axis, or one window
      per spatial axis (H, W or D, H, W order), from `gaussian_kernel`; host
      (numpy) arrays, since they are baked into the compiled filter.
    padding: ``"valid"`` shrinks each spatial axis by its K-1; ``"same"``
      zero-pads and keeps them; or one of them per spatial axis (the depth
      slabs of `fused` filter D 'valid' and H, W as the caller asked).
    method: lowering, ``"auto"`` defers to `choose_method`.
    layout: "NHWC" (channels last) or "NCHW" (channels first), of `x` and
      of the result.

  Returns:
    The filtered maps, float32, in the layout of `x`.
  """
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if x.ndim not in (4, 5):
    dims = "[B, H, W, C]" if layout == "NHWC" else "[B, C, H, W]"
    raise ValueError(f"x must be {dims} (or a volume with a D axis), got "
                     f"shape {x.shape}")
  kernels = as_kernels(kernel, x.ndim - 2)
  paddings = as_paddings(padding, x.ndim - 2)
  if layout == "NHWC":
    b, *spatial, c = x.shape
    planes = jnp.moveaxis(x, -1, 1).reshape((b * c,) + tuple(spatial))
  else:
    b, c, *spatial = x.shape
    planes = x.reshape((b * c,) + tuple(spatial))
  if any(p == "valid" and n < k.shape[0]
         for n, k, p in zip(spatial, kernels, paddings)):
    raise ValueError(f"'valid' padding needs H and W (and D for volumes) "
                     f">= their window sizes "
                     f"{tuple(k.shape[0] for k in kernels)}, got x of shape "
                     f"{x.shape} ({layout})")
  if method == "auto":
    method = choose_method(tuple(x.shape) if layout == "NHWC" else
                           (b,) + tuple(spatial) + (c,))
  out = _blur_planes(planes, kernels, paddings, method)
  out = out.reshape((b, c) + out.shape[1:])
  return jnp.moveaxis(out, 1, -1) if layout == "NHWC" else out


def blur_adjoint(
    g: jax.Array,
    kernel: np.ndarray | tuple[np.ndarray, ...],
    *,
    padding: Padding | tuple[Padding, ...] = "valid",
    method: Method | str = "auto",
) -> jax.Array:
  """Adjoint (transpose) of `blur(., kernel, padding=padding)` on NCHW maps.

  For a cotangent `g` of the blurred maps, `blur_adjoint(g)` is the
  cotangent of the input: the blur with the flipped kernels, on `g`
  zero-padded by K-1 per side for 'valid' padding (so the result has the
  input's size). Used by the analytic SSIM derivative (`fused`).

  Args:
    g: float32 `[B, C, H', W']` (or `[B, C, D', H', W']`), blur output sized.
    kernel: the window(s) of the forward blur, as in `blur`.
    padding: padding of the forward blur (one, or one per spatial axis).
    method: lowering, as in `blur`.

  Returns:
    float32 `[B, C, H, W]` (or `[B, C, D, H, W]`), the forward blur's input
    size.
  """
  kernels = as_kernels(kernel, g.ndim - 2)
  paddings = as_paddings(padding, g.ndim - 2)
  flipped = tuple(np.ascontiguousarray(k[::-1]) for k in kernels)
  return blur(_full_pad(g, tuple(k.shape[0] for k in kernels), paddings),
              flipped, padding=paddings, method=method, layout="NCHW")
