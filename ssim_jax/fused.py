"""The mask-weighted SSIM sum with a fused, chunked, analytic derivative.

`weighted_ssim_sum(x, y, w)` is, per image, `sum(w * ssim_map(x, y))`: the
value behind `ssim`, `ssim_sums`, `ssim_loss` and `l1_ssim_loss` (all but the
foreground mask mode); `weighted_plane_sums` is the same per image and
channel, of the SSIM map or of its contrast-structure factor alone (the
finest scale of MS-SSIM). Its derivative is written out instead of left to
autodiff of the four blurs. With the blurred maps `m_x = B(xc)`,
`e_ss = B(xc^2 + yc^2)`, `e_xy = B(xc yc)` (centred images, see
`stats.centre`) and
`P_* = d sum(w ssim) / d(blurred map)` (elementwise, so cheap to get from
`jax.vjp` of `stats.moments_from_blurs` + `stats.luminance_cs`, with the
clamps' identity derivative), the gradient is

    d/dx = B^T[P_mx] + 2 xc B^T[P_ess] + yc B^T[P_exy]
    d/dy = B^T[P_my] + 2 yc B^T[P_ess] + xc B^T[P_exy]

where `B^T`, the adjoint blur, is again a Gaussian blur (`filters.blur_adjoint`).
That is three adjoint blurs for one differentiated image (four for both)
instead of four transposed ones per image, and no residual maps between the forward and the backward
pass: the gradient maps are computed in the same pass as the value, one
chunk of image planes at a time (`jax.lax.map`), so each chunk's ~15
intermediate maps stay small, and only the gradient itself is kept.

It is a `jax.custom_jvp` whose tangent is `sum(g_x * dx + g_y * dy)`: reverse
mode transposes that to `ct * g_x` (no second pass), forward mode
(`jax.jvp`, `jax.jacfwd`) works, and higher derivatives differentiate the
rule itself. Tangents that are symbolic zeros (the target image in a
training loss) skip the adjoint blur of P_m of that image. If the weights or the SSIM
constants carry a tangent (a `data_range` computed from the images, say), the
rule falls back to autodiff of the plain route.

The plain route (`ssim_jax.planes`) holds the one definition of the map;
this module differentiates it.

Volumes (`[B, D, H, W, C]`) run the same code with a D axis. A volume too
large for one chunk is cut into depth slabs (`route.choose_slab`): one scan over
slabs runs the four blurs (each slab reads its K_D - 1 halo slices), the
elementwise derivative and the adjoint blurs, and adds the slab's share of
the gradient into the gradient volumes in place. Memory is then the centred
inputs and the gradients plus one slab's intermediates (measured in
benchmarks/README.md against whole-volume autodiff).

Whether this route runs, with how many planes per chunk and slices per slab,
is decided by `ssim_jax.route` (for `filter_method="auto"` only; a named
lowering runs under plain autodiff).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

from ssim_jax import filters
from ssim_jax import planes as planes_lib
from ssim_jax import stats as stats_lib

class _Static(NamedTuple):
  """Hashable non-differentiable options of the custom_jvp."""
  taps: tuple[tuple[float, ...], ...]  # one window per spatial axis
  padding: str
  filter_method: str
  planes_per_chunk: int
  slab_depth: int
  term: str  # "ssim" (luminance * cs) or "cs" (contrast-structure only)

  @property
  def kernel(self) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(t, np.float32) for t in self.taps)


def weighted_ssim_sum(x: jax.Array, y: jax.Array, map_weights: jax.Array, *,
                      kernel, c1: jax.Array, c2: jax.Array,
                      padding: str, filter_method: str,
                      planes_per_chunk: int, slab_depth: int = 0
                      ) -> jax.Array:
  """Per image, sum over (H', W', C) of `map_weights * ssim_map(x, y)`.

  Args:
    x: float32 `[B, H, W, C]` (or `[B, D, H, W, C]`).
    y: float32, same shape as `x`.
    map_weights: float32, broadcastable to the map `[B, H', W', C]`
      (aligned to the map region; all-ones `[1, 1, 1, 1]` without a mask).
    kernel: 1-D window `[K]`, or one per spatial axis.
    c1: float32 `[B]`.
    c2: float32 `[B]`.
    padding: "valid" or "same".
    filter_method: blur lowering passed to `filters.blur`.
    planes_per_chunk: image planes (one channel of one image) per chunk of
      the fused derivative, >= 1 (`route.choose_chunk`).
    slab_depth: volumes only: output depth slices per slab,
      or 0 for whole volumes (`route.choose_slab`).

  Returns:
    float32 `[B]`.
  """
  return jnp.sum(weighted_plane_sums(
      x, y, map_weights, kernel=kernel, c1=c1, c2=c2, padding=padding,
      filter_method=filter_method, planes_per_chunk=planes_per_chunk,
      slab_depth=slab_depth), axis=1)


def weighted_plane_sums(x: jax.Array, y: jax.Array, map_weights: jax.Array,
                        *, kernel, c1: jax.Array, c2: jax.Array,
                        padding: str, filter_method: str,
                        planes_per_chunk: int, slab_depth: int = 0,
                        term: str = "ssim") -> jax.Array:
  """Per image and channel, sum over (H', W') of `map_weights * map`,
  where the map is SSIM's (`term="ssim"`) or its contrast-structure factor
  (`term="cs"`, MS-SSIM's finer scales), with the fused derivative.

  Args as `weighted_ssim_sum`, and `term`: "ssim" or "cs".

  Returns:
    float32 `[B, C]`.
  """
  if term not in planes_lib.TERMS:
    raise ValueError(f"term must be one of {planes_lib.TERMS}, got {term!r}")
  if planes_per_chunk < 1:
    raise ValueError(f"planes_per_chunk must be >= 1, got {planes_per_chunk}")
  if slab_depth < 0 or (slab_depth and x.ndim != 5):
    raise ValueError(f"slab_depth must be 0, or >= 1 for volumes, got "
                     f"{slab_depth} for x of rank {x.ndim}")
  kernels = filters.as_kernels(kernel, x.ndim - 2)
  static = _Static(tuple(tuple(float(t) for t in k) for k in kernels),
                   padding, filter_method, int(planes_per_chunk),
                   int(slab_depth), term)
  return _fused(x, y, jnp.asarray(map_weights, jnp.float32), c1, c2, static)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _fused(x, y, map_weights, c1, c2, static: _Static):
  if static.slab_depth:
    # Slabs bound the memory of the value too.
    return _value_and_grads(x, y, map_weights, c1, c2, static, need_x=False,
                            need_y=False)[0]
  # Value only: the plain route (chunking did not speed up the forward pass).
  return planes_lib.plain_weighted_plane_sums(
      x, y, map_weights, kernel=static.kernel, c1=c1, c2=c2,
      padding=static.padding, filter_method=static.filter_method,
      term=static.term)


@functools.partial(_fused.defjvp, symbolic_zeros=True)
def _fused_jvp(static: _Static, primals, tangents):
  x, y, map_weights, c1, c2 = primals
  t_x, t_y, t_w, t_c1, t_c2 = tangents
  if not all(isinstance(t, SymbolicZero) for t in (t_w, t_c1, t_c2)):
    dense = tuple(jnp.zeros(p.shape, p.dtype) if isinstance(t, SymbolicZero)
                  else t for p, t in zip(primals, tangents))
    return jax.jvp(
        lambda a, b, w, k1, k2: planes_lib.plain_weighted_plane_sums(
            a, b, w, kernel=static.kernel, c1=k1, c2=k2,
            padding=static.padding, filter_method=static.filter_method,
            term=static.term),
        primals, dense)
  need_x = not isinstance(t_x, SymbolicZero)
  need_y = not isinstance(t_y, SymbolicZero)
  value, g_x, g_y = _value_and_grads(x, y, map_weights, c1, c2, static,
                                     need_x=need_x, need_y=need_y)
  axes = tuple(range(1, x.ndim - 1))  # spatial: per image and channel
  tangent = jnp.zeros_like(value)
  if need_x:
    tangent = tangent + jnp.sum(g_x * t_x, axis=axes)
  if need_y:
    tangent = tangent + jnp.sum(g_y * t_y, axis=axes)
  return value, tangent


def _value_and_grads(x, y, map_weights, c1, c2, static: _Static, *,
                     need_x: bool, need_y: bool):
  """Value `[B, C]` and gradient maps `[B, *S, C]` (None where not
  needed)."""
  b, *sides, c = x.shape
  sides = tuple(sides)
  n = b * c
  out_sides = planes_lib.map_sides(x.shape, tuple(len(t) for t in static.taps),
                         static.padding)
  planes = [planes_lib.to_nchw(x).reshape((n,) + sides),
            planes_lib.to_nchw(y).reshape((n,) + sides)]
  scalar_weight = map_weights.size == 1
  if scalar_weight:
    planes.append(jnp.broadcast_to(map_weights.reshape(()), (n,)))
  else:
    planes.append(planes_lib.to_nchw(jnp.broadcast_to(
        map_weights, (b,) + out_sides + (c,))).reshape((n,) + out_sides))
  planes += [jnp.repeat(c1, c), jnp.repeat(c2, c)]
  per_chunk = 1 if static.slab_depth else static.planes_per_chunk
  # Balanced chunks; the last is topped up with zero planes whose constants
  # are 1 (finite, discarded).
  n_chunks = -(-n // min(per_chunk, n))
  per = -(-n // n_chunks)
  extra = n_chunks * per - n
  if extra:
    planes = [jnp.concatenate([a, jnp.full((extra,) + a.shape[1:],
                                           1.0 if i >= 3 else 0.0,
                                           a.dtype)])
              for i, a in enumerate(planes)]
  chunks = tuple(a.reshape((n_chunks, per) + a.shape[1:]) for a in planes)

  def body(chunk):
    if static.slab_depth:
      return _slabbed_value_and_grads(*chunk, static=static,
                                      scalar_weight=scalar_weight,
                                      need_x=need_x, need_y=need_y)
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

  def to_channels_last(g):
    if g is None:
      return None
    return planes_lib.to_nhwc(unchunk(g).reshape((b, c) + sides))

  value = unchunk(out[0]).reshape(b, c)
  return value, to_channels_last(out[1]), to_channels_last(out[2])


def _weighted_sum_fn(ox, oy, c1, c2, weights, border_mass, term):
  """sum(weights * map) per plane from the four blurred maps
  (elementwise)."""
  def weighted_sum(*maps):
    st = stats_lib.moments_from_blurs(maps, ox, oy, border_mass=border_mass)
    return jnp.sum(weights * planes_lib.term_map(st, c1, c2, term),
                   axis=tuple(range(1, weights.ndim)))
  return weighted_sum


def _chunk_value_and_grads(x, y, weights, c1, c2, *, static: _Static,
                           scalar_weight: bool, need_x: bool, need_y: bool):
  """One chunk: planes `[n, *S]`, weights `[n]` or `[n, *S']`,
  constants `[n]` -> (value `[n]`, g_x, g_y `[n, *S]` or None)."""
  kernel = static.kernel
  # Each plane is an image with one channel: NCHW `[n, 1, *S]`.
  xc, yc, ox, oy = stats_lib.centre(x[:, None], y[:, None],
                                    tuple(range(2, x.ndim + 1)))
  blurred, b1 = stats_lib.blurred_moments(
      xc, yc, kernel=kernel, padding=static.padding,
      filter_method=static.filter_method, layout="NCHW")
  weights = (weights.reshape((-1,) + (1,) * x.ndim) if scalar_weight
             else weights[:, None])
  value, pullback = jax.vjp(
      _weighted_sum_fn(ox, oy, c1, c2, weights, b1, static.term), *blurred)
  if not (need_x or need_y):
    return value, None, None
  p_mx, p_my, p_ss, p_xy = pullback(jnp.ones_like(value))

  def adjoint(a):
    return filters.blur_adjoint(a, kernel, padding=static.padding,
                                method=static.filter_method)

  g_x = g_y = None
  squares, cross = 2.0 * adjoint(p_ss), adjoint(p_xy)
  if need_x:
    g_x = (adjoint(p_mx) + xc * squares + yc * cross)[:, 0]
  if need_y:
    g_y = (adjoint(p_my) + yc * squares + xc * cross)[:, 0]
  return value, g_x, g_y


def _slabbed_value_and_grads(x, y, weights, c1, c2, *, static: _Static,
                             scalar_weight: bool, need_x: bool,
                             need_y: bool):
  """One volume cut into depth slabs: x, y `[1, D, H, W]`, weights `[1]` or
  `[1, D', H', W']`, constants `[1]` -> (value `[1]`, g_x, g_y `[1, D, H, W]`
  or None).

  D is made 'valid' by zero-padding the centred volumes by K_D // 2 for
  'same' padding (what 'same' blurs do), so that output slab j of `dz`
  slices reads the input slices [j dz, j dz + dz + K_D - 1). One
  `lax.scan` over output slabs computes the slab's value, its `P_*` maps
  and their adjoint blurs (which land on those same dz + K_D - 1 input
  slices) and adds them into the gradient volumes carried by the scan
  (updated in place). Nothing volume-sized is kept but the two centred
  inputs and the gradients. Output slices past D' (the last slab's
  top-up) get weight 0, so they add nothing.
  """
  kernel = static.kernel
  k_d = kernel[0].shape[0]
  same = static.padding == "same"
  d, h, w = x.shape[1:]
  d_out = d if same else d - k_d + 1
  dz = min(static.slab_depth, d_out)
  n_out = -(-d_out // dz)
  top_up = n_out * dz - d_out
  xc, yc, ox, oy = stats_lib.centre(x[:, None], y[:, None], (2, 3, 4))
  lead = k_d // 2 if same else 0
  # Input slices read by the output slabs (the last one topped up).
  d_in = n_out * dz + k_d - 1

  def pad_depth(a):
    return jnp.pad(a[0, 0], ((lead, d_in - lead - d), (0, 0), (0, 0)))

  xp, yp = pad_depth(xc), pad_depth(yc)
  paddings = ("valid",) + (static.padding,) * 2
  if scalar_weight:
    w_depth = jnp.pad(jnp.broadcast_to(weights.reshape(()), (d_out,)),
                      (0, top_up))
  else:
    w_map = jnp.pad(weights[0], ((0, top_up), (0, 0), (0, 0)))
  if same:
    bd, bh, bw = stats_lib.border_mass_vectors((d, h, w), kernel)
    # Topped-up slices: mass 1 (finite; their weight is 0).
    bd = jnp.asarray(np.concatenate([bd, np.ones(top_up, np.float32)]),
                     xp.dtype)
    bh, bw = jnp.asarray(bh, xp.dtype), jnp.asarray(bw, xp.dtype)

  def step(grads, j):
    z0 = j * dz
    sx = jax.lax.dynamic_slice_in_dim(xp, z0, dz + k_d - 1)[None, None]
    sy = jax.lax.dynamic_slice_in_dim(yp, z0, dz + k_d - 1)[None, None]
    blurred = tuple(
        filters.blur(a, kernel, padding=paddings,
                     method=static.filter_method, layout="NCHW")
        for a in (sx, sy, sx * sx + sy * sy, sx * sy))
    b1 = None
    if same:
      b1 = stats_lib.outer((jax.lax.dynamic_slice_in_dim(bd, z0, dz), bh,
                            bw))[None, None]
    if scalar_weight:
      wj = jax.lax.dynamic_slice_in_dim(w_depth, z0, dz)
      wj = wj[None, None, :, None, None]
    else:
      wj = jax.lax.dynamic_slice_in_dim(w_map, z0, dz)[None, None]
    value, pullback = jax.vjp(
        _weighted_sum_fn(ox, oy, c1, c2, wj, b1, static.term), *blurred)
    if not (need_x or need_y):
      return grads, value
    p_mx, p_my, p_ss, p_xy = pullback(jnp.ones_like(value))

    def adjoint(a):
      # [1, 1, dz, H', W'] -> [1, 1, dz + K_D - 1, H, W]: the input slab.
      return filters.blur_adjoint(a, kernel, padding=paddings,
                                  method=static.filter_method)

    def accumulate(g, part):
      old = jax.lax.dynamic_slice_in_dim(g, z0, dz + k_d - 1)
      return jax.lax.dynamic_update_slice_in_dim(g, old + part[0, 0], z0, 0)

    g_x, g_y = grads
    squares, cross = 2.0 * adjoint(p_ss), adjoint(p_xy)
    if need_x:
      g_x = accumulate(g_x, adjoint(p_mx) + sx * squares + sy * cross)
    if need_y:
      g_y = accumulate(g_y, adjoint(p_my) + sy * squares + sx * cross)
    return (g_x, g_y), value

  zeros = jnp.zeros_like(xp)
  init = (zeros if need_x else None, zeros if need_y else None)
  (g_x, g_y), values = jax.lax.scan(step, init, jnp.arange(n_out))

  def crop(g):
    return None if g is None else g[lead:lead + d][None]

  return jnp.sum(values, axis=0), crop(g_x), crop(g_y)
