"""AutoencoderKL-style VAE in Flax NNX (the diffusers architecture, NHWC).

Encoder: conv_in -> down blocks (ResNet blocks, a stride-2 downsampling
between levels) -> mid block (ResNet, single-head self-attention, ResNet) ->
GroupNorm/SiLU/conv_out -> [quant_conv] -> posterior `(mean, logvar)`.
Decoder: [post_quant_conv] -> conv_in -> mid block -> up blocks (ResNet
blocks, nearest x2 + conv between levels) -> GroupNorm/SiLU/conv_out.
The quant convs are optional (`use_quant_conv`, `use_post_quant_conv`): SD1.x,
SD2 and SDXL VAEs have them, SD3/SD3.5 and FLUX.1 VAEs do not.

`channels` are diffusers' `block_out_channels`: `len(channels) - 1`
downsamplings, so 64x64 RGB images with `channels=(32, 64, 64)` and
`latent_channels=4` give 16x16x4 latents. Module and attribute names mirror
diffusers' `AutoencoderKL`, which is what lets `from_diffusers` build a VAE
from a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`)
and map its tensors onto the model by name, with numpy only (no torch);
`save_diffusers` writes the same folder format back.

Diffusion latents follow the diffusers convention
`latents = (mean - shift_factor) * scaling_factor` (`scale_latents`) and
`decode(latents / scaling_factor + shift_factor)` (`unscale_latents`).

Images are `[B, H, W, in_channels]` in [-1, 1]; H and W divisible by
`2 ** (len(channels) - 1)`.

Precision: `dtype=None` (the trainer's VAEs) computes in the dtype of the
input and of the parameters (cast them together for bf16). `dtype=jnp.bfloat16`
casts inputs and parameters to bf16 inside every layer (`param_dtype` is the
storage dtype). Either way the GroupNorm statistics (two-pass, centred) and
the attention logits and softmax are float32.

Frozen use inside a jitted step: `graphdef, params = nnx.split(vae)` once and
pass `params` as an ARGUMENT (`nnx.merge(graphdef, params)` inside), never
close over them (they would be baked in as constants).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _groups(num_groups: int, channels: int) -> int:
  """Largest divisor of `channels` not above `num_groups` (32 for diffusers sizes)."""
  return math.gcd(int(num_groups), int(channels))


@dataclasses.dataclass(frozen=True)
class _Layers:
  """Builds the layers of one VAE with its shared settings (used in __init__ only).

  `dtype` is the compute dtype (None: follow the inputs and parameters),
  `param_dtype` the storage dtype of new parameters.
  """
  rngs: nnx.Rngs
  norm_groups: int
  eps: float
  dtype: Any
  param_dtype: Any

  def conv(self, cin: int, cout: int, k: int, *, stride: int = 1,
           pad: int | None = None) -> nnx.Conv:
    pad = k // 2 if pad is None else pad
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                    param_dtype=self.param_dtype, rngs=self.rngs)

  def norm(self, c: int) -> nnx.GroupNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses digits on the large activations
    # of pretrained decoders (torch's GroupNorm is two-pass too). flax computes
    # the statistics in at least float32 whatever `dtype` is.
    return nnx.GroupNorm(c, num_groups=_groups(self.norm_groups, c), epsilon=self.eps,
                         use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=self.rngs)

  def linear(self, cin: int, cout: int) -> nnx.Linear:
    return nnx.Linear(cin, cout, dtype=self.dtype, param_dtype=self.param_dtype,
                      rngs=self.rngs)


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv3x3 twice plus a (1x1 conv when channels change) skip."""

  def __init__(self, cin: int, cout: int, *, layers: _Layers):
    self.norm1 = layers.norm(cin)
    self.conv1 = layers.conv(cin, cout, 3)
    self.norm2 = layers.norm(cout)
    self.conv2 = layers.conv(cout, cout, 3)
    self.conv_shortcut = layers.conv(cin, cout, 1) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a residual (diffusers' VAE mid block)."""

  def __init__(self, c: int, *, layers: _Layers):
    self.group_norm = layers.norm(c)
    self.to_q = layers.linear(c, c)
    self.to_k = layers.linear(c, c)
    self.to_v = layers.linear(c, c)
    self.to_out = nnx.List([layers.linear(c, c)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
    # Logits accumulated and softmaxed in float32 even for bf16 inputs: h*w
    # logits per row, whose bf16 rounding (8 bits) would reorder near-ties.
    logits = jnp.einsum("bqc,bkc->bqk", q, k,
                        preferred_element_type=jnp.float32) / math.sqrt(c)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", attn, v))
    return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Pad right/bottom by 1, conv3x3 stride 2 (diffusers Downsample2D, padding=0)."""

  def __init__(self, c: int, *, layers: _Layers):
    self.conv = layers.conv(c, c, 3, stride=2, pad=0)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then conv3x3 (diffusers Upsample2D)."""

  def __init__(self, c: int, *, layers: _Layers):
    self.conv = layers.conv(c, c, 3)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class DownBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, num_layers: int, downsample: bool,
               layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, layers=layers)
                             for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample(cout, layers=layers)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, num_layers: int, upsample: bool,
               layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, layers=layers)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample(cout, layers=layers)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class MidBlock(nnx.Module):

  def __init__(self, c: int, *, attention: bool, layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(c, c, layers=layers) for _ in range(2)])
    self.attentions = nnx.List([Attention(c, layers=layers)] if attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for a in self.attentions:
      x = a(x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, *, in_channels: int, channels: Sequence[int], latent_channels: int,
               layers_per_block: int, mid_attention: bool, layers: _Layers):
    self.conv_in = layers.conv(in_channels, channels[0], 3)
    blocks, cin = [], channels[0]
    for i, cout in enumerate(channels):
      blocks.append(DownBlock(cin, cout, num_layers=layers_per_block,
                              downsample=i < len(channels) - 1, layers=layers))
      cin = cout
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(channels[-1], attention=mid_attention, layers=layers)
    self.conv_norm_out = layers.norm(channels[-1])
    self.conv_out = layers.conv(channels[-1], 2 * latent_channels, 3)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, *, out_channels: int, channels: Sequence[int], latent_channels: int,
               layers_per_block: int, mid_attention: bool, layers: _Layers):
    rev = list(reversed(channels))
    self.conv_in = layers.conv(latent_channels, rev[0], 3)
    self.mid_block = MidBlock(rev[0], attention=mid_attention, layers=layers)
    blocks, cin = [], rev[0]
    for i, cout in enumerate(rev):
      blocks.append(UpBlock(cin, cout, num_layers=layers_per_block + 1,
                            upsample=i < len(rev) - 1, layers=layers))
      cin = cout
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = layers.norm(channels[0])
    self.conv_out = layers.conv(channels[0], out_channels, 3)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for b in self.up_blocks:
      x = b(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class VAEOutput(NamedTuple):
  """`VAE.__call__` result.

  Attributes:
    reconstruction: `[B, H, W, C]` decoded images (in [-1, 1] once trained).
    mean: posterior mean `[B, h, w, latent_channels]`.
    logvar: posterior log-variance, same shape (clipped to [-30, 20]).
    kl: float32 `[B]`, KL(q(z|x) || N(0, I)) summed over latent elements.
  """
  reconstruction: jax.Array
  mean: jax.Array
  logvar: jax.Array
  kl: jax.Array


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _float_dtype(name: str, value, *, allow_none: bool):
  """`value` as a jnp floating dtype (or None), else a ValueError naming `name`."""
  if value is None and allow_none:
    return None
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or dt.name not in FLOAT_DTYPES:
    raise ValueError(f"{name} must be one of {FLOAT_DTYPES}"
                     f"{' or None' if allow_none else ''}, got {value!r}")
  return dt


class VAE(nnx.Module):
  """AutoencoderKL: `encode(x) -> (mean, logvar)`, `decode(z) -> x`.

  Args:
    channels: per-level widths (diffusers `block_out_channels`); there are
      `len(channels) - 1` stride-2 downsamplings.
    latent_channels: channels of the latent.
    in_channels: image channels (3).
    out_channels: decoded image channels (None: `in_channels`).
    layers_per_block: ResNet blocks per encoder level (decoder: one more).
    norm_groups: GroupNorm groups (capped to a divisor of each width, so tiny
      widths work; diffusers sizes are multiples of 32 and use 32).
    mid_attention: self-attention in the mid blocks (diffusers'
      `mid_block_add_attention`, True).
    use_quant_conv, use_post_quant_conv: the 1x1 convs after the encoder and
      before the decoder (SD/SDXL: True; SD3/FLUX: False).
    scaling_factor, shift_factor: diffusion latent scale/shift (see module doc).
    force_upcast: the checkpoint asks for float32 decoding (diffusers'
      `force_upcast`); recorded for `save_diffusers`, obeyed by `from_diffusers`.
    eps: GroupNorm epsilon (diffusers: 1e-6).
    dtype: compute dtype (None: the dtype of the inputs and parameters;
      `jnp.bfloat16` casts both to bf16 in every layer).
    param_dtype: storage dtype of the parameters (float32).
    rngs: `nnx.Rngs` for initialisation.

  Example:
    >>> vae = VAE(channels=(32, 64, 64), latent_channels=4, rngs=nnx.Rngs(0))
    >>> mean, logvar = vae.encode(jnp.zeros((2, 64, 64, 3)))   # [2,16,16,4]
    >>> vae.decode(mean).shape
    (2, 64, 64, 3)
  """

  def __init__(self, *, channels: Sequence[int] = (32, 64, 64),
               latent_channels: int = 4, in_channels: int = 3,
               out_channels: int | None = None, layers_per_block: int = 1,
               norm_groups: int = 32, mid_attention: bool = True,
               use_quant_conv: bool = True, use_post_quant_conv: bool = True,
               scaling_factor: float = 1.0, shift_factor: float = 0.0,
               force_upcast: bool = False, eps: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    channels = tuple(channels)
    if not channels or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                           or c < 1 for c in channels):
      raise ValueError(f"channels must be a non-empty tuple of positive ints, got "
                       f"{channels!r}")
    out_channels = in_channels if out_channels is None else out_channels
    for name, v in (("latent_channels", latent_channels), ("in_channels", in_channels),
                    ("out_channels", out_channels), ("layers_per_block", layers_per_block),
                    ("norm_groups", norm_groups)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("mid_attention", mid_attention), ("use_quant_conv", use_quant_conv),
                    ("use_post_quant_conv", use_post_quant_conv),
                    ("force_upcast", force_upcast)):
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    if not (isinstance(scaling_factor, (int, float)) and not isinstance(scaling_factor, bool)
            and math.isfinite(scaling_factor) and scaling_factor > 0):
      raise ValueError(f"scaling_factor must be a finite number > 0, got {scaling_factor!r}")
    if not (isinstance(shift_factor, (int, float)) and not isinstance(shift_factor, bool)
            and math.isfinite(shift_factor)):
      raise ValueError(f"shift_factor must be a finite number, got {shift_factor!r}")
    self.channels = tuple(int(c) for c in channels)
    self.latent_channels = int(latent_channels)
    self.in_channels = int(in_channels)
    self.out_channels = int(out_channels)
    self.layers_per_block = int(layers_per_block)
    self.norm_groups = int(norm_groups)
    self.mid_attention = bool(mid_attention)
    self.scaling_factor = float(scaling_factor)
    self.shift_factor = float(shift_factor)
    self.force_upcast = bool(force_upcast)
    self.eps = float(eps)
    self.dtype = _float_dtype("dtype", dtype, allow_none=True)
    self.param_dtype = _float_dtype("param_dtype", param_dtype, allow_none=False)
    layers = _Layers(rngs=rngs, norm_groups=self.norm_groups, eps=self.eps,
                     dtype=self.dtype, param_dtype=self.param_dtype)
    kw = dict(channels=self.channels, latent_channels=self.latent_channels,
              layers_per_block=self.layers_per_block, mid_attention=self.mid_attention,
              layers=layers)
    self.encoder = Encoder(in_channels=self.in_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    c2 = 2 * self.latent_channels
    self.quant_conv = layers.conv(c2, c2, 1) if use_quant_conv else None
    self.post_quant_conv = (layers.conv(self.latent_channels, self.latent_channels, 1)
                            if use_post_quant_conv else None)

  @property
  def use_quant_conv(self) -> bool:
    return self.quant_conv is not None

  @property
  def use_post_quant_conv(self) -> bool:
    return self.post_quant_conv is not None

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent pixel along each axis, `2 ** (len(channels) - 1)`."""
    return 2 ** (len(self.channels) - 1)

  def _check_images(self, x: jax.Array) -> None:
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be [B, H, W, {self.in_channels}], got {x.shape}")
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"x spatial size {x.shape[1:3]} must be divisible by the "
                       f"downsampling factor {f}")

  def _cast(self, x: jax.Array) -> jax.Array:
    return x if self.dtype is None else x.astype(self.dtype)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images `[B, H, W, in_channels]` in [-1, 1] -> `(mean, logvar)` `[B, H/f, W/f, c]`."""
    self._check_images(x)
    moments = self.encoder(self._cast(x))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw (unscaled) latents `[B, h, w, c]` -> images `[B, h*f, w*f, out_channels]`."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"z must be [B, h, w, {self.latent_channels}], got {z.shape}")
    z = self._cast(z)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw latents -> diffusion latents `(z - shift) * scale`."""
    return (z - self.shift_factor) * self.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> raw latents `latents / scale + shift`."""
    return latents / self.scaling_factor + self.shift_factor

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> VAEOutput:
    """Reconstruction and KL for training (posterior sample when `key` is given).

    Args:
      x: images `[B, H, W, in_channels]` in [-1, 1].
      key: PRNG key for the reparameterised sample; None decodes the mean.

    Returns:
      `VAEOutput(reconstruction, mean, logvar, kl)`.
    """
    mean, logvar = self.encode(x)
    z = mean
    if key is not None:
      eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * eps
    m32, lv32 = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.sum(jnp.square(m32) + jnp.exp(lv32) - 1.0 - lv32, axis=(1, 2, 3))
    return VAEOutput(self.decode(z), mean, logvar, kl)


# ----------------------------------------------------------------------------
# diffusers checkpoints: config.json <-> VAE arguments, tensors <-> parameters.

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# diffusers' AutoencoderKL.__init__ defaults: a config.json may omit any field.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
    "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# diffusers' get_activation names for SiLU (the only activation of real VAEs).
_SILU_NAMES = ("silu", "swish")


class DiffusersCheckpoint(NamedTuple):
  """A located diffusers AutoencoderKL checkpoint.

  Attributes:
    config: the parsed `config.json` (an `AutoencoderKL` config).
    weights: path of the `.safetensors` file.
  """
  config: dict
  weights: str


def _cfg_error(field: str, msg: str):
  raise ValueError(f"diffusers AutoencoderKL config field {field!r}: {msg}")


def _cfg_int(cfg, field: str) -> int:
  v = cfg[field]
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    _cfg_error(field, f"must be a positive int, got {v!r}")
  return v


def _cfg_bool(cfg, field: str) -> bool:
  v = cfg[field]
  if not isinstance(v, bool):
    _cfg_error(field, f"must be true or false, got {v!r}")
  return v


def _cfg_float(cfg, field: str) -> float:
  v = cfg[field]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _cfg_error(field, f"must be a finite number, got {v!r}")
  return float(v)


def vae_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """`VAE(**kwargs)` arguments that rebuild a diffusers `AutoencoderKL` exactly.

  Missing fields take diffusers' defaults (as `AutoencoderKL.from_pretrained`
  does). Keys starting with `_` are metadata (`_class_name` must be
  `AutoencoderKL` when present). `sample_size` only sets diffusers' tiling
  threshold and is ignored.

  Args:
    config: the contents of a diffusers VAE `config.json`.

  Returns:
    dict of `VAE` keyword arguments (without `rngs`, `dtype`, `param_dtype`).

  Raises:
    ValueError: for every field whose value this VAE cannot reproduce exactly
      (another block type, activation or per-channel latent statistics, GroupNorm
      groups that do not divide a width, unknown fields), naming the field.
  """
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a mapping (the parsed config.json), got "
                     f"{type(config).__name__}")
  cls = config.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    _cfg_error("_class_name", f"is {cls!r}; only 'AutoencoderKL' checkpoints are "
               "supported (AutoencoderKLQwenImage, AsymmetricAutoencoderKL, ... differ)")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    _cfg_error(unknown[0], "is not an AutoencoderKL field this loader knows; refusing to "
               f"guess what it changes (unknown fields: {unknown})")
  cfg = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

  chans = cfg["block_out_channels"]
  if (not isinstance(chans, (list, tuple)) or not chans
      or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans)):
    _cfg_error("block_out_channels", f"must be a non-empty list of positive ints, got {chans!r}")
  for field, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
    types = cfg[field]
    if not isinstance(types, (list, tuple)) or len(types) != len(chans):
      _cfg_error(field, f"must list one block per block_out_channels entry "
                 f"({len(chans)}), got {types!r}")
    other = [t for t in types if t != block]
    if other:
      _cfg_error(field, f"only {block!r} blocks are supported, got {other[0]!r}")
  if cfg["act_fn"] not in _SILU_NAMES:
    _cfg_error("act_fn", f"only {_SILU_NAMES} are supported, got {cfg['act_fn']!r}")
  for field in ("latents_mean", "latents_std"):
    if cfg[field] is not None:
      _cfg_error(field, "per-channel latent statistics are not supported (only the "
                 "scalar scaling_factor / shift_factor convention); it must be null")
  groups = _cfg_int(cfg, "norm_num_groups")
  bad = [c for c in chans if c % groups]
  if bad:
    _cfg_error("norm_num_groups", f"{groups} does not divide block_out_channels entry "
               f"{bad[0]} (diffusers' GroupNorm would reject it)")
  scaling = _cfg_float(cfg, "scaling_factor")
  if scaling <= 0:
    _cfg_error("scaling_factor", f"must be > 0, got {scaling}")
  shift = 0.0 if cfg["shift_factor"] is None else _cfg_float(cfg, "shift_factor")
  return dict(
      channels=tuple(chans), latent_channels=_cfg_int(cfg, "latent_channels"),
      in_channels=_cfg_int(cfg, "in_channels"), out_channels=_cfg_int(cfg, "out_channels"),
      layers_per_block=_cfg_int(cfg, "layers_per_block"), norm_groups=groups,
      mid_attention=_cfg_bool(cfg, "mid_block_add_attention"),
      use_quant_conv=_cfg_bool(cfg, "use_quant_conv"),
      use_post_quant_conv=_cfg_bool(cfg, "use_post_quant_conv"),
      scaling_factor=scaling, shift_factor=shift,
      force_upcast=_cfg_bool(cfg, "force_upcast"), eps=1e-6)


def diffusers_config(vae: VAE, *, sample_size: int = 32) -> dict[str, Any]:
  """The diffusers `AutoencoderKL` config.json of `vae` (inverse of the above).

  Args:
    vae: the model.
    sample_size: diffusers' tiling threshold in pixels (no effect on the maths).

  Raises:
    ValueError: when diffusers cannot express the model: GroupNorm groups that
      differ between widths (diffusers uses one `norm_num_groups` everywhere) or
      an epsilon other than diffusers' fixed 1e-6.
  """
  groups = sorted({_groups(vae.norm_groups, c) for c in vae.channels})
  if len(groups) != 1:
    raise ValueError(f"vae.norm_groups={vae.norm_groups} gives GroupNorm groups {groups} "
                     f"for channels {vae.channels}; diffusers uses one norm_num_groups for "
                     "every layer: build the VAE with norm_groups dividing every width")
  if vae.eps != 1e-6:
    raise ValueError(f"vae.eps={vae.eps}: diffusers' AutoencoderKL fixes GroupNorm eps=1e-6")
  n = len(vae.channels)
  return {
      "_class_name": "AutoencoderKL",
      "in_channels": vae.in_channels, "out_channels": vae.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(vae.channels), "layers_per_block": vae.layers_per_block,
      "act_fn": "silu", "latent_channels": vae.latent_channels,
      "norm_num_groups": groups[0], "sample_size": int(sample_size),
      "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
      "latents_mean": None, "latents_std": None, "force_upcast": vae.force_upcast,
      "use_quant_conv": vae.use_quant_conv, "use_post_quant_conv": vae.use_post_quant_conv,
      "mid_block_add_attention": vae.mid_attention,
  }


def locate_diffusers(path: str | os.PathLike, *,
                     config: Mapping | str | os.PathLike | None = None) -> DiffusersCheckpoint:
  """Finds the config and weights of a diffusers VAE (reads config.json only).

  Args:
    path: a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`),
      a pipeline folder holding one in `vae/`, or a `.safetensors` file.
    config: for a file `path`: the config as a dict or a `config.json` path
      (None: `config.json` next to the file). Must be None for a folder.

  Raises:
    FileNotFoundError / ValueError naming `path` or `config`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if config is not None:
      raise ValueError("config must be None when path is a folder (its config.json is used)")
    folder = path
    if (not os.path.isfile(os.path.join(folder, CONFIG_NAME))
        and os.path.isfile(os.path.join(folder, "vae", CONFIG_NAME))):
      folder = os.path.join(folder, "vae")  # a pipeline folder (model_index.json, vae/, ...)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"path {path!r}: no {CONFIG_NAME} in it or in its vae/ "
                              "subfolder; is it a diffusers VAE or pipeline folder?")
    if not os.path.isfile(weights):
      found = sorted(f for f in os.listdir(folder) if "safetensors" in f or f.endswith(".bin"))
      raise FileNotFoundError(
          f"path {path!r}: no {WEIGHTS_NAME} in {folder!r} (found {found}); sharded, variant "
          "(fp16) or .bin weights: pass the .safetensors file as path and config=")
  elif os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"path {path!r} must be a folder or a .safetensors file (torch "
                       ".bin pickles are not read)")
    weights = path
    if config is None:
      cfg_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
      if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"config: none given and no {CONFIG_NAME} next to {path!r}")
    elif isinstance(config, Mapping):
      return DiffusersCheckpoint(dict(config), weights)
    else:
      cfg_path = os.fspath(config)
      if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"config: no file {cfg_path!r}")
  else:
    raise FileNotFoundError(f"path {path!r} does not exist")
  with open(cfg_path) as fh:
    try:
      cfg = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"config {cfg_path!r} is not valid JSON: {e}") from None
  return DiffusersCheckpoint(cfg, weights)


_ATTN_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v",
                 "proj_attn": "to_out.0"}
_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _diffusers_name(path: tuple) -> str:
  """NNX state path -> diffusers tensor name (with its `.weight`/`.bias` suffix)."""
  return ".".join(str(p) for p in path[:-1]) + "." + _SUFFIX[str(path[-1])]


def _rename_legacy_attention(tensors: dict) -> dict:
  """Old diffusers attention names (`query/key/value/proj_attn`) -> current ones."""
  out = {}
  for k, v in tensors.items():
    parts = k.split(".")
    if "attentions" in parts:
      parts = [_ATTN_ALIASES.get(p, p) for p in parts]
    out[".".join(parts)] = v
  return out


def _torch_shape(leaf: str, shape: tuple) -> tuple:
  """The torch layout of an NNX parameter shape (for error messages)."""
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax(name: str, leaf: str, value: np.ndarray, shape: tuple) -> np.ndarray:
  """Converts one torch-layout tensor to the layout of the NNX parameter (float32)."""
  v = np.asarray(value).astype(np.float32)  # bf16/f16 -> f32 is exact
  fits = {4: v.ndim == 4, 2: v.ndim == 2 or (v.ndim == 4 and v.shape[2:] == (1, 1)),
          1: v.ndim == 1}[len(shape)]
  if fits and leaf == "kernel" and len(shape) == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
    v = v.transpose(2, 3, 1, 0)
  elif fits and leaf == "kernel" and len(shape) == 2:  # linear [O, I] (or 1x1 conv) -> [I, O]
    v = v.reshape(v.shape[0], v.shape[1]).T
  if not fits or v.shape != tuple(shape):
    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                     f"{_torch_shape(leaf, shape)} (torch layout); do config.json's "
                     "block_out_channels / latent_channels / in_channels describe these weights?")
  return v


def _load_tensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # local: numpy-only, bf16 via ml_dtypes
  return _rename_legacy_attention(load_file(str(path)))


def _fill(state: nnx.State, tensors: Mapping[str, np.ndarray], *, strict: bool,
          source: str) -> nnx.State:
  """`state` (arrays or abstract) with every parameter taken from `tensors`.

  Values are cast to each parameter's dtype. Raises ValueError naming missing
  and unexpected tensors (when `strict`) and shape mismatches.
  """
  used, missing, updates = set(), [], []
  for path_, var in nnx.to_flat_state(state):
    name = _diffusers_name(path_)
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if name not in tensors:
      missing.append(name)
      updates.append((path_, var))
      continue
    used.add(name)
    value = _to_flax(name, str(path_[-1]), tensors[name], shape)
    updates.append((path_, var.replace(jnp.asarray(value, dtype))))
  unexpected = sorted(set(tensors) - used)
  if strict and (missing or unexpected):
    hint = ""
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in unexpected):
      hint = (" (the tensor names look like an original LDM/BFL checkpoint, not diffusers';"
              " convert it with diffusers' AutoencoderKL.from_single_file + save_pretrained)")
    raise ValueError(f"{source} does not match the model: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                     f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''} "
                     f"({len(unexpected)}){hint}")
  return nnx.from_flat_state(updates)


def load_diffusers_safetensors(model: VAE, path: str, *, strict: bool = True) -> VAE:
  """Loads a diffusers `AutoencoderKL` `.safetensors` file into `model` in place.

  `from_diffusers` builds the model from the checkpoint's config.json as well;
  this is for a model you built yourself. Old attention names
  (`query/key/value/proj_attn`) are accepted. numpy only: no torch.

  Args:
    model: the `VAE` to fill.
    path: file path of the safetensors checkpoint.
    strict: raise when a model parameter is missing from the file or the file
      holds tensors the model does not use.

  Returns:
    `model`, with every parameter replaced (in the model's dtype and layout).

  Raises:
    ValueError: missing/unexpected tensors (strict) or shape mismatches, naming
      the tensors.
  """
  state = _fill(nnx.state(model, nnx.Param), _load_tensors(path), strict=strict,
                source=f"checkpoint {os.fspath(path)!r}")
  nnx.update(model, state)
  return model


def from_diffusers(path: str | os.PathLike, *, dtype=jnp.float32,
                   config: Mapping | str | os.PathLike | None = None,
                   force_upcast: bool | None = None) -> VAE:
  """Builds a `VAE` from a diffusers `AutoencoderKL` checkpoint and loads its weights.

  Exact (to float32 rounding) for the SD1.x/SD2, SDXL, SD3/SD3.5 and FLUX.1
  VAE layouts (see `scripts/check_diffusers_vae.py`). numpy only, no torch;
  the parameters are never initialised randomly (abstract model, then filled).

  Args:
    path: a diffusers VAE folder, a pipeline folder with a `vae/` subfolder,
      or a `.safetensors` file (see `locate_diffusers`).
    dtype: parameter AND compute dtype: float32, bfloat16 or float16. GroupNorm
      statistics and the attention softmax stay float32.
    config: for a file `path`: the config dict or config.json path.
    force_upcast: None follows the checkpoint's `force_upcast` (diffusers'
      default True): such a VAE is built in float32 whatever `dtype` is, as the
      checkpoint asks. False uses `dtype` anyway (bf16 has float32's range, so
      the fp16 overflow that `force_upcast` guards against cannot happen; diffusers
      itself applies it only to float16), True always uses float32.

  Returns:
    the `VAE`, with `scaling_factor`, `shift_factor` and `force_upcast` from
    the config; `vae.dtype` is the dtype it actually runs in.

  Raises:
    ValueError / FileNotFoundError: unsupported config fields (named), tensors
      that do not match the config (named), bad paths.
  """
  dtype = _float_dtype("dtype", dtype, allow_none=False)
  if force_upcast is not None and not isinstance(force_upcast, bool):
    raise ValueError(f"force_upcast must be None, True or False, got {force_upcast!r}")
  ckpt = locate_diffusers(path, config=config)
  kwargs = vae_kwargs_from_diffusers_config(ckpt.config)
  upcast = kwargs["force_upcast"] if force_upcast is None else force_upcast
  if upcast and dtype != jnp.float32:
    logging.info("%s: force_upcast=True, running the VAE in float32 instead of %s "
                 "(pass force_upcast=False to keep %s)", ckpt.weights, dtype.name, dtype.name)
    dtype = jnp.dtype(jnp.float32)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: VAE(**kwargs, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))
  state = _fill(abstract, _load_tensors(ckpt.weights), strict=True,
                source=f"checkpoint {ckpt.weights!r}")
  return nnx.merge(graphdef, state)


def diffusers_state_dict(model: VAE, *, dtype=None) -> dict[str, np.ndarray]:
  """The inverse mapping: parameters as diffusers-named torch-layout numpy arrays.

  Args:
    model: the VAE.
    dtype: array dtype (None: each parameter's own dtype; bf16 via ml_dtypes).
  """
  out = {}
  for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    leaf = str(path_[-1])
    value = var.get_value()
    v = np.asarray(value.astype(jnp.float32))
    if leaf == "kernel" and v.ndim == 4:
      v = v.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and v.ndim == 2:
      v = v.T
    target = value.dtype if dtype is None else _float_dtype("dtype", dtype, allow_none=False)
    out[_diffusers_name(path_)] = np.ascontiguousarray(v.astype(target))
  return out


def save_diffusers(vae: VAE, folder: str | os.PathLike, *, dtype=None,
                   sample_size: int = 32) -> str:
  """Writes `vae` as a diffusers `AutoencoderKL` folder; `from_diffusers` reads it back.

  `folder/config.json` (diffusers' AutoencoderKL config format) and
  `folder/diffusion_pytorch_model.safetensors` (diffusers' tensor names, torch
  layouts). diffusers' `AutoencoderKL.from_pretrained(folder)` loads it too.

  Args:
    vae: the model (diffusers must be able to express it, see `diffusers_config`).
    folder: output folder (created; existing files of these two names replaced).
    dtype: tensor dtype in the file (None: the parameters' dtype).
    sample_size: diffusers' tiling threshold recorded in the config.

  Returns:
    `folder` as a string.
  """
  from safetensors.numpy import save_file  # local: numpy-only
  folder = os.fspath(folder)
  cfg = diffusers_config(vae, sample_size=sample_size)
  tensors = diffusers_state_dict(vae, dtype=dtype)
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
  with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
    json.dump(cfg, fh, indent=2)
    fh.write("\n")
  return folder


def weights_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a weights file (provenance of a pretrained VAE in a run)."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
