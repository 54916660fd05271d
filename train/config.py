"""Validation of a trainer config, run before anything is built or compiled.

`validate(config, num_devices=...)` raises ONE `ValueError` naming the field for
the first inconsistent setting, so that a bad run fails in a second instead of
deep inside a traced loss (the seed's TypeError when SSIM was on without a VAE)
or after an hour of training.
"""

from __future__ import annotations

import os

import ml_collections

PRECISIONS = ("float32", "bfloat16")
MODELS = ("dit", "flux")  # train/velocity.py
T_SAMPLINGS = ("logit_normal", "uniform")
T_SHIFTS = ("none", "resolution")
PIXEL_LOSS_TYPES = ("l1", "l2")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
  """An inconsistent trainer config; the message names the field."""


def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      _fail(dotted, "is missing (start from configs/base.py get_config())")
    node = node[part]
  return node


def _int(config, field: str, *, minimum: int | None = None) -> int:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, int):
    _fail(field, f"must be an int, got {v!r} ({type(v).__name__})")
  if minimum is not None and v < minimum:
    _fail(field, f"must be >= {minimum}, got {v}")
  return v


def _float(config, field: str, *, minimum: float | None = None,
           strictly_positive: bool = False) -> float:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    _fail(field, f"must be a number, got {v!r} ({type(v).__name__})")
  v = float(v)
  if v != v or v in (float("inf"), float("-inf")):
    _fail(field, f"must be finite, got {v}")
  if strictly_positive and v <= 0:
    _fail(field, f"must be > 0, got {v}")
  if minimum is not None and v < minimum:
    _fail(field, f"must be >= {minimum}, got {v}")
  return v


def _choice(config, field: str, choices) -> str:
  v = _get(config, field)
  if v not in choices:
    _fail(field, f"must be one of {choices}, got {v!r}")
  return v


def _check_pretrained_vae(config, down: int) -> None:
  """`vae.pretrained`: a readable diffusers VAE whose latents fit the model config.

  Reads config.json only (no weights): latent channels and downsampling must
  match `vae.latent_channels` and `vae.channels` (the DiT and the data
  geometry are built from them), and the VAE must take and give RGB.
  """
  path = _get(config, "vae.pretrained")
  if not isinstance(path, str):
    _fail("vae.pretrained", f"must be a path string ('' trains the VAE), got {path!r}")
  if not path:
    return
  from train.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  try:
    kw = vae_lib.vae_kwargs_from_diffusers_config(vae_lib.locate_diffusers(path).config)
  except (OSError, ValueError) as e:
    _fail("vae.pretrained", str(e))
  if kw["latent_channels"] != config.vae.latent_channels:
    _fail("vae.latent_channels", f"is {config.vae.latent_channels} but the pretrained VAE "
          f"{path!r} has latent_channels={kw['latent_channels']}; set "
          f"--config.vae.latent_channels={kw['latent_channels']}")
  pdown = 2 ** (len(kw["channels"]) - 1)
  if pdown != down:
    _fail("vae.channels", f"{len(config.vae.channels)} levels downsample by {down} but the "
          f"pretrained VAE {path!r} downsamples by {pdown} (block_out_channels="
          f"{list(kw['channels'])}); set --config.vae.channels='{tuple(kw['channels'])}'")
  if kw["in_channels"] != 3 or kw["out_channels"] != 3:
    _fail("vae.pretrained", f"{path!r} has in_channels={kw['in_channels']}, out_channels="
          f"{kw['out_channels']}; the trainer's images are RGB (3)")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run uses: a copy with the decisions that follow from other fields made.

  - `model='flux'` with `flux.pretrained` a diffusers pipeline folder that has
    a `vae/` and no `vae.pretrained`: the VAE is the pipeline's (FLUX's latent
    space is its VAE's), so `vae.pretrained` becomes that folder.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, references resolved
  if (config.get("model", "dit") == "flux" and not config.vae.pretrained
      and isinstance(config.flux.pretrained, str) and config.flux.pretrained
      and os.path.isfile(os.path.join(config.flux.pretrained, "vae", "config.json"))):
    config.vae.pretrained = config.flux.pretrained
  return config


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Checks a trainer config; raises `ConfigError` (a ValueError) naming the field.

  Args:
    config: a config from `configs/*.py` (after command-line overrides).
    num_devices: total number of devices over all processes (`jax.device_count()`).

  Raises:
    ConfigError: for the first inconsistent setting.
  """
  _int(config, "seed", minimum=0)
  fsdp = _int(config, "mesh.fsdp", minimum=1)
  if num_devices % fsdp:
    _fail("mesh.fsdp", f"{fsdp} does not divide the device count {num_devices} "
          "(the mesh is data x fsdp = devices)")
  _int(config, "mesh.min_shard_size", minimum=0)
  batch = _int(config, "batch_size", minimum=1)
  if batch % num_devices:
    _fail("batch_size", f"global batch {batch} is not divisible by the {num_devices} "
          f"devices of the mesh (data={num_devices // fsdp} x fsdp={fsdp}); use a "
          f"multiple of {num_devices}")
  _choice(config, "precision", PRECISIONS)
  _int(config, "max_consecutive_skips", minimum=1)
  _int(config, "grad_accum_steps", minimum=1)
  decay = _float(config, "ema.decay", minimum=0.0)
  if decay >= 1:
    _fail("ema.decay", f"must be in [0, 1) (0: no EMA), got {decay}")
  for field in ("ema.warmup", "ema.use_for_eval"):
    if not isinstance(_get(config, field), bool):
      _fail(field, f"must be a bool, got {_get(config, field)!r}")

  # Flow loss weights.
  mse_w = _float(config, "mse_loss_weight", minimum=0.0)
  pix_w = _float(config, "pixel_loss_weight", minimum=0.0)
  ssim_w = _float(config, "ssim_loss_weight", minimum=0.0)
  _choice(config, "pixel_loss_type", PIXEL_LOSS_TYPES)
  if mse_w == 0 and pix_w == 0 and ssim_w == 0:
    _fail("mse_loss_weight", "mse_loss_weight, pixel_loss_weight and ssim_loss_weight "
          "are all 0: the flow stage would have no loss")
  vae_on = bool(_get(config, "vae.enabled"))
  if not vae_on:
    for field, w in (("pixel_loss_weight", pix_w), ("ssim_loss_weight", ssim_w)):
      if w > 0:
        _fail(field, f"is {w} > 0 but config.vae.enabled is False: the pixel and SSIM "
              "losses decode the predicted latents with the VAE")
  max_t = _float(config, "ssim_loss_max_t")
  if not 0 < max_t <= 1:
    _fail("ssim_loss_max_t", f"must be in (0, 1] (a flow time), got {max_t}")
  win = _int(config, "ssim_window_size", minimum=1)
  if win % 2 == 0:
    _fail("ssim_window_size", f"must be odd (a centred Gaussian window), got {win}")
  _int(config, "chunk_size", minimum=1)
  _choice(config, "t_sampling", T_SAMPLINGS)
  _float(config, "t_logit_mean")
  _float(config, "t_logit_std", strictly_positive=True)
  if _choice(config, "t_shift", T_SHIFTS) == "resolution":
    for field in ("shift.base_shift", "shift.max_shift"):
      _float(config, field)
    base = _int(config, "shift.base_image_seq_len", minimum=1)
    top = _int(config, "shift.max_image_seq_len", minimum=1)
    if top <= base:
      _fail("shift.max_image_seq_len", f"{top} must exceed shift.base_image_seq_len={base}")

  # Data geometry.
  hr = _int(config, "data.hr_size", minimum=2)
  scale = _int(config, "data.scale", minimum=1)
  if hr % scale:
    _fail("data.hr_size", f"{hr} is not divisible by data.scale={scale}")
  _int(config, "data.num_val", minimum=1)
  _int(config, "data.prefetch", minimum=0)
  _int(config, "data.num_workers", minimum=0)
  _float(config, "data.blur_sigma", minimum=0.0)
  _float(config, "data.noise_level", minimum=0.0)
  if _int(config, "data.lr_bits", minimum=0) > 16:
    _fail("data.lr_bits", f"must be in [0, 16] (0: no rounding), got {config.data.lr_bits}")
  _int(config, "data.retina_downscale", minimum=1)
  _choice(config, "data.degradation", ("camera", "mri"))
  _choice(config, "data.dicom_window", ("header", "percentile"))
  source = _choice(config, "data.source", ("", "retina", "folder", "dicom"))
  if source in ("folder", "dicom") and not _get(config, "data.dir"):
    _fail("data.source", f"{source!r} needs data.dir (a folder of images)")
  if not isinstance(_get(config, "data.dir"), str):
    _fail("data.dir", "must be a string path ('' for the embedded retina data)")
  if win > hr:
    _fail("ssim_window_size", f"{win} is larger than the image (data.hr_size={hr})")
  for field in ("ssim_loss_levels", "vae.ssim_levels"):
    levels = _int(config, field, minimum=1)
    need = (win - 1) * 2 ** (levels - 1) + 1
    if levels > 5 or need > hr:
      _fail(field, f"{levels} MS-SSIM scales need at most 5 scales and data.hr_size >= "
            f"(ssim_window_size - 1) * 2^(levels - 1) + 1 = {need} (hr_size={hr}, "
            f"ssim_window_size={win})")

  # Models.
  if not vae_on:
    _fail("vae.enabled", "the flow stage runs in the VAE latent space; the VAE is required")
  chans = _get(config, "vae.channels")
  if (not isinstance(chans, (tuple, list)) or not chans
      or not all(isinstance(ch, int) and ch >= 1 for ch in chans)):
    _fail("vae.channels", f"must be a non-empty tuple of positive ints, got {chans!r}")
  _int(config, "vae.latent_channels", minimum=1)
  _int(config, "vae.layers_per_block", minimum=1)
  _int(config, "vae.norm_groups", minimum=1)
  if not isinstance(_get(config, "vae.mid_attention"), bool):
    _fail("vae.mid_attention", f"must be a bool, got {config.vae.mid_attention!r}")
  _int(config, "vae.steps", minimum=0)
  _float(config, "vae.learning_rate", strictly_positive=True)
  _int(config, "vae.warmup_steps", minimum=0)
  vl1 = _float(config, "vae.l1_weight", minimum=0.0)
  vssim = _float(config, "vae.ssim_weight", minimum=0.0)
  _float(config, "vae.kl_weight", minimum=0.0)
  if vl1 == 0 and vssim == 0:
    _fail("vae.l1_weight", "vae.l1_weight and vae.ssim_weight are both 0: the VAE stage "
          "would have no reconstruction loss")
  down = 2 ** (len(chans) - 1)
  _check_pretrained_vae(config, down)
  if hr % down:
    _fail("vae.channels", f"{len(chans)} levels downsample by {down}, which does not "
          f"divide data.hr_size={hr}")
  if _choice(config, "model", MODELS) == "flux":
    _check_flux(config, latent=hr // down)
  else:
    _check_dit(config, latent=hr // down)
  _check_lora(config)
  _int(config, "flow.steps", minimum=0)
  _float(config, "flow.learning_rate", strictly_positive=True)
  _int(config, "flow.warmup_steps", minimum=0)

  # Optimiser and schedule.
  _choice(config, "schedule", SCHEDULES)
  _float(config, "weight_decay", minimum=0.0)
  _float(config, "grad_clip_norm", minimum=0.0)

  # Observability and checkpoints.
  _int(config, "log_every", minimum=1)
  _int(config, "preemption_check_every", minimum=1)
  _int(config, "eval_every", minimum=0)
  _int(config, "eval_ode_steps", minimum=1)
  n_img = _int(config, "eval_num_images", minimum=1)
  if n_img > _get(config, "data.num_val"):
    _fail("eval_num_images", f"{n_img} > data.num_val={config.data.num_val}")
  _int(config, "ckpt_every", minimum=1)
  _check_faults(config)  # config.faults (absent or empty = off)
  _int(config, "ckpt_max_to_keep", minimum=1)


def _check_faults(config) -> None:
  """Checks `config.faults` (absent = off; `train/faults.py` injects them)."""
  faults = config.get("faults", None) if hasattr(config, "get") else None
  if faults is None:
    return
  for name in ("nan_batch_steps", "nan_model_steps"):
    v = faults.get(name, ())
    if isinstance(v, int) and not isinstance(v, bool):
      v = (v,)
    if (v is not None and (not isinstance(v, (tuple, list))
                           or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                      for s in v))):
      raise ConfigError(
          f"config.faults.{name}: must be a tuple of global step numbers >= 1 "
          f"(vae steps first, then flow), got {v!r}")
  k = faults.get("kill_at_step", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ConfigError(
        f"config.faults.kill_at_step: must be an int >= 0 (0 = off), got {k!r}")


def _check_dit(config, *, latent: int) -> None:
  """The DiT's fields (model == 'dit')."""
  p = _int(config, "dit.patch_size", minimum=1)
  if latent % p:
    _fail("dit.patch_size", f"{p} does not divide the latent size {latent} "
          f"(data.hr_size={config.data.hr_size} / VAE downsampling)")
  hidden = _int(config, "dit.hidden_size", minimum=1)
  heads = _int(config, "dit.num_heads", minimum=1)
  if hidden % heads:
    _fail("dit.num_heads", f"{heads} does not divide dit.hidden_size={hidden}")
  if hidden % 4:
    _fail("dit.hidden_size", f"must be a multiple of 4 (sinusoidal embeddings), got {hidden}")
  _int(config, "dit.depth", minimum=1)
  _int(config, "dit.mlp_ratio", minimum=1)
  from train.models import stacking  # pylint: disable=g-import-not-at-top
  _choice(config, "dit.remat", stacking.REMAT_POLICIES)
  _check_pretrained_dit(config)


def _check_flux(config, *, latent: int) -> None:
  """FLUX's fields (model == 'flux'): the checkpoint's config against the run's.

  Reads config.json (and the prompt file) only, no weights.
  """
  from train import velocity  # pylint: disable=g-import-not-at-top
  from train.models import stacking  # pylint: disable=g-import-not-at-top
  path = _get(config, "flux.pretrained")
  if not isinstance(path, str):
    _fail("flux.pretrained", f"must be a folder path string ('' for random weights), got {path!r}")
  _choice(config, "flux.remat", stacking.REMAT_POLICIES)
  _choice(config, "flux.param_dtype", tuple(velocity.PARAM_DTYPES))
  _int(config, "flux.prompt_length", minimum=1)
  if not isinstance(_get(config, "flux.prompt_embeds"), str):
    _fail("flux.prompt_embeds", "must be a path string ('' for zero embeddings)")
  try:
    arch = velocity.flux_architecture(config)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  src = f"the FLUX transformer in flux.pretrained={path!r}" if path else "config.flux"
  if arch.in_channels != velocity.FLUX_PATCH ** 2 * config.vae.latent_channels:
    _fail("vae.latent_channels", f"is {config.vae.latent_channels}, so FLUX's 2x2 latent "
          f"patches have {4 * config.vae.latent_channels} values, but {src} has in_channels="
          f"{arch.in_channels}: use the VAE it was trained with "
          f"({arch.in_channels // 4} latent channels)")
  if arch.patch_size != 1 or arch.output_channels != arch.in_channels:
    _fail("flux.pretrained", f"{src} has patch_size={arch.patch_size}, out_channels="
          f"{arch.out_channels}; FLUX.1's layout (patch_size 1, out_channels = in_channels) "
          "is what the trainer packs latents for")
  if latent % velocity.FLUX_PATCH:
    _fail("data.hr_size", f"{config.data.hr_size} gives latents of {latent} pixels, not "
          "divisible by FLUX's 2x2 patches")
  guidance = _get(config, "flux.guidance")
  if guidance is not None:
    guidance = _float(config, "flux.guidance", strictly_positive=True)
  if arch.guidance_embeds and guidance is None:
    _fail("flux.guidance", f"is None but {src} has guidance_embeds=True (FLUX.1 [dev], "
          "Kontext): set --config.flux.guidance=3.5")
  if not arch.guidance_embeds and guidance is not None:
    _fail("flux.guidance", f"is {guidance} but {src} has guidance_embeds=False (FLUX.1 "
          "[schnell]): set --config.flux.guidance=None")
  if config.flux.prompt_embeds:
    try:
      emb = velocity.read_prompt_embeds(config.flux.prompt_embeds)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    if emb["prompt_embeds"].shape[1] != arch.joint_attention_dim:
      _fail("flux.prompt_embeds", f"prompt_embeds has width {emb['prompt_embeds'].shape[1]} "
            f"but {src} has joint_attention_dim={arch.joint_attention_dim}")
    if emb["pooled_prompt_embeds"].shape[0] != arch.pooled_projection_dim:
      _fail("flux.prompt_embeds", f"pooled_prompt_embeds has {emb['pooled_prompt_embeds'].shape[0]}"
            f" values but {src} has pooled_projection_dim={arch.pooled_projection_dim}")
    if emb["prompt_embeds"].shape[0] != config.flux.prompt_length:
      _fail("flux.prompt_length", f"is {config.flux.prompt_length} but flux.prompt_embeds "
            f"holds {emb['prompt_embeds'].shape[0]} tokens; set "
            f"--config.flux.prompt_length={emb['prompt_embeds'].shape[0]}")


def _check_lora(config) -> None:
  """`lora.*`: the rank, alpha, targets (they must match layers of the model) and init file."""
  if "lora" not in config:
    return
  rank = _int(config, "lora.rank", minimum=0)
  if not rank:
    return
  if _get(config, "lora.alpha") is not None:
    _float(config, "lora.alpha", strictly_positive=True)
  targets = _get(config, "lora.targets")
  if (not isinstance(targets, (tuple, list))
      or not all(isinstance(t, str) and t for t in targets)):
    _fail("lora.targets", f"must be a tuple of module-name patterns (() for the model's "
          f"defaults), got {targets!r}")
  init_from = _get(config, "lora.init_from")
  if not isinstance(init_from, str):
    _fail("lora.init_from", f"must be a path string ('' for a fresh adapter), got {init_from!r}")
  if init_from and not os.path.isfile(init_from):
    _fail("lora.init_from", f"no file {init_from!r} (a diffusers LoRA "
          "pytorch_lora_weights.safetensors)")
  from train import velocity  # pylint: disable=g-import-not-at-top
  try:
    velocity.for_config(config).lora_targets()
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


def _check_pretrained_dit(config) -> None:
  """A base model to fine-tune must be the architecture the config builds."""
  path = _get(config, "dit.pretrained")
  if not isinstance(path, str):
    _fail("dit.pretrained", f"must be a folder path string ('' for none), got {path!r}")
  if not path:
    return
  from train.models import dit  # pylint: disable=g-import-not-at-top
  try:
    saved = dit.read_config(path)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  built = {k: _get(config, f"dit.{k}") for k in dit.CONFIG_FIELDS if k != "latent_channels"}
  built["latent_channels"] = _get(config, "vae.latent_channels")
  for k in dit.CONFIG_FIELDS:
    if saved.get(k) != built[k]:
      field = "vae.latent_channels" if k == "latent_channels" else f"dit.{k}"
      _fail(field, f"is {built[k]!r} but the base model in dit.pretrained={path!r} has "
            f"{k}={saved.get(k)!r}")
