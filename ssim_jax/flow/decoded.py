"""Decoded losses: one decode per image gives the timestep-weighted SSIM and pixel losses.

    SSIM  = 1 - sum_i w_i S_i / sum_i w_i M_i                 (psum over devices)
    pixel = sum_i w_i sum_valid |d|^p / sum_i w_i N_i C      (psum over devices)

with `S_i, M_i` the masked SSIM-map sum and mask mass of image i
(`ssim_jax.ssim_sums`). Images are sorted by weight and decoded `chunk_size`
at a time in a `lax.scan`, each chunk under `jax.checkpoint`, skipping chunks
whose weights are all zero (`lax.cond`); see the package docstring.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks
# Names, not the module: the package re-exports a function called `ssim`.
from ssim_jax.flow.packing import PackedLayout
from ssim_jax.flow.packing import _check_layout
from ssim_jax.ms_ssim import ms_ssim
from ssim_jax.ssim import SSIMSums
from ssim_jax.ssim import loss_from_sums
from ssim_jax.ssim import safe_ratio
from ssim_jax.ssim import ssim_sums

DEBUG_ENV = "SSIM_LOSS_DEBUG"
PIXEL_LOSSES = ("l1", "l2")


class DecodedLosses(NamedTuple):
  """Result of `decoded_losses` (scalars are global when `axis_name` is set).

  Attributes:
    ssim: float32 scalar `1 - psum(sum w S) / psum(sum w M)`, in [0, 2];
      0 with zero gradient when the total weight mass is 0.
    pixel: float32 scalar weighted mean L1/L2 over valid pixels and channels
      (images in [-1, 1]); 0 when the total weight mass is 0.
    weight_mass: float32 scalar, psum of the per-image weights.
    per_image_ssim: float32 `[N]` unweighted SSIM of each (local) image over
      its valid region; 0 for images that were not decoded.
    decoded: bool `[N]`, whether each image's chunk was decoded.
  """
  ssim: jax.Array
  pixel: jax.Array
  weight_mass: jax.Array
  per_image_ssim: jax.Array
  decoded: jax.Array


class DecodedMasses(NamedTuple):
  """The normalisers of `decoded_losses` (`decoded_masses`; global when `axis_name` is set).

  Attributes:
    ssim: float32 scalar `psum(sum_i w_i M_i)`, the SSIM term's denominator.
    pixel: float32 scalar `psum(sum_i w_i N_i C)`, the pixel term's denominator.
  """
  ssim: jax.Array
  pixel: jax.Array


class _Partials(NamedTuple):
  ssim_sum: jax.Array    # float32 [], sum_i w_i S_i
  ssim_mass: jax.Array   # float32 [], sum_i w_i M_i
  pixel_sum: jax.Array   # float32 [], sum_i w_i sum_valid |d|^p
  pixel_mass: jax.Array  # float32 [], sum_i w_i N_i C


def _erode(valid: jax.Array, r: int) -> jax.Array:
  """Keeps pixel (a, b) iff (a + r, b + r) is valid.

  Validity regions are top-left rectangles, so after the 'valid' crop of
  `r` pixels per side the kept map positions are exactly those whose window
  lies inside the image: the map of the cropped image.
  """
  if r == 0:
    return valid
  padded = jnp.pad(valid, ((0, 0), (0, r), (0, r), (0, 0)))
  return padded[:, r:, r:, :]


def _count_and_mask(gt, valid, ssim_kwargs):
  """`(N_i C [c], SSIM mask or None)` of images `gt` `[c, H, W, C]` with validity `valid`.

  The pixel count is what the pixel term divides image i by; the mask (the
  validity, eroded by the window radius for 'valid' padding) is the SSIM map's.
  """
  if valid is None:
    return jnp.full(gt.shape[:1], float(np.prod(gt.shape[1:])), jnp.float32), None
  mask = valid
  if ssim_kwargs.get("padding", "valid") == "valid":
    k = checks.effective_window(ssim_kwargs.get("window_size", 11), gt.shape[1], gt.shape[2])
    mask = _erode(valid, k // 2)
  return jnp.sum(valid, axis=(1, 2, 3)) * gt.shape[-1], mask


def _chunk_losses(z, gt, w, valid, *, decode_fn, pixel_loss, ssim_kwargs,
                  ms_ssim_levels=1):
  """Decode + both losses for one chunk (the body under `jax.checkpoint`).

  Args:
    z: latents `[c, h, w, C]`.
    gt: ground truth `[c, H, W, 3]` in [-1, 1].
    w: float32 weights `[c]`.
    valid: float32 validity `[c, H, W, 1]` or None (every pixel valid).

  Returns:
    `(_Partials, per-image SSIM [c])`.
  """
  pred = decode_fn(z)
  if tuple(pred.shape) != tuple(gt.shape):
    raise ValueError(
        f"decode_fn returned shape {tuple(pred.shape)} for latents "
        f"{tuple(z.shape)}, but images have shape {tuple(gt.shape)}")
  pred = pred.astype(jnp.float32)
  gt = gt.astype(jnp.float32)
  diff = pred - gt
  per_pixel = jnp.abs(diff) if pixel_loss == "l1" else jnp.square(diff)
  # [-1, 1] -> [0, 1] for SSIM. No clip of the prediction: a clip would zero
  # the gradient of every out-of-range pixel (SSIM is range-safe anyway).
  pred01 = pred * 0.5 + 0.5
  gt01 = gt * 0.5 + 0.5
  count, mask = _count_and_mask(gt, valid, ssim_kwargs)
  if valid is None:
    pixel_per_image = jnp.sum(per_pixel, axis=(1, 2, 3))
  else:
    pixel_per_image = jnp.sum(valid * per_pixel, axis=(1, 2, 3))
    # Zero outside the image: with 'same' padding the borders then see the
    # zeros the image alone would see; with 'valid' the eroded mask drops
    # every window that straddles the padding.
    pred01 = jnp.where(valid > 0, pred01, 0.0)
    gt01 = jnp.where(valid > 0, gt01, 0.0)
  if ms_ssim_levels > 1:
    # MS-SSIM is a product over scales, not a ratio of sums: each image counts
    # with its weight alone (mass w_i), its valid pixels as the mask.
    per_image = ms_ssim(pred01, gt01, mask=valid, levels=ms_ssim_levels, **ssim_kwargs)
    parts = _Partials(jnp.sum(w * per_image), jnp.sum(w),
                      jnp.sum(w * pixel_per_image), jnp.sum(w * count))
    return parts, per_image
  sums = ssim_sums(pred01, gt01, mask=mask, **ssim_kwargs)
  per_image = safe_ratio(sums.weighted_sum, sums.mass)
  # The per-image weight multiplies the (already 0/1) SSIM mask: linear, so
  # it is applied to the sums.
  parts = _Partials(jnp.sum(w * sums.weighted_sum), jnp.sum(w * sums.mass),
                    jnp.sum(w * pixel_per_image), jnp.sum(w * count))
  return parts, per_image


def _zero_like_inputs(*arrays) -> jax.Array:
  """float32 scalar 0 that varies over the same mapped axes as the inputs.

  Inside `jax.shard_map` both `cond` branches and the scan carry must agree on
  the mesh axes they vary over (the decode branch varies like its inputs);
  `zeros_like` keeps that type without reading the data.
  """
  zero = jnp.zeros((), jnp.float32)
  for a in arrays:
    if a is not None:
      zero = zero + jnp.zeros_like(a, dtype=jnp.float32, shape=())
  return zero


def _chunked(z, gt, w, valid, *, decode_fn, chunk_size, remat, pixel_loss,
             ssim_kwargs, ms_ssim_levels=1):
  """Sorted, chunked, rematerialised, skip-if-zero losses of one size group.

  Returns:
    `(_Partials, per-image SSIM [n], decoded [n])`, per image in input order.
  """
  n = z.shape[0]
  chunk = min(chunk_size, n)
  num_chunks = -(-n // chunk)
  total = num_chunks * chunk
  # Heaviest first: every chunk after the last positive weight is all zero
  # and skipped by the cond below.
  order = jnp.argsort(-w, stable=True)
  inverse = jnp.argsort(order)

  def arrange(a):
    if a is None:
      return None
    a = a[order]
    if total > n:  # zero-weight filler images complete the last chunk
      a = jnp.concatenate([a, jnp.zeros((total - n,) + a.shape[1:], a.dtype)])
    return a.reshape((num_chunks, chunk) + a.shape[1:])

  xs = (arrange(z), arrange(gt), arrange(w), arrange(valid))
  body = functools.partial(_chunk_losses, decode_fn=decode_fn,
                           pixel_loss=pixel_loss, ssim_kwargs=ssim_kwargs,
                           ms_ssim_levels=ms_ssim_levels)
  if remat:
    body = jax.checkpoint(body)

  def skip(zc, gc, wc, vc):
    zero = _zero_like_inputs(zc, gc, wc, vc)
    return _Partials(zero, zero, zero, zero), jnp.broadcast_to(zero, (chunk,))

  def step(carry, chunk_xs):
    zc, gc, wc, vc = chunk_xs
    run = jnp.any(wc > 0)
    parts, per_image = jax.lax.cond(run, body, skip, zc, gc, wc, vc)
    carry = _Partials(*(a + b for a, b in zip(carry, parts)))
    return carry, (per_image, jnp.broadcast_to(run, (chunk,)))

  zero = _zero_like_inputs(*xs)
  parts, (per_image, decoded) = jax.lax.scan(
      step, _Partials(zero, zero, zero, zero), xs)
  per_image = per_image.reshape(total)[:n][inverse]
  decoded = decoded.reshape(total)[:n][inverse]
  return parts, per_image, decoded


def _pixel_valid(valid_mask, n, hw_img, hw_lat):
  """Validity at pixel resolution, float32 `[N, H, W, 1]` (or None)."""
  if valid_mask is None:
    return None
  v = jnp.asarray(valid_mask, jnp.float32)
  if v.ndim != 4 or v.shape[0] != n or v.shape[-1] != 1:
    raise ValueError(f"valid_mask must be [N, H, W, 1] with N={n}, got {v.shape}")
  if tuple(v.shape[1:3]) == hw_img:
    return v
  if tuple(v.shape[1:3]) == hw_lat and hw_img[0] % hw_lat[0] == 0 and \
      hw_img[1] % hw_lat[1] == 0:
    # A latent-resolution mask: nearest upsampling by the VAE factor.
    fh, fw = hw_img[0] // hw_lat[0], hw_img[1] // hw_lat[1]
    return jnp.repeat(jnp.repeat(v, fh, axis=1), fw, axis=2)
  raise ValueError(
      f"valid_mask spatial shape {v.shape[1:3]} matches neither the images "
      f"{hw_img} nor the latents {hw_lat}")


def decoded_losses(
    z0_pred: jax.Array,
    images: jax.Array,
    weights: jax.Array,
    decode_fn: Callable[[jax.Array], jax.Array],
    *,
    chunk_size: int = 2,
    pixel_loss: str = "l1",
    valid_mask: jax.Array | None = None,
    layout: PackedLayout | None = None,
    axis_name: Any = None,
    remat: bool = True,
    t: jax.Array | None = None,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
    filter_method: str = "auto",
    ms_ssim_levels: int = 1,
    masses: DecodedMasses | None = None,
) -> DecodedLosses:
  """SSIM and pixel losses of decoded latents, from one decode per image.

  Images are sorted by weight inside the traced function and decoded
  `chunk_size` at a time in a `lax.scan`, each chunk under `jax.checkpoint`
  (memory flat in N) and a `lax.cond` that skips chunks whose weights are all
  zero. The SSIM mask of image i is `w_i * valid_i`; both losses are
  normalised by the total weight mass, summed over `axis_name` when given,
  so N devices give the loss of one device holding the whole batch.

  Frozen VAE parameters must reach `decode_fn` as arguments of the jitted
  function (build `decode_fn` inside it), not as closed-over constants.

  Args:
    z0_pred: predicted clean latents `[N, h, w, c]` (padded when packed).
    images: ground truth `[N, H, W, 3]` in [-1, 1], floating.
    weights: per-image weights `[N]` >= 0, e.g. `timestep_weight(t, ...)`.
    decode_fn: `[n, h, w, c] -> [n, H, W, 3]` images in [-1, 1].
    chunk_size: images per decode, >= 1.
    pixel_loss: "l1" or "l2" (on [-1, 1] images).
    valid_mask: optional validity `[N, H, W, 1]` (pixel resolution) or
      `[N, h, w, 1]` (latent resolution, upsampled) for padded batches, e.g.
      `layout.mask(downsample=f)`. Padded pixels weigh nothing; SSIM windows
      that straddle padding are dropped ('valid' padding) or see zeros
      ('same'), as for the image alone. Padded latents still enter the
      decoder's receptive field: use `layout=` for exactness.
    layout: optional `PackedLayout` of `z0_pred` (from `unpack`): each group of
      equal-size images is cropped to its true size and decoded without any
      padding (exactly image by image, for any decoder); `valid_mask` must
      then be None.
    axis_name: mapped axis name(s) to psum the sums over (`jax.shard_map`).
    remat: wrap each chunk in `jax.checkpoint` (False only to measure).
    t: optional flow times `[N]`, only for the `SSIM_LOSS_DEBUG` printout.
    data_range: SSIM dynamic range of the [0, 1] images, a Python float.
    window_size, sigma, k1, k2, padding, filter_method: SSIM options (see
      `ssim_jax.ssim`); every valid image region should be at least
      `window_size` pixels wide (the window shrinks only for small batches).
    ms_ssim_levels: 1 (SSIM) or the number of MS-SSIM scales (`ssim_jax.ms_ssim`
      with the standard weights renormalised; images need a side >=
      `(window_size - 1) 2^(levels - 1) + 1`): the SSIM term is then
      `1 - sum_i w_i MS-SSIM_i / sum_i w_i` and `per_image_ssim` holds MS-SSIM.
    masses: optional `DecodedMasses` to divide by instead of this call's own
      (psum-ed) masses, e.g. those of a whole batch (`decoded_masses`) when it
      is processed in micro-batches (gradient accumulation): each call then
      gives its share, `ssim = 1 - psum(sum w S) / masses.ssim` and `pixel =
      psum(sum w |d|^p) / masses.pixel`, and the batch's losses are
      `1 - sum_j (1 - ssim_j)` and `sum_j pixel_j` over micro-batches j (their
      gradients likewise), to float rounding.

  Returns:
    `DecodedLosses(ssim, pixel, weight_mass, per_image_ssim, decoded)`.

  Example:
    >>> def loss_fn(params, vae_params, batch):
    ...   decode = lambda z: vae_apply(vae_params, z)
    ...   z0 = reconstruct_z0(batch.x_t, model(params, batch), batch.t)
    ...   w = timestep_weight(batch.t, max_t=0.3)
    ...   out = decoded_losses(z0, batch.images, w, decode, axis_name="data")
    ...   return out.ssim + 10.0 * out.pixel

    A perfect prediction, with `tanh` as the "decoder"; the image at
    t = 0.6 > max_t has weight 0 and is never decoded:

    >>> z0 = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))   # [N, h, w, c]
    >>> w = timestep_weight(jnp.array([0.0, 0.1, 0.2, 0.6]), max_t=0.3)
    >>> out = decoded_losses(z0, jnp.tanh(z0), w, jnp.tanh, chunk_size=1, window_size=7)
    >>> float(out.ssim), float(out.pixel), out.decoded.tolist()
    (0.0, 0.0, [True, True, True, False])
  """
  chex.assert_rank([z0_pred, images, weights], [4, 4, 1])
  n = z0_pred.shape[0]
  chex.assert_axis_dimension(images, 0, n)
  chex.assert_axis_dimension(weights, 0, n)
  if not callable(decode_fn):
    raise TypeError(f"decode_fn must be callable, got {type(decode_fn).__name__}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  pixel_loss = checks.check_choice(pixel_loss, "pixel_loss", PIXEL_LOSSES)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating in [-1, 1], got {images.dtype}")
  if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
    raise TypeError(f"data_range must be a Python float here (images are sorted "
                    f"and chunked), got {type(data_range).__name__}")
  _check_levels(ms_ssim_levels)
  if masses is not None and not isinstance(masses, DecodedMasses):
    raise TypeError(f"masses must be a DecodedMasses (decoded_masses), got "
                    f"{type(masses).__name__}")
  ssim_kwargs = dict(data_range=data_range, window_size=window_size, sigma=sigma,
                     k1=k1, k2=k2, padding=padding, filter_method=filter_method)
  w = jnp.asarray(weights, jnp.float32)
  hw_img, hw_lat = tuple(images.shape[1:3]), tuple(z0_pred.shape[1:3])
  run = functools.partial(_chunked, decode_fn=decode_fn, chunk_size=int(chunk_size),
                          remat=remat, pixel_loss=pixel_loss,
                          ssim_kwargs=ssim_kwargs, ms_ssim_levels=int(ms_ssim_levels))
  if layout is None:
    valid = _pixel_valid(valid_mask, n, hw_img, hw_lat)
    parts, per_image, decoded = run(z0_pred, images, w, valid)
  else:
    layout = _check_layout(layout)
    if valid_mask is not None:
      raise ValueError("valid_mask must be None when layout is given (the layout "
                       "defines the valid region)")
    if layout.num_images != n or layout.max_hw != hw_lat:
      raise ValueError(f"layout ({layout.num_images} images, max latent size "
                       f"{layout.max_hw}) does not match z0_pred {z0_pred.shape}")
    fh, fw = hw_img[0] // hw_lat[0], hw_img[1] // hw_lat[1]
    if (fh * hw_lat[0], fw * hw_lat[1]) != hw_img:
      raise ValueError(f"images {hw_img} are not an integer multiple of the "
                       f"latents {hw_lat}")
    zero = jnp.zeros((), jnp.float32)
    parts = _Partials(zero, zero, zero, zero)
    per_image = jnp.zeros((n,), jnp.float32)
    decoded = jnp.zeros((n,), bool)
    for (h, wl), idx in layout.size_groups():
      ix = np.asarray(idx, np.int32)
      g_parts, g_ssim, g_dec = run(z0_pred[ix, :h, :wl], images[ix, :h * fh, :wl * fw],
                                   w[ix], None)
      parts = _Partials(*(a + b for a, b in zip(parts, g_parts)))
      per_image = per_image.at[ix].set(g_ssim)
      decoded = decoded.at[ix].set(g_dec)

  weight_mass = jnp.sum(w)
  if axis_name is not None:
    parts = _Partials(*(jax.lax.psum(a, axis_name) for a in parts))
    weight_mass = jax.lax.psum(weight_mass, axis_name)
  if masses is not None:
    parts = parts._replace(ssim_mass=jnp.asarray(masses.ssim, jnp.float32),
                           pixel_mass=jnp.asarray(masses.pixel, jnp.float32))
  ssim_loss = loss_from_sums(
      SSIMSums(parts.ssim_sum, parts.ssim_mass))
  pixel = safe_ratio(parts.pixel_sum, parts.pixel_mass)

  if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
    tt = jnp.full((n,), jnp.nan, jnp.float32) if t is None else jnp.asarray(t, jnp.float32)
    # One print call (one line per image): the lines of a step stay together.
    lines = [f"[ssim_loss] image {i}: t={{t{i}:.4f}} weight={{w{i}:.4f}} "
             f"ssim={{s{i}:.4f}} decoded={{d{i}}}" for i in range(n)]
    lines.append("[ssim_loss] ssim_loss={loss:.5f} pixel={pixel:.5f} "
                 "weight_mass={mass:.4f}")
    values = {}
    for i in range(n):
      values.update({f"t{i}": tt[i], f"w{i}": w[i], f"s{i}": per_image[i],
                     f"d{i}": decoded[i]})
    jax.debug.print("\n".join(lines), loss=ssim_loss, pixel=pixel,
                    mass=weight_mass, **values)
  return DecodedLosses(ssim_loss, pixel, weight_mass, per_image, decoded)


def _check_levels(ms_ssim_levels) -> None:
  if isinstance(ms_ssim_levels, bool) or not isinstance(ms_ssim_levels, numbers.Integral) \
      or ms_ssim_levels < 1:
    raise ValueError(f"ms_ssim_levels must be an int >= 1, got {ms_ssim_levels!r}")


def decoded_masses(
    images: jax.Array,
    weights: jax.Array,
    *,
    valid_mask: jax.Array | None = None,
    axis_name: Any = None,
    window_size: int = 11,
    padding: str = "valid",
    ms_ssim_levels: int = 1,
) -> DecodedMasses:
  """The masses that `decoded_losses` divides by, without decoding anything.

  They depend on the weights, the image size and the validity only, not on
  the prediction: computed once for a whole batch and passed as
  `decoded_losses(..., masses=)` to each of its micro-batches, they make the
  micro-batches' losses add up to the batch's (gradient accumulation).

  Args:
    images: ground truth `[N, H, W, 3]` (only its shape is used).
    weights: per-image weights `[N]` >= 0.
    valid_mask: optional validity `[N, H, W, 1]` at pixel resolution. (A
      packed batch decoded with `layout=`: its `layout.mask(downsample=f)`,
      exact while each image is at least `window_size` pixels wide.)
    axis_name: mapped axis name(s) to psum the masses over.
    window_size, padding, ms_ssim_levels: as given to `decoded_losses`.

  Returns:
    `DecodedMasses(ssim, pixel)`, float32 scalars.

  Example:
    >>> images = jnp.zeros((4, 16, 16, 3))
    >>> w = jnp.array([1.0, 0.5, 0.0, 0.5])
    >>> m = decoded_masses(images, w, window_size=7)   # 10 x 10 map x 3 channels
    >>> float(m.ssim), float(m.pixel)
    (600.0, 1536.0)
  """
  chex.assert_rank([images, weights], [4, 1])
  chex.assert_axis_dimension(weights, 0, images.shape[0])
  _check_levels(ms_ssim_levels)
  w = jnp.asarray(weights, jnp.float32)
  hw = tuple(images.shape[1:3])
  valid = _pixel_valid(valid_mask, images.shape[0], hw, hw)
  count, mask = _count_and_mask(images, valid, dict(window_size=window_size, padding=padding))
  if ms_ssim_levels > 1:
    ssim_mass = jnp.ones_like(w)  # each image counts with its weight alone
  else:
    x = jnp.zeros(images.shape, jnp.float32)  # the mass depends on the mask only
    ssim_mass = ssim_sums(x, x, mask=mask, window_size=window_size, padding=padding).mass
  out = DecodedMasses(jnp.sum(w * ssim_mass), jnp.sum(w * count))
  if axis_name is not None:
    out = DecodedMasses(*(jax.lax.psum(a, axis_name) for a in out))
  return out
