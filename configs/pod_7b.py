"""The seed's scale: a 6.5 B-parameter DiT over FLUX.1's VAE latents at 512 px, ZeRO-3 fsdp.

  python -m train --config=configs/pod_7b.py --workdir=gs://.../sr512_7b \\
      --config.vae.pretrained=/path/to/FLUX.1-schnell/vae --config.data.dir=/data/hr \\
      --config.batch_size=256 --config.mesh.fsdp=256          # v5e-256 (16x16)
  python scripts/memory_plan.py --config=configs/pod_7b.py --topology=v5e:16x16 \\
      --stages=flow --config.batch_size=256 --config.mesh.fsdp=256   # the plan, any CPU

x4 super-resolution 128 -> 512 px, as configs/pod.py, with the frozen FLUX.1
VAE (16 latent channels, 8x downsampling: 64 x 64 x 16 latents, 1024 tokens
of 2 x 2 patches) and the decoded pixel + SSIM loss backpropagated through
its decoder. DiT: hidden 3584, depth 28, 28 heads (head dim 128), MLP x4:
6.52 B float32 master parameters (24.3 GiB; AdamW's two moments 48.6 GiB
more), computed in bfloat16.

Every parameter, gradient and optimizer moment is split over `mesh.fsdp`
devices; inside the step each block's parameters are cast to bfloat16 and
all-gathered only while the scanned block runs, and gathered again when it is
rematerialised in the backward pass (`dit.remat='full'`); each block's
gradient is reduce-scattered as it is produced (train/step.py). Per chip:
(params + gradients + Adam moments) / fsdp + about two bf16 blocks (0.9 GiB)
+ the activations of its own images, nothing that grows with the whole model.

Memory plans, compiled by the TPU compiler (libtpu 0.0.42.1 compile-only
client on the 2-core CPU machine; `scripts/memory_plan.py --topology=...
--stages=flow`, a randomly initialised VAE of the FLUX layout, same shapes):
see README "Pod scale" for the figures of this commit (peak per chip, the
largest per-chip batch that fits each topology, compile times).
"""

from configs import pod


def get_config():
  c = pod.get_config()
  # v5e-256 default: one 512 px image per chip; on one v5p-8 host use
  # --config.batch_size=16 --config.mesh.fsdp=8.
  c.batch_size = 256
  c.mesh.fsdp = 256
  c.precision = "bfloat16"  # compute; master params and AdamW moments stay float32
  c.dit.hidden_size = 3584
  c.dit.depth = 28
  c.dit.num_heads = 28
  c.dit.mlp_ratio = 4
  c.dit.remat = "full"  # keep only each block's input; recompute (and re-gather) the rest
  c.chunk_size = 1  # decode one image at a time for the pixel + SSIM loss
  c.flow.learning_rate = 3e-5
  c.weight_decay = 0.01
  return c
