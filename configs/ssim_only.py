"""Flow loss with the SSIM loss only (no pixel term): the seed's "SSIM" mode.

The seed crashed here with a TypeError because the VAE was only attached when
the pixel loss was on; here the VAE is a required, validated part of the config.

  python -m train --config=configs/ssim_only.py --workdir=/tmp/ssim_sr_ssim
"""

from configs import default


def get_config():
  c = default.get_config()
  c.pixel_loss_weight = 0.0
  c.ssim_loss_weight = 1.0
  return c
