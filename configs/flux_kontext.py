"""Fine-tune FLUX.1 Kontext [dev] (12 B) for x4 super-resolution, conditioned on the LR image.

  python -m train --config=configs/flux_kontext.py --workdir=runs/kontext_sr \\
      --config.flux.pretrained=/path/to/FLUX.1-Kontext-dev \\
      --config.flux.prompt_embeds=/path/to/prompt.safetensors \\
      --config.data.dir=/data/hr --config.batch_size=8 --config.mesh.fsdp=8     # one 8-GPU host
  python scripts/memory_plan.py --config=configs/flux_kontext.py --stages=flow \\
      --topology=h100:8 --config.batch_size=8 --config.mesh.fsdp=8            # the plan, any CPU

`flux.pretrained` is a diffusers pipeline folder (its `transformer/` and
`vae/` are read; the weights' license is the user's matter) or a transformer
folder (then set `vae.pretrained` to FLUX.1's VAE). The low-resolution image
(128 px), resized to 512 px and encoded by the frozen FLUX VAE, enters as
1024 clean latent tokens after the 1024 noisy target tokens
(`img_ids[..., 0] = 1`), Kontext's way; the prompt embeddings
(`scripts/encode_prompt.py`, once) are fixed; guidance 3.5. Loss: velocity
mse + the decoded L1 and SSIM terms through the FLUX VAE, weighted by
w(t) = clip((0.3 - t) / 0.3, 0, 1). Flow times: logit-normal, shifted for
the 1024-token image as FLUX's scheduler does (mu = 0.7 at 1024 tokens).

Full fine-tuning: float32 master weights and AdamW moments (12 B x 12 B),
split over `mesh.fsdp` devices (ZeRO-3: each block is gathered in bf16 only
while it runs, `flux.remat='full'`), bf16 compute.

Without `flux.pretrained` the model is a random FLUX of Kontext's
architecture: only for memory plans (shapes), never for training.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model = "flux"
  c.batch_size = 8  # global; one 8-GPU host: --config.mesh.fsdp=8
  c.precision = "bfloat16"  # compute; master weights and AdamW moments stay float32
  c.mesh.fsdp = 8
  # 512 px targets, x4 super-resolution (128 px in).
  c.data.hr_size = 512
  c.data.scale = 4
  c.data.num_val = 16
  c.data.prefetch = 4
  # FLUX.1's VAE (the pipeline's vae/; its architecture, checked against its config.json).
  c.vae.pretrained = ""
  base.set_flux_vae(c)
  c.vae.steps = 0  # never trained here
  # FLUX.1 Kontext [dev]: 19 double + 38 single blocks, hidden 3072, 24 heads.
  c.flux.pretrained = ""
  c.flux.param_dtype = "float32"
  c.flux.remat = "full"
  c.flux.guidance = 3.5
  c.flux.guidance_embeds = True
  c.flux.prompt_length = 512
  c.t_sampling = "logit_normal"
  c.t_shift = "resolution"
  # Loss: velocity mse + decoded L1 + SSIM, one image decoded at a time.
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 1.0
  c.ssim_loss_weight = 0.5
  c.ssim_loss_max_t = 0.3
  c.chunk_size = 1
  c.flow.steps = 5000
  c.flow.learning_rate = 1e-5
  c.flow.warmup_steps = 100
  c.weight_decay = 0.01
  c.grad_clip_norm = 1.0
  c.log_every = 20
  c.eval_every = 1000
  c.eval_ode_steps = 28
  c.eval_num_images = 4
  c.ckpt_every = 500
  c.ckpt_max_to_keep = 2
  return c
