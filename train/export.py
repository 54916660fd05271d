"""What a run leaves for others to load: `WORKDIR/export/vae` (here) and the velocity model's.

- `export/vae/`: a VAE trained in the run's `vae` stage, as a diffusers
  AutoencoderKL folder (`vae.save_diffusers`), with the latent `shift_factor`
  and `scaling_factor` measured on training crops so that scaled latents have
  mean 0 and std 1 (the diffusers convention `(z - shift) * scale`, as the
  SD3 / FLUX VAEs ship). `--config.vae.pretrained=WORKDIR/export/vae` reuses it.
- the final velocity model, written by its `VelocityModel.export`
  (train/velocity.py): `export/dit/` (`dit.save_pretrained`;
  `--config.dit.pretrained=WORKDIR/export/dit` fine-tunes from it) or
  `export/transformer/` (FLUX: a diffusers `FluxTransformer2DModel` folder).

Both are written by process 0 at the end of their stage.
"""

from __future__ import annotations

import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models import vae as vae_lib

# Training crops the latent statistics are measured on.
LATENT_STAT_IMAGES = 256


def latent_statistics(vae: vae_lib.VAE, images: Iterable[np.ndarray]) -> tuple[float, float]:
  """`(mean, std)` over every element of the posterior means of `images`.

  Args:
    vae: the trained model.
    images: batches `[b, H, W, 3]` in [-1, 1].

  Returns:
    float64 mean and standard deviation of the unscaled latents.
  """
  graphdef, state = nnx.split(vae)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0].astype(jnp.float32))
  total, total_sq, n = 0.0, 0.0, 0
  for x in images:
    z = np.asarray(encode(state, jnp.asarray(x)), np.float64)
    total, total_sq, n = total + z.sum(), total_sq + np.square(z).sum(), n + z.size
  mean = total / n
  return mean, float(np.sqrt(max(total_sq / n - mean * mean, 1e-12)))


def export_vae(vae: vae_lib.VAE, images: Iterable[np.ndarray], workdir: str) -> str:
  """Writes `WORKDIR/export/vae` with measured latent factors; returns the folder."""
  mean, std = latent_statistics(vae, images)
  vae.shift_factor, vae.scaling_factor = float(mean), float(1.0 / std)
  return vae_lib.save_diffusers(vae, os.path.join(workdir, "export", "vae"))
