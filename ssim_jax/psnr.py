"""Peak signal-to-noise ratio, per image, with masks and volumes.

    PSNR_b = 10 log10(L_b^2 / MSE_b),   MSE_b = sum(w (x - y)^2) / sum(w)

over the pixels (voxels) and channels of image b, `L` = `data_range`, `w` the
mask broadcast to the image (1 without a mask). Without a mask this is
skimage's `peak_signal_noise_ratio` of each image. It shares the SSIM
functions' boundary (`plan.make_pixel_plan`: layout, `channel_axis`, masks,
`data_range`), so the two metrics read the same input the same way.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from ssim_jax import plan as plan_lib
from ssim_jax.ssim import safe_ratio

def psnr(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float | jax.Array = 1.0,
    mask: jax.Array | None = None,
    channel_axis: int = -1,
    spatial_dims: int = 2,
) -> jax.Array:
  """Per-image PSNR in dB, `10 log10(data_range^2 / MSE)`, mask-weighted.

  Equals skimage's `peak_signal_noise_ratio(y_b, x_b, data_range=L)` for
  each image b (skimage takes one image; torchmetrics reduces the whole batch
  unless given `dim`, dm_pix assumes `data_range=1`). With a mask the MSE is
  the mask-weighted mean of the squared error, the mask broadcast over
  channels where it has one; a 0/1 mask gives the PSNR of the masked pixels
  alone.

  Under `jax.jit` `channel_axis` and `spatial_dims` are static (pass them in
  `static_argnames` or close over them); `data_range` and `mask` are traceable.

  Args:
    x: `[B, H, W, C]` or `[H, W, C]` (volumes `[B, D, H, W, C]` with
      `spatial_dims=3`), float16/bfloat16/float32, any side >= 1.
    y: same shape as `x` (the order does not matter: the MSE is symmetric).
    data_range: the dynamic range L (1.0 for [0, 1] images, 255.0 for 8-bit
      values, 2.0 for [-1, 1]), a float or a float array `[B]`.
    mask: optional non-negative weights `[B, H, W, 1|C]`
      (`[B, D, H, W, 1|C]`), laid out like the images.
    channel_axis: the channel axis of `x`, `y` and `mask` (-1:
      channels-last; 1: channels-first `[B, C, H, W]`).
    spatial_dims: 2 (images) or 3 (volumes); never guessed from the rank.

  Returns:
    float32 `[B]` in dB (a scalar for `[H, W, C]` inputs); `inf` for
    identical images (MSE 0), as skimage; 0 with zero gradient for an image
    whose mask mass is 0 (no pixels to compare), as `ssim`.

  Example:
    >>> x = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))   # [B, H, W, C]
    >>> y = x + 0.01 * jax.random.normal(jax.random.key(1), x.shape)
    >>> psnr(x, y)                                    # noise sigma 0.01: ~40 dB
    Array([40.07..., 40.06...], dtype=float32)
    >>> psnr(255 * x, 255 * y, data_range=255.0).shape
    (2,)
    >>> top = jnp.zeros((2, 48, 48, 1)).at[:, :24].set(1.0)
    >>> psnr(x, y, mask=top).shape                    # the top half only
    (2,)
  """
  p = plan_lib.make_pixel_plan(
      x, y, fn="psnr", data_range=data_range, mask=mask,
      channel_axis=channel_axis, spatial_dims=spatial_dims)
  axes = tuple(range(1, p.x.ndim))
  squared = jnp.square(p.x - p.y)
  if p.mask is None:
    mse = jnp.mean(squared, axis=axes)
    mass = jnp.full(mse.shape, 1.0, jnp.float32)
  else:
    w = jnp.broadcast_to(p.mask, p.x.shape)
    mass = jnp.sum(w, axis=axes)
    mse = safe_ratio(jnp.sum(w * squared, axis=axes), mass)
  # 20 log10(L) - 10 log10(MSE): no overflow of L^2 for any valid L.
  value = 20.0 * jnp.log10(p.data_range) - 10.0 * jnp.log10(
      jnp.where(mass > 0, mse, 1.0))
  value = jnp.where(mass > 0, value, 0.0)
  chex.assert_shape(value, (p.x.shape[0],))
  return value if p.batched else value[0]
