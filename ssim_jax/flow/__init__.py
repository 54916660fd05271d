"""Latent flow matching -> decoded pixel + SSIM losses, jit-friendly.

Conventions (rectified flow, as in the latent flow-matching trainer this
library was built for)::

    x_t = (1 - t) * z0 + t * noise,   v = noise - z0,   t in [0, 1], t = 0 clean.
    z0_pred = x_t - t * v_pred        (= z0 + t * (v - v_pred))

The SSIM loss only means something in pixel space, so the predicted clean
latent is decoded by a (frozen) VAE and compared with the ground-truth image::

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

Modules: `conventions` (interpolation, velocity, weight, z0), `packing`
(patches and packed layouts), `decoded` (the decoded losses). Every public
name is importable from `ssim_jax.flow`.
"""

from ssim_jax.flow.conventions import interpolate
from ssim_jax.flow.conventions import reconstruct_z0
from ssim_jax.flow.conventions import timestep_weight
from ssim_jax.flow.conventions import velocity_target
from ssim_jax.flow.decoded import DEBUG_ENV
from ssim_jax.flow.decoded import DecodedLosses
from ssim_jax.flow.decoded import DecodedMasses
from ssim_jax.flow.decoded import PIXEL_LOSSES
from ssim_jax.flow.decoded import decoded_losses
from ssim_jax.flow.decoded import decoded_masses
from ssim_jax.flow.packing import PackedLayout
from ssim_jax.flow.packing import image_values
from ssim_jax.flow.packing import pack
from ssim_jax.flow.packing import pack_padded
from ssim_jax.flow.packing import patchify
from ssim_jax.flow.packing import token_values
from ssim_jax.flow.packing import unpack
from ssim_jax.flow.packing import unpatchify

__all__ = (
    "DEBUG_ENV",
    "DecodedLosses",
    "DecodedMasses",
    "PIXEL_LOSSES",
    "PackedLayout",
    "decoded_losses",
    "decoded_masses",
    "image_values",
    "interpolate",
    "pack",
    "pack_padded",
    "patchify",
    "reconstruct_z0",
    "timestep_weight",
    "token_values",
    "unpack",
    "unpatchify",
    "velocity_target",
)
