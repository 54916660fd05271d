"""diffusers AutoencoderKL checkpoints written with numpy only (no torch, no diffusers).

`tensor_shapes(config)` lists the tensors diffusers' `AutoencoderKL(**config)`
has, by diffusers' names and torch shapes, written from diffusers' module
structure (`autoencoders/vae.py` Encoder/Decoder, `unet_2d_blocks`
DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D, `resnet.py`
ResnetBlock2D, `attention_processor.Attention`), independently of
`train/models/vae.py`: a loader that maps names wrongly fails on these.
`write_folder` saves random weights + config.json as `save_pretrained` would.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

# The architecture-defining fields of the published configs, at tiny widths.
_TINY = dict(in_channels=3, out_channels=3, act_fn="silu", layers_per_block=2,
             norm_num_groups=4, block_out_channels=[8, 16, 16],
             down_block_types=["DownEncoderBlock2D"] * 3,
             up_block_types=["UpDecoderBlock2D"] * 3, sample_size=64)
FAMILIES = {
    # SD1.x / SD2 (stabilityai/sd-vae-ft-mse: no shift/quant/upcast fields at all)
    "sd15": dict(_TINY, latent_channels=4, scaling_factor=0.18215),
    "sdxl": dict(_TINY, latent_channels=4, scaling_factor=0.13025, force_upcast=True,
                 shift_factor=None, latents_mean=None, latents_std=None,
                 use_quant_conv=True, use_post_quant_conv=True),
    "sd3": dict(_TINY, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True),
    "flux": dict(_TINY, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                 mid_block_add_attention=True),
}
DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1,
                latent_channels=4, use_quant_conv=True, use_post_quant_conv=True,
                mid_block_add_attention=True)


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """diffusers tensor name -> torch shape for `AutoencoderKL(**config)`."""
  c = {**DEFAULTS, **config}
  boc, n_layers, lat = list(c["block_out_channels"]), c["layers_per_block"], c["latent_channels"]
  attention = c["mid_block_add_attention"]
  out: dict[str, tuple[int, ...]] = {}

  def conv(name, cout, cin, k):
    out[f"{name}.weight"] = (cout, cin, k, k)
    out[f"{name}.bias"] = (cout,)

  def norm(name, ch):
    out[f"{name}.weight"] = (ch,)
    out[f"{name}.bias"] = (ch,)

  def linear(name, cout, cin):
    out[f"{name}.weight"] = (cout, cin)
    out[f"{name}.bias"] = (cout,)

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cout, cin, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.conv_shortcut", cout, cin, 1)

  def mid(name, ch):
    resnet(f"{name}.resnets.0", ch, ch)
    if attention:
      norm(f"{name}.attentions.0.group_norm", ch)
      for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        linear(f"{name}.attentions.0.{proj}", ch, ch)
    resnet(f"{name}.resnets.1", ch, ch)

  conv("encoder.conv_in", boc[0], c["in_channels"], 3)
  cout = boc[0]
  for i, width in enumerate(boc):
    cin, cout = cout, width
    for j in range(n_layers):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
    if i < len(boc) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
  mid("encoder.mid_block", boc[-1])
  norm("encoder.conv_norm_out", boc[-1])
  conv("encoder.conv_out", 2 * lat, boc[-1], 3)

  rev = boc[::-1]
  conv("decoder.conv_in", rev[0], lat, 3)
  mid("decoder.mid_block", rev[0])
  cout = rev[0]
  for i, width in enumerate(rev):
    cin, cout = cout, width
    for j in range(n_layers + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
    if i < len(rev) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
  norm("decoder.conv_norm_out", boc[0])
  conv("decoder.conv_out", c["out_channels"], boc[0], 3)
  if c["use_quant_conv"]:
    conv("quant_conv", 2 * lat, 2 * lat, 1)
  if c["use_post_quant_conv"]:
    conv("post_quant_conv", lat, lat, 1)
  return out


def random_tensors(config: dict, *, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random weights of plausible scale (fan-in normal; norm scales near 1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in tensor_shapes(config).items():
    if len(shape) == 1:
      base = 1.0 if ".norm" in name or "group_norm" in name or "norm_out" in name else 0.0
      base = base if name.endswith(".weight") else 0.0
      v = base + 0.1 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[1:]))
      v = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[name] = np.ascontiguousarray(v.astype(dtype))
  return out


def write_folder(folder, config: dict, *, seed: int = 0, dtype=np.float32,
                 tensors: dict | None = None) -> str:
  """`folder/config.json` + `folder/diffusion_pytorch_model.safetensors`."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  if tensors is None:
    tensors = random_tensors(config, seed=seed, dtype=dtype)
  save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", **config}, fh)
  return folder
