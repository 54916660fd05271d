"""Latent patches and packed variable-size batches.

`patchify` / `unpatchify` map latents `[..., H, W, c]` to tokens
`[..., (H/p)(W/p), p*p*c]` and back (exact inverses). Images of different
latent sizes travel as one flat token sequence `[T, p*p*c]`: a `PackedLayout`
(host-side, hashable, static) maps it to a padded batch `[N, Hmax, Wmax, c]`
plus a validity mask with one gather (`unpack`), and back (`pack`,
`pack_padded`). Padded latent values are constant zeros and padded pixels
carry no weight in `ssim_jax.flow.decoded_losses`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssim_jax import checks


# Orders of one token's p x p x c values: (patch row, patch column, channel)
# -- channels-last, the default -- or (channel, patch row, patch column), the
# order of FLUX (diffusers' `_pack_latents`) and of the seed's NCHW models.
PATCH_ORDERS = ("pqc", "cpq")


def _check_patch_size(patch_size: Any) -> int:
  if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral):
    raise TypeError(f"patch_size must be an int, got {patch_size!r}")
  if patch_size < 1:
    raise ValueError(f"patch_size must be >= 1, got {patch_size}")
  return int(patch_size)


def patchify(z: jax.Array, *, patch_size: int, patch_order: str = "pqc") -> jax.Array:
  """Latents `[..., h*p, w*p, c]` -> tokens `[..., h*w, p*p*c]` (row-major grid).

  With `patch_order="pqc"` (the default) each token holds its `p x p x c`
  patch in (row, column, channel) order, the channels-last form of the seed's
  `hwpqc` token layout; `"cpq"` is (channel, row, column), FLUX's order
  (diffusers' `FluxPipeline._pack_latents` with p = 2).

  Args:
    z: latents, rank >= 3, spatial sizes divisible by `patch_size`.
    patch_size: p >= 1.
    patch_order: "pqc" or "cpq", the order of the values inside a token.

  Returns:
    tokens `[..., h*w, p*p*c]`.

  Example:
    >>> patchify(jnp.zeros((2, 8, 6, 4)), patch_size=2).shape    # a 4 x 3 grid
    (2, 12, 16)
  """
  p = _check_patch_size(patch_size)
  order = checks.check_choice(patch_order, "patch_order", PATCH_ORDERS)
  if z.ndim < 3:
    raise ValueError(f"z must have rank >= 3 ([..., H, W, C]), got shape {z.shape}")
  *lead, hp, wp, c = z.shape
  if hp % p or wp % p:
    raise ValueError(f"z spatial shape {(hp, wp)} is not divisible by patch_size={p}")
  h, w = hp // p, wp // p
  x = z.reshape(*lead, h, p, w, p, c)
  x = jnp.einsum(f"...hpwqc->...hw{order}", x)
  return x.reshape(*lead, h * w, p * p * c)


def unpatchify(tokens: jax.Array, *, grid_hw: tuple[int, int],
               patch_size: int, patch_order: str = "pqc") -> jax.Array:
  """Tokens `[..., h*w, p*p*c]` -> latents `[..., h*p, w*p, c]`.

  The exact inverse of `patchify` (a pure permutation: bitwise round trip);
  the seed's `einsum("hwpqc->chpwq")` made channels-last.

  Args:
    tokens: `[..., h*w, p*p*c]`.
    grid_hw: `(h, w)`, the patch grid.
    patch_size: p >= 1.
    patch_order: "pqc" or "cpq", as given to `patchify`.

  Returns:
    latents `[..., h*p, w*p, c]`.

  Example:
    >>> tokens = patchify(jnp.zeros((2, 8, 6, 4)), patch_size=2)
    >>> unpatchify(tokens, grid_hw=(4, 3), patch_size=2).shape
    (2, 8, 6, 4)
  """
  p = _check_patch_size(patch_size)
  order = checks.check_choice(patch_order, "patch_order", PATCH_ORDERS)
  h, w = (int(s) for s in grid_hw)
  if tokens.ndim < 2:
    raise ValueError(f"tokens must have rank >= 2, got shape {tokens.shape}")
  *lead, n, d = tokens.shape
  if n != h * w:
    raise ValueError(f"tokens has {n} tokens but grid_hw={grid_hw} needs {h * w}")
  if d % (p * p):
    raise ValueError(f"token size {d} is not divisible by patch_size**2={p * p}")
  c = d // (p * p)
  x = tokens.reshape(*lead, h, w, *(p, p, c) if order == "pqc" else (c, p, p))
  x = jnp.einsum(f"...hw{order}->...hpwqc", x)
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

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> layout.num_tokens, layout.tokens_per_image, layout.starts, layout.max_hw
    (7, (4, 3), (0, 4), (4, 6))
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

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> pack([jnp.ones((4, 4, 3)), jnp.ones((2, 6, 3))], layout).shape
    (7, 12)
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

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> tokens = pack([jnp.ones((4, 4, 3)), jnp.ones((2, 6, 3))], layout)
    >>> bool(jnp.all(pack_padded(unpack(tokens, layout)[0], layout) == tokens))
    True
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

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> latents, mask = unpack(pack([jnp.ones((4, 4, 3)), jnp.ones((2, 6, 3))], layout), layout)
    >>> latents.shape, mask.shape, float(mask[1].sum())    # image 1 holds 2 x 6 valid cells
    ((2, 4, 6, 3), (2, 4, 6, 1), 12.0)
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
  """Per-image value from each image's FIRST token (e.g. t `[T]` -> `[N]`).

  Args:
    token_values: `[T, ...]`, one value per token of `layout`.
    layout: the `PackedLayout`.

  Returns:
    `[N, ...]`.

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> image_values(token_values(jnp.array([0.1, 0.7]), layout), layout)
    Array([0.1, 0.7], dtype=float32)
  """
  layout = _check_layout(layout)
  return token_values[np.asarray(layout.starts, np.int32)]


def token_values(image_values_: jax.Array, layout: PackedLayout) -> jax.Array:
  """Broadcasts per-image values `[N, ...]` to every token `[T, ...]`.

  Args:
    image_values_: `[N, ...]`, one value per image of `layout`.
    layout: the `PackedLayout`.

  Returns:
    `[T, ...]`.

  Example:
    >>> layout = PackedLayout.from_sizes([(4, 4), (2, 6)], patch_size=2)
    >>> token_values(jnp.array([0.1, 0.7]), layout)      # 4 tokens, then 3
    Array([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=float32)
  """
  layout = _check_layout(layout)
  return image_values_[layout.token_image_ids()]
