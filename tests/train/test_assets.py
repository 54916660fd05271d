"""The pretrained models shipped in train/assets/ load and reach their documented figures.

docs/main_job.rst documents how each was made (configs/vae_retina.py,
configs/flow_retina_base.py) and these held-out figures (16 validation crops
of configs/default.py, float32 on CPU). The tolerances cover float32 rounding
across CPU kinds; a damaged or replaced file misses them by far more.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import input_pipeline
from train import evaluate as eval_lib
from train import loop
from train import velocity
from train.models import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top

# Documented in README.md and docs/main_job.rst (held-out crops of configs/default.py).
VAE_PSNR, VAE_SSIM = 35.95, 0.9524
BASE_PSNR, BASE_SSIM = 32.91, 0.8796  # per-crop sampler noise (fold_in(key, i))


@pytest.fixture(scope="module")
def setup():
  config = default.get_config()
  ds = input_pipeline.make_datasets(config.data, batch_size_per_process=config.batch_size, seed=0)
  bicubic = eval_lib.evaluate_sr(
      np.asarray(eval_lib.bicubic_upsample(ds.val.lowres, config.data.scale)),
      ds.val.lowres, ds.val.highres, scale=config.data.scale)["bicubic"]
  return config, ds.val, bicubic


def test_shipped_vae_reconstructs_held_out_crops_above_bicubic(setup):
  config, val, bicubic = setup
  vae = vae_lib.from_diffusers(config.vae.pretrained)
  assert (vae.channels, vae.latent_channels) == (tuple(config.vae.channels),
                                                 config.vae.latent_channels)
  graphdef, params, rest = loop.split_model(vae)
  rec = loop.make_recon(config, graphdef, rest, compute_dtype=jnp.float32)(
      params, jnp.asarray(val.highres))
  m = eval_lib.image_metrics(rec, val.highres)
  psnr, ssim = np.mean(m["psnr"]), np.mean(m["ssim"])
  assert abs(float(psnr) - VAE_PSNR) < 0.05 and abs(float(ssim) - VAE_SSIM) < 5e-4
  # Not the cap of the task: above doing nothing clever, in both metrics.
  assert float(psnr) > bicubic["psnr"] + 2.0 and float(ssim) > bicubic["ssim"]
  # Scaled latents of the training distribution are about unit scale.
  z = vae.scale_latents(vae.encode(jnp.asarray(val.highres))[0])
  assert 0.7 < float(jnp.std(z)) < 1.4 and abs(float(jnp.mean(z))) < 0.3


def test_shipped_base_model_samples_above_bicubic(setup):
  # The base model of the main job (configs/default.py fine-tunes it): the
  # ODE sampler of the trainer, the shipped VAE, the held-out crops.
  config, val, bicubic = setup
  (vg, vp, vr), (dg, dp, _) = loop.build_models(config)
  latent_shape = (config.data.hr_size // 4, config.data.hr_size // 4,
                  config.vae.latent_channels)
  sampler = loop.make_sampler(config, velocity.for_config(config), dg, vg, vr, latent_shape,
                              compute_dtype=jnp.float32)
  pred = np.asarray(sampler(dp, {"vae": vp, "model": {}}, jnp.asarray(val.lowres),
                            jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)))
  model = eval_lib.evaluate_sr(pred, val.lowres, val.highres,
                               scale=config.data.scale)["model"]
  assert abs(model["psnr"] - BASE_PSNR) < 0.05 and abs(model["ssim"] - BASE_SSIM) < 5e-4
  assert model["psnr"] > bicubic["psnr"] and model["ssim"] > bicubic["ssim"]
