"""ssim_jax: range-safe SSIM, masked SSIM and MS-SSIM for JAX.

Images are channels-last `[B, H, W, C]` (or `[H, W, C]`; `channel_axis=1`
for `[B, C, H, W]`), float16, bfloat16 or float32; statistics are computed
and results returned in float32; every function is pure, differentiable and
works under `jit`, `vmap`, `grad` and `jax.shard_map`. Options are
keyword-only; under `jit` all but `data_range` and `mask` are static
(`static_argnames`). Volumes `[B, D, H, W, C]` take `spatial_dims=3` (and
optionally a physical voxel `spacing`). See `ssim_jax.ssim` for the formulas,
the window rule and the mask modes.
"""

from ssim_jax.ms_ssim import ms_ssim
from ssim_jax.ms_ssim import ms_ssim_loss
from ssim_jax.ms_ssim import ms_ssim_sums
from ssim_jax.psnr import psnr
from ssim_jax.ssim import SSIMSums
from ssim_jax.ssim import l1_ssim_loss
from ssim_jax.ssim import loss_from_sums
from ssim_jax.ssim import ssim
from ssim_jax.ssim import ssim_loss
from ssim_jax.ssim import ssim_map
from ssim_jax.ssim import ssim_sums

__version__ = "0.1.0"

__all__ = (
    "SSIMSums",
    "l1_ssim_loss",
    "loss_from_sums",
    "ms_ssim",
    "ms_ssim_loss",
    "ms_ssim_sums",
    "psnr",
    "ssim",
    "ssim_loss",
    "ssim_map",
    "ssim_sums",
)

# Flow-matching helpers (timestep weights, z0 reconstruction, packing,
# decoded losses) as a submodule: `ssim_jax.flow`.
from ssim_jax import flow  # noqa: F401,E402
