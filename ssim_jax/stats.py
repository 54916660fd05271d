"""Local (windowed) statistics for SSIM, computed accurately in float32.

The SSIM statistics are local means, variances and the covariance of two
images under a Gaussian window. The textbook form `E[x^2] - E[x]^2` cancels
catastrophically in float32 when the local mean is large compared with the
local standard deviation (the mechanism that made SSIM exceed 1 on constant
backgrounds). Two measures keep the result accurate and in range:

- values are centred on their per-image, per-channel (mask-weighted) mean
  before squaring; variance and covariance are shift invariant, and the
  uncentred local means (needed by the luminance term) get the offset back;
- SSIM needs the two variances only through their sum (the denominator of
  the contrast-structure term), so four maps are blurred, not five: x, y,
  x^2 + y^2 and x y (`var_x + var_y = B(x^2 + y^2) - mu_x^2 - mu_y^2`);
- the variance sum is clamped at 0 and the covariance at +-(var_x + var_y) / 2,
  so the contrast-structure term lies in [-1, 1] even after float32
  rounding; the clamps' derivative is the identity (they are inactive in
  exact arithmetic, see `clamp_moments`), so gradients do not depend on how
  a CPU rounds.

`local_stats` and `masked_local_stats` take float32 `[B, H, W, C]`
(`local_stats` also `[B, C, H, W]` with `layout="NCHW"`), or volumes with a
D axis before H (`[B, D, H, W, C]`, `[B, C, D, H, W]`), and return float32
maps of the blur's output size (each spatial side n -> n-K+1 for 'valid',
unchanged for 'same'). The window is one 1-D kernel or one per spatial axis
(`filters.as_kernels`). `local_stats` is three steps, public so that the
fused derivative (`ssim_jax.fused`) can run them per chunk and differentiate
the last one alone: `centre`, `blurred_moments` (the four blurs), and the
elementwise `moments_from_blurs`. `luminance_cs` turns statistics into SSIM's two factors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import filters


class LocalStats(NamedTuple):
  """Windowed statistics of an image pair, each float32 `[B, H', W', C]`
  (volumes `[B, D', H', W', C]`; channels first for the NCHW routes).

  Attributes:
    mu_x: local mean of x (uncentred, in image units).
    mu_y: local mean of y.
    var_sum: sum of the local variances of x and y, var_x + var_y >= 0
      (all that SSIM needs of them).
    cov: local covariance, |cov| <= var_sum / 2.
  """
  mu_x: jax.Array
  mu_y: jax.Array
  var_sum: jax.Array
  cov: jax.Array


@jax.custom_jvp
def clamp_moments(var_sum: jax.Array, cov: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """The variance sum clamped at 0, |cov| at var_sum / 2.

  `var_sum >= 0` and `2 |cov| <= var_sum` hold exactly in float32 after the
  clamp (0.5 * s is exact), so the contrast-structure term
  `(2 cov + C2) / (var_sum + C2)` is in [-1, 1]; for x == y the unclamped
  `var_sum` is exactly `2 cov` (see `moments_from_blurs`), so cs == 1.

  The derivative is the identity (a hand-written JVP, below): the clamps
  correct rounding only. The statistics are moments of a probability
  measure (the window; for zero 'same' padding the window plus its missing
  mass at the value 0; for masks the normalised masked window), so in exact
  arithmetic var_x, var_y >= 0 and |cov| <= sqrt(var_x var_y) <=
  (var_x + var_y) / 2 always hold and the clamp is inactive: SSIM is a
  smooth function of the images and its derivative is that of the unclamped
  moments. A derivative of the clamp itself would branch on rounding
  wherever the bound holds with equality in exact arithmetic (windows in
  which y = x + const, e.g. a flat patch at a zero-padded border): there
  the one-sided choice flipped with the CPU's vector code (issue 12:
  gradient entries 0.091 vs 0.069 on AVX-512 vs AVX2, where float64 gives
  0.069). The identity is finite everywhere and costs no backward work.

  Args:
    var_sum: float32 map, var_x + var_y before the clamp.
    cov: float32 map, same shape.

  Returns:
    `(var_sum, cov)` clamped, same shapes.
  """
  var_sum = jnp.maximum(var_sum, 0.0)
  bound = 0.5 * var_sum
  return var_sum, jnp.clip(cov, -bound, bound)


@clamp_moments.defjvp
def _clamp_moments_jvp(primals, tangents):
  return clamp_moments(*primals), tuple(tangents)


def _clamp(mu_x, mu_y, var_sum, cov) -> LocalStats:
  return LocalStats(mu_x, mu_y, *clamp_moments(var_sum, cov))


def border_mass_vectors(sizes: tuple[int, ...],
                        kernels: tuple[np.ndarray, ...]
                        ) -> tuple[np.ndarray, ...]:
  """Per-axis factors of blur(ones) under zero 'same' padding (host float32
  vectors `[n]`, one per spatial axis; the blur is separable, so blur(ones)
  is their outer product)."""
  return tuple(
      np.convolve(np.ones(n), np.asarray(k, np.float64),
                  mode="same").astype(np.float32)
      for n, k in zip(sizes, kernels))


def outer(vectors: tuple[jax.Array, ...]) -> jax.Array:
  """Outer product of 1-D arrays `[n_0], [n_1], ...` -> `[n_0, n_1, ...]`."""
  nd = len(vectors)
  out = jnp.asarray(vectors[0]).reshape((-1,) + (1,) * (nd - 1))
  for i, v in enumerate(vectors[1:], start=1):
    shape = [1] * nd
    shape[i] = -1
    out = out * jnp.asarray(v).reshape(shape)
  return out


def _border_mass(sizes: tuple[int, ...], kernels: tuple[np.ndarray, ...], *,
                 layout: str, dtype=jnp.float32) -> jax.Array:
  """blur(ones) under zero 'same' padding, float32 `[*S]` (S = (H, W) or
  (D, H, W)), shaped to broadcast against channels-last ("NHWC") or
  channels-first ("NCHW") maps.

  Built in the graph as the outer product of host vectors: an `[H, W]`
  host constant would be baked into the executable (8 MB at 1080p) and
  cost about 1.5 s of compile time.
  """
  # In the images' dtype (float32 but for float64 reference runs, where a
  # float32 1 - b1 would round differently in differently fused programs).
  b1 = outer(tuple(jnp.asarray(v, dtype)
                   for v in border_mass_vectors(sizes, kernels)))
  return b1[None, ..., None] if layout == "NHWC" else b1[None, None]


def spatial_axes(layout: str, ndim: int) -> tuple[int, ...]:
  """The spatial axes of a channels-last ("NHWC") or channels-first
  ("NCHW") array of rank `ndim` (4 for images, 5 for volumes)."""
  return (tuple(range(1, ndim - 1)) if layout == "NHWC"
          else tuple(range(2, ndim)))


def centre(x: jax.Array, y: jax.Array, axes: tuple[int, ...]
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-image, per-channel centring of an image pair.

  Exact shift invariance of var/cov, and identical expressions for x and y,
  so x == y gives identical statistics. The offsets are constants to the
  derivative (stop_gradient): every statistic is exactly invariant to the
  choice of offset, so this is the true gradient, and the backward pass
  skips two reductions.

  Args:
    x: float32 image maps.
    y: float32, same shape as `x`.
    axes: the spatial axes.

  Returns:
    `(xc, yc, ox, oy)`: centred maps and the offsets (keepdims).
  """
  ox = jax.lax.stop_gradient(jnp.mean(x, axis=axes, keepdims=True))
  oy = jax.lax.stop_gradient(jnp.mean(y, axis=axes, keepdims=True))
  return x - ox, y - oy, ox, oy


def blurred_moments(xc: jax.Array, yc: jax.Array, *, kernel: np.ndarray,
                    padding: str, filter_method: str, layout: str
                    ) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
  """Blurs of the four moment maps xc, yc, xc^2 + yc^2, xc yc.

  Args:
    xc: centred float32 maps (`centre`), `[B, H, W, C]` or `[B, C, H, W]`
      (volumes: `[B, D, H, W, C]` or `[B, C, D, H, W]`).
    yc: same shape.
    kernel: 1-D window `[K]`, or one per spatial axis.
    padding: "valid" or "same".
    filter_method: lowering passed to `filters.blur`.
    layout: "NHWC" or "NCHW".

  Returns:
    `(blurred, border_mass)`: the four blurred maps `(m_x, m_y, e_ss, e_xy)`
    and, for 'same' padding, `blur(ones)` broadcastable to them (None for
    'valid'); the arguments of `moments_from_blurs`.
  """
  # Separate blurs: on XLA CPU they measured faster forward+backward than one
  # blur of the channel-stacked maps (the concatenation and split cost more
  # than the extra launches). For x == y, xc^2 + yc^2 is exactly 2 xc yc,
  # and so are their blurs (same gemms, scaled by a power of two).
  blurred = tuple(
      filters.blur(a, kernel, padding=padding, method=filter_method,
                   layout=layout)
      for a in (xc, yc, xc * xc + yc * yc, xc * yc))
  if padding == "valid":
    return blurred, None
  axes = spatial_axes(layout, xc.ndim)
  return blurred, _border_mass(tuple(xc.shape[a] for a in axes),
                               filters.as_kernels(kernel, len(axes)),
                               layout=layout, dtype=xc.dtype)


def _var_sum(e_ss: jax.Array, m_x: jax.Array, m_y: jax.Array) -> jax.Array:
  """var_x + var_y = e_ss - m_x^2 - m_y^2, written as
  `(e_ss - 2 m_x m_y) - (m_x - m_y)^2` so that x == y gives exactly twice
  `cov = e_xy - m_x m_y` whether or not the compiler contracts the products
  into fused multiply-adds (e_ss == 2 e_xy, and the last term is 0)."""
  d = m_x - m_y
  return (e_ss - (2.0 * m_x) * m_y) - d * d


def moments_from_blurs(blurred: tuple[jax.Array, ...], ox: jax.Array,
                       oy: jax.Array, *,
                       border_mass: jax.Array | None) -> LocalStats:
  """Clamped local statistics from `blurred_moments`.

  Elementwise, so it can be differentiated or evaluated per chunk of planes.

  Args:
    blurred: `(m_x, m_y, e_ss, e_xy)`, blurs of the centred maps.
    ox: offset of x (broadcastable, from `centre`).
    oy: offset of y.
    border_mass: None for 'valid' padding; for zero 'same' padding
      `blur(ones)`, broadcastable to the maps (from `blurred_moments`).

  Returns:
    `LocalStats` of the uncentred images.
  """
  m_x, m_y, e_ss, e_xy = blurred
  var_sum = _var_sum(e_ss, m_x, m_y)
  cov = e_xy - m_x * m_y
  if border_mass is None:
    return _clamp(m_x + ox, m_y + oy, var_sum, cov)
  # Zero padding pads the *uncentred* image. With b1 = blur(ones) (< 1 only
  # near the border) the uncentred moments are recovered exactly:
  #   mu = m + o b1,  var += 2 o m (1-b1) + o^2 b1 (1-b1),
  #   cov += (o_x m_y + o_y m_x)(1-b1) + o_x o_y b1 (1-b1).
  # The terms are written symmetrically so that x == y stays bit-identical.
  b1 = border_mass
  rest = 1.0 - b1

  def extra(o_a, m_a, o_b, m_b):
    return (o_a * m_b * rest + o_b * m_a * rest) + o_a * o_b * (b1 * rest)

  return _clamp(m_x + ox * b1, m_y + oy * b1,
                var_sum + (extra(ox, m_x, ox, m_x) + extra(oy, m_y, oy, m_y)),
                cov + extra(ox, m_x, oy, m_y))


def local_stats(x: jax.Array, y: jax.Array, *, kernel: np.ndarray,
                padding: str, filter_method: str,
                layout: str = "NHWC") -> LocalStats:
  """Gaussian-windowed statistics of an image pair (no mask).

  Args:
    x: float32 `[B, H, W, C]` ("NHWC") or `[B, C, H, W]` ("NCHW"); volumes
      `[B, D, H, W, C]` or `[B, C, D, H, W]`.
    y: float32, same shape as `x`.
    kernel: 1-D window `[K]` from `filters.gaussian_kernel`, or one per
      spatial axis.
    padding: "valid" or "same" (zero padding, as in Gaussian-splatting code).
    filter_method: lowering passed to `filters.blur`.
    layout: layout of `x`, `y` and of the returned maps. "NCHW" is the fast
      one (the blurs need no transposes); the SSIM routes convert once.

  Returns:
    `LocalStats`, each `[B, H', W', C]` (or `[B, C, H', W']` for "NCHW";
    volumes with D' before H').
  """
  axes = spatial_axes(layout, x.ndim)
  xc, yc, ox, oy = centre(x, y, axes)
  blurred, b1 = blurred_moments(xc, yc, kernel=kernel, padding=padding,
                                filter_method=filter_method, layout=layout)
  return moments_from_blurs(blurred, ox, oy, border_mass=b1)


def luminance_cs(st: LocalStats, c1: jax.Array, c2: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """SSIM's luminance and contrast-structure maps, each in [-1, 1] exactly.

  Args:
    st: clamped local statistics, `[B, ...]` maps.
    c1: float32 `[B]`, (k1 L)^2.
    c2: float32 `[B]`, (k2 L)^2.

  Returns:
    `(luminance, cs)` float32, shaped like the maps of `st`.
  """
  c1 = c1.reshape((-1,) + (1,) * (st.mu_x.ndim - 1))
  c2 = c2.reshape((-1,) + (1,) * (st.mu_x.ndim - 1))
  sq = st.mu_x * st.mu_x + st.mu_y * st.mu_y
  # |2 mu_x mu_y| <= mu_x^2 + mu_y^2 in exact arithmetic; the clip makes it
  # hold after rounding too (0.5 * sq is exact), so |l| <= 1 in float32.
  half = 0.5 * sq
  cross = jnp.clip(st.mu_x * st.mu_y, -half, half)
  luminance = (2.0 * cross + c1) / (sq + c1)
  cs = (2.0 * st.cov + c2) / (st.var_sum + c2)
  return luminance, cs


def masked_local_stats(
    x: jax.Array, y: jax.Array, mask: jax.Array, *, kernel: np.ndarray,
    padding: str, filter_method: str,
) -> tuple[LocalStats, jax.Array]:
  """Mask-weighted (normalised-convolution) windowed statistics.

  Local moments use only masked pixels: `mu = blur(m x) / blur(m)` etc., so
  pixels with mask 0 cannot change the result whatever their value (even
  NaN or Inf: they are replaced by 0 before filtering).

  Args:
    x: float32 `[B, H, W, C]` (volumes `[B, D, H, W, C]`).
    y: float32, same shape as `x`.
    mask: float32 `[B, H, W, 1|C]` (volumes `[B, D, H, W, 1|C]`),
      non-negative.
    kernel: 1-D window `[K]`, or one per spatial axis.
    padding: "valid" or "same".
    filter_method: lowering passed to `filters.blur`.

  Returns:
    `(stats, local_mass)`: `LocalStats` maps `[B, H', W', C]` (finite
    everywhere; where `local_mass` is 0 they are 0) and the blurred mask
    `[B, H', W', C]` (the window's mask mass, in [0, max(mask)]); volumes
    with D' before H'.
  """
  mask = jnp.broadcast_to(mask, x.shape)
  axes = spatial_axes("NHWC", x.ndim)
  inside = mask > 0
  x = jnp.where(inside, x, 0.0)
  y = jnp.where(inside, y, 0.0)
  mass = jnp.sum(mask, axis=axes, keepdims=True)
  safe_mass = jnp.where(mass > 0, mass, 1.0)
  # Constant offsets to the derivative, as in `local_stats` (the normalised
  # moments are exactly invariant to them).
  ox = jax.lax.stop_gradient(
      jnp.sum(mask * x, axis=axes, keepdims=True) / safe_mass)
  oy = jax.lax.stop_gradient(
      jnp.sum(mask * y, axis=axes, keepdims=True) / safe_mass)
  xc = jnp.where(inside, x - ox, 0.0)
  yc = jnp.where(inside, y - oy, 0.0)
  # mask (xc^2 + yc^2) and mask (xc yc): for x == y exactly 2:1, as in
  # `blurred_moments`.
  maps = jnp.concatenate(
      [mask, mask * xc, mask * yc, mask * (xc * xc + yc * yc),
       mask * (xc * yc)], axis=-1)
  blurred = filters.blur(maps, kernel, padding=padding, method=filter_method)
  w, s_x, s_y, s_ss, s_xy = jnp.split(blurred, 5, axis=-1)
  # Relative threshold: blur rounding can leave ~1e-9 where the window holds
  # no mask at all; such windows are "empty" (no statistics, no weight).
  has = w > 1e-6 * jnp.max(mask, axis=axes, keepdims=True)
  safe_w = jnp.where(has, w, 1.0)

  def norm(s):
    return jnp.where(has, s / safe_w, 0.0)

  m_x, m_y = norm(s_x), norm(s_y)
  var_sum = _var_sum(norm(s_ss), m_x, m_y)
  cov = norm(s_xy) - m_x * m_y
  # Empty windows: mean 0 (not the offset), so the map value there is the
  # finite constant 1 and carries no weight.
  mu_x = jnp.where(has, m_x + ox, 0.0)
  mu_y = jnp.where(has, m_y + oy, 0.0)
  return _clamp(mu_x, mu_y, var_sum, cov), jnp.where(has, w, 0.0)
