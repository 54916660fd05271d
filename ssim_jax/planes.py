"""The plain SSIM map of NCHW planes: the reference route every SSIM value shares.

`ssim_map_nchw` is the one definition of the SSIM map (and of its
contrast-structure factor, MS-SSIM's finer scales) on channels-first planes;
`plain_weighted_plane_sums` / `plain_weighted_ssim_sum` are the mask-weighted
sums of it under plain autodiff. The fused route (`ssim_jax.fused`) computes
the same sums with an analytic derivative and falls back to these when its
rule does not apply. The SSIM routes convert the two images to NCHW once
(`to_nchw`), so the blurs of a value and its gradient run without transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssim_jax import filters
from ssim_jax import stats as stats_lib


def map_sides(shape, kernel_size, padding) -> tuple[int, ...]:
  """Spatial sides of the SSIM map of images `shape` `[B, *S, C]`.

  Args:
    shape: `[B, H, W, C]` (or `[B, D, H, W, C]`).
    kernel_size: K, one or one per spatial axis.
    padding: "valid" (`S - K + 1`) or "same" (`S`).
  """
  sides = tuple(shape[1:-1])
  ks = (tuple(kernel_size) if isinstance(kernel_size, (tuple, list))
        else (kernel_size,) * len(sides))
  if padding == "same":
    return sides
  return tuple(n - k + 1 for n, k in zip(sides, ks))


def align_mask(mask: jax.Array, kernel, padding: str) -> jax.Array:
  """Crops a full-resolution mask `[B, *S, 1|C]` to the region of the map.

  Args:
    mask: `[B, *S, 1|C]`.
    kernel: the window(s) of the map, one per spatial axis (or one).
    padding: "valid" (crop `K // 2` per side of each axis) or "same" (none).

  Returns:
    `[B, *S', 1|C]`.
  """
  if padding == "same":
    return mask
  kernels = filters.as_kernels(kernel, mask.ndim - 2)
  index = (slice(None),) + tuple(
      slice(k.shape[0] // 2, n - k.shape[0] // 2)
      for k, n in zip(kernels, mask.shape[1:-1])) + (slice(None),)
  return mask[index]


def to_nchw(a: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C, H, W]` (volumes `[B, D, H, W, C]` ->
  `[B, C, D, H, W]`)."""
  return jnp.moveaxis(a, -1, 1)


def to_nhwc(a: jax.Array) -> jax.Array:
  """Inverse of `to_nchw`."""
  return jnp.moveaxis(a, 1, -1)


TERMS = ("ssim", "cs")


def term_map(st: stats_lib.LocalStats, c1, c2, term: str) -> jax.Array:
  luminance, cs = stats_lib.luminance_cs(st, c1, c2)
  return luminance * cs if term == "ssim" else cs


def ssim_map_nchw(x: jax.Array, y: jax.Array, *, kernel, c1: jax.Array,
                  c2: jax.Array, padding: str,
                  filter_method: str, term: str = "ssim") -> jax.Array:
  """Plain SSIM map of `[B, C, H, W]` images -> `[B, C, H', W']` (volumes
  `[B, C, D, H, W]` -> `[B, C, D', H', W']`); with `term="cs"` the
  contrast-structure map instead (MS-SSIM's finer scales).

  The SSIM routes convert the two images to NCHW once, so the blurs of
  a value and its gradient run without transposes (benchmarks/README.md:
  about 2x faster forward at 1x1024x1024x1 on CPU).
  """
  st = stats_lib.local_stats(x, y, kernel=kernel, padding=padding,
                             filter_method=filter_method, layout="NCHW")
  return term_map(st, c1, c2, term)


def plain_weighted_plane_sums(x: jax.Array, y: jax.Array,
                              map_weights: jax.Array, *, kernel,
                              c1: jax.Array, c2: jax.Array, padding: str,
                              filter_method: str,
                              term: str = "ssim") -> jax.Array:
  """`weighted_plane_sums` under plain autodiff (the reference route).

  Args and returns as `weighted_plane_sums` (without the chunking options).
  """
  smap = ssim_map_nchw(to_nchw(x), to_nchw(y), kernel=kernel, c1=c1, c2=c2,
                       padding=padding, filter_method=filter_method,
                       term=term)
  return jnp.sum(to_nchw(map_weights) * smap, axis=tuple(range(2, x.ndim)))


def plain_weighted_ssim_sum(x: jax.Array, y: jax.Array,
                            map_weights: jax.Array, *, kernel,
                            c1: jax.Array, c2: jax.Array, padding: str,
                            filter_method: str) -> jax.Array:
  """`weighted_ssim_sum` under plain autodiff (the reference route).

  Args and returns as `weighted_ssim_sum` (without the chunking options).
  """
  return jnp.sum(plain_weighted_plane_sums(
      x, y, map_weights, kernel=kernel, c1=c1, c2=c2, padding=padding,
      filter_method=filter_method), axis=1)
