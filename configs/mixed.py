"""Flow loss with both pixel and SSIM terms: the seed's mixed mode.

  python -m train --config=configs/mixed.py --workdir=/tmp/ssim_sr_mixed
"""

from configs import default


def get_config():
  c = default.get_config()
  c.pixel_loss_weight = 0.5  # the main job's loss before the study (docs/study.rst)
  c.ssim_loss_weight = 0.5
  return c
