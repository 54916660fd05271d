"""SSIM maps, per-image SSIM, mask-weighted sums and losses.

Contract (all public functions): images channels-last `[B, H, W, C]` (or
`[H, W, C]`, then the batch axis is dropped from results), float16, bfloat16
or float32; statistics and results in float32; one value per image pair.
`channel_axis` puts the channels elsewhere (1: PyTorch's `[B, C, H, W]`);
masks follow the images' layout and `ssim_map` returns the caller's. Input
that is probably channels-first read as channels-last (a side below the
window and more channels than that side) is an error naming `channel_axis`.

Under `jax.jit` the options that decide shapes or the program are static
(window, sigma, k1, k2, padding, mask_mode, filter_method, spatial_dims,
spacing, channel_axis; MS-SSIM's levels and weights; `l1_ssim_loss`'s
ssim_weight): mark them in `static_argnames` (e.g.
`jax.jit(ssim_jax.ssim, static_argnames=("window_size",))`) or close over
them; a traced one is a `TypeError` showing that fix. `data_range` and the
mask are traceable arrays.
With `spatial_dims=3` the same holds for volumes `[B, D, H, W, C]` (or
`[D, H, W, C]`): the window, the statistics, the masks and the map gain the
D axis, through the same code.

Window (`checks.check_window`): `window_size` and `sigma` are one value or
one per spatial axis; `spacing` (physical voxel size per axis, e.g. mm)
makes `sigma` physical (sigma in voxels = sigma / spacing) and the default
window per axis the odd size covering +-3.5 sigma (`2 int(3.5 sigma + 0.5)
+ 1` voxels, skimage's truncate=3.5: 11 for sigma 1.5). Without spacing the
default window is 11 on every axis. The formula::

    SSIM = l * cs,   l  = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1),
                     cs = (2 cov + C2) / (var_x + var_y + C2),
    C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range (per image).

With variances >= 0 and `|cov|` clamped (see `stats`), `|l| <= 1` and `|cs| <= 1`
hold in float32, so SSIM is in [-1, 1] and every loss `1 - SSIM` is in
[0, 2] by construction: no final clamp (a clamp to [0, 1] would zero the
gradient whenever SSIM < 0). `ssim(x, x) == 1` exactly: the two images go
through identical expressions.

Masks are per-pixel non-negative weights broadcastable to `[B, H, W, 1|C]`
(`[B, D, H, W, 1|C]`):

- ``mask_mode="weighted"``: the map is averaged with the mask as weights,
  the mask cropped to the valid region of the map (`K//2` pixels per side of
  each axis for 'valid' padding). A mask of ones equals no mask.
- ``mask_mode="foreground"``: the window statistics themselves are
  mask-weighted (normalised convolution), so masked-out pixels cannot change
  the result whatever their value; the map is then averaged with the
  (aligned) mask as weights. Windows with no mask mass carry no weight.

Batch / chunk / device reduction: `ssim_sums` returns per image the
mask-weighted sum of the map and the mask mass; any mass-weighted mean over
images, chunks or devices is `psum(weighted_sum) / psum(mass)`
(`loss_from_sums`). Empty mass gives loss 0 with zero gradient, never NaN.

NaN or Inf in (unmasked) images propagates to the result: the metric does not
hide it (a trainer decides to skip the step).

One call runs in one direction: `plan.make_plan` makes every check and
decision (window, constants, mask mode, padding, blur lowering, fused or
autodiff route), then the statistics (`stats`, `planes` or `fused`), the
formula, and the reduction (`SSIMSums`, `loss_from_sums`).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks
from ssim_jax import fused
from ssim_jax import plan as plan_lib
from ssim_jax import planes
from ssim_jax import stats as stats_lib


class SSIMSums(NamedTuple):
  """Additive per-image SSIM partial results.

  Attributes:
    weighted_sum: float32 `[B]`, sum over (H', W', C) (volumes: (D', H', W',
      C)) of weight * SSIM map.
    mass: float32 `[B]`, sum over the same axes of the weight (mask aligned
      to the map and broadcast over channels; H'W'C when there is no mask).
  """
  weighted_sum: jax.Array
  mass: jax.Array


def _foreground_map(p: plan_lib.Plan) -> tuple[jax.Array, jax.Array]:
  """Statistics from masked pixels only, then the formula: the SSIM map and
  its weights, both `[B, *S', C]`."""
  st, local_mass = stats_lib.masked_local_stats(
      p.x, p.y, p.mask, kernel=p.kernel, padding=p.padding,
      filter_method=p.lowering)
  luminance, cs = stats_lib.luminance_cs(st, p.c1, p.c2)
  smap = luminance * cs
  weights = jnp.broadcast_to(planes.align_mask(p.mask, p.kernel, p.padding),
                             smap.shape)
  weights = jnp.where(local_mass > 0, weights, 0.0)
  return smap, weights


def _map(p: plan_lib.Plan) -> jax.Array:
  """Statistics, then the formula: the SSIM map `[B, *S', C]`."""
  if p.foreground:
    return _foreground_map(p)[0]
  return planes.to_nhwc(planes.ssim_map_nchw(
      planes.to_nchw(p.x), planes.to_nchw(p.y), kernel=p.kernel, c1=p.c1,
      c2=p.c2, padding=p.padding, filter_method=p.lowering))


def _sums(p: plan_lib.Plan) -> SSIMSums:
  """Statistics, formula and the per-image reduction: `SSIMSums` `[B]`."""
  axes = tuple(range(1, p.x.ndim))
  if p.foreground:
    smap, weights = _foreground_map(p)
    return SSIMSums(jnp.sum(weights * smap, axis=axes),
                    jnp.sum(weights, axis=axes))
  if p.mask is None:
    map_weights = jnp.ones((1,) * p.x.ndim, jnp.float32)
    mass = jnp.full((p.map_shape[0],), float(np.prod(p.map_shape[1:])),
                    jnp.float32)
  else:
    map_weights = planes.align_mask(p.mask, p.kernel, p.padding)
    mass = jnp.sum(jnp.broadcast_to(map_weights, p.map_shape), axis=axes)
  common = dict(kernel=p.kernel, c1=p.c1, c2=p.c2, padding=p.padding,
                filter_method=p.lowering)
  if p.route.fused:  # decided by the plan
    total = fused.weighted_ssim_sum(
        p.x, p.y, map_weights, planes_per_chunk=p.route.planes_per_chunk,
        slab_depth=p.route.slab_depth, **common)
  else:
    total = planes.plain_weighted_ssim_sum(p.x, p.y, map_weights, **common)
  return SSIMSums(total, mass)


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0 with zero gradient (never NaN)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _unbatch(a: jax.Array, batched: bool) -> jax.Array:
  return a if batched else a[0]


def _planned_sums(x, y, *, fn: str, **options) -> SSIMSums:
  """The plan of a call to public function `fn`, then `_sums`, unbatched as
  the caller's images were."""
  p = plan_lib.make_plan(x, y, fn=fn, **options)
  out = _sums(p)
  chex.assert_shape([out.weighted_sum, out.mass], (p.x.shape[0],))
  return SSIMSums(_unbatch(out.weighted_sum, p.batched),
                  _unbatch(out.mass, p.batched))


def ssim_map(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float | jax.Array = 1.0,
    window_size: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
    mask: jax.Array | None = None,
    mask_mode: str = "weighted",
    filter_method: str = "auto",
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> jax.Array:
  """Per-pixel SSIM map.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      float16/bfloat16/float32.
    y: same shape as `x`.
    data_range: dynamic range L of the images (e.g. 1.0 or 255.0), a float or
      a float array `[B]` (per image).
    window_size: odd Gaussian window size >= 3, or one per spatial axis
      (voxels); None: 11, or with `spacing` +-3.5 sigma per axis. One size
      shrinks to the largest odd size that fits the smallest side; per-axis
      sizes shrink axis by axis.
    sigma: Gaussian standard deviation, pixels (physical units with
      `spacing`), one or one per spatial axis.
    k1: luminance constant, C1 = (k1 L)^2.
    k2: contrast constant, C2 = (k2 L)^2.
    padding: "valid" (map `[B, H-K+1, W-K+1, C]`; skimage, dm_pix,
      pytorch-msssim, tf.image.ssim) or "same" (zero padding, map
      `[B, H, W, C]`; Gaussian-splatting code, fused-ssim); either case
      ("SAME", lax's and Flax's spelling, is accepted).
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`). In "weighted" mode
      the map does not depend on it (use `ssim` for the weighted mean); in
      "foreground" mode the map is computed from masked pixels only.
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering. "auto" lets `filters.choose_method` pick
      it, and `route.choose_chunk` whether the gradient of the SSIM value
      is the fused analytic one (`ssim_jax.fused`); a named lowering
      ("conv", "matmul", "slices") runs under plain autodiff.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    float32 map `[B, H', W', C]` (no batch axis for `[H, W, C]` inputs; the
    channels at `channel_axis`, as in `x`), values in [-1, 1]. In foreground mode, windows without mask mass hold the
    finite value 1 (they carry no weight in `ssim`).

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> ssim_map(x, y).shape, ssim_map(x, y, padding="same").shape   # K = 11
    ((2, 38, 38, 3), (2, 48, 48, 3))
    >>> nchw = jnp.moveaxis(x, -1, 1)                               # [B, C, H, W]
    >>> ssim_map(nchw, 0.8 * nchw + 0.1, channel_axis=1).shape
    (2, 3, 38, 38)
  """
  p = plan_lib.make_plan(
      x, y, fn="ssim_map", data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis)
  smap = _map(p)
  chex.assert_shape(smap, p.map_shape)
  # Back to the caller's layout: the channels where its images had them.
  return jnp.moveaxis(_unbatch(smap, p.batched), -1, p.channel_axis)


def ssim_sums(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float | jax.Array = 1.0,
    window_size: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
    mask: jax.Array | None = None,
    mask_mode: str = "weighted",
    filter_method: str = "auto",
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> SSIMSums:
  """Per-image mask-weighted SSIM sum and mask mass (additive partials).

  Per-image SSIM is `weighted_sum / mass`; a loss over a batch, several
  chunks or devices is `1 - psum(weighted_sum) / psum(mass)` (see
  `loss_from_sums`), so images count by their mask mass.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      floating.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis; None: 11 (with
      `spacing`: +-3.5 sigma per axis). Shrinks for small images.
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`) at full image
      resolution (aligned to the map region by the library).
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    `SSIMSums(weighted_sum, mass)`, each float32 `[B]` (scalars for
    `[H, W, C]` inputs).

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> m = jnp.zeros((2, 48, 48, 1)).at[:, :24].set(1.0)        # top half
    >>> s = ssim_sums(x, y, mask=m)
    >>> s.mass                    # rows 5..23 of the 38 x 38 map, x 38 columns x 3 channels
    Array([2166., 2166.], dtype=float32)
    >>> bool(loss_from_sums(s) == ssim_loss(x, y, mask=m))
    True
  """
  return _planned_sums(
      x, y, fn="ssim_sums", data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis)


def ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float | jax.Array = 1.0,
    window_size: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
    mask: jax.Array | None = None,
    mask_mode: str = "weighted",
    filter_method: str = "auto",
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004), the mask-weighted mean of the map.

  `SSIM_b = sum(w * ssim_map) / sum(w)` over the map's positions and channels
  of image b, with `w` the mask aligned to the map (1 without a mask) and the
  map `l * cs` (module docstring).

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      float16/bfloat16/float32.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis; None: 11 (with
      `spacing`: +-3.5 sigma per axis). Shrinks for small images.
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]` (`[B, D, H, W, 1|C]`).
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    float32 `[B]` in [-1, 1] (scalar for `[H, W, C]` inputs). An image whose
    mask mass is 0 gets 0 with zero gradient (it has no pixels to compare).

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> ssim(x, x)
    Array([1., 1.], dtype=float32)
    >>> bool(jnp.all(ssim(x, y) < 1))
    True
    >>> ssim(255 * x, 255 * y, data_range=255.0).shape    # uint8-range float images
    (2,)
  """
  sums = _planned_sums(
      x, y, fn="ssim", data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis)
  return safe_ratio(sums.weighted_sum, sums.mass)


def loss_from_sums(sums: SSIMSums, *, axis_name: Any = None) -> jax.Array:
  """`1 - sum(weighted_sum) / sum(mass)` over images (and devices).

  Args:
    sums: `SSIMSums` with fields of any (equal) shape, e.g. `[B]`.
    axis_name: optional mapped axis name(s) (inside `jax.shard_map` /
      `vmap`) to `psum` the partials over.

  Returns:
    float32 scalar in [0, 2]; 0 with zero gradient when the total mass is 0.

  Example:
    >>> sums = SSIMSums(jnp.array([90.0, 40.0]), jnp.array([100.0, 50.0]))
    >>> loss_from_sums(sums)                      # 1 - 130 / 150
    Array(0.13333333, dtype=float32)
  """
  total = jnp.sum(jnp.asarray(sums.weighted_sum, jnp.float32))
  mass = jnp.sum(jnp.asarray(sums.mass, jnp.float32))
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    mass = jax.lax.psum(mass, axis_name)
  return jnp.where(mass > 0, 1.0 - safe_ratio(total, mass), 0.0)


def ssim_loss(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float | jax.Array = 1.0,
    window_size: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
    mask: jax.Array | None = None,
    mask_mode: str = "weighted",
    filter_method: str = "auto",
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> jax.Array:
  """Scalar `1 - SSIM` over the batch, mask-mass weighted.

  Images count by their mask mass (twice the mass, twice the weight); a batch
  with zero mask mass gives 0 with zero gradient, never NaN.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      floating.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis; None: 11 (with
      `spacing`: +-3.5 sigma per axis). Shrinks for small images.
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]` (`[B, D, H, W, 1|C]`).
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    float32 scalar in [0, 2].

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> bool(0 < ssim_loss(x, y) < 0.1)
    True
    >>> jax.grad(ssim_loss)(x, y).shape           # d loss / d x
    (2, 48, 48, 3)
  """
  sums = _planned_sums(
      x, y, fn="ssim_loss", data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis)
  return loss_from_sums(sums)


def l1_ssim_loss(
    x: jax.Array,
    y: jax.Array,
    *,
    ssim_weight: float = 0.2,
    mask: jax.Array | None = None,
    data_range: float | jax.Array = 1.0,
    window_size: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "same",
    filter_method: str = "auto",
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
    weight_map: jax.Array | None = None,
) -> jax.Array:
  """Gaussian-splatting loss `(1 - lambda) L1 + lambda (1 - SSIM)`.

  With `mask` (per-pixel weights, e.g. a region of interest) both terms are
  weighted means: `L1 = sum(w |x - y|) / sum(w)` over pixels and channels, and
  SSIM the w-weighted mean of the map (mask_mode "weighted"). Zero total
  weight gives 0 with zero gradient.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`; the
      channels where `channel_axis` says), floating (e.g. the rendering).
    y: same shape as `x` (e.g. the ground truth).
    ssim_weight: lambda in [0, 1].
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`; laid out like the images).
    data_range: float or float array `[B]` (SSIM constants only).
    window_size: odd window >= 3, or one per spatial axis; None: 11 (with
      `spacing`: +-3.5 sigma per axis). Shrinks for small images.
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "same" (zero padding, the Gaussian-splatting convention) or
      "valid", either case.
    filter_method: blur lowering.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1: channels-last;
      1: `[B, C, H, W]`).
    weight_map: deprecated alias of `mask` (warns once; passing both is an
      error).

  Returns:
    float32 scalar >= 0 (<= 2 * data_range-scaled L1 bound + 2 lambda).

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> l1 = jnp.mean(jnp.abs(x - y))
    >>> bool(jnp.isclose(l1_ssim_loss(x, y, ssim_weight=0.0), l1))
    True
    >>> roi = jnp.full((2, 48, 48, 1), 0.3).at[:, 12:36, 12:36].set(1.0)
    >>> jax.grad(l1_ssim_loss)(x, y, ssim_weight=0.2, mask=roi).shape
    (2, 48, 48, 3)
  """
  mask_name = "mask"
  if weight_map is not None:
    if mask is not None:
      raise TypeError(
          "l1_ssim_loss got both mask and weight_map; pass mask only "
          "(weight_map is its deprecated alias)")
    _warn_weight_map()
    mask, mask_name = weight_map, "weight_map"
  p = plan_lib.make_plan(
      x, y, fn="l1_ssim_loss", data_range=data_range,
      window_size=window_size, sigma=sigma, k1=k1, k2=k2, padding=padding,
      mask=mask, mask_mode="weighted", filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis,
      mask_name=mask_name, ssim_weight=ssim_weight)
  lam = checks.check_unit_interval(ssim_weight, "ssim_weight")
  absdiff = jnp.abs(p.x - p.y)  # L1 over every pixel (or voxel) and channel
  if p.mask is None:
    l1 = jnp.mean(absdiff)
  else:
    w = jnp.broadcast_to(p.mask, p.x.shape)
    l1 = safe_ratio(jnp.sum(w * absdiff), jnp.sum(w))
  ssim_term = loss_from_sums(_sums(p))
  return (1.0 - lam) * l1 + lam * ssim_term


_WARNED: set[str] = set()


def _warn_weight_map() -> None:
  """`weight_map` is deprecated: one DeprecationWarning per process (as
  optax warns, `stacklevel` at the caller)."""
  if "weight_map" in _WARNED:
    return
  _WARNED.add("weight_map")
  warnings.warn(
      "l1_ssim_loss(weight_map=...) is deprecated: pass mask=... (the name "
      "every other ssim_jax function uses); weight_map will be removed in a "
      "future release", DeprecationWarning, stacklevel=3)
