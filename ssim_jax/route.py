"""Where an SSIM value's derivative comes from: the fused route or plain autodiff.

`choose_route` is the one place that decides, for one call, whether the
mask-weighted SSIM sum takes the fused analytic derivative
(`ssim_jax.fused`) and how it is cut: `choose_chunk` (planes per chunk, or
0 for plain autodiff) and `choose_slab` (depth slabs for large volumes).
The thresholds are measurements (benchmarks/README.md), kept here with
the rule that uses them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ssim_jax import planes

# Target elements per image plane chunk: about 1 MiB per float32 map.
_CHUNK_ELEMENTS = 1 << 18
# Maps at most this wide or high keep plain autodiff on CPU (see choose_chunk).
_MIN_FUSED_SIDE = 96
# Volumes above this many voxels per plane are cut into depth slabs; a slab
# holds about _SLAB_ELEMENTS input voxels (32 MiB per float32 map).
_MAX_UNSLABBED = 1 << 25
_SLAB_ELEMENTS = 1 << 23


class Route(NamedTuple):
  """How the SSIM value is differentiated; `(0, 0)` is plain autodiff.

  Attributes:
    planes_per_chunk: image planes per chunk of the fused derivative (>= 1), or 0.
    slab_depth: output depth slices per slab (volumes), or 0 for whole planes.
  """
  planes_per_chunk: int
  slab_depth: int

  @property
  def fused(self) -> bool:
    return self.planes_per_chunk > 0


def choose_chunk(shape: tuple[int, ...], *, kernel_size, padding: str,
                 backend: str | None = None) -> int:
  """Planes per chunk for the fused route, or 0 for plain autodiff.

  This is the one place where the choice is made (benchmarks/README.md,
  2-core CPU machines, `ssim_loss` forward+backward): the fused route wins
  where both sides of the map exceed 96 pixels (with the four-blur
  statistics on Zen 4, AVX-512 and `--xla_cpu_max_isa=AVX2` alike:
  32x128x128x3 -10..-25%, 16x256x256x3 -20..-40%) and loses on small
  planes (64x64x64x3: +20..+80%, 8x96x96x3: +30..+60%), where autodiff's
  transposed band gemms are cheap; the two instruction sets gave the same
  ranking, so the rule does not depend on the ISA. Volumes follow the same rule
  on their H and W sides, and always take the fused route when they need
  depth slabs (`choose_slab`: memory). No GPU measurement exists yet, so
  other backends keep plain autodiff.

  Args:
    shape: `[B, H, W, C]` (or `[B, D, H, W, C]`) of the images.
    kernel_size: K, the window actually used (one, or one per spatial axis).
    padding: "valid" or "same".
    backend: `jax.default_backend()` when None.

  Returns:
    Planes (image channels) per chunk, >= 1; or 0 for plain autodiff.
  """
  if backend is None:
    backend = jax.default_backend()
  sides = planes.map_sides(shape, kernel_size, padding)
  if backend != "cpu":
    return 0
  plane = int(np.prod(shape[1:-1]))
  if min(sides[-2:]) <= _MIN_FUSED_SIDE and not (
      len(sides) == 3 and plane > _MAX_UNSLABBED):
    return 0
  return max(1, _CHUNK_ELEMENTS // plane)


def choose_slab(shape: tuple[int, ...], *, kernel_size) -> int:
  """Output depth slices per slab for the fused route, or 0 (whole planes).

  Volumes of more than `_MAX_UNSLABBED` voxels (32 Mi: 300x512x512 is 78 Mi)
  are cut into slabs of about `_SLAB_ELEMENTS` input voxels, but at least
  2 (K_D - 1) output slices, so the K_D - 1 halo slices each slab re-reads
  cost at most half of it.

  Args:
    shape: `[B, D, H, W, C]` (images `[B, H, W, C]` give 0).
    kernel_size: the windows actually used (one, or one per spatial axis).

  Returns:
    Output depth slices per slab, or 0.
  """
  if len(shape) != 5 or int(np.prod(shape[1:-1])) <= _MAX_UNSLABBED:
    return 0
  k_d = (kernel_size[0] if isinstance(kernel_size, (tuple, list))
         else kernel_size)
  d, h, w = shape[1:-1]
  per = max(2 * (k_d - 1), _SLAB_ELEMENTS // (h * w) - (k_d - 1), 1)
  return min(per, d)


def choose_route(shape: tuple[int, ...], *, kernel_size, padding: str,
                 filter_method: str) -> Route:
  """The `Route` of the fused derivative, or `Route(0, 0)`: plain autodiff.

  What an SSIM call's plan (`ssim_jax.plan`) and MS-SSIM's scales ask: only `filter_method="auto"`
  may take the fused route (a named lowering is a request for plain
  autodiff), then `choose_chunk` decides and `choose_slab` cuts volumes.

  Args:
    shape: `[B, H, W, C]` (or `[B, D, H, W, C]`) of the images.
    kernel_size: the windows actually used (one, or one per spatial axis).
    padding: "valid" or "same".
    filter_method: the caller's blur lowering.
  """
  chunk = 0
  if filter_method == "auto":
    chunk = choose_chunk(shape, kernel_size=kernel_size, padding=padding)
  if not chunk:
    return Route(0, 0)
  return Route(chunk, choose_slab(shape, kernel_size=kernel_size))
