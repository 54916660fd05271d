"""Flow loss without decoded terms (velocity mse only): the main job's control.

The SSIM-loss study (docs/study.rst) (scripts/study.py) uses the same
control at its own size (`configs/study_fundus.py`).

  python -m train --config=configs/mse_only.py --workdir=/tmp/ssim_sr_mse

Fine-tuning the base model with its own training loss shows what further
steps alone buy, so the pixel and SSIM arms can be read against it.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.pixel_loss_weight = 0.0
  c.ssim_loss_weight = 0.0
  return c
