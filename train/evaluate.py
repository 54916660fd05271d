"""Evaluation of the super-resolution model: ODE sampling, metrics, PNG grid.

Conventions (flow matching, as in train/step.py): `x_t = (1 - t) z0 + t noise`
and the velocity `v = noise - z0`, so `dx/dt = v`; sampling integrates from
`t = 1` (pure noise) to `t = 0` (clean).

Metrics are computed on images mapped from [-1, 1] to [0, 1] and clipped to
[0, 1] (what a saved image holds), with `data_range = 1`:

- PSNR in dB, `10 log10(1 / MSE)` per image (infinite for identical images),
  averaged over images;
- SSIM: `ssim_jax.ssim` with the Gaussian window 11 / sigma 1.5, 'valid'
  padding (the window shrinks to the largest odd size that fits images smaller
  than 11 pixels);
- MS-SSIM: `ssim_jax.ms_ssim` with window 11 / sigma 1.5 and as many scales as
  keep the window inside the coarsest scale (at most 5; ssim_jax requires a
  side >= (window - 1) * 2^(levels - 1) + 1): 3 scales for a 64 x 64 image
  (64, 32, 16 pixels); the weights are the first standard weights (Wang et
  al. 2003) renormalised to sum to 1. 5 scales would need 161 pixels.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Wang, Simoncelli & Bovik (2003) MS-SSIM weights, finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
METRICS = ("psnr", "ssim", "ms_ssim")


# ----------------------------------------------------------------------------
# ODE sampler.


def ode_sample(velocity_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
               noise: jax.Array, cond: Any, *, num_steps: int,
               method: str = "euler", times=None) -> jax.Array:
  """Integrates dx/dt = v(x, t, cond) from t = 1 (noise) to t = 0 (clean).

  Args:
    velocity_fn: `velocity_fn(x, t, cond) -> v` with `x` like `noise`, `t`
      float32 `[B]`. The sampler is a `lax.fori_loop`: call it inside a jitted
      function (with `num_steps` and `method` static) to compile it once.
    noise: `[B, ...]` float, the sample at t = 1.
    cond: conditioning pytree passed through unchanged.
    num_steps: number of steps (>= 1).
    method: "euler" (one evaluation per step) or "heun" (two; second order).
    times: optional time grid `[num_steps + 1]` from 1 down to 0 (e.g.
      FLUX's shifted schedule, `step.sample_times`); None: uniform steps.

  Returns:
    `[B, ...]` the sample at t = 0, dtype of `noise`. Exact for a velocity
    constant along the path (v = noise - z0 gives z0 with either method).
  """
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if method not in ("euler", "heun"):
    raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
  chex.assert_rank(noise, {2, 3, 4, 5})
  b = noise.shape[0]
  if times is not None:
    times = np.asarray(times, np.float32)
    if times.shape != (num_steps + 1,) or np.any(np.diff(times) >= 0):
      raise ValueError(f"times must be a decreasing grid of num_steps + 1 = {num_steps + 1} "
                       f"values, got shape {times.shape}")
    grid = jnp.asarray(times)

  def step_times(k):
    """(t, t_next, dt) of step k."""
    if times is None:  # uniform: t = 1 - k / num_steps
      dt = 1.0 / num_steps
      t = 1.0 - k.astype(jnp.float32) * dt
      return t, t - dt, dt
    return grid[k], grid[k + 1], grid[k] - grid[k + 1]

  def v_at(x, t):
    return velocity_fn(x, jnp.full((b,), t, jnp.float32), cond).astype(x.dtype)

  def body(k, x):
    t, t_next, dt = step_times(k)
    v = v_at(x, t)
    x_euler = x - dt * v
    if method == "euler":
      return x_euler
    v2 = v_at(x_euler, t_next)
    return x - dt * 0.5 * (v + v2)

  return jax.lax.fori_loop(0, num_steps, body, noise)


# ----------------------------------------------------------------------------
# Baseline and metrics.


def bicubic_upsample(lowres: jax.Array, scale: int) -> jax.Array:
  """Bicubic upsampling `[B, h, w, C] -> [B, h * scale, w * scale, C]` (not clipped)."""
  chex.assert_rank(lowres, 4)
  if not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale must be an int >= 1, got {scale!r}")
  b, h, w, c = lowres.shape
  return jax.image.resize(jnp.asarray(lowres, jnp.float32), (b, h * scale, w * scale, c),
                          method="cubic")


def _to_unit(x) -> jax.Array:
  """[-1, 1] -> [0, 1], clipped."""
  return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def ssim_window(size: int) -> int:
  """Largest odd window <= 11 that fits an image side of `size` pixels."""
  w = min(SSIM_WINDOW, size)
  return w if w % 2 else w - 1


def ms_ssim_levels(size: int, *, window_size: int = SSIM_WINDOW) -> int:
  """Number of MS-SSIM scales (<= 5) that fit an image side of `size` pixels.

  ssim_jax.ms_ssim needs `size >= (window_size - 1) * 2**(levels - 1) + 1`
  (the window still fits the coarsest scale): 3 for 64 pixels and window 11.
  """
  levels = 1
  while (levels < len(MS_SSIM_WEIGHTS)
         and (window_size - 1) * 2**levels + 1 <= size):
    levels += 1
  return levels


def ms_ssim_weights(levels: int) -> tuple[float, ...]:
  """The first `levels` standard MS-SSIM weights, renormalised to sum to 1."""
  w = np.asarray(MS_SSIM_WEIGHTS[:levels], np.float64)
  return tuple(float(v) for v in w / w.sum())


def _metrics(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Per-image PSNR / SSIM / MS-SSIM of images in [0, 1]: float32 `[B]` each (traced)."""
  import ssim_jax  # pylint: disable=g-import-not-at-top
  from ssim_jax.ms_ssim import ms_ssim  # pylint: disable=g-import-not-at-top

  size = min(x.shape[1], x.shape[2])
  win = ssim_window(size)
  levels = ms_ssim_levels(size, window_size=win)
  return {
      "psnr": ssim_jax.psnr(x, y, data_range=1.0),
      "ssim": ssim_jax.ssim(x, y, data_range=1.0, window_size=win, sigma=SSIM_SIGMA),
      "ms_ssim": ms_ssim(x, y, data_range=1.0, window_size=win, sigma=SSIM_SIGMA,
                         levels=levels, weights=ms_ssim_weights(levels)),
  }


@functools.partial(jax.jit, static_argnames=("scale",))
def _evaluate(pred, lowres, target, scale):
  y = _to_unit(target)
  bicubic = _to_unit(bicubic_upsample(lowres, scale))
  return {"bicubic": _metrics(bicubic, y), "model": _metrics(_to_unit(pred), y)}


def image_metrics(pred, target) -> dict[str, np.ndarray]:
  """Per-image PSNR / SSIM / MS-SSIM of `pred` vs `target` (both `[B, H, W, C]` in [-1, 1]).

  The metrics of `evaluate_sr`, e.g. for VAE reconstructions: float64 `[B]` each.
  """
  chex.assert_rank([pred, target], 4)
  chex.assert_equal_shape([pred, target])
  out = jax.device_get(_image_metrics(jnp.asarray(pred, jnp.float32),
                                      jnp.asarray(target, jnp.float32)))
  return {m: np.asarray(out[m], np.float64) for m in METRICS}


@jax.jit
def _image_metrics(pred, target):
  return _metrics(_to_unit(pred), _to_unit(target))


def evaluate_sr_per_image(pred, lowres, target, *,
                          scale: int) -> dict[str, dict[str, np.ndarray]]:
  """Per-image PSNR / SSIM / MS-SSIM of the model and of the bicubic baseline.

  Args:
    pred: model output `[B, H, W, 3]` in [-1, 1] (clipped to it).
    lowres: `[B, H / scale, W / scale, 3]` in [-1, 1].
    target: `[B, H, W, 3]` in [-1, 1].
    scale: super-resolution factor.

  Returns:
    `{"bicubic": {"psnr", "ssim", "ms_ssim"}, "model": {...}}`, float64 `[B]`
    each (one compiled computation per shape): paired comparisons of two
    models on the same crops use these.
  """
  chex.assert_rank([pred, lowres, target], 4)
  chex.assert_equal_shape([pred, target])
  if not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale must be an int >= 1, got {scale!r}")
  b, h, w, c = target.shape
  if lowres.shape != (b, h // scale, w // scale, c) or h % scale or w % scale:
    raise ValueError(f"lowres shape {lowres.shape} does not match target {target.shape} "
                     f"at scale={scale}")
  out = jax.device_get(_evaluate(jnp.asarray(pred, jnp.float32),
                                 jnp.asarray(lowres, jnp.float32),
                                 jnp.asarray(target, jnp.float32), scale))
  return {k: {m: np.asarray(out[k][m], np.float64) for m in METRICS}
          for k in ("bicubic", "model")}


def mean_metrics(per_image: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """`{method: {metric: [B]}}` -> `{method: {metric: mean float}}` (float32 mean, as before)."""
  return {k: {m: float(np.mean(np.asarray(v, np.float32))) for m, v in row.items()}
          for k, row in per_image.items()}


def evaluate_sr(pred, lowres, target, *, scale: int) -> dict[str, dict[str, float]]:
  """PSNR / SSIM / MS-SSIM of the model and of the bicubic baseline, means over the batch.

  Args and checks as `evaluate_sr_per_image`.

  Returns:
    `{"bicubic": {"psnr", "ssim", "ms_ssim"}, "model": {...}}` python floats.
  """
  return mean_metrics(evaluate_sr_per_image(pred, lowres, target, scale=scale))


def ssim_map_image(pred, target) -> np.ndarray:
  """SSIM map of `pred` vs `target` for display: float32 `[B, H, W, 3]` in [0, 1].

  Images in [-1, 1]; the map uses 'same' padding (full size, zero-padded
  statistics near the border), is averaged over channels, clipped at 0 and
  shown as gray (white = identical structure).
  """
  chex.assert_rank([pred, target], 4)
  chex.assert_equal_shape([pred, target])
  return np.asarray(_ssim_map_display(jnp.asarray(pred, jnp.float32),
                                      jnp.asarray(target, jnp.float32)), np.float32)


@jax.jit
def _ssim_map_display(pred, target):
  import ssim_jax  # pylint: disable=g-import-not-at-top

  win = ssim_window(min(target.shape[1], target.shape[2]))
  m = ssim_jax.ssim_map(_to_unit(pred), _to_unit(target), data_range=1.0,
                        window_size=win, sigma=SSIM_SIGMA, padding="same")
  m = jnp.clip(jnp.mean(m, axis=-1, keepdims=True), 0.0, 1.0)
  return jnp.repeat(m, 3, axis=-1)


# ----------------------------------------------------------------------------
# PNG grid and table.


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  x = np.asarray(x, np.float32)
  x = np.nan_to_num((x - lo) / (hi - lo), nan=0.0)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


COLUMNS = ("low-res", "bicubic", "model", "target", "SSIM map")


def make_grid(lowres, bicubic, model, target, ssim_map, *, value_range=(-1.0, 1.0),
              pad: int = 2, header: bool = True) -> np.ndarray:
  """Grid image: one row per example, columns low-res | bicubic | model | target | SSIM map.

  Args:
    lowres: `[B, h, w, C]`, nearest-upsampled to the target size.
    bicubic, model, target: `[B, H, W, C]`.
    ssim_map: `[B, H, W, C|1]` or `[B, H, W]` in [0, 1].
    value_range: range of the four image columns ((-1, 1) for the data).
    pad: white separator in pixels.
    header: a row of column names on top.

  Returns:
    uint8 `[rows, cols, 3]`.
  """
  lo, hi = value_range
  target = np.asarray(target)
  b, h, w = target.shape[:3]
  lowres = np.asarray(lowres)
  if h % lowres.shape[1] or w % lowres.shape[2]:
    raise ValueError(f"lowres {lowres.shape} does not divide the target size {h}x{w}")
  up = np.repeat(np.repeat(lowres, h // lowres.shape[1], axis=1), w // lowres.shape[2], axis=2)
  smap = np.asarray(ssim_map, np.float32)
  if smap.ndim == 3:
    smap = smap[..., None]
  cols = [_to_uint8(up, lo, hi), _to_uint8(bicubic, lo, hi), _to_uint8(model, lo, hi),
          _to_uint8(target, lo, hi), _to_uint8(smap, 0.0, 1.0)]
  for name, col in zip(COLUMNS, cols):
    if col.shape != (b, h, w, 3):
      raise ValueError(f"{name} column has shape {col.shape}, expected {(b, h, w, 3)}")
  head = 12 if header else 0
  grid = np.full((head + b * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
  for j, col in enumerate(cols):
    x0 = pad + j * (w + pad)
    for i in range(b):
      y0 = head + pad + i * (h + pad)
      grid[y0:y0 + h, x0:x0 + w] = col[i]
  if header:
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for j, name in enumerate(COLUMNS):
      draw.text((pad + j * (w + pad) + 1, 0), name[: max(1, w // 6)], fill=(0, 0, 0))
    grid = np.asarray(im)
  return grid


def save_grid(path: str, lowres, bicubic, model, target, ssim_map, **kwargs) -> np.ndarray:
  """Writes `make_grid(...)` as a PNG at `path` (directories created); returns it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  grid = make_grid(lowres, bicubic, model, target, ssim_map, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path, format="PNG")
  return grid


_METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Aligned text table: one row per method, one column per metric."""
  if not results:
    raise ValueError("results is empty")
  metrics = [m for m in METRICS if any(m in row for row in results.values())]
  for row in results.values():
    for k in row:
      if k not in metrics:
        metrics.append(k)
  headers = ["method"] + [_METRIC_NAMES.get(m, m) for m in metrics]
  rows = []
  for method, row in results.items():
    cells = [str(method)]
    for m in metrics:
      v = row.get(m)
      cells.append("-" if v is None else (f"{v:.2f}" if m == "psnr" else f"{v:.4f}"))
    rows.append(cells)
  widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
  def line(cells):
    return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                     for i, c in enumerate(cells))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(headers), sep] + [line(r) for r in rows])
