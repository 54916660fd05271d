"""Base configuration of the ssim_jax super-resolution trainer.

Every other config starts from `get_config()` here and changes a few fields.
Run (any config file works the same way):

  python -m train --config=configs/base.py --workdir=/tmp/ssim_sr \
      --config.flow.steps=2000 --config.batch_size=64

Task: a low-resolution image `data.hr_size // data.scale` in, the high-resolution
image `data.hr_size` out. Stage `vae` trains the autoencoder (L1 + SSIM + KL);
stage `flow` trains a small DiT velocity model over VAE latent tokens with the
frozen VAE and the ssim_jax flow loss:

  total = mse_loss_weight * mse(v_pred, v)
        + pixel_loss_weight * pixel(decode(z0_pred), image)   (weighted by w(t))
        + ssim_loss_weight * (1 - SSIM(decode(z0_pred), image)) (weighted by w(t))

with w(t) = clip((ssim_loss_max_t - t) / ssim_loss_max_t, 0, 1).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config (a medium-size run, not tuned for CPU)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Global batch over all processes and devices (split over data x fsdp); must
  # divide by the device count.
  c.batch_size = 32
  # Compute dtype of the models; parameters and optimizer state stay float32.
  c.precision = "float32"  # float32 | bfloat16
  # Device mesh (train/sharding.py): ('data', 'fsdp'). mesh.fsdp devices share one
  # copy of the params and optimizer state, each large array split over them;
  # it must divide the device count, data = devices // fsdp (1: data parallel).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1
  c.mesh.min_shard_size = 1024  # arrays with fewer elements stay replicated
  # Stop the run after this many consecutive skipped (non-finite) steps (counted
  # on the device, exact; the run stops at the next logging step with the state
  # of the step that hit the limit, and never checkpoints past it).
  c.max_consecutive_skips = 20
  # Gradient accumulation: each optimizer step runs this many micro-batches of
  # `batch_size` images in one jitted step (a scan) and sums their gradients, so
  # a step is one step with a batch_size * grad_accum_steps batch (to float
  # rounding, decoded pixel/SSIM terms included) at the activation memory of
  # batch_size. The data pipeline delivers batch_size * grad_accum_steps images
  # per step; steps, schedules and checkpoints count optimizer steps. 1: off.
  c.grad_accum_steps = 1
  # EMA of the flow stage's trainable parameters (the velocity model), kept in
  # the train state (float32, sharded like the params, checkpointed). After each
  # applied update: ema = d * ema + (1 - d) * params, with d = ema.decay, or with
  # ema.warmup d = min(ema.decay, (1 + n) / (10 + n)), n = updates applied before
  # this one (TensorFlow's / diffusers' EMAModel warm-up). A skipped step leaves
  # it unchanged. Turning it on for a run whose checkpoints have none starts it
  # from the restored params.
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0  # 0: off; e.g. 0.999 (an average over ~1000 updates)
  c.ema.warmup = True
  c.ema.use_for_eval = True  # with decay > 0: evaluate and export the EMA params

  # --- Flow-matching loss (stage `flow`), field names as in the seed trainer.
  c.mse_loss_weight = 1.0
  c.pixel_loss_weight = 0.0
  c.pixel_loss_type = "l1"  # l1 | l2
  c.ssim_loss_weight = 0.0
  c.ssim_loss_max_t = 0.3
  c.ssim_window_size = 11
  # 1: the SSIM term is SSIM; L > 1: MS-SSIM over L scales (standard weights
  # renormalised; needs data.hr_size >= (ssim_window_size - 1) 2^(L-1) + 1).
  c.ssim_loss_levels = 1
  # Images decoded per chunk for the pixel/SSIM losses (bounds activation memory).
  c.chunk_size = 2
  # Training flow times: "logit_normal" t = sigmoid(N(t_logit_mean, t_logit_std))
  # | "uniform" t ~ U(0, 1) (diffusers' FLUX scripts: weighting_scheme
  # logit_normal / none).
  c.t_sampling = "logit_normal"
  c.t_logit_mean = 0.0
  c.t_logit_std = 1.0
  # "none" | "resolution": FLUX's shift t -> e^mu t / (e^mu t + 1 - t) of the
  # training times and of the sampler's grid, mu linear in the image's token
  # count from base_shift (at base_image_seq_len tokens) to max_shift (at
  # max_image_seq_len); a FLUX pipeline folder's scheduler config overrides these.
  c.t_shift = "none"
  c.shift = ml_collections.ConfigDict()
  c.shift.base_shift = 0.5
  c.shift.max_shift = 1.15
  c.shift.base_image_seq_len = 256
  c.shift.max_image_seq_len = 4096

  # --- Data (train/sources.py: images; train/input_pipeline.py: crops -> batches, on grain).
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # "" -> embedded skimage retina crops; else a folder of PNG/JPEG/TIFF
  # "" (retina, or "folder" when data.dir is set) | "folder" | "dicom" (a folder of .dcm)
  c.data.source = ""
  c.data.dicom_window = "header"  # DICOM: "header" WindowCenter/Width | "percentile"
  c.data.hr_size = 64  # high-resolution crop size (pixels)
  c.data.scale = 4  # low-resolution size = hr_size // scale
  c.data.num_val = 16  # held-out validation crops
  c.data.prefetch = 2  # host-side batches built ahead (per worker with num_workers > 0)
  c.data.num_workers = 0  # grain worker processes building batches (0: in the training process)
  # How the LR image is made (train/degradations.py): blur -> area x scale -> noise -> bits.
  c.data.blur_sigma = 0.0  # Gaussian blur std, HR pixels (0: none)
  c.data.noise_level = 0.0  # Gaussian noise std, 8-bit grey levels of 255 (0: none)
  c.data.lr_bits = 0  # round the LR image to this many bits (0: keep float32)
  # "camera": blur -> area -> Gaussian noise; "mri": k-space truncation -> Rician noise.
  c.data.degradation = "camera"
  c.data.retina_downscale = 1  # embedded retina only: area-downscale the photograph first

  # --- Autoencoder (train/models/vae.py) and its stage.
  c.vae = ml_collections.ConfigDict()
  c.vae.enabled = True
  # A diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, or a
  # pipeline folder with vae/): loaded frozen, the vae stage is skipped, its
  # scaling/shift factors scale the flow latents. vae.latent_channels and the
  # number of vae.channels levels must match it (checked); the other vae.* model
  # fields are taken from its config.json. "" trains the VAE (stage vae).
  c.vae.pretrained = ""
  c.vae.channels = (32, 64, 64)
  c.vae.latent_channels = 4
  c.vae.layers_per_block = 1  # ResNet blocks per encoder level (decoder: one more)
  c.vae.mid_attention = True  # self-attention in the mid blocks (diffusers default)
  c.vae.norm_groups = 32  # GroupNorm groups (capped to a divisor of each width)
  c.vae.steps = 2000
  c.vae.learning_rate = 1e-3
  c.vae.warmup_steps = 100
  c.vae.l1_weight = 1.0
  c.vae.ssim_weight = 0.2
  c.vae.ssim_levels = 1  # 1: SSIM; L > 1: MS-SSIM over L scales (as ssim_loss_levels)
  c.vae.kl_weight = 1e-6

  # --- Velocity model of the flow stage (train/velocity.py): "dit" (the small
  # DiT below) | "flux" (FLUX.1 from a diffusers folder, `flux.*`).
  c.model = "dit"
  c.dit = ml_collections.ConfigDict()
  c.dit.patch_size = 2
  c.dit.hidden_size = 128
  c.dit.depth = 4
  c.dit.num_heads = 4
  c.dit.mlp_ratio = 4
  # Per-block rematerialisation: 'none' | 'full' | 'dots_saveable' (train/models/dit.py).
  # 'full' keeps only each block's input for the backward pass (and, with fsdp,
  # gathers the block's parameters again there): memory for compute.
  c.dit.remat = "none"
  # A base model folder (`dit.save_pretrained`; a run writes one to
  # WORKDIR/export/dit) to fine-tune from; "" trains the DiT from scratch.
  c.dit.pretrained = ""
  # FLUX.1 (train/models/flux.py), used when model == "flux".
  c.flux = ml_collections.ConfigDict()
  # A diffusers FLUX.1 [dev] / [schnell] / Kontext [dev] pipeline folder (its
  # transformer/ is read) or transformer folder: the architecture comes from its
  # config.json and the weights from its safetensors. "": a random FLUX of the
  # architecture below (tests; memory plans need only the shapes).
  c.flux.pretrained = ""
  c.flux.param_dtype = "float32"  # master weights: float32 | bfloat16
  c.flux.remat = "full"  # per-block rematerialisation, as dit.remat
  # The guidance input of [dev] / Kontext (guidance_embeds=True), e.g. 3.5;
  # None for [schnell] (checked against the checkpoint).
  c.flux.guidance = ml_collections.config_dict.placeholder(float)
  c.flux.guidance = 3.5
  # safetensors with `prompt_embeds [L, joint_attention_dim]` and
  # `pooled_prompt_embeds [pooled_projection_dim]` (scripts/encode_prompt.py).
  # "": zero embeddings of prompt_length tokens.
  c.flux.prompt_embeds = ""
  c.flux.prompt_length = 512
  # Architecture without flux.pretrained (FLUX.1's; in_channels = 4 x vae.latent_channels).
  c.flux.num_layers = 19
  c.flux.num_single_layers = 38
  c.flux.attention_head_dim = 128
  c.flux.num_attention_heads = 24
  c.flux.joint_attention_dim = 4096
  c.flux.pooled_projection_dim = 768
  c.flux.guidance_embeds = True
  c.flux.axes_dims_rope = (16, 56, 56)
  # LoRA (train/lora.py): rank 0 trains the whole model; rank r > 0 trains
  # low-rank adapters on lora.targets (fnmatch patterns over diffusers' module
  # names, a block's index written '*'; () = the model's defaults: attention
  # q/k/v/out and the MLP linears), the base frozen in the compute dtype and in
  # no checkpoint. The update is alpha / rank * B A (alpha None: = rank).
  # lora.init_from: a diffusers / PEFT LoRA file (pytorch_lora_weights.safetensors)
  # to continue from.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = ml_collections.config_dict.placeholder(float)
  c.lora.targets = ()
  c.lora.init_from = ""
  c.flow = ml_collections.ConfigDict()
  c.flow.steps = 5000
  c.flow.learning_rate = 3e-4
  c.flow.warmup_steps = 200

  # Learning-rate schedule for both stages: linear warmup then cosine|constant.
  c.schedule = "cosine"
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0

  # --- Observability and checkpoints (steps are per stage).
  # Logging interval: metrics, step time, images/s, tokens/s and MFU (TensorBoard).
  # The host reads device values only at logging, checkpoint and preemption
  # agreement steps: between them it never waits for the device.
  c.log_every = 50
  # With several processes: steps between the all-gathers that agree on a
  # preemption (SIGTERM on any process); a preemption is acted on within this
  # many steps. One process: at the next step. Orbax's (JAX's) preemption sync
  # point is honoured at every step.
  c.preemption_check_every = 10
  c.eval_every = 1000  # 0: evaluate only at the end of each stage
  c.eval_ode_steps = 20  # Euler steps of the ODE sampler
  c.eval_num_images = 8  # validation images in the PNG grid
  c.ckpt_every = 500
  c.ckpt_max_to_keep = 3
  c.progress_bar = True

  # --- Fault injection (train/faults.py), for reliability tests and scripts/soak.py.
  # Global 1-based steps (vae steps first, then flow); empty / 0 = off (free).
  c.faults = ml_collections.ConfigDict()
  c.faults.nan_batch_steps = ()  # batches replaced by NaN/Inf pixels
  c.faults.nan_model_steps = ()  # NaN produced inside the model output
  c.faults.kill_at_step = 0  # SIGKILL right after this step (one-shot per workdir)
  return c


def set_flux_vae(c: ml_collections.ConfigDict) -> None:
  """Sets `c.vae` to FLUX.1's VAE architecture (16 latent channels at 1/8 the image size).

  Its weights come from `vae.pretrained` (a diffusers folder, or a FLUX
  pipeline's vae/), whose config.json is checked against these fields.
  """
  c.vae.channels = (128, 256, 512, 512)
  c.vae.latent_channels = 16
  c.vae.layers_per_block = 2
  c.vae.norm_groups = 32
  c.vae.mid_attention = True
