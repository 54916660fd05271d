"""Argument validation shared by every public ssim_jax function.

Every check here runs at trace time, on static information (shapes, dtypes,
Python scalars). Values of arrays are inspected only when they are host data
(numpy arrays, Python numbers and lists): a `jax.Array`'s values, traced or
concrete, are never read, so no call copies device data to the host, under
`jax.jit` or not. A negative `jax.Array` mask or a non-positive per-image
`data_range` held in a `jax.Array` is the caller's contract.

Options that decide shapes or the program (window, constants, padding, modes,
`spatial_dims`, `spacing`, `channel_axis`, MS-SSIM's `levels` and `weights`)
are static: a traced one is a `TypeError` that shows the `static_argnames`
fix (`check_static`). `data_range` and masks are ordinary (traceable) arrays.

Errors are `TypeError` (wrong kind of thing: integer images, a float window
size) or `ValueError` (right kind, wrong value or shape), and the message
always starts with the name of the offending argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import filters

PADDINGS = ("valid", "same")
MASK_MODES = ("weighted", "foreground")
SPATIAL_DIMS = (2, 3)
MIN_IMAGE_SIZE = 3
# Default window without `spacing` (Wang et al. 2004), every axis.
DEFAULT_WINDOW = 11
# With `spacing`, the default window covers +-TRUNCATE sigma per axis, as
# skimage's `truncate=3.5` (radius int(3.5 sigma + 0.5): 11 for sigma 1.5).
TRUNCATE = 3.5


class Images(NamedTuple):
  """Validated image pair, moved to channels-last.

  Attributes:
    x: float32 `[B, H, W, C]` (volumes `[B, D, H, W, C]`).
    y: float32, same shape as `x`.
    batched: False when the caller passed `[H, W, C]` (`[D, H, W, C]`);
      results then drop the batch axis.
    channel_axis: the channel axis in the caller's array, >= 0 (results
      with a channel axis, the SSIM map, go back there).
  """
  x: jax.Array
  y: jax.Array
  batched: bool
  channel_axis: int


class Window(NamedTuple):
  """Validated Gaussian window, per spatial axis (D, H, W or H, W order).

  Attributes:
    sizes: requested odd window sizes, voxels.
    sigmas: standard deviations, voxels (physical sigma / spacing).
    isotropic: one window size was given (or the default without
      `spacing`): it shrinks as a whole to fit the smallest side.
  """
  sizes: tuple[int, ...]
  sigmas: tuple[float, ...]
  isotropic: bool


def _axis_letters(spatial_dims: int) -> str:
  return "HW" if spatial_dims == 2 else "DHW"


def _dims_text(spatial_dims: int, batched: bool, channel_axis: int = -1,
               channels: str = "C") -> str:
  """The layout in words, e.g. `[B, H, W, C]`, or `[B, C, H, W]` for
  `channel_axis=1` (`channel_axis` counted in the caller's rank)."""
  names = (["B"] if batched else []) + list(_axis_letters(spatial_dims))
  position = channel_axis % (len(names) + 1)
  names.insert(position, channels)
  return "[" + ", ".join(names) + "]"


def _is_traced(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return any(_is_traced(v) for v in value)
  return isinstance(value, jax.core.Tracer)


def check_static(fn: str, **options: Any) -> None:
  """Raises a `TypeError` showing the `static_argnames` fix for a traced option.

  Args:
    fn: the public function's name, e.g. "ssim" (used in the fix shown).
    **options: the static options of the call, by name (a sequence option
      is traced when any of its entries is).
  """
  for name, value in options.items():
    if _is_traced(value):
      raise TypeError(
          f"{name} is a static option of ssim_jax.{fn} (it decides shapes or "
          f"the program) and cannot be a traced value. Under jax.jit mark it "
          f"static: jax.jit(ssim_jax.{fn}, static_argnames=({name!r},)), or "
          f"close over it: jax.jit(lambda x, y: ssim_jax.{fn}(x, y, "
          f"{name}=...)). Only data_range and the mask are traceable.")


def check_channel_axis(channel_axis: Any, ndim: int, *, batched: bool) -> int:
  """Validates `channel_axis` for images of rank `ndim`, returns it >= 0.

  Args:
    channel_axis: int in [-ndim, ndim) (default -1: channels-last); not the
      batch axis 0 of batched images.
    ndim: the rank of the caller's images.
    batched: whether axis 0 is the batch axis.
  """
  if isinstance(channel_axis, bool) or not isinstance(
      channel_axis, numbers.Integral):
    raise TypeError(
        f"channel_axis must be an int (-1: channels-last [B, H, W, C]; 1: "
        f"channels-first [B, C, H, W]), got {channel_axis!r}; for grayscale "
        f"images without a channel axis add one (x[..., None])")
  axis = int(channel_axis)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"channel_axis={axis} is out of range for images of rank {ndim}")
  axis %= ndim
  if batched and axis == 0:
    raise ValueError(
        f"channel_axis must not be the batch axis 0 of rank-{ndim} images; "
        f"use channel_axis=1 for channels-first [B, C, H, W] images")
  return axis


def check_spatial_dims(spatial_dims: Any) -> int:
  """Validates `spatial_dims`: 2 (images) or 3 (volumes)."""
  if isinstance(spatial_dims, bool) or not isinstance(
      spatial_dims, numbers.Integral):
    raise TypeError(f"spatial_dims must be an int (2 or 3), got "
                    f"{spatial_dims!r}")
  if int(spatial_dims) not in SPATIAL_DIMS:
    raise ValueError(f"spatial_dims must be 2 (images [B, H, W, C]) or 3 "
                     f"(volumes [B, D, H, W, C]), got {spatial_dims}")
  return int(spatial_dims)


def _on_host(a: Any) -> bool:
  """Whether `a`'s values can be read without a device-to-host copy (numpy
  data; a `jax.Array`, traced or not, is never read)."""
  return isinstance(a, (np.ndarray, np.generic))


def _as_array(a: Any, name: str) -> Any:
  if isinstance(a, (jax.Array, np.ndarray)):
    return a
  if isinstance(a, (list, tuple)) or isinstance(a, numbers.Number):
    return np.asarray(a)
  raise TypeError(
      f"{name} must be an array (jax.Array or numpy.ndarray), got "
      f"{type(a).__name__}")


def _check_float_dtype(a: Any, name: str) -> None:
  dtype = np.dtype(a.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16 or float32), "
        f"got {dtype}; convert integer images with e.g. "
        f"x.astype(jnp.float32) / 255.0")


def check_images(x: Any, y: Any, *, spatial_dims: int = 2,
                 channel_axis: Any = -1,
                 min_side: int = MIN_IMAGE_SIZE) -> Images:
  """Validates an image pair and casts it to float32 channels-last `[B, *S, C]`.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (spatial_dims=2); `[B, D, H, W, C]` or
      `[D, H, W, C]` (spatial_dims=3); float16/bfloat16/float32; the
      channel axis where `channel_axis` says.
    y: same shape as `x`, floating.
    spatial_dims: 2 or 3 (validated by `check_spatial_dims`). The rank is
      never used to guess it: a rank-5 array without spatial_dims=3 is an
      error, not a volume.
    channel_axis: the channel axis of `x` and `y` (`check_channel_axis`);
      it is moved last.
    min_side: the smallest spatial side accepted (3, the smallest SSIM
      window; 1 for PSNR).

  Returns:
    `Images` with float32 channels-last arrays (statistics are always
    computed in float32).

  Raises:
    TypeError: non-array or non-floating (integer, bool, complex) images.
    ValueError: wrong rank for `spatial_dims`, shape mismatch, empty channel
      axis, or a spatial side smaller than `min_side` pixels.
  """
  spatial_dims = check_spatial_dims(spatial_dims)
  x = _as_array(x, "x")
  y = _as_array(y, "y")
  _check_float_dtype(x, "x")
  _check_float_dtype(y, "y")
  rank = spatial_dims + 2
  if x.ndim not in (rank - 1, rank):
    hint = ""
    if spatial_dims == 2 and x.ndim == 5:
      hint = "; volumes [B, D, H, W, C] need spatial_dims=3"
    elif spatial_dims == 3 and x.ndim == 3:
      hint = "; images [H, W, C] need spatial_dims=2"
    raise ValueError(
        f"x must have rank {rank} {_dims_text(spatial_dims, True)} or rank "
        f"{rank - 1} {_dims_text(spatial_dims, False)} (spatial_dims="
        f"{spatial_dims}), got shape {tuple(x.shape)}{hint}")
  if y.shape != x.shape:
    raise ValueError(
        f"y must have the same shape as x, got x {tuple(x.shape)} and y "
        f"{tuple(y.shape)}")
  batched = x.ndim == rank
  axis = check_channel_axis(channel_axis, x.ndim, batched=batched)
  shape = tuple(x.shape)
  shape = shape[:axis] + shape[axis + 1:] + (shape[axis],)  # channels-last
  if not batched:
    shape = (1,) + shape
  _, *sides, c = shape
  if c < 1:
    raise ValueError(f"x must have at least one channel, got shape "
                     f"{tuple(x.shape)}")
  if min(sides) < min_side:
    got = ", ".join(f"{a}={n}" for a, n in
                    zip(_axis_letters(spatial_dims), sides))
    kind = "images" if spatial_dims == 2 else "volumes"
    smallest = "x".join([str(min_side)] * spatial_dims)
    why = (" (the smallest SSIM window)" if min_side == MIN_IMAGE_SIZE
           else "")
    raise ValueError(
        f"x {kind} must be at least {smallest} pixels{why}, got {got}")
  x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
  y = jnp.moveaxis(jnp.asarray(y, jnp.float32), axis, -1)
  if not batched:
    x, y = x[None], y[None]
  chex.assert_shape([x, y], shape)
  return Images(x, y, batched, axis)


def _check_positive_real(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  return value


def _per_axis(value: Any, name: str, spatial_dims: int) -> tuple[Any, ...]:
  """One value for every spatial axis, or a sequence of one per axis."""
  if isinstance(value, (tuple, list, np.ndarray)):
    values = tuple(np.asarray(value).reshape(-1).tolist()) if isinstance(
        value, np.ndarray) else tuple(value)
    if len(values) != spatial_dims:
      raise ValueError(
          f"{name} must be one value or one per spatial axis "
          f"({_axis_letters(spatial_dims)}: {spatial_dims}), got "
          f"{len(values)}: {value!r}")
    return values
  return (value,) * spatial_dims


def _check_odd_window(k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise TypeError(f"window_size must be an int or one int per spatial "
                    f"axis, got {k!r}")
  k = int(k)
  if k < MIN_IMAGE_SIZE or k % 2 == 0:
    raise ValueError(
        f"window_size must be odd and >= {MIN_IMAGE_SIZE}, got {k}")
  return k


def physical_window(sigma_voxels: float) -> int:
  """Default window (voxels) for a `spacing`-scaled sigma (voxels): the odd
  size covering +-3.5 sigma, `2 int(3.5 sigma + 0.5) + 1` (skimage's
  truncate=3.5; 11 for sigma 1.5), at least 3."""
  return max(MIN_IMAGE_SIZE, 2 * int(TRUNCATE * sigma_voxels + 0.5) + 1)


def check_window(window_size: Any, sigma: Any, *, spatial_dims: int = 2,
                 spacing: Any = None) -> Window:
  """Validates the Gaussian window options, per spatial axis.

  Args:
    window_size: None (the default), an odd int >= 3, or one per spatial
      axis (voxels). None means 11 on every axis without `spacing`, and
      with `spacing` the odd size covering +-3.5 sigma per axis
      (`physical_window`).
    sigma: finite float > 0, or one per spatial axis: voxels, or physical
      units (e.g. mm) when `spacing` is given.
    spatial_dims: 2 or 3.
    spacing: None, or the physical voxel size per spatial axis ((sy, sx) or
      (sz, sy, sx), finite > 0, any unit): sigma in voxels = sigma / spacing.

  Returns:
    `Window` (sizes and sigmas in voxels, one per spatial axis).
  """
  spatial_dims = check_spatial_dims(spatial_dims)
  sigmas = tuple(_check_positive_real(v, "sigma")
                 for v in _per_axis(sigma, "sigma", spatial_dims))
  if spacing is not None:
    if isinstance(spacing, jax.core.Tracer):
      raise TypeError("spacing must be concrete (Python floats), not traced")
    steps = tuple(_check_positive_real(v, "spacing")
                  for v in _per_axis(spacing, "spacing", spatial_dims))
    sigmas = tuple(s / d for s, d in zip(sigmas, steps))
  if window_size is None:
    if spacing is None:
      return Window((DEFAULT_WINDOW,) * spatial_dims, sigmas, True)
    return Window(tuple(physical_window(s) for s in sigmas), sigmas, False)
  isotropic = not isinstance(window_size, (tuple, list, np.ndarray))
  sizes = tuple(_check_odd_window(k) for k in
                _per_axis(window_size, "window_size", spatial_dims))
  return Window(sizes, sigmas, isotropic)


def effective_windows(window: Window, sides: Sequence[int]
                      ) -> tuple[int, ...]:
  """The windows actually used for spatial sides `sides` (one per axis).

  An isotropic window (one `window_size`, or the default without spacing)
  shrinks as a whole to fit the smallest side, as the 2-D rule always did;
  per-axis windows shrink axis by axis (`effective_window`).
  """
  if window.isotropic:
    return (effective_window(window.sizes[0], *sides),) * len(sides)
  return tuple(effective_window(k, n) for k, n in zip(window.sizes, sides))


def effective_window(window_size: int, *sides: int) -> int:
  """The window actually used for an image with spatial sides `sides`.

  When the image is smaller than the window, the window shrinks to the largest
  odd size that fits the smallest side (at least 3). Note `min(H, W) | 1`
  overshoots for even sizes (8 | 1 == 9 > 8); this does not.

  Args:
    window_size: requested odd window.
    *sides: spatial sides (e.g. H, W), each >= 3.

  Returns:
    odd int in [3, window_size].
  """
  side = min(sides)
  if side >= window_size:
    return window_size
  largest_odd = side if side % 2 == 1 else side - 1
  return max(MIN_IMAGE_SIZE, largest_odd)


def check_layout(caller_shape: tuple[int, ...], images: Images,
                 window: Window, *, needed: Sequence[int] | None = None,
                 what: str = "the {k}-pixel window",
                 small_fix: str = "") -> None:
  """Refuses 2-D input that is probably channels-first read as channels-last.

  A `[B, C, H, W]` batch read as `[B, H, W, C]` has an "H" of C (3 for RGB)
  and W "channels": it would only fit by shrinking the window, and the
  result would be a wrong number. So 2-D images with a spatial side below
  what the call needs (the requested window; MS-SSIM: its pyramid) and more
  channels than that side are an error naming `channel_axis`. Genuinely
  small images with many channels pass with a `window_size` that fits (then
  nothing shrinks).

  Args:
    caller_shape: the shape of the caller's `x`.
    images: the validated images (`check_images`), channels-last.
    window: the requested window (`check_window`).
    needed: the smallest side per spatial axis the call needs without
      shrinking (default: the window).
    what: what needs it, in the message; `{k}` is the side needed.
    small_fix: the fix for genuinely small images (default: a window_size
      that fits).

  Raises:
    ValueError: naming `channel_axis` and `window_size`.
  """
  _, *sides, c = images.x.shape
  if len(sides) != 2:
    return
  needed = window.sizes if needed is None else tuple(needed)
  for i, (n, k) in enumerate(zip(sides, needed)):
    if n >= k or c <= n:
      continue
    # The caller's axis that holds this "spatial" side.
    rest = [a for a in range(len(caller_shape)) if a != images.channel_axis]
    side_axis = rest[i + 1 if images.batched else i]
    ours = _dims_text(2, images.batched, images.channel_axis)
    theirs = _dims_text(2, images.batched, side_axis)
    fix = small_fix or (f"pass a window_size that fits (window_size="
                        f"{min(effective_windows(window, sides))})")
    raise ValueError(
        f"x of shape {tuple(caller_shape)}, read as {ours}, has "
        f"{'HW'[i]}={n}, below {what.format(k=k)}, and {c} channels: it is "
        f"probably channels-first. Pass channel_axis={side_axis} for "
        f"{theirs} images (PyTorch's layout); for small images with many "
        f"channels, {fix}.")


def check_constants(k1: Any, k2: Any) -> tuple[float, float]:
  """Validates the SSIM stabilising constants (both > 0, so 0/0 cannot occur)."""
  return _check_positive_real(k1, "k1"), _check_positive_real(k2, "k2")


_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


def _check_constants_representable(values: np.ndarray,
                                   ks: tuple[float, float]) -> None:
  # C = (k L)^2 must be a normal, finite float32: C == 0 allows 0/0 on flat
  # images and C == inf gives inf/inf; both would be NaN, not an error.
  for k in ks:
    c = (k * values.astype(np.float64)) ** 2
    if np.any(c < _F32_TINY) or np.any(c > _F32_MAX):
      raise ValueError(
          f"data_range {values.tolist()} is absurd for k={k}: (k * "
          f"data_range)^2 must be a normal float32 in [{_F32_TINY:.3g}, "
          f"{_F32_MAX:.3g}]")


def check_data_range(data_range: Any, batch: int, *,
                     ks: tuple[float, float] = (0.01, 0.03)) -> jax.Array:
  """Validates `data_range` and broadcasts it to float32 `[B]`.

  Args:
    data_range: Python float > 0, or a floating array of shape `[]` or `[B]`
      (per-image dynamic range). Array values are checked (> 0, finite) only
      for numpy arrays; a `jax.Array`'s values are the caller's contract
      (reading them would copy them to the host).
    batch: B.
    ks: `(k1, k2)`; `(k * data_range)^2` must be a normal, finite float32
      (PSNR passes `(1.0,)`: its `data_range^2`).

  Returns:
    float32 `[B]`.
  """
  if isinstance(data_range, numbers.Real) and not isinstance(
      data_range, bool):
    value = _check_positive_real(data_range, "data_range")
    _check_constants_representable(np.asarray([value]), ks)
    return jnp.full((batch,), value, jnp.float32)
  if isinstance(data_range, bool) or not isinstance(
      data_range, (jax.Array, np.ndarray)):
    raise TypeError(
        f"data_range must be a float or a float array [B], got "
        f"{type(data_range).__name__}")
  if not (jnp.issubdtype(data_range.dtype, jnp.floating)
          or jnp.issubdtype(data_range.dtype, jnp.integer)):
    raise TypeError(
        f"data_range must be real, got dtype {data_range.dtype}")
  if data_range.shape not in ((), (batch,)):
    raise ValueError(
        f"data_range must be a scalar or have shape [B]=({batch},), got "
        f"{tuple(data_range.shape)}")
  if _on_host(data_range):
    values = np.asarray(data_range, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
      raise ValueError(
          f"data_range must be finite and > 0 everywhere, got {values}")
    _check_constants_representable(values.reshape(-1), ks)
  return jnp.broadcast_to(jnp.asarray(data_range, jnp.float32), (batch,))


def check_choice(value: Any, name: str, choices: Sequence[str], *,
                 any_case: bool = False) -> str:
  """`value` if it is one of `choices` (lower-cased first with `any_case`:
  `padding="SAME"` is lax's and Flax's spelling)."""
  if isinstance(value, str) and any_case:
    value = value.lower()
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def check_filter_method(method: Any) -> str:
  # Read filters.METHODS at call time: new lowerings register themselves there.
  return check_choice(method, "filter_method",
                      ("auto",) + tuple(filters.METHODS))


def check_mask(mask: Any, shape: tuple[int, ...], *, batched: bool,
               name: str = "mask", channel_axis: int = -1
               ) -> jax.Array | None:
  """Validates a mask (per-pixel non-negative weights) for images of `shape`.

  Args:
    mask: None, or an array with the rank of the images, laid out like them
      (`[B, H, W, 1|C]` for batched channels-last images, `[H, W, 1|C]`
      unbatched, `[B, 1|C, H, W]` with `channel_axis=1`; volumes with D
      before H) whose leading axes may be 1 (broadcast). bool, integer and
      floating masks are accepted. Values (non-negative, not NaN) are
      checked only for numpy masks (a `jax.Array`'s values are never read).
    shape: `[B, H, W, C]` (or `[B, D, H, W, C]`) of the validated images,
      channels-last.
    batched: whether the caller's images had a batch axis.
    name: argument name used in errors.
    channel_axis: the channel axis of the caller's images and mask, >= 0
      (`Images.channel_axis`); -1: the last.

  Returns:
    None, or float32 channels-last `[B, H, W, 1|C]` (`[B, D, H, W, 1|C]`).
  """
  if mask is None:
    return None
  mask = _as_array(mask, name)
  dtype = np.dtype(mask.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_):
    raise TypeError(f"{name} must be real (bool, int or float), got {dtype}")
  spatial_dims = len(shape) - 2
  want_rank = len(shape) if batched else len(shape) - 1
  expected = _dims_text(spatial_dims, batched, channel_axis, "1|C")
  if mask.ndim != want_rank:
    raise ValueError(
        f"{name} must have rank {want_rank} {expected} like the images, got "
        f"shape {tuple(mask.shape)}")
  axis = channel_axis % want_rank
  caller = tuple(mask.shape)
  full = caller[:axis] + caller[axis + 1:] + (caller[axis],)
  if not batched:
    full = (1,) + full
  if not all(m in (1, n) for m, n in zip(full, shape)):
    images = tuple(shape) if batched else tuple(shape[1:])
    images = images[:axis] + (images[-1],) + images[axis:-1]
    raise ValueError(
        f"{name} of shape {caller} does not broadcast to the images "
        f"{images}; expected {expected}")
  if _on_host(mask):
    values = np.asarray(mask, np.float64)
    if np.any(np.isnan(values)):
      raise ValueError(f"{name} contains NaN")
    if np.any(values < 0):
      raise ValueError(
          f"{name} must be non-negative, got minimum {values.min()}")
  mask = jnp.moveaxis(jnp.asarray(mask, jnp.float32), axis, -1)
  if not batched:
    mask = mask[None]
  return jnp.broadcast_to(mask, tuple(shape[:-1]) + (full[-1],))


def check_unit_interval(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return value
