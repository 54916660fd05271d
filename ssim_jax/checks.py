"""Argument validation shared by every public ssim_jax function.

Every check here runs at trace time, on static information (shapes, dtypes,
Python scalars). Values of arrays are only inspected when they are concrete
(not traced): under `jax.jit` a negative mask or a non-positive per-image
`data_range` cannot be detected without a host synchronisation, which the
library never does; such inputs are the caller's contract there.

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
MIN_IMAGE_SIZE = 3


class Images(NamedTuple):
  """Validated image pair.

  Attributes:
    x: float32 `[B, H, W, C]`.
    y: float32 `[B, H, W, C]`.
    batched: False when the caller passed `[H, W, C]`; results then drop
      the batch axis.
  """
  x: jax.Array
  y: jax.Array
  batched: bool


def _is_concrete(a: Any) -> bool:
  return not isinstance(a, jax.core.Tracer)


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


def check_images(x: Any, y: Any) -> Images:
  """Validates an image pair and casts it to float32 `[B, H, W, C]`.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]`, float16/bfloat16/float32.
    y: same shape as `x`, floating.

  Returns:
    `Images` with float32 arrays (statistics are always computed in float32).

  Raises:
    TypeError: non-array or non-floating (integer, bool, complex) images.
    ValueError: rank other than 3 or 4, shape mismatch, empty channel axis,
      or an image side smaller than 3 pixels.
  """
  x = _as_array(x, "x")
  y = _as_array(y, "y")
  _check_float_dtype(x, "x")
  _check_float_dtype(y, "y")
  if x.ndim not in (3, 4):
    raise ValueError(
        f"x must have rank 4 [B, H, W, C] or rank 3 [H, W, C], got shape "
        f"{tuple(x.shape)}")
  if y.shape != x.shape:
    raise ValueError(
        f"y must have the same shape as x, got x {tuple(x.shape)} and y "
        f"{tuple(y.shape)}")
  batched = x.ndim == 4
  if not batched:
    x, y = x[None], y[None]
  _, h, w, c = x.shape
  if c < 1:
    raise ValueError(f"x must have at least one channel, got shape {x.shape}")
  if min(h, w) < MIN_IMAGE_SIZE:
    raise ValueError(
        f"x images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels "
        f"(the smallest SSIM window), got H={h}, W={w}")
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  chex.assert_rank([x, y], 4)
  chex.assert_equal_shape([x, y])
  return Images(x, y, batched)


def _check_positive_real(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  return value


def check_window(window_size: Any, sigma: Any) -> tuple[int, float]:
  """Validates the Gaussian window options.

  Args:
    window_size: odd int >= 3.
    sigma: finite float > 0 (pixels).

  Returns:
    `(window_size, sigma)` as Python int and float.
  """
  if isinstance(window_size, bool) or not isinstance(
      window_size, numbers.Integral):
    raise TypeError(f"window_size must be an int, got {window_size!r}")
  window_size = int(window_size)
  if window_size < MIN_IMAGE_SIZE or window_size % 2 == 0:
    raise ValueError(
        f"window_size must be odd and >= {MIN_IMAGE_SIZE}, got {window_size}")
  sigma = _check_positive_real(sigma, "sigma")
  return window_size, sigma


def effective_window(window_size: int, height: int, width: int) -> int:
  """The window actually used for an image of `height` x `width` pixels.

  When the image is smaller than the window, the window shrinks to the largest
  odd size that fits (at least 3). Note `min(H, W) | 1` overshoots for even
  sizes (8 | 1 == 9 > 8); this does not.

  Args:
    window_size: requested odd window.
    height: image height H >= 3.
    width: image width W >= 3.

  Returns:
    odd int in [3, window_size].
  """
  side = min(height, width)
  if side >= window_size:
    return window_size
  largest_odd = side if side % 2 == 1 else side - 1
  return max(MIN_IMAGE_SIZE, largest_odd)


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
      when concrete; under `jit` they are the caller's contract.
    batch: B.
    ks: `(k1, k2)`; `(k * data_range)^2` must be a normal, finite float32.

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
  if _is_concrete(data_range):
    values = np.asarray(data_range, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
      raise ValueError(
          f"data_range must be finite and > 0 everywhere, got {values}")
    _check_constants_representable(values.reshape(-1), ks)
  return jnp.broadcast_to(jnp.asarray(data_range, jnp.float32), (batch,))


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def check_filter_method(method: Any) -> str:
  # Read filters.METHODS at call time: new lowerings register themselves there.
  return check_choice(method, "filter_method",
                      ("auto",) + tuple(filters.METHODS))


def check_mask(mask: Any, shape: tuple[int, int, int, int], *, batched: bool,
               name: str = "mask") -> jax.Array | None:
  """Validates a mask (per-pixel non-negative weights) for images of `shape`.

  Args:
    mask: None, or an array with the rank of the images (`[B, H, W, 1|C]`
      for batched images, `[H, W, 1|C]` otherwise) whose leading axes may
      be 1 (broadcast). bool, integer and floating masks are accepted.
      Values (non-negative, not NaN) are checked only when concrete.
    shape: `[B, H, W, C]` of the validated images.
    batched: whether the caller's images had a batch axis.
    name: argument name used in errors.

  Returns:
    None, or float32 `[B, H, W, 1|C]`.
  """
  if mask is None:
    return None
  mask = _as_array(mask, name)
  dtype = np.dtype(mask.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_):
    raise TypeError(f"{name} must be real (bool, int or float), got {dtype}")
  want_rank = 4 if batched else 3
  b, h, w, c = shape
  expected = "[B, H, W, 1|C]" if batched else "[H, W, 1|C]"
  if mask.ndim != want_rank:
    raise ValueError(
        f"{name} must have rank {want_rank} {expected} like the images, got "
        f"shape {tuple(mask.shape)}")
  full = mask.shape if batched else (1,) + tuple(mask.shape)
  ok = (full[0] in (1, b) and full[1] in (1, h) and full[2] in (1, w)
        and full[3] in (1, c))
  if not ok:
    raise ValueError(
        f"{name} of shape {tuple(mask.shape)} does not broadcast to the "
        f"images {(b, h, w, c) if batched else (h, w, c)}; expected "
        f"{expected}")
  if _is_concrete(mask):
    values = np.asarray(mask, np.float64)
    if np.any(np.isnan(values)):
      raise ValueError(f"{name} contains NaN")
    if np.any(values < 0):
      raise ValueError(
          f"{name} must be non-negative, got minimum {values.min()}")
  mask = jnp.asarray(mask, jnp.float32)
  if not batched:
    mask = mask[None]
  return jnp.broadcast_to(mask, (b, h, w, full[3]))


def check_unit_interval(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return value
