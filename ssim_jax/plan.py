"""The plan of one SSIM call: every check and every decision, made once, up front.

`make_plan` is the first thing every public SSIM function does. It refuses
traced static options (with the `static_argnames` fix), validates all
arguments (`ssim_jax.checks`, at trace time), converts the images to float32
channels-last (`channel_axis` is moved last here, once: everything
downstream is one channels-last implementation, and `ssim_map` moves the
channel axis back), refuses input that is probably channels-first
(`checks.check_layout`), and decides, in this order:

1. the window: the requested one (`checks.check_window`) and the one used,
   shrunk to fit small images (`checks.effective_windows`; MS-SSIM keeps it);
2. the SSIM constants `C1 = (k1 L)^2`, `C2 = (k2 L)^2` per image;
3. the mask mode: weighted mean of the map, or statistics from masked
   pixels only (`foreground`);
4. the padding, hence the map's shape;
5. the blur lowering (`filters.choose_method` for `filter_method="auto"`);
6. the route of the value's derivative (`route.choose_route`): the fused
   analytic derivative, in chunks of planes and depth slabs, or autodiff.

The SSIM functions then run in one direction, plan -> statistics -> SSIM
formula -> reduction, and nothing downstream decides anything again.
`make_pixel_plan` is the same boundary for the pixel metrics (`psnr`): the
images, `data_range` and the mask, without a window.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks
from ssim_jax import filters
from ssim_jax import planes
from ssim_jax import route as route_lib


class Plan(NamedTuple):
  """Validated inputs and every decision of one SSIM call (built by `make_plan`).

  Attributes:
    x: float32 `[B, *S, C]`, S = (H, W) or (D, H, W), channels-last
      whatever the caller's `channel_axis`.
    y: float32 `[B, *S, C]`.
    batched: False when the caller passed `[*S, C]` (results drop the batch axis).
    channel_axis: the channel axis of the caller's images, >= 0 (where
      `ssim_map` puts the map's channels back).
    window: the requested window (MS-SSIM uses it at every scale).
    kernel: the Gaussian window used, one 1-D `[K_a]` per spatial axis.
    c1: float32 `[B]`, `(k1 L)^2`.
    c2: float32 `[B]`, `(k2 L)^2`.
    mask: float32 `[B, *S, 1|C]` at full resolution, or None.
    foreground: statistics from masked pixels only (a mask in "foreground" mode).
    padding: "valid" or "same".
    filter_method: the validated request, "auto" or a lowering (the routes
      of derived shapes, MS-SSIM's scales, are chosen from it).
    lowering: the blur lowering of every blur of the call ("matmul", "conv" or "slices").
    map_shape: `[B, *S', C]`, the SSIM map's shape.
    route: `route.Route` of the SSIM value's derivative; `(0, 0)`: plain autodiff.
  """
  x: jax.Array
  y: jax.Array
  batched: bool
  channel_axis: int
  window: checks.Window
  kernel: tuple[np.ndarray, ...]
  c1: jax.Array
  c2: jax.Array
  mask: jax.Array | None
  foreground: bool
  padding: str
  filter_method: str
  lowering: str
  map_shape: tuple[int, ...]
  route: route_lib.Route


class PixelPlan(NamedTuple):
  """Validated inputs of one pixel-metric call (`psnr`; `make_pixel_plan`).

  Attributes:
    x: float32 channels-last `[B, *S, C]`.
    y: float32 `[B, *S, C]`.
    batched: False when the caller passed `[*S, C]`.
    data_range: float32 `[B]`.
    mask: float32 `[B, *S, 1|C]`, or None.
  """
  x: jax.Array
  y: jax.Array
  batched: bool
  data_range: jax.Array
  mask: jax.Array | None


def make_pixel_plan(x, y, *, fn: str, data_range, mask, channel_axis,
                    spatial_dims) -> PixelPlan:
  """Validates the arguments of a pixel metric (no window: any side >= 1).

  Args:
    x, y, data_range, mask, channel_axis, spatial_dims: as `ssim_jax.psnr`.
    fn: the public function's name (in the `static_argnames` error).

  Returns:
    The `PixelPlan`.
  """
  checks.check_static(fn, channel_axis=channel_axis, spatial_dims=spatial_dims)
  images = checks.check_images(x, y, spatial_dims=spatial_dims,
                               channel_axis=channel_axis, min_side=1)
  # L^2 (PSNR's numerator) must be a normal float32, as (k L)^2 for SSIM.
  dr = checks.check_data_range(data_range, images.x.shape[0], ks=(1.0,))
  mask = checks.check_mask(mask, images.x.shape, batched=images.batched,
                           channel_axis=images.channel_axis)
  return PixelPlan(images.x, images.y, images.batched, dr, mask)


def make_plan(x, y, *, fn: str, data_range, window_size, sigma, k1, k2,
              padding, mask, mask_mode, filter_method, spatial_dims, spacing,
              channel_axis, mask_name: str = "mask",
              shrink_window: bool = True, **static_options) -> Plan:
  """Validates every argument and makes every decision of one call.

  Args:
    x, y, data_range, window_size, sigma, k1, k2, padding, mask, mask_mode,
      filter_method, spatial_dims, spacing, channel_axis: as
      `ssim_jax.ssim_map`.
    fn: the public function's name (in the `static_argnames` error).
    mask_name: the mask's argument name in error messages.
    shrink_window: shrink the window to fit small images (False: MS-SSIM,
      which uses the requested window at every scale and checks the size
      and the layout, `checks.check_layout`, against its pyramid).
    **static_options: the caller's other static options (MS-SSIM's `levels`
      and `weights`, `l1_ssim_loss`'s `ssim_weight`), checked not traced.

  Returns:
    The `Plan`.

  Raises:
    ValueError, TypeError: a bad argument, named.
  """
  checks.check_static(
      fn, window_size=window_size, sigma=sigma, k1=k1, k2=k2, padding=padding,
      mask_mode=mask_mode, filter_method=filter_method,
      spatial_dims=spatial_dims, spacing=spacing, channel_axis=channel_axis,
      **static_options)
  images = checks.check_images(x, y, spatial_dims=spatial_dims,
                               channel_axis=channel_axis)
  b, *sides, _ = images.x.shape
  window = checks.check_window(window_size, sigma, spatial_dims=spatial_dims,
                               spacing=spacing)
  if shrink_window:  # MS-SSIM checks the layout against its pyramid
    checks.check_layout(tuple(np.shape(x)), images, window)
  k1, k2 = checks.check_constants(k1, k2)
  padding = checks.check_choice(padding, "padding", checks.PADDINGS,
                                any_case=True)
  mask_mode = checks.check_choice(mask_mode, "mask_mode", checks.MASK_MODES)
  filter_method = checks.check_filter_method(filter_method)
  dr = checks.check_data_range(data_range, b, ks=(k1, k2))
  mask = checks.check_mask(mask, images.x.shape, batched=images.batched,
                           name=mask_name, channel_axis=images.channel_axis)
  # 1. The window.
  sizes = (checks.effective_windows(window, sides) if shrink_window
           else window.sizes)
  kernel = tuple(filters.gaussian_kernel(k, sg)
                 for k, sg in zip(sizes, window.sigmas))
  # 2. The constants.
  c1 = jnp.square(k1 * dr)
  c2 = jnp.square(k2 * dr)
  # 3. The mask mode.
  foreground = mask is not None and mask_mode == "foreground"
  # 4. The map's shape.
  map_shape = ((b,) + planes.map_sides(images.x.shape, sizes, padding)
               + (images.x.shape[-1],))
  # 5. The blur lowering.
  lowering = (filters.choose_method(tuple(images.x.shape))
              if filter_method == "auto" else filter_method)
  # 6. The route of the derivative (the foreground statistics have no fused rule).
  route = route_lib.Route(0, 0)
  if not foreground and min(map_shape[1:-1]) >= 1:
    route = route_lib.choose_route(images.x.shape, kernel_size=sizes,
                                   padding=padding, filter_method=filter_method)
  return Plan(images.x, images.y, images.batched, images.channel_axis,
              window, kernel, c1, c2,
              mask, foreground, padding, filter_method, lowering, map_shape,
              route)
