"""A pod-scale run: a 0.46 B-parameter DiT over FLUX-layout latents at 512 x 512, fsdp.

For an 8-GPU host or a v5p-8-class slice (8 devices):

  python -m train --config=configs/pod.py --workdir=/runs/sr512 \\
      --config.vae.pretrained=/path/to/FLUX.1-schnell/vae --config.data.dir=/data/hr

x4 super-resolution 128 -> 512 px. The frozen VAE is FLUX.1's (diffusers
folder: 16 latent channels, 8x downsampling, block_out_channels
(128, 256, 512, 512), no quant convs), so the DiT works on 64 x 64 x 16
latents, 1024 tokens of 2 x 2 patches. The vae.* fields below describe that
architecture (validation checks them against its config.json). Without
vae.pretrained the vae stage would train a VAE of that layout first
(vae.steps), but at 8 images of 512 px per device its CPU plan (86.43 GiB of
temporaries) is above an 80 GB device: expect the fit check to stop that
stage before its step 1 unless batch_size is lowered.

DiT: hidden 1024, depth 24, 16 heads, MLP x4: 0.458 B float32 parameters
(1.71 GiB; AdamW's two moments 3.41 GiB more), computed in bfloat16.
mesh.fsdp = 8 splits parameters and optimizer state over the 8 devices
(`data` = 1); the global batch of 64 is split over all of them (8 images per
device).

Memory plan. Before step 1 the trainer compiles the step and prints one line
per stage. Compiled by the TPU compiler for one v5p-8 host (libtpu's
compile-only client on the 2-core CPU machine, no TPU: `python
scripts/memory_plan.py --config=configs/pod.py --topology=v5p:2x2x2
--stages=flow --config.dit.depth=2`; a randomly initialised VAE of the FLUX
layout, same shapes), at depth 2:

  per device 20.09 MiB params + 40.17 MiB optimizer state, step arguments
  405.61 MiB, outputs 60.33 MiB, temporaries 11.94 GiB; peak ~11.21 GiB of
  95.00 GiB (42.1 M parameters; 3259 s to compile with the machine at load 9)

and at its full depth 24 (the command without --config.dit.depth; quiet
machine, compiled in 188 s):

  per device 218.25 MiB params + 436.49 MiB optimizer state, step arguments
  1000.49 MiB, outputs 655.21 MiB, temporaries 12.72 GiB; peak ~12.23 GiB of
  95.00 GiB (457.7 M parameters)

The blocks are scanned, so the program (and its compile time) is the same at
depth 24; with `dit.remat='full'` each further block adds only its saved
input (8 images x 1024 tokens x 1024 bf16 = 16 MiB per chip), about 0.35 GiB
for the 22 more blocks, and its params + Adam state / 8 (~20 MiB): an
extrapolation, not a compile of depth 24 (which the 2-core machine, shared
that day, could not finish in the session). The whole-model gather that
this replaced needed 36.9 GiB per chip at depth 24 (a compile of the
previous step, the issue's table). The temporaries are now the frozen VAE's
encoder at 512 px and its decoder chunks for the SSIM loss (lower
`chunk_size` or `batch_size` first), not the model.

For one host of 8 H100 80GB, compiled by XLA:GPU with no GPU (`python
scripts/memory_plan.py --config=configs/pod.py --topology=h100:8
--stages=flow`, full depth, the shared 2-core machine: 77 s, 39 s CPU):

  per device 218.25 MiB params + 436.49 MiB optimizer state, step arguments
  999.99 MiB, outputs 654.74 MiB, temporaries 3.40 GiB; peak ~4.37 GiB of the
  59.36 GiB JAX's allocator takes by default; 92.2 TFLOP per step per GPU
  (>= 93 ms at the H100's peak). cuBLAS/cuDNN are compiled untuned there (no
  workspace), so the GPU's temporaries are a close lower bound.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.batch_size = 64  # global: 8 per device on 8 devices
  c.precision = "bfloat16"  # compute; params and optimizer state stay float32
  c.mesh.fsdp = 8
  # 512 px high-resolution crops, x4 super-resolution (128 px in).
  c.data.hr_size = 512
  c.data.scale = 4
  c.data.num_val = 64
  c.data.prefetch = 4
  # The frozen VAE: FLUX.1's (set vae.pretrained to its diffusers folder).
  c.vae.pretrained = ""
  base.set_flux_vae(c)
  c.vae.steps = 50_000  # only without vae.pretrained
  c.vae.learning_rate = 1e-4
  c.vae.warmup_steps = 1000
  # The velocity model.
  c.dit.patch_size = 2
  c.dit.hidden_size = 1024
  c.dit.depth = 24
  c.dit.num_heads = 16
  c.dit.mlp_ratio = 4
  c.dit.remat = "full"  # keep each block's input only; recompute (and re-gather) the rest
  c.flow.steps = 200_000
  c.flow.learning_rate = 1e-4
  c.flow.warmup_steps = 2000
  c.weight_decay = 0.01
  # The decoded pixel + SSIM loss (as configs/default.py), 2 images decoded at a time.
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 0.5
  c.ssim_loss_weight = 0.5
  c.chunk_size = 2
  c.log_every = 100
  c.eval_every = 10_000
  c.eval_ode_steps = 20
  c.ckpt_every = 2000
  c.ckpt_max_to_keep = 3
  return c
