"""The SSIM-loss study's pixel-space arm (issue 23; `python scripts/study.py`, not in CI).

  python -m train --config=configs/study_vae.py --workdir=runs/study/vae_l1_seed0 \\
      --config.vae.ssim_weight=0.0

The VAE stage alone (the shipped retina VAE's architecture and recipe,
`configs/vae_retina.py`) from scratch on the study's fundus crops (32 px, 64
held-out), 1500 steps; the arms change only the reconstruction loss: L1
(`vae.ssim_weight=0`), L1 + SSIM, L1 + MS-SSIM (`vae.ssim_levels=2`), as Zhao
et al. (2017) compare them for restoration. Reconstruction PSNR / SSIM /
MS-SSIM per held-out crop land in results.json.
"""

from configs import study_fundus
from configs import vae_retina


def get_config():
  c = vae_retina.get_config()
  c.data.hr_size = study_fundus.get_config().data.hr_size
  c.data.num_val = 64
  c.vae.steps = 1500
  c.vae.ssim_weight = 1.0
  c.ckpt_every = 500
  c.ckpt_max_to_keep = 2
  c.progress_bar = False
  return c
