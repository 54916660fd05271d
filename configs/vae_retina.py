"""The retina autoencoder shipped in `train/assets/retina_vae/`: VAE stage only.

  python -m train --config=configs/vae_retina.py --workdir=runs/vae_retina

Trains the VAE of `configs/default.py` on 64 px crops of the retina
photograph at the task's resolution (downscaled x2), then
the run writes it to `runs/vae_retina/export/vae` as a diffusers folder with
its measured latent shift and scaling factors (train/export.py), which is
copied to `train/assets/retina_vae`.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.batch_size = 8
  c.vae.steps = 3000
  c.vae.learning_rate = 2e-3
  c.vae.warmup_steps = 100
  c.vae.kl_weight = 1e-6
  c.vae.pretrained = ""  # this config makes the VAE
  c.dit.pretrained = ""
  c.flow.steps = 0  # autoencoder only
  c.log_every = 50
  c.ckpt_every = 250
  c.ckpt_max_to_keep = 20
  return c
