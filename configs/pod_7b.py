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

Memory plans, compiled by the TPU compiler (libtpu 0.0.42.1's compile-only
client on the 2-core CPU machine, no TPU; a randomly initialised VAE of the
FLUX layout, same shapes; `python scripts/memory_plan.py
--config=configs/pod_7b.py --topology=... --stages=flow ...`):

  v5e:16x16 (256 chips of 16 GiB), --config.batch_size=256
  --config.mesh.fsdp=256 (1 image per chip):
    per device 98.41 MiB params + 196.82 MiB optimizer state, step arguments
    632.92 MiB, outputs 309.95 MiB, temporaries 2.12 GiB; peak ~2.24 GiB of
    16.00 GiB; 6.53 B parameters. Compile: 194 s on the quiet 2-core machine
    (3 min 16 s for the command; 2203 s wall when the machine was shared).
  v5p:2x2x2 (one 8-chip host, 95 GiB each), --config.batch_size=16
  --config.mesh.fsdp=8 (2 images per chip):
    per device 3.04 GiB params + 6.08 GiB optimizer state, step arguments
    9.44 GiB, outputs 9.12 GiB, temporaries 6.17 GiB; peak ~13.90 GiB of
    95.00 GiB. Compile: 203 s on the quiet machine (3 min 26 s for the
    command; 700 s wall when shared).

The whole-model gather that this replaced needed 27.8 GiB of temporaries per
chip for this model at fsdp 64 and did not compile for v5e:16x16 at all
(25.66 G of temporaries above 15.75 G of HBM).

Largest per-chip batch. Compiled: 4 images per chip on v5e:16x16
(--config.batch_size=1024): peak ~3.22 GiB (temporaries 3.15 GiB, 956 s wall,
467 s CPU); 32 per chip on v5p:2x2x2 (--config.batch_size=256): peak ~28.40
GiB (temporaries 29.09 GiB, 817 s wall, 358 s CPU). Each further image costs
~0.33 GiB (v5e) / ~0.48 GiB (v5p), so about 30 images per chip would stay
under 12 GiB on v5e and about 100 under 64 GiB on v5p (~170 under 95 GiB):
linear extrapolations, not compiled.

H100 hosts, compiled by XLA:GPU with no GPU (deviceless AOT; `--topology=h100:8`,
the 2-core machine shared with other work, so the times are upper bounds):

  h100:8 (one host of 8 H100 80GB), --config.batch_size=8 --config.mesh.fsdp=8
  (1 image per GPU): per device 3.04 GiB params + 6.08 GiB optimizer state,
    step arguments 9.43 GiB, outputs 9.12 GiB, temporaries 4.67 GiB; peak
    ~14.10 GiB of the 59.36 GiB JAX's allocator takes by default; 45.7 TFLOP
    per step per GPU (matmuls and convolutions, remat included: >= 46 ms per
    step at the H100's 989 TFLOP/s). Compiled in 35-63 s (35 s CPU).
  h100:2x8, --config.batch_size=16 --config.mesh.fsdp=16: 1.52 + 3.04 GiB,
    temporaries 3.10 GiB, peak ~7.98 GiB per GPU; compiled in 62 s.
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
