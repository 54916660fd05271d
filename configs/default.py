"""Default config: both stages on the embedded retina crops in a few CPU minutes.

This is the README's command:

  python -m train --config=configs/default.py --workdir=/tmp/ssim_sr

64x64 high-resolution / 16x16 low-resolution crops of `skimage.data.retina()`,
a tiny VAE and a tiny DiT, mixed pixel + SSIM flow loss.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 8  # global; measured ~3.7 s/step at 16 on a 6x-oversubscribed 2-core box
  # The task: x4 super-resolution of fundus crops at DRIVE-like resolution
  # (the photograph downscaled x2) with a first-order degradation (README).
  c.data.retina_downscale = 2
  c.data.blur_sigma = 1.6
  c.data.noise_level = 5.0
  c.data.lr_bits = 8
  c.vae.channels = (16, 32, 64)  # 64x64 -> 16x16x8 latents
  c.vae.norm_groups = 8
  c.vae.latent_channels = 8
  c.vae.mid_attention = False
  c.vae.steps = 200
  c.vae.learning_rate = 2e-3
  c.vae.warmup_steps = 20
  c.dit.hidden_size = 64
  c.dit.depth = 2
  c.dit.num_heads = 4
  c.dit.mlp_ratio = 2
  c.flow.steps = 300
  c.chunk_size = 4
  c.flow.learning_rate = 1e-3
  c.flow.warmup_steps = 20
  c.pixel_loss_weight = 0.5
  c.ssim_loss_weight = 0.5
  c.log_every = 25
  c.eval_every = 0
  c.ckpt_every = 200
  c.eval_ode_steps = 10
  return c
