"""MR super-resolution from DICOM, for the SSIM-loss study (issue 23; scripts/study.py).

  python -m train --config=configs/mr_study.py --workdir=runs/study/mr_base_seed0
  python -m train --config=configs/mr_study.py --workdir=runs/mr \\
      --config.data.dir=/path/to/dicom/folder          # your MR slices

The data: a folder of DICOM slices (`data.source="dicom"`, train/sources.py:
RescaleSlope / Intercept, the header's window, the middle band of every slice
held out). By default the two real clinical MR slices that `pydicom-data`
ships (found offline with `pydicom.data.get_testdata_file`): `MR2_UNCI.dcm`
(a shoulder, 1024 x 1024, 12 bits stored) and
`MR-SIEMENS-DICOM-WithOverlays.dcm` (an abdomen, 484 x 484), linked into
`runs/mr_dicom/` (made on first use).

The task: x4 super-resolution of 32 px crops (as the fundus study) under the
MR degradation (`data.degradation="mri"`, train/degradations.py): k-space
truncation to the central 1/4 x 1/4 of the frequencies (a low-resolution
acquisition) and Rician noise of 3 grey levels (of 255), 8-bit LR. The
latent model: an MR VAE trained by the base run (the retina VAE does not fit
gray MR, below); as given, this config is the study's shared base run (VAE
1500 steps, then the velocity-mse DiT, 2000 steps from scratch); the arms
fine-tune the DiT on the frozen MR VAE (scripts/study.py).
"""

import os

from configs import study_fundus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYDICOM_MR = ("MR2_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")


def pydicom_mr_folder(folder: str = os.path.join(ROOT, "runs", "mr_dicom")) -> str:
  """A folder linking pydicom-data's two MR slices (created when missing)."""
  if not all(os.path.exists(os.path.join(folder, n)) for n in PYDICOM_MR):
    import pydicom.data  # pylint: disable=g-import-not-at-top
    os.makedirs(folder, exist_ok=True)
    for name in PYDICOM_MR:
      link = os.path.join(folder, name)
      if not os.path.exists(link):
        os.symlink(pydicom.data.get_testdata_file(name), link)
  return folder


def get_config():
  c = study_fundus.get_config()
  c.data.source = "dicom"
  c.data.dir = pydicom_mr_folder()
  c.data.dicom_window = "header"
  c.data.degradation = "mri"
  c.data.blur_sigma = 0.0
  c.data.noise_level = 3.0
  c.data.lr_bits = 8
  c.data.retina_downscale = 1
  # The retina VAE reconstructs these gray MR crops at 16.8 dB / SSIM 0.63 (below
  # bicubic's 27.0 dB / 0.59 SSIM in PSNR, measured on the 64 held-out crops):
  # the base run trains an MR VAE first, with the shipped VAE's architecture and
  # recipe (configs/vae_retina.py: L1 + 0.2 SSIM + 1e-6 KL), and the arms reuse it.
  c.vae.pretrained = ""
  c.vae.steps = 1500
  c.vae.learning_rate = 2e-3
  c.vae.warmup_steps = 100
  return c
