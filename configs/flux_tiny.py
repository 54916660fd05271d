"""A seconds-long FLUX run on CPU: a tiny random FLUX.1 transformer with the shipped retina VAE.

  python -m train --config=configs/flux_tiny.py --workdir=/tmp/flux_tiny
  python -m train --config=configs/flux_tiny.py --workdir=/tmp/flux_tiny \\
      --config.flux.pretrained=/path/to/small_flux   # any diffusers FLUX folder, in_channels 32

The whole FLUX path of configs/flux_kontext.py at toy size: the model is
`FluxTransformer2DModel`'s architecture (1 double + 1 single block, width
32, guidance input), conditioned the Kontext way on the low-resolution image
encoded by the frozen shipped retina VAE (8 latent channels, so
`in_channels` = 4 x 8 = 32), trained with velocity mse + decoded L1 + SSIM,
sampled with FLUX's shifted schedule and exported to
`WORKDIR/export/transformer` as a diffusers folder. With
`--config.flux.pretrained=<folder>` it starts from any small diffusers FLUX
folder of that `in_channels`, whatever its other dimensions (they come from
its config.json).
"""

from configs import default


def get_config():
  c = default.get_config()  # the shipped retina VAE, frozen
  c.model = "flux"
  c.dit.pretrained = ""
  c.batch_size = 8
  c.data.hr_size = 32  # 8 x 8 latents: 16 target + 16 condition tokens
  c.data.scale = 4
  c.data.num_val = 4
  c.flux.pretrained = ""
  c.flux.num_layers = 1
  c.flux.num_single_layers = 1
  c.flux.attention_head_dim = 16
  c.flux.num_attention_heads = 2
  c.flux.joint_attention_dim = 32
  c.flux.pooled_projection_dim = 16
  c.flux.axes_dims_rope = (4, 6, 6)
  c.flux.guidance_embeds = True
  c.flux.guidance = 3.5
  c.flux.prompt_length = 8
  c.flux.remat = "full"
  c.t_sampling = "logit_normal"
  c.t_shift = "resolution"
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 0.5
  c.ssim_loss_weight = 0.5
  c.ssim_window_size = 7
  c.flow.steps = 4
  c.flow.learning_rate = 1e-3
  c.flow.warmup_steps = 1
  c.log_every = 2
  c.ckpt_every = 2
  c.eval_every = 0
  c.eval_ode_steps = 2
  c.eval_num_images = 2
  c.progress_bar = False
  c.mesh.min_shard_size = 64  # shard most of the tiny state when mesh.fsdp > 1
  return c
