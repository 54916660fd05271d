"""Flow loss with the pixel loss only (no SSIM term): the seed's "pixel" mode.

  python -m train --config=configs/pixel_only.py --workdir=/tmp/ssim_sr_pixel
"""

from configs import default


def get_config():
  c = default.get_config()
  c.pixel_loss_weight = 1.0
  c.ssim_loss_weight = 0.0
  return c
