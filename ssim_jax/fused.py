"""The mask-weighted SSIM sum with a fused, chunked, analytic derivative.

`weighted_ssim_sum(x, y, w)` is, per image, `sum(w * ssim_map(x, y))`: the
value behind `ssim`, `ssim_sums`, `ssim_loss` and `l1_ssim_loss` (all but the
foreground mask mode). Its derivative is written out instead of left to
autodiff of the five blurs. With the blurred maps `m_x = B(xc)`,
`e_xx = B(xc^2)`, `e_xy = B(xc yc)` (centred images, see `stats.centre`) and
`P_* = d sum(w ssim) / d(blurred map)` (elementwise, so cheap to get from
`jax.vjp` of `stats.moments_from_blurs` + `stats.luminance_cs`, with the
clamps' identity derivative), the gradient is

    d/dx = B^T[P_mx] + 2 xc B^T[P_exx] + yc B^T[P_exy]
    d/dy = B^T[P_my] + 2 yc B^T[P_eyy] + xc B^T[P_exy]

where `B^T`, the adjoint blur, is again a Gaussian blur (`filters.blur_adjoint`).
That is three adjoint blurs per differentiated image instead of five
transposed ones, and no residual maps between the forward and the backward
pass: the gradient maps are computed in the same pass as the value, one
chunk of image planes at a time (`jax.lax.map`), so each chunk's ~15
intermediate maps stay small, and only the gradient itself is kept.

It is a `jax.custom_jvp` whose tangent is `sum(g_x * dx + g_y * dy)`: reverse
mode transposes that to `ct * g_x` (no second pass), forward mode
(`jax.jvp`, `jax.jacfwd`) works, and higher derivatives differentiate the
rule itself. Tangents that are symbolic zeros (the target image in a
training loss) skip their three adjoint blurs. If the weights or the SSIM
constants carry a tangent (a `data_range` computed from the images, say), the
rule falls back to autodiff of the plain route.

The plain route (`ssim_map_nchw`, `plain_weighted_ssim_sum`) lives here too,
so that both routes share one definition of the map.

`choose_chunk` is the one place that decides whether this route runs and
with how many planes per chunk; the SSIM functions use it for
`filter_method="auto"` (a named lowering runs under plain autodiff).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

from ssim_jax import filters
from ssim_jax import stats as stats_lib

# Target elements per image plane chunk: about 1 MiB per float32 map.
_CHUNK_ELEMENTS = 1 << 18
# Maps at most this wide or high keep plain autodiff on CPU (see choose_chunk).
_MIN_FUSED_SIDE = 128


def choose_chunk(shape: tuple[int, ...], *, kernel_size: int, padding: str,
                 backend: str | None = None) -> int:
  """Planes per chunk for the fused route, or 0 for plain autodiff.

  This is the one place where the choice is made (benchmarks/README.md,
  quiet 2-core CPU machine, `ssim_loss` forward+backward): the fused route
  wins where both sides of the map exceed 128 pixels (16x256x256x3: -16..-24%,
  1x1080x1920x3 'same' + L1: -18%, 4x512x512x3: -16%; 1x1024x1024x1: equal)
  and loses on small planes (64x64x64x3: +40%, 32x128x128x3: +8%), where
  autodiff's transposed band gemms are cheap. No GPU measurement exists yet,
  so other backends keep plain autodiff.

  Args:
    shape: `[B, H, W, C]` of the images.
    kernel_size: K, the window actually used.
    padding: "valid" or "same".
    backend: `jax.default_backend()` when None.

  Returns:
    Planes (image channels) per chunk, >= 1; or 0 for plain autodiff.
  """
  if backend is None:
    backend = jax.default_backend()
  _, h, w, _ = shape
  h_out, w_out = (h, w) if padding == "same" else (h - kernel_size + 1,
                                                   w - kernel_size + 1)
  if backend != "cpu" or min(h_out, w_out) <= _MIN_FUSED_SIDE:
    return 0
  return max(1, _CHUNK_ELEMENTS // (h * w))


class _Static(NamedTuple):
  """Hashable non-differentiable options of the custom_jvp."""
  taps: tuple[float, ...]
  padding: str
  filter_method: str
  planes_per_chunk: int

  @property
  def kernel(self) -> np.ndarray:
    return np.asarray(self.taps, np.float32)


def to_nchw(a: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C, H, W]`."""
  return jnp.transpose(a, (0, 3, 1, 2))


def ssim_map_nchw(x: jax.Array, y: jax.Array, *, kernel: np.ndarray,
                  c1: jax.Array, c2: jax.Array, padding: str,
                  filter_method: str) -> jax.Array:
  """Plain SSIM map of `[B, C, H, W]` images -> `[B, C, H', W']`.

  The SSIM routes convert the two images to NCHW once, so the ten blurs of
  a value and its gradient run without transposes (benchmarks/README.md:
  about 2x faster forward at 1x1024x1024x1 on CPU).
  """
  st = stats_lib.local_stats(x, y, kernel=kernel, padding=padding,
                             filter_method=filter_method, layout="NCHW")
  luminance, cs = stats_lib.luminance_cs(st, c1, c2)
  return luminance * cs


def plain_weighted_ssim_sum(x: jax.Array, y: jax.Array,
                            map_weights: jax.Array, *, kernel: np.ndarray,
                            c1: jax.Array, c2: jax.Array, padding: str,
                            filter_method: str) -> jax.Array:
  """`weighted_ssim_sum` under plain autodiff (the reference route).

  Args and returns as `weighted_ssim_sum` (without `planes_per_chunk`).
  """
  smap = ssim_map_nchw(to_nchw(x), to_nchw(y), kernel=kernel, c1=c1, c2=c2,
                       padding=padding, filter_method=filter_method)
  return jnp.sum(to_nchw(map_weights) * smap, axis=(1, 2, 3))


def weighted_ssim_sum(x: jax.Array, y: jax.Array, map_weights: jax.Array, *,
                      kernel: np.ndarray, c1: jax.Array, c2: jax.Array,
                      padding: str, filter_method: str,
                      planes_per_chunk: int) -> jax.Array:
  """Per image, sum over (H', W', C) of `map_weights * ssim_map(x, y)`.

  Args:
    x: float32 `[B, H, W, C]`.
    y: float32 `[B, H, W, C]`.
    map_weights: float32, broadcastable to the map `[B, H', W', C]`
      (aligned to the map region; `[1, 1, 1, 1]` ones without a mask).
    kernel: 1-D window `[K]`.
    c1: float32 `[B]`.
    c2: float32 `[B]`.
    padding: "valid" or "same".
    filter_method: blur lowering passed to `filters.blur`.
    planes_per_chunk: image planes (one channel of one image) per chunk of
      the fused derivative, >= 1 (`choose_chunk`).

  Returns:
    float32 `[B]`.
  """
  if planes_per_chunk < 1:
    raise ValueError(f"planes_per_chunk must be >= 1, got {planes_per_chunk}")
  static = _Static(tuple(float(t) for t in np.asarray(kernel, np.float32)),
                   padding, filter_method, int(planes_per_chunk))
  return _fused(x, y, jnp.asarray(map_weights, jnp.float32), c1, c2, static)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _fused(x, y, map_weights, c1, c2, static: _Static):
  # Value only: the plain route (chunking did not speed up the forward pass).
  return plain_weighted_ssim_sum(x, y, map_weights, kernel=static.kernel,
                                 c1=c1, c2=c2, padding=static.padding,
                                 filter_method=static.filter_method)


@functools.partial(_fused.defjvp, symbolic_zeros=True)
def _fused_jvp(static: _Static, primals, tangents):
  x, y, map_weights, c1, c2 = primals
  t_x, t_y, t_w, t_c1, t_c2 = tangents
  if not all(isinstance(t, SymbolicZero) for t in (t_w, t_c1, t_c2)):
    dense = tuple(jnp.zeros(p.shape, p.dtype) if isinstance(t, SymbolicZero)
                  else t for p, t in zip(primals, tangents))
    return jax.jvp(
        lambda a, b, w, k1, k2: plain_weighted_ssim_sum(
            a, b, w, kernel=static.kernel, c1=k1, c2=k2,
            padding=static.padding, filter_method=static.filter_method),
        primals, dense)
  need_x = not isinstance(t_x, SymbolicZero)
  need_y = not isinstance(t_y, SymbolicZero)
  value, g_x, g_y = _value_and_grads(x, y, map_weights, c1, c2, static,
                                     need_x=need_x, need_y=need_y)
  tangent = jnp.zeros_like(value)
  if need_x:
    tangent = tangent + jnp.sum(g_x * t_x, axis=(1, 2, 3))
  if need_y:
    tangent = tangent + jnp.sum(g_y * t_y, axis=(1, 2, 3))
  return value, tangent


def _value_and_grads(x, y, map_weights, c1, c2, static: _Static, *,
                     need_x: bool, need_y: bool):
  """Value `[B]` and gradient maps `[B, H, W, C]` (None where not needed)."""
  b, h, w, c = x.shape
  n = b * c
  k = len(static.taps)
  h_out, w_out = (h, w) if static.padding == "same" else (h - k + 1,
                                                          w - k + 1)
  planes = [to_nchw(x).reshape(n, h, w), to_nchw(y).reshape(n, h, w)]
  scalar_weight = map_weights.size == 1
  if scalar_weight:
    planes.append(jnp.broadcast_to(map_weights.reshape(()), (n,)))
  else:
    planes.append(to_nchw(jnp.broadcast_to(map_weights, (b, h_out, w_out, c))
                           ).reshape(n, h_out, w_out))
  planes += [jnp.repeat(c1, c), jnp.repeat(c2, c)]
  # Balanced chunks; the last is topped up with zero planes whose constants
  # are 1 (finite, discarded).
  n_chunks = -(-n // min(static.planes_per_chunk, n))
  per = -(-n // n_chunks)
  extra = n_chunks * per - n
  if extra:
    planes = [jnp.concatenate([a, jnp.full((extra,) + a.shape[1:],
                                           1.0 if i >= 3 else 0.0,
                                           a.dtype)])
              for i, a in enumerate(planes)]
  chunks = tuple(a.reshape((n_chunks, per) + a.shape[1:]) for a in planes)

  def body(chunk):
    return _chunk_value_and_grads(*chunk, static=static,
                                  scalar_weight=scalar_weight,
                                  need_x=need_x, need_y=need_y)

  if n_chunks == 1:
    out = jax.tree.map(lambda a: a[None], body(tuple(a[0] for a in chunks)))
  else:
    out = jax.lax.map(body, chunks)

  def unchunk(a):
    # [n_chunks, per, ...] -> [n, ...], padding planes dropped.
    return a.reshape((n_chunks * per,) + a.shape[2:])[:n]

  def to_nhwc(g):
    if g is None:
      return None
    return jnp.transpose(unchunk(g).reshape(b, c, h, w), (0, 2, 3, 1))

  value = unchunk(out[0]).reshape(b, c).sum(axis=1)
  return value, to_nhwc(out[1]), to_nhwc(out[2])


def _chunk_value_and_grads(x, y, weights, c1, c2, *, static: _Static,
                           scalar_weight: bool, need_x: bool, need_y: bool):
  """One chunk: planes `[n, H, W]`, weights `[n]` or `[n, H', W']`,
  constants `[n]` -> (value `[n]`, g_x, g_y `[n, H, W]` or None)."""
  kernel = static.kernel
  # Each plane is an image with one channel: NCHW `[n, 1, H, W]`.
  xc, yc, ox, oy = stats_lib.centre(x[:, None], y[:, None], (2, 3))
  blurred, b1 = stats_lib.blurred_moments(
      xc, yc, kernel=kernel, padding=static.padding,
      filter_method=static.filter_method, layout="NCHW")
  weights = (weights[:, None, None, None] if scalar_weight
             else weights[:, None])

  def weighted_sum(*maps):
    st = stats_lib.moments_from_blurs(maps, ox, oy, border_mass=b1)
    luminance, cs = stats_lib.luminance_cs(st, c1, c2)
    return jnp.sum(weights * (luminance * cs), axis=(1, 2, 3))

  value, pullback = jax.vjp(weighted_sum, *blurred)
  p_mx, p_my, p_xx, p_yy, p_xy = pullback(jnp.ones_like(value))

  def adjoint(a):
    return filters.blur_adjoint(a, kernel, padding=static.padding,
                                method=static.filter_method)

  g_x = g_y = None
  cross = adjoint(p_xy)
  if need_x:
    g_x = (adjoint(p_mx) + 2.0 * xc * adjoint(p_xx) + yc * cross)[:, 0]
  if need_y:
    g_y = (adjoint(p_my) + 2.0 * yc * adjoint(p_yy) + xc * cross)[:, 0]
  return value, g_x, g_y
