"""AutoencoderKL-style VAE in Flax NNX (the diffusers architecture, NHWC).

Encoder: conv_in -> down blocks (ResNet blocks, a stride-2 downsampling
between levels) -> mid block (ResNet, single-head self-attention, ResNet) ->
GroupNorm/SiLU/conv_out -> quant_conv -> posterior `(mean, logvar)`.
Decoder: post_quant_conv -> conv_in -> mid block -> up blocks (ResNet
blocks, nearest x2 + conv between levels) -> GroupNorm/SiLU/conv_out.

`channels` are diffusers' `block_out_channels`: `len(channels) - 1`
downsamplings, so 64x64 RGB images with `channels=(32, 64, 64)` and
`latent_channels=4` give 16x16x4 latents. Module and attribute names mirror
diffusers' `AutoencoderKL`, which is what lets `load_diffusers_safetensors`
map a diffusers checkpoint (`diffusion_pytorch_model.safetensors`) onto the
model by name, with numpy only (no torch).

Diffusion latents follow the diffusers convention
`latents = (mean - shift_factor) * scaling_factor` (`scale_latents`) and
`decode(latents / scaling_factor + shift_factor)` (`unscale_latents`).

Images are `[B, H, W, 3]` in [-1, 1]; H and W divisible by
`2 ** (len(channels) - 1)`. Computation follows the dtype of the input and of
the parameters (cast them together for bf16).

Frozen use inside a jitted step: `graphdef, params = nnx.split(vae)` once and
pass `params` as an ARGUMENT (`nnx.merge(graphdef, params)` inside), never
close over them (they would be baked in as constants).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _groups(num_groups: int, channels: int) -> int:
  """Largest divisor of `channels` not above `num_groups` (32 for diffusers sizes)."""
  return math.gcd(int(num_groups), int(channels))


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1,
          pad: int | None = None) -> nnx.Conv:
  pad = k // 2 if pad is None else pad
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), rngs=rngs)


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv3x3 twice plus a (1x1 conv when channels change) skip."""

  def __init__(self, cin: int, cout: int, *, norm_groups: int, eps: float,
               rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=_groups(norm_groups, cin),
                               epsilon=eps, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=_groups(norm_groups, cout),
                               epsilon=eps, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a residual (diffusers' VAE mid block)."""

  def __init__(self, c: int, *, norm_groups: int, eps: float, rngs: nnx.Rngs):
    self.group_norm = nnx.GroupNorm(c, num_groups=_groups(norm_groups, c),
                                    epsilon=eps, rngs=rngs)
    self.to_q = nnx.Linear(c, c, rngs=rngs)
    self.to_k = nnx.Linear(c, c, rngs=rngs)
    self.to_v = nnx.Linear(c, c, rngs=rngs)
    self.to_out = nnx.List([nnx.Linear(c, c, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
    # Softmax in float32 even for bf16 inputs (h*w logits per row).
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", attn, v))
    return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Pad right/bottom by 1, conv3x3 stride 2 (diffusers Downsample2D, padding=0)."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, rngs, stride=2, pad=0)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then conv3x3 (diffusers Upsample2D)."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class DownBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, num_layers: int, downsample: bool,
               norm_groups: int, eps: float, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(cin if i == 0 else cout, cout, norm_groups=norm_groups,
                    eps=eps, rngs=rngs) for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample(cout, rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, num_layers: int, upsample: bool,
               norm_groups: int, eps: float, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(cin if i == 0 else cout, cout, norm_groups=norm_groups,
                    eps=eps, rngs=rngs) for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample(cout, rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class MidBlock(nnx.Module):

  def __init__(self, c: int, *, attention: bool, norm_groups: int, eps: float,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(c, c, norm_groups=norm_groups, eps=eps, rngs=rngs)
        for _ in range(2)])
    self.attentions = nnx.List(
        [Attention(c, norm_groups=norm_groups, eps=eps, rngs=rngs)]
        if attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for a in self.attentions:
      x = a(x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, *, in_channels: int, channels: Sequence[int],
               latent_channels: int, layers_per_block: int, norm_groups: int,
               mid_attention: bool, eps: float, rngs: nnx.Rngs):
    self.conv_in = _conv(in_channels, channels[0], 3, rngs)
    blocks, cin = [], channels[0]
    for i, cout in enumerate(channels):
      blocks.append(DownBlock(cin, cout, num_layers=layers_per_block,
                              downsample=i < len(channels) - 1,
                              norm_groups=norm_groups, eps=eps, rngs=rngs))
      cin = cout
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(channels[-1], attention=mid_attention,
                              norm_groups=norm_groups, eps=eps, rngs=rngs)
    self.conv_norm_out = nnx.GroupNorm(
        channels[-1], num_groups=_groups(norm_groups, channels[-1]), epsilon=eps,
        rngs=rngs)
    self.conv_out = _conv(channels[-1], 2 * latent_channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, *, out_channels: int, channels: Sequence[int],
               latent_channels: int, layers_per_block: int, norm_groups: int,
               mid_attention: bool, eps: float, rngs: nnx.Rngs):
    rev = list(reversed(channels))
    self.conv_in = _conv(latent_channels, rev[0], 3, rngs)
    self.mid_block = MidBlock(rev[0], attention=mid_attention,
                              norm_groups=norm_groups, eps=eps, rngs=rngs)
    blocks, cin = [], rev[0]
    for i, cout in enumerate(rev):
      blocks.append(UpBlock(cin, cout, num_layers=layers_per_block + 1,
                            upsample=i < len(rev) - 1, norm_groups=norm_groups,
                            eps=eps, rngs=rngs))
      cin = cout
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = nnx.GroupNorm(
        channels[0], num_groups=_groups(norm_groups, channels[0]), epsilon=eps,
        rngs=rngs)
    self.conv_out = _conv(channels[0], out_channels, 3, rngs)

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


class VAE(nnx.Module):
  """AutoencoderKL: `encode(x) -> (mean, logvar)`, `decode(z) -> x`.

  Args:
    channels: per-level widths (diffusers `block_out_channels`); there are
      `len(channels) - 1` stride-2 downsamplings.
    latent_channels: channels of the latent.
    in_channels: image channels (3).
    layers_per_block: ResNet blocks per encoder level (decoder: one more).
    norm_groups: GroupNorm groups (capped to a divisor of each width, so tiny
      widths work; diffusers sizes are multiples of 32 and use 32).
    mid_attention: self-attention in the mid blocks (diffusers: True).
    scaling_factor, shift_factor: diffusion latent scale/shift (see module doc).
    eps: GroupNorm epsilon (diffusers: 1e-6).
    rngs: `nnx.Rngs` for initialisation.

  Example:
    >>> vae = VAE(channels=(32, 64, 64), latent_channels=4, rngs=nnx.Rngs(0))
    >>> mean, logvar = vae.encode(jnp.zeros((2, 64, 64, 3)))   # [2,16,16,4]
    >>> vae.decode(mean).shape
    (2, 64, 64, 3)
  """

  def __init__(self, *, channels: Sequence[int] = (32, 64, 64),
               latent_channels: int = 4, in_channels: int = 3,
               layers_per_block: int = 1, norm_groups: int = 32,
               mid_attention: bool = True, scaling_factor: float = 1.0,
               shift_factor: float = 0.0, eps: float = 1e-6, rngs: nnx.Rngs):
    channels = tuple(channels)
    if not channels or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                           or c < 1 for c in channels):
      raise ValueError(f"channels must be a non-empty tuple of positive ints, got "
                       f"{channels!r}")
    for name, v in (("latent_channels", latent_channels), ("in_channels", in_channels),
                    ("layers_per_block", layers_per_block), ("norm_groups", norm_groups)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(scaling_factor, (int, float)) and scaling_factor > 0):
      raise ValueError(f"scaling_factor must be > 0, got {scaling_factor!r}")
    self.channels = tuple(int(c) for c in channels)
    self.latent_channels = int(latent_channels)
    self.in_channels = int(in_channels)
    self.scaling_factor = float(scaling_factor)
    self.shift_factor = float(shift_factor)
    kw = dict(channels=self.channels, latent_channels=self.latent_channels,
              layers_per_block=int(layers_per_block), norm_groups=int(norm_groups),
              mid_attention=bool(mid_attention), eps=float(eps), rngs=rngs)
    self.encoder = Encoder(in_channels=self.in_channels, **kw)
    self.decoder = Decoder(out_channels=self.in_channels, **kw)
    c2 = 2 * self.latent_channels
    self.quant_conv = _conv(c2, c2, 1, rngs)
    self.post_quant_conv = _conv(self.latent_channels, self.latent_channels, 1, rngs)

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

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images `[B, H, W, 3]` in [-1, 1] -> `(mean, logvar)` `[B, H/f, W/f, c]`."""
    self._check_images(x)
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw (unscaled) latents `[B, h, w, c]` -> images `[B, h*f, w*f, 3]`."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"z must be [B, h, w, {self.latent_channels}], got {z.shape}")
    return self.decoder(self.post_quant_conv(z))

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw latents -> diffusion latents `(z - shift) * scale`."""
    return (z - self.shift_factor) * self.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> raw latents `latents / scale + shift`."""
    return latents / self.scaling_factor + self.shift_factor

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> VAEOutput:
    """Reconstruction and KL for training (posterior sample when `key` is given).

    Args:
      x: images `[B, H, W, 3]` in [-1, 1].
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
# diffusers weights.

_ATTN_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v",
                 "proj_attn": "to_out.0"}


def _diffusers_name(path: tuple) -> str:
  """NNX state path -> diffusers tensor name (without the parameter suffix)."""
  return ".".join(str(p) for p in path[:-1])


def _to_flax(name: str, leaf: str, value: np.ndarray, shape: tuple) -> np.ndarray:
  """Converts one torch-layout tensor to the layout of the NNX parameter."""
  v = np.asarray(value, np.float32)
  if leaf == "kernel" and len(shape) == 4:       # conv [O, I, kh, kw] -> [kh, kw, I, O]
    v = v.transpose(2, 3, 1, 0)
  elif leaf == "kernel" and len(shape) == 2:     # linear [O, I] (or 1x1 conv) -> [I, O]
    v = v.reshape(v.shape[0], v.shape[1]).T
  if v.shape != tuple(shape):
    raise ValueError(f"{name}: checkpoint shape {value.shape} does not fit the "
                     f"model parameter {tuple(shape)}")
  return v


def load_diffusers_safetensors(model: VAE, path: str, *, strict: bool = True) -> VAE:
  """Loads a diffusers `AutoencoderKL` `.safetensors` file into `model` in place.

  Build `model` with the checkpoint's config (`channels` =
  `block_out_channels`, `latent_channels`, `layers_per_block`,
  `norm_num_groups`, `scaling_factor`, `shift_factor`). Old attention names
  (`query/key/value/proj_attn`) are accepted. numpy only: no torch.

  Args:
    model: the `VAE` to fill.
    path: file path of the safetensors checkpoint.
    strict: raise when a model parameter is missing from the file or the file
      holds tensors the model does not use.

  Returns:
    `model`, with every parameter replaced (float32, the model's layout).

  Raises:
    ValueError: missing/unexpected tensors (strict) or shape mismatches, naming
      the tensors.
  """
  from safetensors.numpy import load_file  # local: an optional dependency path

  tensors = load_file(str(path))
  for old, new in _ATTN_ALIASES.items():
    for k in list(tensors):
      parts = k.split(".")
      if "attentions" in parts and old in parts:
        parts[parts.index(old)] = new
        tensors[".".join(parts)] = tensors.pop(k)
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  used, missing, updates = set(), [], []
  for path_, var in flat:
    leaf = str(path_[-1])
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    name = f"{_diffusers_name(path_)}.{suffix}"
    if name not in tensors:
      missing.append(name)
      updates.append((path_, var))
      continue
    used.add(name)
    value = _to_flax(name, leaf, tensors[name], var.get_value().shape)
    updates.append((path_, var.replace(jnp.asarray(value, var.get_value().dtype))))
  unexpected = sorted(set(tensors) - used)
  if strict and (missing or unexpected):
    raise ValueError(f"checkpoint does not match the model: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected "
                     f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
  nnx.update(model, nnx.from_flat_state(updates))
  return model


def diffusers_state_dict(model: VAE) -> dict[str, np.ndarray]:
  """The inverse mapping: model parameters as diffusers-named torch-layout arrays."""
  out = {}
  for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    leaf = str(path_[-1])
    v = np.asarray(var.get_value(), np.float32)
    if leaf == "kernel" and v.ndim == 4:
      v = v.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and v.ndim == 2:
      v = v.T
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    out[f"{_diffusers_name(path_)}.{suffix}"] = np.ascontiguousarray(v)
  return out
