"""The base super-resolution model shipped in `train/assets/retina_dit_base/`.

  python -m train --config=configs/flow_retina_base.py --workdir=runs/flow_retina_base

A flow-matching DiT trained with the plain velocity loss (mse only, no
decoded pixel or SSIM term) on the shipped retina VAE, for docs/main_job.rst's
main job (`configs/default.py`) to fine-tune with the SSIM loss, as field
report 000 fine-tunes a pretrained latent model. The run writes the model to
`runs/flow_retina_base/export/dit`, which is copied into the package.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dit.pretrained = ""  # this config makes the base model
  c.batch_size = 16
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 0.0
  c.ssim_loss_weight = 0.0
  c.flow.steps = 8000
  c.flow.learning_rate = 1e-3
  c.flow.warmup_steps = 200
  c.log_every = 100
  c.eval_every = 2000
  c.ckpt_every = 500
  return c
