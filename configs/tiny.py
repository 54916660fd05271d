"""A seconds-long config for tests and smoke runs (not a useful model).

  python -m train --config=configs/tiny.py --workdir=/tmp/ssim_tiny
"""

from configs import default


def get_config():
  c = default.get_config()
  c.batch_size = 8
  c.data.hr_size = 16
  c.data.scale = 2
  c.data.num_val = 4
  c.vae.pretrained = ""  # trains its own (tiny) VAE and DiT
  c.dit.pretrained = ""
  # Both decoded terms on, whatever the main job uses: the tests exercise them.
  c.pixel_loss_weight = 0.5
  c.ssim_loss_weight = 0.5
  c.vae.channels = (4,)
  c.vae.latent_channels = 2
  c.vae.mid_attention = False
  c.vae.steps = 4
  c.vae.learning_rate = 2e-3
  c.vae.warmup_steps = 20
  c.dit.hidden_size = 16
  c.dit.depth = 1
  c.dit.num_heads = 2
  c.dit.mlp_ratio = 2
  c.flow.steps = 4
  c.flow.learning_rate = 1e-3
  c.ssim_window_size = 3
  c.log_every = 2
  c.ckpt_every = 2
  c.eval_ode_steps = 2
  c.eval_num_images = 2
  c.progress_bar = False
  # Its arrays are tiny: shard every one of >= 64 elements when mesh.fsdp > 1,
  # so that the fsdp tests split most of the state.
  c.mesh.min_shard_size = 64
  return c
