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
per stage. For the flow stage of exactly this config, compiled on 8 fake CPU
devices (`python scripts/memory_plan.py --config=configs/pod.py --devices=8
--stages=flow`, 109 s; without a VAE file, a randomly initialised VAE of the
FLUX layout, same shapes):

  fsdp=8: per device 218.25 MiB params + 436.49 MiB optimizer state, step
          arguments 999.99 MiB, outputs 654.75 MiB, temporaries 57.59 GiB;
          peak ~59.21 GiB
  fsdp=1: per device 1.71 GiB params + 3.41 GiB optimizer state, step
          arguments 5.45 GiB, outputs 5.12 GiB, temporaries 53.91 GiB;
          peak ~64.48 GiB

Params and optimizer state shrink by 8; the temporaries do not, and they
dominate: the activations that the backward pass keeps (24 blocks x 8 images
x 1024 tokens, with 16 x 1024 x 1024 attention weights per image and block),
the frozen VAE's encoder at 512 px, its decoder chunks for the SSIM loss,
and, with fsdp, the all-gathered parameters and their full local gradients
(+3.7 GiB). These are XLA:CPU figures; GPU/TPU buffer assignment and fusion
differ, so read them as the order of magnitude: the run prints the device's
own plan and stops before step 1, naming the fields to change, if it does not
fit (lower batch_size or chunk_size first: they set the temporaries).
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
  c.vae.channels = (128, 256, 512, 512)
  c.vae.latent_channels = 16
  c.vae.layers_per_block = 2
  c.vae.norm_groups = 32
  c.vae.mid_attention = True
  c.vae.steps = 50_000  # only without vae.pretrained
  c.vae.learning_rate = 1e-4
  c.vae.warmup_steps = 1000
  # The velocity model.
  c.dit.patch_size = 2
  c.dit.hidden_size = 1024
  c.dit.depth = 24
  c.dit.num_heads = 16
  c.dit.mlp_ratio = 4
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
