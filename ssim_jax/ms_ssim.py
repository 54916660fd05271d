"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003), with mask support.

    MS-SSIM = prod_{l < L-1} relu(cs_l)^{w_l} * relu(ssim_{L-1})^{w_{L-1}}

per image and channel, then averaged over channels (weighted by each
channel's mask mass; a plain mean without a mask). Between levels both
images (and the mask) are 2x2 average-pooled; an odd side is zero-padded by
one pixel first, exactly like pytorch-msssim's `avg_pool2d(padding=s % 2)`,
whose values this module reproduces (golden fixture in tests/fixtures).

Volumes (`spatial_dims=3`): the pyramid halves an axis only while the halved
side (ceil(n / 2)) stays at least that axis's window, so a thin
through-plane axis (D of an MR volume with 5 mm slices, say) stops
shrinking while H and W go on. H and W must reach every level, so each
needs `(K - 1) 2^(levels - 1) + 1` voxels as in 2-D (where the same rule
always halves both axes); D needs only its window K_D. The window is the
same at every level, in voxels.

`relu` keeps negative contrast-structure at coarse scales from producing
NaN in a fractional power (anti-correlated inputs); the power itself is made
gradient-safe below `_POW_EPS` (see `_safe_pow`).

In "foreground" mask mode the pyramid is mask-weighted too (pooled
`m x / m`), so masked-out pixels cannot reach coarser levels.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks
from ssim_jax import fused
from ssim_jax import plan as plan_lib
from ssim_jax import planes
from ssim_jax import route as route_lib
from ssim_jax import stats as stats_lib
from ssim_jax.ssim import SSIMSums
from ssim_jax.ssim import loss_from_sums
from ssim_jax.ssim import safe_ratio

# Wang et al. 2003, the five standard scale weights.
DEFAULT_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Below this value, v**w continues linearly to 0 (same value and a finite
# slope eps**(w-1) at the joint), so the gradient stays finite as cs -> 0+.
_POW_EPS = 1e-6


def _safe_pow(v: jax.Array, w: float) -> jax.Array:
  """relu(v)**w with a finite gradient everywhere (v float32, w >= 0)."""
  v = jnp.maximum(v, 0.0)
  if w == 0.0:
    return jnp.ones_like(v)
  big = v > _POW_EPS
  power = jnp.where(big, v, 1.0) ** w
  linear = v * (_POW_EPS ** (w - 1.0))
  return jnp.where(big, power, linear)


def _check_levels(levels: Any, weights: Any) -> tuple[float, ...]:
  """Validates `levels` / `weights` and returns the per-level weights."""
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
    raise TypeError(f"levels must be an int, got {levels!r}")
  if levels < 1:
    raise ValueError(f"levels must be >= 1, got {levels}")
  if weights is None:
    if levels > len(DEFAULT_WEIGHTS):
      raise ValueError(
          f"levels={levels} needs explicit weights (the standard weights "
          f"cover {len(DEFAULT_WEIGHTS)} levels)")
    if levels == len(DEFAULT_WEIGHTS):
      # As published (they sum to 1.0001); pytorch-msssim and tf agree.
      return DEFAULT_WEIGHTS
    # Fewer levels: the first `levels` standard weights, renormalised to 1.
    w = np.asarray(DEFAULT_WEIGHTS[:levels], np.float64)
    return tuple(float(v) for v in w / w.sum())
  try:
    w = np.asarray(weights, np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise TypeError(f"weights must be a sequence of floats, got "
                    f"{weights!r}") from e
  if w.shape[0] != levels:
    raise ValueError(
        f"weights must have one entry per level ({levels}), got {w.shape[0]}")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
  return tuple(float(v) for v in w)


def min_size(levels: int, window_size: int) -> int:
  """Smallest image side for `levels` scales with a `window_size` window.

  The coarsest level (side ceil(S / 2^(levels-1))) must hold one window.
  """
  return (window_size - 1) * 2 ** (levels - 1) + 1


def _fitting_settings(side: int, window_size: int, levels: int) -> str:
  max_levels = 0
  while max_levels < 8 and side >= min_size(max_levels + 1, window_size):
    max_levels += 1
  max_window = 0
  for k in range(window_size, 2, -2):
    if side >= min_size(levels, k):
      max_window = k
      break
  parts = []
  if max_levels >= 1:
    parts.append(f"levels={max_levels} with window_size={window_size}")
  if max_window:
    parts.append(f"window_size={max_window} with levels={levels}")
  return " or ".join(parts) if parts else "no setting (image too small)"


def _pool(a: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
  """Average pooling by 2 along `axes` (default: every spatial axis of
  `[B, *S, C]`); odd sides padded by one leading zero (counted in the
  mean, as pytorch-msssim's `avg_pool2d(padding=s % 2)`)."""
  if axes is None:
    axes = tuple(range(1, a.ndim - 1))
  a = jnp.pad(a, [(a.shape[i] % 2, 0) if i in axes else (0, 0)
                  for i in range(a.ndim)])
  shape, mean_axes = [], []
  for i, n in enumerate(a.shape):
    if i in axes:
      shape += [n // 2, 2]
      mean_axes.append(len(shape) - 1)
    else:
      shape.append(n)
  return a.reshape(shape).mean(axis=tuple(mean_axes))


def pyramid_axes(sides: tuple[int, ...], windows: tuple[int, ...]
                 ) -> tuple[int, ...]:
  """Spatial axes (counted from 1, as in `[B, *S, C]`) halved on the way to
  the next level: those whose halved side ceil(n / 2) is still >= the
  window."""
  return tuple(i + 1 for i, (n, k) in enumerate(zip(sides, windows))
               if -(-n // 2) >= k)


def min_sizes(levels: int, windows: tuple[int, ...]) -> tuple[int, ...]:
  """Smallest side per spatial axis for `levels` scales: H and W (the last
  two axes) `min_size`, D (volumes) its window."""
  in_plane = tuple(min_size(levels, k) for k in windows[-2:])
  return tuple(windows[:-2]) + in_plane


def _level_values(x, y, mask, *, kernel, c1, c2, padding, lowering,
                  foreground, term, route: route_lib.Route):
  """Per image and channel weighted mean of the SSIM (`term="ssim"`) or
  contrast-structure (`term="cs"`) map and the weights' mass, both `[B, C]`
  (x, y `[B, *S, C]`).

  `route` is this scale's, decided up front (`_level_routes`): where it is
  fused (in practice the finest scale) the sum takes the fused analytic
  derivative (`fused.weighted_plane_sums`), as `ssim_loss` does; the
  coarser scales and the foreground mode run under plain autodiff.
  """
  axes = tuple(range(1, x.ndim - 1))
  if mask is None:
    weights = jnp.ones((1,) * x.ndim, jnp.float32)
  else:
    weights = planes.align_mask(mask, kernel, padding)
  if route.fused:
    total = fused.weighted_plane_sums(
        x, y, weights, kernel=kernel, c1=c1, c2=c2, padding=padding,
        filter_method=lowering, planes_per_chunk=route.planes_per_chunk,
        slab_depth=route.slab_depth, term=term)
    map_shape = (x.shape[0],) + planes.map_sides(
        x.shape, tuple(k.shape[0] for k in kernel), padding) + (x.shape[-1],)
    mass = jnp.sum(jnp.broadcast_to(weights, map_shape), axis=axes)
    return safe_ratio(total, mass), mass
  if foreground:
    st, local_mass = stats_lib.masked_local_stats(
        x, y, mask, kernel=kernel, padding=padding, filter_method=lowering)
  else:
    st = stats_lib.local_stats(x, y, kernel=kernel, padding=padding,
                               filter_method=lowering)
  luminance, cs = stats_lib.luminance_cs(st, c1, c2)
  value = luminance * cs if term == "ssim" else cs
  weights = jnp.broadcast_to(weights, cs.shape)
  if foreground:
    weights = jnp.where(local_mass > 0, weights, 0.0)
  mass = jnp.sum(weights, axis=axes)
  return safe_ratio(jnp.sum(weights * value, axis=axes), mass), mass


def _level_routes(p: plan_lib.Plan, levels: int
                  ) -> tuple[route_lib.Route, ...]:
  """The route of every scale, decided before any arithmetic: scale 0 is the
  plan's; scale j + 1 has the sides of scale j halved (rounded up) along
  `pyramid_axes`, as `_pool` makes them."""
  ws = p.window.sizes
  shape = tuple(p.x.shape)
  routes = [p.route]
  for _ in range(levels - 1):
    axes = pyramid_axes(shape[1:-1], ws)
    shape = tuple(-(-n // 2) if i in axes else n for i, n in enumerate(shape))
    routes.append(route_lib.Route(0, 0) if p.foreground else
                  route_lib.choose_route(shape, kernel_size=ws,
                                         padding=p.padding,
                                         filter_method=p.filter_method))
  return tuple(routes)


def _too_small_message(sides, window: checks.Window, levels: int) -> str:
  ws = window.sizes
  if len(sides) == 2 and window.isotropic:
    side = min(sides)
    return (f"x images of {sides[0]}x{sides[1]} are too small for MS-SSIM "
            f"with levels={levels} and window_size={ws[0]}: the minimum side "
            f"is {min_size(levels, ws[0])}; use "
            f"{_fitting_settings(side, ws[0], levels)}")
  letters = "HW" if len(sides) == 2 else "DHW"
  fits = [lv for lv in range(1, 9) if all(
      n >= m for n, m in zip(sides, min_sizes(lv, ws)))]
  use = (f"use levels={fits[-1]} or a smaller window" if fits
         else "use a smaller window (one level does not fit)")
  return (f"x {'images' if len(sides) == 2 else 'volumes'} of "
          f"{'x'.join(map(str, sides))} are too small for MS-SSIM with "
          f"levels={levels} and window_size={ws} ({letters}): the minimum "
          f"size per axis ({', '.join(letters)}) is "
          f"{min_sizes(levels, ws)} (H and W are halved at every level, D "
          f"only while it stays >= its window); {use}")


def _ms_ssim_parts(x, y, *, fn, data_range, window_size, sigma, k1, k2,
                   padding, mask, mask_mode, filter_method, levels, weights,
                   spatial_dims, spacing, channel_axis):
  """Validated MS-SSIM of public function `fn`: (per-image value [B],
  per-image level-0 mask mass [B], batched)."""
  # Every check and decision up front: the plan (the window is not shrunk:
  # every level uses the same window), the size check, each scale's route.
  p = plan_lib.make_plan(
      x, y, fn=fn, data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis,
      shrink_window=False, levels=levels, weights=weights)
  level_weights = _check_levels(levels, weights)
  levels = len(level_weights)
  ws = p.window.sizes
  sides = tuple(p.x.shape[1:-1])
  checks.check_layout(
      tuple(np.shape(x)), checks.Images(p.x, p.y, p.batched, p.channel_axis),
      p.window, needed=min_sizes(levels, ws),
      what=f"the {{k}} pixels MS-SSIM needs for levels={levels}",
      small_fix="use fewer levels or a smaller window_size")
  if any(n < m for n, m in zip(sides, min_sizes(levels, ws))):
    raise ValueError(_too_small_message(sides, p.window, levels))
  routes = _level_routes(p, levels)
  xs, ys, ms = p.x, p.y, p.mask
  if p.foreground:
    inside = jnp.broadcast_to(ms, xs.shape) > 0
    xs = jnp.where(inside, xs, 0.0)
    ys = jnp.where(inside, ys, 0.0)
  factors = []
  mass0 = None
  for level in range(levels):
    last = level == levels - 1
    mean, mass = _level_values(
        xs, ys, ms, kernel=p.kernel, c1=p.c1, c2=p.c2, padding=p.padding,
        lowering=p.lowering, foreground=p.foreground,
        term="ssim" if last else "cs", route=routes[level])
    if level == 0:
      mass0 = mass
    factors.append(_safe_pow(mean, level_weights[level]))
    if not last:
      axes = pyramid_axes(tuple(xs.shape[1:-1]), ws)
      if p.foreground:
        mb = jnp.broadcast_to(ms, xs.shape)
        pm = _pool(mb, axes)
        xs = safe_ratio(_pool(mb * xs, axes), pm)
        ys = safe_ratio(_pool(mb * ys, axes), pm)
        ms = _pool(ms, axes)
      else:
        xs, ys = _pool(xs, axes), _pool(ys, axes)
        ms = None if ms is None else _pool(ms, axes)
  per_channel = factors[0]
  for f in factors[1:]:
    per_channel = per_channel * f
  # Channels weighted by their level-0 mask mass (equal without a mask).
  mass = jnp.sum(mass0, axis=-1)
  value = safe_ratio(jnp.sum(mass0 * per_channel, axis=-1), mass)
  chex.assert_shape([value, mass], (p.x.shape[0],))
  return value, mass, p.batched


def ms_ssim(
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
    levels: int = 5,
    weights: Sequence[float] | None = None,
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> jax.Array:
  """Per-image MS-SSIM (Wang et al. 2003)::

      MS-SSIM = prod_{j < M} relu(mean_w cs_j)^(w_j) * relu(mean_w SSIM_M)^(w_M)

  over `M = levels` scales, the images (and mask) average-pooled by 2 from one
  scale to the next, `cs_j` the contrast-structure map at scale j, `w_j` the
  level weights; channels are averaged by their level-0 mask mass.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      float16/bfloat16/float32; H and W must be >= (window_size - 1) *
      2^(levels-1) + 1 (161 for the defaults), D >= its window, else a
      ValueError names the minimum and settings that fit.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis (None: 11, with
      `spacing` +-3.5 sigma per axis); used unchanged at every level.
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`), pooled with the images at each level.
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    levels: number of scales; with `weights=None` and levels < 5 the first
      `levels` standard weights are used, renormalised to sum to 1.
    weights: optional per-level exponents (non-negative floats).
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    float32 `[B]` in [0, 1] (scalar for `[H, W, C]` inputs); 0 with zero
    gradient for an image with zero mask mass.

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> ms_ssim(x, x, levels=2, window_size=7)    # 48 px: too small for 5 levels
    Array([1., 1.], dtype=float32)
    >>> ms_ssim(x, y).shape
    Traceback (most recent call last):
    ...
    ValueError: x images of 48x48 are too small for MS-SSIM with levels=5 and window_size=11: the minimum side is 161; ...
  """
  value, _, batched = _ms_ssim_parts(
      x, y, fn="ms_ssim", data_range=data_range, window_size=window_size,
      sigma=sigma, k1=k1, k2=k2, padding=padding, mask=mask,
      mask_mode=mask_mode, filter_method=filter_method, levels=levels,
      weights=weights, spatial_dims=spatial_dims, spacing=spacing,
      channel_axis=channel_axis)
  return value if batched else value[0]


def ms_ssim_loss(
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
    levels: int = 5,
    weights: Sequence[float] | None = None,
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> jax.Array:
  """Scalar `1 - MS-SSIM`, images weighted by their (level-0) mask mass.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      floating.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis (None: 11, with
      `spacing` +-3.5 sigma per axis).
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`).
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    levels: number of scales.
    weights: optional per-level exponents.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm): `sigma` is then physical, and the default
      window per axis the odd size covering +-3.5 sigma / spacing voxels.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    float32 scalar in [0, 1]; 0 with zero gradient when the mask mass is 0.

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> bool(0 < ms_ssim_loss(x, y, levels=2, window_size=7) < 0.1)
    True
  """
  sums = _ms_ssim_sums(
      x, y, fn="ms_ssim_loss", data_range=data_range,
      window_size=window_size, sigma=sigma, k1=k1, k2=k2, padding=padding,
      mask=mask, mask_mode=mask_mode, filter_method=filter_method,
      levels=levels, weights=weights, spatial_dims=spatial_dims,
      spacing=spacing, channel_axis=channel_axis)
  return loss_from_sums(sums)


def _ms_ssim_sums(x, y, **options) -> SSIMSums:
  value, mass, batched = _ms_ssim_parts(x, y, **options)
  sums = SSIMSums(mass * value, mass)
  return sums if batched else SSIMSums(sums.weighted_sum[0], sums.mass[0])


def ms_ssim_sums(
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
    levels: int = 5,
    weights: Sequence[float] | None = None,
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
    channel_axis: int = -1,
) -> SSIMSums:
  """Per-image MS-SSIM as additive partials, for batches split over devices.

  `weighted_sum` is each image's MS-SSIM times its weight, the level-0 mask
  mass (the count of map positions x channels without a mask), and `mass`
  that weight; so `weighted_sum / mass` is `ms_ssim` and
  `loss_from_sums(sums, axis_name=...)` over a batch split across devices
  (or chunks) is the `ms_ssim_loss` of the whole batch. MS-SSIM is not a
  mean of a map (it is a product of powers of per-scale means), so these
  sums are per image: split the batch, not an image.

  Under `jax.jit` every option except `data_range` and `mask` is static:
  pass them in `static_argnames` or close over them.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes: see `spatial_dims`),
      floating; the size rule of `ms_ssim`.
    y: same shape as `x`.
    data_range: float or float array `[B]`.
    window_size: odd window >= 3, or one per spatial axis (None: 11, with
      `spacing` +-3.5 sigma per axis).
    sigma: Gaussian standard deviation, pixels (physical with `spacing`),
      one or one per spatial axis.
    k1: luminance constant.
    k2: contrast constant.
    padding: "valid" or "same" (either case).
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`).
    mask_mode: "weighted" or "foreground".
    filter_method: blur lowering.
    levels: number of scales.
    weights: optional per-level exponents.
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W,
      C]`, or `[D, H, W, C]`); never guessed from the rank.
    spacing: optional physical voxel size per spatial axis ((sz, sy, sx)
      for volumes, e.g. mm).
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`, PyTorch's layout).

  Returns:
    `SSIMSums(weighted_sum, mass)`, each float32 `[B]` (scalars for
    `[H, W, C]` inputs).

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = 0.8 * x + 0.1                                           # lower contrast
    >>> s = ms_ssim_sums(x, y, levels=2, window_size=7)
    >>> s.mass                            # the 42 x 42 level-0 map x 3 channels
    Array([5292., 5292.], dtype=float32)
    >>> bool(jnp.allclose(s.weighted_sum / s.mass, ms_ssim(x, y, levels=2, window_size=7)))
    True
    >>> bool(loss_from_sums(s) == ms_ssim_loss(x, y, levels=2, window_size=7))
    True
  """
  return _ms_ssim_sums(
      x, y, fn="ms_ssim_sums", data_range=data_range,
      window_size=window_size, sigma=sigma, k1=k1, k2=k2, padding=padding,
      mask=mask, mask_mode=mask_mode, filter_method=filter_method,
      levels=levels, weights=weights, spatial_dims=spatial_dims,
      spacing=spacing, channel_axis=channel_axis)
