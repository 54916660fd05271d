"""Latent flow matching -> decoded pixel + SSIM losses, jit-friendly.

Conventions (rectified flow, as in the latent flow-matching trainer this
library was built for):

    x_t = (1 - t) * z0 + t * noise,   v = noise - z0,   t in [0, 1], t = 0 clean.
    z0_pred = x_t - t * v_pred        (= z0 + t * (v - v_pred))

The SSIM loss only means something in pixel space, so the predicted clean
latent is decoded by a (frozen) VAE and compared with the ground-truth image:

    w(t)  = clip((max_t - t) / max_t, 0, 1)                  per image
    SSIM  = 1 - sum_i w_i S_i / sum_i w_i M_i                 (psum over devices)
    pixel = sum_i w_i sum_valid |d|^p / sum_i w_i N_i C      (psum over devices)

with `S_i, M_i` the masked SSIM-map sum and mask mass of image i
(`ssim_jax.ssim_sums`). Both losses come from ONE decode per image.

Memory and compute (`decoded_losses`): images are sorted by weight inside the
jitted function and decoded `chunk_size` at a time in a `lax.scan`; each
chunk's decode + loss is wrapped in `jax.checkpoint`, so the backward pass
keeps only the chunk inputs and peak memory does not grow with the number of
images; `lax.cond(any(w > 0))` skips the decode of chunks whose weights are
all zero (with max_t = 0.3 and uniform t, ~70% of images). Under `vmap` a
`cond` becomes a `select` and runs both branches: do not vmap
`decoded_losses`; use `jax.shard_map` with `axis_name` for data parallelism.

Packed variable-size batches (`PackedLayout`, `pack`, `unpack`): images of
different latent sizes travel as one flat token sequence `[T, p*p*c]`; the
layout (host-side, hashable, static) maps it to a padded batch
`[N, Hmax, Wmax, c]` plus a validity mask, with one gather. Padding never
contributes to a loss or a gradient: padded latent values are constant zeros,
padded pixels carry no weight, and `decoded_losses(..., layout=layout)`
decodes every group of equal-size images at its true size (no padding enters
the decoder at all, so the result equals image-by-image decoding for any
decoder).

Debugging: with the environment variable `SSIM_LOSS_DEBUG=1` at trace time,
`decoded_losses` prints per image t, weight and SSIM via `jax.debug.print`;
when unset nothing extra is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks
# Names, not the module: the package re-exports a function called `ssim`.
from ssim_jax.ssim import SSIMSums
from ssim_jax.ssim import loss_from_sums
from ssim_jax.ssim import safe_ratio
from ssim_jax.ssim import ssim_sums

DEBUG_ENV = "SSIM_LOSS_DEBUG"
PIXEL_LOSSES = ("l1", "l2")


# ----------------------------------------------------------------------------
# Flow-matching conventions.


def _per_image(t: jax.Array, ndim: int) -> jax.Array:
  """Broadcasts per-image `t` (`[B]`, scalar, or any leading shape) to `ndim`."""
  t = jnp.asarray(t)
  if t.ndim > ndim:
    raise ValueError(f"t has rank {t.ndim}, more than the latents' rank {ndim}")
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def timestep_weight(t: jax.Array, *, max_t: float) -> jax.Array:
  """Per-image SSIM/pixel-loss weight `clip((max_t - t) / max_t, 0, 1)`.

  Low-noise steps (t near 0) get weight 1, t >= max_t weight 0: a prediction
  from a very noisy input is too poor for a structural loss to help.

  Args:
    t: flow times, any shape (e.g. `[B]`), t = 0 clean.
    max_t: threshold > 0 (a Python float, or a concrete array).

  Returns:
    float32 weights in [0, 1], same shape as `t`.

  Raises:
    ValueError: `max_t <= 0` (or not finite) when it is concrete.

  Example:
    >>> timestep_weight(jnp.array([0.0, 0.15, 0.5]), max_t=0.3)
    Array([1. , 0.5, 0. ], dtype=float32)
  """
  if not isinstance(max_t, jax.core.Tracer):
    if isinstance(max_t, bool) or not (
        isinstance(max_t, numbers.Real) or
        (isinstance(max_t, (np.ndarray, jax.Array)) and max_t.size == 1)):
      raise TypeError(f"max_t must be a real number, got {max_t!r}")
    value = float(np.asarray(max_t).reshape(()))
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"max_t must be a finite number > 0, got {max_t!r}")
  t = jnp.asarray(t, jnp.float32)
  return jnp.clip((max_t - t) / max_t, 0.0, 1.0)


def interpolate(z0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """`x_t = (1 - t) z0 + t noise`, `t` broadcast per image.

  Args:
    z0: clean latents `[B, ...]`.
    noise: same shape as `z0`.
    t: `[B]` (or scalar, or a prefix shape of `z0` such as `[B, T]` per token).

  Returns:
    `x_t`, shape of `z0`.
  """
  chex.assert_equal_shape([z0, noise])
  tb = _per_image(t, z0.ndim).astype(z0.dtype)
  return (1 - tb) * z0 + tb * noise


def velocity_target(z0: jax.Array, noise: jax.Array) -> jax.Array:
  """Rectified-flow velocity `v = noise - z0` (constant along the path)."""
  chex.assert_equal_shape([z0, noise])
  return noise - z0


def reconstruct_z0(
    x_t: jax.Array,
    v_pred: jax.Array,
    t: jax.Array,
    *,
    z0: jax.Array | None = None,
    noise: jax.Array | None = None,
    supervised: jax.Array | None = None,
) -> jax.Array:
  """Predicted clean latent `x_t - t * v_pred`.

  With both `z0` and `noise` given the same quantity is computed as
  `z0 + t * (v - v_pred)` (the seed's form): identical gradient, and exactly
  `z0` when `v_pred == v` (the other form rounds). Where `supervised` is False
  or `t == 0` (conditioning / clean tokens) the clean `z0` is kept, when given.

  Args:
    x_t: noisy latents `[B, ...]`.
    v_pred: predicted velocities, shape of `x_t`.
    t: `[B]` per image (or a prefix shape of `x_t`, e.g. `[B, T]` per token).
    z0: optional clean latents, shape of `x_t`.
    noise: optional noise, shape of `x_t` (used only with `z0`).
    supervised: optional bool, a prefix shape of `x_t` like `t`.

  Returns:
    `z0_pred`, shape and dtype of `x_t`.
  """
  chex.assert_equal_shape([x_t, v_pred])
  tb = _per_image(t, x_t.ndim).astype(x_t.dtype)
  if z0 is not None:
    chex.assert_equal_shape([x_t, z0])
  if z0 is not None and noise is not None:
    chex.assert_equal_shape([x_t, noise])
    pred = z0 + tb * (velocity_target(z0, noise) - v_pred)
  else:
    pred = x_t - tb * v_pred
  if z0 is None:
    return pred
  keep = tb == 0
  if supervised is not None:
    keep = jnp.logical_or(keep, jnp.logical_not(_per_image(supervised, x_t.ndim)))
  return jnp.where(keep, z0, pred)


# ----------------------------------------------------------------------------
# Patches and packed layouts.


def _check_patch_size(patch_size: Any) -> int:
  if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral):
    raise TypeError(f"patch_size must be an int, got {patch_size!r}")
  if patch_size < 1:
    raise ValueError(f"patch_size must be >= 1, got {patch_size}")
  return int(patch_size)


def patchify(z: jax.Array, *, patch_size: int) -> jax.Array:
  """Latents `[..., h*p, w*p, c]` -> tokens `[..., h*w, p*p*c]` (row-major grid).

  Each token holds its `p x p x c` patch in (row, column, channel) order, the
  channels-last form of the seed's `hwpqc` token layout.

  Args:
    z: latents, rank >= 3, spatial sizes divisible by `patch_size`.
    patch_size: p >= 1.

  Returns:
    tokens `[..., h*w, p*p*c]`.
  """
  p = _check_patch_size(patch_size)
  if z.ndim < 3:
    raise ValueError(f"z must have rank >= 3 ([..., H, W, C]), got shape {z.shape}")
  *lead, hp, wp, c = z.shape
  if hp % p or wp % p:
    raise ValueError(f"z spatial shape {(hp, wp)} is not divisible by patch_size={p}")
  h, w = hp // p, wp // p
  x = z.reshape(*lead, h, p, w, p, c)
  x = jnp.einsum("...hpwqc->...hwpqc", x)
  return x.reshape(*lead, h * w, p * p * c)


def unpatchify(tokens: jax.Array, *, grid_hw: tuple[int, int],
               patch_size: int) -> jax.Array:
  """Tokens `[..., h*w, p*p*c]` -> latents `[..., h*p, w*p, c]`.

  The exact inverse of `patchify` (a pure permutation: bitwise round trip);
  the seed's `einsum("hwpqc->chpwq")` made channels-last.

  Args:
    tokens: `[..., h*w, p*p*c]`.
    grid_hw: `(h, w)`, the patch grid.
    patch_size: p >= 1.

  Returns:
    latents `[..., h*p, w*p, c]`.
  """
  p = _check_patch_size(patch_size)
  h, w = (int(s) for s in grid_hw)
  if tokens.ndim < 2:
    raise ValueError(f"tokens must have rank >= 2, got shape {tokens.shape}")
  *lead, n, d = tokens.shape
  if n != h * w:
    raise ValueError(f"tokens has {n} tokens but grid_hw={grid_hw} needs {h * w}")
  if d % (p * p):
    raise ValueError(f"token size {d} is not divisible by patch_size**2={p * p}")
  c = d // (p * p)
  x = tokens.reshape(*lead, h, w, p, p, c)
  x = jnp.einsum("...hwpqc->...hpwqc", x)
  return x.reshape(*lead, h * p, w * p, c)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Static layout of a packed sequence of variable-size latent images.

  Hashable and comparable, so it can be a `static_argnames` argument; build it
  on the host once per layout (e.g. per resolution bucket).

  Attributes:
    latent_hw: `((h_0, w_0), ...)` latent sizes (pixels of the latent grid,
      before patchifying), each divisible by `patch_size`.
    patch_size: p.
  """
  latent_hw: tuple[tuple[int, int], ...]
  patch_size: int

  @classmethod
  def from_sizes(cls, latent_hw_list: Sequence[Sequence[int]],
                 patch_size: int) -> "PackedLayout":
    """Validates and builds a layout from `[(h, w), ...]` latent sizes."""
    p = _check_patch_size(patch_size)
    sizes = []
    for i, hw in enumerate(latent_hw_list):
      hw = tuple(int(s) for s in hw)
      if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"latent_hw_list[{i}] must be (h, w) >= 1, got {hw}")
      if hw[0] % p or hw[1] % p:
        raise ValueError(
            f"latent_hw_list[{i}]={hw} is not divisible by patch_size={p}")
      sizes.append(hw)
    if not sizes:
      raise ValueError("latent_hw_list must hold at least one image")
    return cls(tuple(sizes), p)

  @property
  def num_images(self) -> int:
    return len(self.latent_hw)

  @property
  def grid_hw(self) -> tuple[tuple[int, int], ...]:
    """Patch grid `(h/p, w/p)` of each image."""
    p = self.patch_size
    return tuple((h // p, w // p) for h, w in self.latent_hw)

  @property
  def tokens_per_image(self) -> tuple[int, ...]:
    return tuple(gh * gw for gh, gw in self.grid_hw)

  @property
  def starts(self) -> tuple[int, ...]:
    """Index of each image's first token in the packed sequence."""
    return tuple(int(s) for s in np.cumsum((0,) + self.tokens_per_image)[:-1])

  @property
  def num_tokens(self) -> int:
    return int(sum(self.tokens_per_image))

  @property
  def max_hw(self) -> tuple[int, int]:
    """`(Hmax, Wmax)` of the padded latent batch."""
    return (max(h for h, _ in self.latent_hw), max(w for _, w in self.latent_hw))

  def token_image_ids(self) -> np.ndarray:
    """int32 `[T]`: the image each token belongs to."""
    return np.repeat(np.arange(self.num_images, dtype=np.int32),
                     self.tokens_per_image)

  def gather_index(self) -> np.ndarray:
    """int32 `[N, Hmax/p, Wmax/p]` token index of each padded grid cell.

    Cells outside an image point at index `num_tokens` (a zero pad row).
    """
    p = self.patch_size
    gh_max, gw_max = self.max_hw[0] // p, self.max_hw[1] // p
    idx = np.full((self.num_images, gh_max, gw_max), self.num_tokens, np.int32)
    for i, ((gh, gw), s) in enumerate(zip(self.grid_hw, self.starts)):
      idx[i, :gh, :gw] = s + np.arange(gh * gw, dtype=np.int32).reshape(gh, gw)
    return idx

  def mask(self, *, downsample: int = 1) -> np.ndarray:
    """float32 validity mask `[N, Hmax*f, Wmax*f, 1]`, f = `downsample`.

    `downsample=1` is the latent mask; the VAE's factor gives the pixel mask.
    """
    f = int(downsample)
    hm, wm = self.max_hw
    out = np.zeros((self.num_images, hm * f, wm * f, 1), np.float32)
    for i, (h, w) in enumerate(self.latent_hw):
      out[i, :h * f, :w * f] = 1.0
    return out

  def size_groups(self) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """`(((h, w), (image indices...)), ...)`, one group per distinct size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(self.latent_hw):
      groups.setdefault(hw, []).append(i)
    return tuple((hw, tuple(ix)) for hw, ix in groups.items())


def _check_layout(layout: Any) -> PackedLayout:
  if not isinstance(layout, PackedLayout):
    raise TypeError(
        f"layout must be a PackedLayout (PackedLayout.from_sizes), got "
        f"{type(layout).__name__}")
  return layout


def pack(latents_list: Sequence[jax.Array], layout: PackedLayout) -> jax.Array:
  """Patchifies and concatenates images of different sizes into one sequence.

  Args:
    latents_list: N latents `[h_i, w_i, c]` matching `layout.latent_hw`.
    layout: the `PackedLayout`.

  Returns:
    tokens `[T, p*p*c]`, images in order.
  """
  layout = _check_layout(layout)
  if len(latents_list) != layout.num_images:
    raise ValueError(f"latents_list has {len(latents_list)} images, layout has "
                     f"{layout.num_images}")
  out = []
  for i, (z, hw) in enumerate(zip(latents_list, layout.latent_hw)):
    if z.ndim != 3 or tuple(z.shape[:2]) != hw:
      raise ValueError(f"latents_list[{i}] has shape {z.shape}, layout says "
                       f"{hw + ('c',)}")
    out.append(patchify(z, patch_size=layout.patch_size))
  return jnp.concatenate(out, axis=0)


def pack_padded(latents: jax.Array, layout: PackedLayout) -> jax.Array:
  """Packs a padded batch `[N, Hmax, Wmax, c]` (the inverse of `unpack`).

  Args:
    latents: `[N, Hmax, Wmax, c]`; values outside each image are ignored.
    layout: the `PackedLayout`.

  Returns:
    tokens `[T, p*p*c]`.
  """
  layout = _check_layout(layout)
  chex.assert_rank(latents, 4)
  expect = (layout.num_images,) + layout.max_hw
  if tuple(latents.shape[:3]) != expect:
    raise ValueError(f"latents has shape {latents.shape}, layout needs {expect + ('c',)}")
  grid = patchify(latents, patch_size=layout.patch_size)  # [N, G, D]
  idx = layout.gather_index().reshape(layout.num_images, -1)
  flat = grid.reshape(-1, grid.shape[-1])
  # Static positions of the real tokens inside the flattened padded grid.
  positions = np.zeros((layout.num_tokens,), np.int32)
  for i in range(layout.num_images):
    valid = idx[i] < layout.num_tokens
    positions[idx[i][valid]] = i * idx.shape[1] + np.nonzero(valid)[0]
  return flat[positions]


def unpack(tokens: jax.Array, layout: PackedLayout) -> tuple[jax.Array, jax.Array]:
  """Packed tokens -> padded latents and validity mask (one gather).

  Args:
    tokens: `[T, p*p*c]` in the order of `layout`.
    layout: the `PackedLayout`.

  Returns:
    `(latents [N, Hmax, Wmax, c], mask [N, Hmax, Wmax, 1])`; padding is exactly
    zero (a constant: no gradient flows to or from it), the mask float32.
  """
  layout = _check_layout(layout)
  chex.assert_rank(tokens, 2)
  if tokens.shape[0] != layout.num_tokens:
    raise ValueError(f"tokens has {tokens.shape[0]} tokens, layout has "
                     f"{layout.num_tokens}")
  padded = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]), tokens.dtype)])
  idx = layout.gather_index()
  grid = padded[idx.reshape(layout.num_images, -1)]  # [N, Gh*Gw, D]
  latents = unpatchify(grid, grid_hw=idx.shape[1:], patch_size=layout.patch_size)
  return latents, jnp.asarray(layout.mask())


def image_values(token_values: jax.Array, layout: PackedLayout) -> jax.Array:
  """Per-image value from each image's FIRST token (e.g. t `[T]` -> `[N]`)."""
  layout = _check_layout(layout)
  return token_values[np.asarray(layout.starts, np.int32)]


def token_values(image_values_: jax.Array, layout: PackedLayout) -> jax.Array:
  """Broadcasts per-image values `[N, ...]` to every token `[T, ...]`."""
  layout = _check_layout(layout)
  return image_values_[layout.token_image_ids()]


# ----------------------------------------------------------------------------
# Decoded losses.


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
  channels = gt.shape[-1]
  if valid is None:
    pixel_per_image = jnp.sum(per_pixel, axis=(1, 2, 3))
    count = jnp.full(w.shape, float(np.prod(gt.shape[1:])), jnp.float32)
    mask = None
  else:
    pixel_per_image = jnp.sum(valid * per_pixel, axis=(1, 2, 3))
    count = jnp.sum(valid, axis=(1, 2, 3)) * channels
    # Zero outside the image: with 'same' padding the borders then see the
    # zeros the image alone would see; with 'valid' the eroded mask drops
    # every window that straddles the padding.
    pred01 = jnp.where(valid > 0, pred01, 0.0)
    gt01 = jnp.where(valid > 0, gt01, 0.0)
    mask = valid
    if ssim_kwargs.get("padding", "valid") == "valid":
      k = checks.effective_window(ssim_kwargs.get("window_size", 11),
                                  gt.shape[1], gt.shape[2])
      mask = _erode(valid, k // 2)
  if ms_ssim_levels > 1:
    # MS-SSIM is a product over scales, not a ratio of sums: each image counts
    # with its weight alone (mass w_i), its valid pixels as the mask.
    from ssim_jax.ms_ssim import ms_ssim  # pylint: disable=g-import-not-at-top
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
      `1 - sum w_i MS-SSIM_i / sum w_i` and `per_image_ssim` holds MS-SSIM.

  Returns:
    `DecodedLosses(ssim, pixel, weight_mass, per_image_ssim, decoded)`.

  Example:
    >>> def loss_fn(params, vae_params, batch):
    ...   decode = lambda z: vae_apply(vae_params, z)
    ...   z0 = reconstruct_z0(batch.x_t, model(params, batch), batch.t)
    ...   w = timestep_weight(batch.t, max_t=0.3)
    ...   out = decoded_losses(z0, batch.images, w, decode, axis_name="data")
    ...   return out.ssim + 10.0 * out.pixel
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
  if isinstance(ms_ssim_levels, bool) or not isinstance(ms_ssim_levels, numbers.Integral) \
      or ms_ssim_levels < 1:
    raise ValueError(f"ms_ssim_levels must be an int >= 1, got {ms_ssim_levels!r}")
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
