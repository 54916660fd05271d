"""The SSIM-loss study on fundus (issue 23; `python scripts/study.py`, not in CI).

  python -m train --config=configs/study_fundus.py --workdir=runs/study/fundus_base

The main job's task (`configs/default.py`: x4 super-resolution of fundus crops
under blur 1.6 -> area x4 -> noise 5 -> 8 bits, the frozen shipped retina VAE)
at 32 px crops and 64 held-out crops, sized so that all arms fit about one CPU
hour on one core (docs/study.rst: how the size was chosen).
As given here it trains the shared base model from scratch with the velocity
loss only (2000 steps); the study's arms fine-tune that base
(`--config.dit.pretrained=runs/study/fundus_base/export/dit`) for 1000 steps
with their own loss weights (scripts/study.py sets them).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.hr_size = 32  # LR 8 x 8; the latents 8 x 8 x 8, 16 DiT tokens
  c.data.num_val = 64
  c.dit.pretrained = ""  # the base run; arms point this at its export
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 0.0
  c.ssim_loss_weight = 0.0
  c.flow.steps = 2000
  c.flow.learning_rate = 1e-3
  c.flow.warmup_steps = 100
  c.log_every = 100
  c.ckpt_every = 500
  c.progress_bar = False
  return c
