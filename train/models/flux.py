"""FLUX.1's flow transformer in Flax NNX: diffusers' `FluxTransformer2DModel`, scanned.

The same architecture, parameter names and call as diffusers'
`FluxTransformer2DModel` (models/transformers/transformer_flux.py), which is
the layout FLUX.1 [dev], [schnell] and Kontext [dev] ship in:

  model(hidden_states [B, N, in_channels], encoder_hidden_states [B, L, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], timestep [B], img_ids [N, 3],
        txt_ids [L, 3], guidance [B] or None) -> [B, N, patch_size**2 * out_channels]

- `x_embedder` / `context_embedder`: linear token embeddings of the image and
  text streams; `time_text_embed`: sinusoids (256, float32, cos first) of
  `1000 t` (and of `1000 guidance` when `guidance_embeds`) through two-layer
  SiLU MLPs, plus a projection of the pooled text embedding. As in diffusers,
  t and guidance are cast to the compute dtype before the factor 1000.
- `transformer_blocks` (double stream): joint attention over `[text, image]`
  with per-stream projections, RMSNorm (eps 1e-6) on q and k per head,
  adaLN-zero modulation `(shift, scale, gate) x 2` and a tanh-GELU MLP per
  stream.
- `single_transformer_blocks`: one stream `[text, image]`; attention and MLP
  in parallel from one adaLN-zero norm, `proj_out` over their concatenation.
- RoPE over the 3 id axes (`axes_dims_rope`, theta 10000): frequencies and
  angles in float64 for concrete ids (as diffusers), then float32; pairs are
  interleaved (`(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`).
- `norm_out` (AdaLayerNormContinuous: `(scale, shift)` order, no affine) and
  `proj_out`.

Each block stack is ONE module with parameters stacked `[depth, ...]` and
applied with `jax.lax.scan` (train/models/stacking.py): `remat` is the
per-block rematerialisation policy and `prepare_block={stack: fn}` lets a
sharded step all-gather one block at a time (train/step.py).

Parameters are float32 by default; a step casts them to its compute dtype
(bfloat16) together. Layer norms, RMS norms, the attention softmax and RoPE
are computed in float32 whatever the compute dtype.

Loading: `from_diffusers(folder)` reads a diffusers folder (a pipeline folder
with `transformer/`, or a transformer folder; one safetensors file or a
sharded set with its index) tensor by tensor into the target sharding, maps
every key or fails naming it, fills every parameter or fails naming it.
`save_diffusers(model, folder)` writes what diffusers' `from_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models import stacking
from train.models import vae as vae_lib

STACKS = ("transformer_blocks", "single_transformer_blocks")
CLASS_NAME = "FluxTransformer2DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
# The version of diffusers whose layout this mirrors (written into saved configs).
DIFFUSERS_VERSION = "0.42.1"
TIME_PROJ_DIM = 256  # Timesteps(num_channels=256) in diffusers' time_text_embed
MLP_RATIO = 4  # FeedForward(mult=4) and FluxSingleTransformerBlock(mlp_ratio=4.0)
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """The architecture: diffusers' `FluxTransformer2DModel` config fields, same names.

  FLUX.1 [dev] / Kontext [dev]: the defaults with `guidance_embeds=True`;
  [schnell]: `guidance_embeds=False`.
  """
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "FluxConfig":
    """The config from a diffusers `config.json` dict (unknown `_`-fields ignored).

    Raises:
      ValueError: naming `source` and the field that is not a FLUX transformer's
        or has the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
    if unknown:
      raise ValueError(f"{source}: fields {unknown} are not FluxTransformer2DModel's "
                       f"(known: {sorted(fields)})")
    cls_name = raw.get("_class_name", CLASS_NAME)
    if cls_name != CLASS_NAME:
      raise ValueError(f"{source}: _class_name is {cls_name!r}, not {CLASS_NAME!r}")
    kw: dict[str, Any] = {}
    for name, value in raw.items():
      if name.startswith("_"):
        continue
      if name == "axes_dims_rope":
        if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(d, int) and d > 0 and d % 2 == 0 for d in value)):
          raise ValueError(f"{source}: axes_dims_rope must be a list of positive even ints, "
                           f"got {value!r}")
        value = tuple(value)
      elif name == "guidance_embeds":
        if not isinstance(value, bool):
          raise ValueError(f"{source}: guidance_embeds must be a bool, got {value!r}")
      elif name == "out_channels" and value is None:
        pass
      elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
      kw[name] = value
    cfg = cls(**kw)
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
      raise ValueError(f"{source}: axes_dims_rope {list(cfg.axes_dims_rope)} sum to "
                       f"{sum(cfg.axes_dims_rope)}, not attention_head_dim="
                       f"{cfg.attention_head_dim}")
    return cfg

  def to_dict(self) -> dict[str, Any]:
    """diffusers' `config.json` content (what `save_pretrained` writes)."""
    d = dataclasses.asdict(self)
    d["axes_dims_rope"] = list(self.axes_dims_rope)
    return {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **d}

  def num_params(self) -> int:
    """Parameter count (elements), from the shapes alone."""
    return sum(math.prod(s) for s in tensor_shapes(self).values())


# ----------------------------------------------------------------------------
# Building blocks.


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters, eps 1e-6, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """torch.nn.RMSNorm(dim, eps=1e-6): `x / rms(x) * weight`, over the last axis, in float32."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(cin: int, cout: int, rngs: nnx.Rngs, param_dtype, *, bias: bool = True):
  return nnx.Linear(cin, cout, use_bias=bias, param_dtype=param_dtype, rngs=rngs)


def timestep_sinusoids(t: jax.Array, dim: int = TIME_PROJ_DIM) -> jax.Array:
  """diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.

  Args:
    t: `[B]` (already multiplied by 1000), any float dtype.
  Returns:
    float32 `[B, dim]`: `[cos(t f), sin(t f)]`, `f_k = 10000^(-k / (dim / 2))`.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nnx.Module):
  """diffusers' TimestepEmbedding / PixArtAlphaTextProjection(act='silu'): linear_2(silu(linear_1))."""

  def __init__(self, cin: int, dim: int, rngs: nnx.Rngs, param_dtype):
    self.linear_1 = _linear(cin, dim, rngs, param_dtype)
    self.linear_2 = _linear(dim, dim, rngs, param_dtype)

  def __call__(self, x):
    return self.linear_2(nnx.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """CombinedTimestep(Guidance)TextProjEmbeddings: the conditioning vector `temb [B, D]`."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, param_dtype):
    d = cfg.inner_dim
    self.timestep_embedder = MLPEmbedder(TIME_PROJ_DIM, d, rngs, param_dtype)
    if cfg.guidance_embeds:
      self.guidance_embedder = MLPEmbedder(TIME_PROJ_DIM, d, rngs, param_dtype)
    self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, d, rngs, param_dtype)

  def __call__(self, timestep, guidance, pooled):
    dtype = pooled.dtype
    emb = self.timestep_embedder(timestep_sinusoids(timestep).astype(dtype))
    if guidance is not None:
      emb = emb + self.guidance_embedder(timestep_sinusoids(guidance).astype(dtype))
    return emb + self.text_embedder(pooled)


def rope_tables(ids, axes_dims: Sequence[int], *, theta: float = 10000.0):
  """FluxPosEmbed: `(cos, sin)` float32 `[S, sum(axes_dims)]` for position ids `[S, n_axes]`.

  Axis i contributes `axes_dims[i]` columns: angles `pos_i * theta^(-2k/d_i)`,
  each repeated twice (interleaved pairs). Concrete ids (numpy, or a concrete
  jax array) are computed in float64 as diffusers does; traced ids in float32.
  """
  if len(axes_dims) != np.shape(ids)[-1]:
    raise ValueError(f"ids: {np.shape(ids)[-1]} columns but axes_dims_rope has "
                     f"{len(axes_dims)} axes")
  try:
    pos = np.asarray(ids, np.float64)  # concrete: float64, as diffusers
    xp, dt = np, np.float64
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    pos, xp, dt = jnp.asarray(ids, jnp.float32), jnp, jnp.float32
  cos, sin = [], []
  for i, d in enumerate(axes_dims):
    freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = pos[:, i:i + 1] * xp.asarray(freqs.astype(dt))[None]
    cos.append(xp.repeat(xp.cos(angles), 2, axis=1))
    sin.append(xp.repeat(xp.sin(angles), 2, axis=1))
  return (jnp.asarray(xp.concatenate(cos, axis=1), jnp.float32),
          jnp.asarray(xp.concatenate(sin, axis=1), jnp.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of `x [B, S, heads, head_dim]` by the tables `[S, head_dim]` (float32)."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


def _attention(q, k, v):
  """Softmax attention `[B, S, heads, head_dim]`; logits and softmax in float32."""
  return jax.nn.dot_product_attention(q, k, v).astype(q.dtype)


class AdaNorm(nnx.Module):
  """The modulation linear of AdaLayerNormZero(Single)/AdaLayerNormContinuous: `linear(silu(temb))`."""

  def __init__(self, dim: int, chunks: int, rngs: nnx.Rngs, param_dtype):
    self.linear = _linear(dim, chunks * dim, rngs, param_dtype)
    self.chunks = chunks

  def __call__(self, temb):
    return jnp.split(self.linear(nnx.silu(temb))[:, None], self.chunks, axis=-1)


class FeedForward(nnx.Module):
  """diffusers FeedForward(dim, activation_fn='gelu-approximate'): `net.2(gelu_tanh(net.0.proj(x)))`."""

  def __init__(self, dim: int, rngs: nnx.Rngs, param_dtype):
    self.net_0_proj = _linear(dim, MLP_RATIO * dim, rngs, param_dtype)
    self.net_2 = _linear(MLP_RATIO * dim, dim, rngs, param_dtype)

  def __call__(self, x):
    return self.net_2(jax.nn.gelu(self.net_0_proj(x), approximate=True))


class Attention(nnx.Module):
  """FluxAttention: q/k/v projections with per-head RMSNorm; the text stream's own ones if `joint`."""

  def __init__(self, cfg: FluxConfig, *, joint: bool, rngs: nnx.Rngs, param_dtype):
    d, hd = cfg.inner_dim, cfg.attention_head_dim
    self.heads, self.head_dim = cfg.num_attention_heads, hd
    self.to_q = _linear(d, d, rngs, param_dtype)
    self.to_k = _linear(d, d, rngs, param_dtype)
    self.to_v = _linear(d, d, rngs, param_dtype)
    self.norm_q = RMSNorm(hd, param_dtype=param_dtype)
    self.norm_k = RMSNorm(hd, param_dtype=param_dtype)
    if joint:
      self.add_q_proj = _linear(d, d, rngs, param_dtype)
      self.add_k_proj = _linear(d, d, rngs, param_dtype)
      self.add_v_proj = _linear(d, d, rngs, param_dtype)
      self.norm_added_q = RMSNorm(hd, param_dtype=param_dtype)
      self.norm_added_k = RMSNorm(hd, param_dtype=param_dtype)
      self.to_out = _linear(d, d, rngs, param_dtype)
      self.to_add_out = _linear(d, d, rngs, param_dtype)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

  def qkv(self, x, *, text: bool = False):
    """Per-head `(q, k, v)` `[B, S, heads, head_dim]` of one stream, q and k RMS-normed."""
    if text:
      q, k, v = self.add_q_proj(x), self.add_k_proj(x), self.add_v_proj(x)
      return self.norm_added_q(self._heads(q)), self.norm_added_k(self._heads(k)), self._heads(v)
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    return self.norm_q(self._heads(q)), self.norm_k(self._heads(k)), self._heads(v)


def _rope_attention(q, k, v, rope):
  cos, sin = rope
  out = _attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
  return out.reshape(*out.shape[:2], -1)


class DoubleBlock(nnx.Module):
  """FluxTransformerBlock: joint attention over [text, image], separate modulation and MLPs."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, param_dtype):
    d = cfg.inner_dim
    self.norm1 = AdaNorm(d, 6, rngs, param_dtype)
    self.norm1_context = AdaNorm(d, 6, rngs, param_dtype)
    self.attn = Attention(cfg, joint=True, rngs=rngs, param_dtype=param_dtype)
    self.ff = FeedForward(d, rngs, param_dtype)
    self.ff_context = FeedForward(d, rngs, param_dtype)

  def __call__(self, carry, temb, rope):
    txt, img = carry
    shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)
    c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
    q, k, v = self.attn.qkv(_layer_norm(img) * (1 + scale) + shift)
    cq, ck, cv = self.attn.qkv(_layer_norm(txt) * (1 + c_scale) + c_shift, text=True)
    out = _rope_attention(jnp.concatenate([cq, q], 1), jnp.concatenate([ck, k], 1),
                          jnp.concatenate([cv, v], 1), rope)
    txt_attn, img_attn = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
    img = img + gate * self.attn.to_out(img_attn)
    img = img + gate2 * self.ff(_layer_norm(img) * (1 + scale2) + shift2)
    txt = txt + c_gate * self.attn.to_add_out(txt_attn)
    txt = txt + c_gate2 * self.ff_context(_layer_norm(txt) * (1 + c_scale2) + c_shift2)
    return txt, img


class SingleBlock(nnx.Module):
  """FluxSingleTransformerBlock: parallel attention + MLP over [text, image], one `proj_out`."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, param_dtype):
    d = cfg.inner_dim
    self.norm = AdaNorm(d, 3, rngs, param_dtype)
    self.proj_mlp = _linear(d, MLP_RATIO * d, rngs, param_dtype)
    self.proj_out = _linear(d + MLP_RATIO * d, d, rngs, param_dtype)
    self.attn = Attention(cfg, joint=False, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x, temb, rope):
    shift, scale, gate = self.norm(temb)
    h = _layer_norm(x) * (1 + scale) + shift
    mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
    attn = _rope_attention(*self.attn.qkv(h), rope)
    return x + gate * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))


class FluxTransformer(nnx.Module):
  """diffusers' `FluxTransformer2DModel`, with both block stacks stacked and scanned.

  Args:
    config: the architecture (`FluxConfig`, diffusers' config fields).
    remat: per-block rematerialisation policy (`stacking.REMAT_POLICIES`).
    param_dtype: parameter storage dtype (float32: master weights).
    rngs: parameter initialisation (random weights; `from_diffusers` loads real ones).
  """

  def __init__(self, config: FluxConfig, *, remat: str = "none", param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    stacking.remat_block(lambda: None, remat)  # validates the policy name
    cfg = config
    self.config = cfg
    self.remat = remat
    d = cfg.inner_dim
    self.x_embedder = _linear(cfg.in_channels, d, rngs, param_dtype)
    self.context_embedder = _linear(cfg.joint_attention_dim, d, rngs, param_dtype)
    self.time_text_embed = TimeTextEmbed(cfg, rngs, param_dtype)
    self.transformer_blocks = stacking.stack_init(
        lambda r: DoubleBlock(cfg, r, param_dtype), cfg.num_layers, rngs)
    self.single_transformer_blocks = stacking.stack_init(
        lambda r: SingleBlock(cfg, r, param_dtype), cfg.num_single_layers, rngs)
    self.norm_out = AdaNorm(d, 2, rngs, param_dtype)
    self.proj_out = _linear(d, cfg.patch_size ** 2 * cfg.output_channels, rngs, param_dtype)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, timestep: jax.Array, img_ids, txt_ids,
               guidance: jax.Array | None = None, *,
               prepare_block: Mapping[str, Callable] | None = None) -> jax.Array:
    """The velocity (FLUX's "noise_pred") of the image tokens.

    Args:
      hidden_states: `[B, N, in_channels]` packed latent tokens (target, then
        any condition tokens); their dtype is the compute dtype.
      encoder_hidden_states: `[B, L, joint_attention_dim]` text embeddings (T5).
      pooled_projections: `[B, pooled_projection_dim]` pooled text embedding (CLIP).
      timestep: `[B]` flow time t in [0, 1] (multiplied by 1000 inside).
      img_ids: `[N, 3]` position ids of the image tokens.
      txt_ids: `[L, 3]` position ids of the text tokens (zeros for FLUX.1).
      guidance: `[B]` guidance scale for `guidance_embeds` models (e.g. 3.5),
        None otherwise.
      prepare_block: optional `{stack name: fn}` (`STACKS`): `fn(params)`
        maps one block's parameters inside the scan body (a sharded step
        all-gathers them there).

    Returns:
      `[B, N, patch_size**2 * out_channels]`, the compute dtype.
    """
    cfg = self.config
    b, n, c = hidden_states.shape
    if c != cfg.in_channels:
      raise ValueError(f"hidden_states: expected [B, N, {cfg.in_channels}], got "
                       f"{hidden_states.shape}")
    l = encoder_hidden_states.shape[1]
    if encoder_hidden_states.shape != (b, l, cfg.joint_attention_dim):
      raise ValueError(f"encoder_hidden_states: expected [{b}, L, {cfg.joint_attention_dim}], "
                       f"got {encoder_hidden_states.shape}")
    if pooled_projections.shape != (b, cfg.pooled_projection_dim):
      raise ValueError(f"pooled_projections: expected [{b}, {cfg.pooled_projection_dim}], got "
                       f"{pooled_projections.shape}")
    if timestep.shape != (b,):
      raise ValueError(f"timestep: expected [{b}], got {timestep.shape}")
    if np.shape(img_ids) != (n, len(cfg.axes_dims_rope)):
      raise ValueError(f"img_ids: expected [{n}, {len(cfg.axes_dims_rope)}], got "
                       f"{np.shape(img_ids)}")
    if np.shape(txt_ids) != (l, len(cfg.axes_dims_rope)):
      raise ValueError(f"txt_ids: expected [{l}, {len(cfg.axes_dims_rope)}], got "
                       f"{np.shape(txt_ids)}")
    if cfg.guidance_embeds and guidance is None:
      raise ValueError("guidance: this model has guidance_embeds=True ([dev], Kontext): pass "
                       "guidance [B] (e.g. 3.5)")
    if not cfg.guidance_embeds and guidance is not None:
      raise ValueError("guidance: this model has guidance_embeds=False ([schnell]): pass "
                       "guidance=None")
    if guidance is not None and guidance.shape != (b,):
      raise ValueError(f"guidance: expected [{b}], got {guidance.shape}")
    prepare = dict(prepare_block or {})

    img = self.x_embedder(hidden_states)
    dtype = img.dtype
    timestep = timestep.astype(dtype) * 1000
    guidance = None if guidance is None else guidance.astype(dtype) * 1000
    temb = self.time_text_embed(timestep, guidance, pooled_projections.astype(dtype))
    txt = self.context_embedder(encoder_hidden_states.astype(dtype))
    ids = (np.concatenate([np.asarray(txt_ids), np.asarray(img_ids)])
           if _concrete(txt_ids) and _concrete(img_ids)
           else jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)]))
    rope = rope_tables(ids, cfg.axes_dims_rope)

    txt, img = stacking.scan(
        self.transformer_blocks, (txt, img), lambda blk, c: blk(c, temb, rope),
        remat=self.remat, prepare_block=prepare.get("transformer_blocks"))
    x = stacking.scan(
        self.single_transformer_blocks, jnp.concatenate([txt, img], axis=1),
        lambda blk, c: blk(c, temb, rope), remat=self.remat,
        prepare_block=prepare.get("single_transformer_blocks"))
    img = x[:, l:]
    scale, shift = self.norm_out(temb)
    return self.proj_out(_layer_norm(img) * (1 + scale) + shift)


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def latent_image_ids(h: int, w: int, *, index: int = 0) -> np.ndarray:
  """FLUX's image position ids `[h * w, 3]` of an `h x w` token grid: `(index, row, column)`.

  `index=0` for the generated image, `index=1` for a Kontext condition image
  (diffusers' `_prepare_latent_image_ids`, then `image_ids[..., 0] = 1`).
  """
  ids = np.zeros((h, w, 3), np.float32)
  ids[..., 0] = index
  ids[..., 1] = np.arange(h, dtype=np.float32)[:, None]
  ids[..., 2] = np.arange(w, dtype=np.float32)[None, :]
  return ids.reshape(h * w, 3)


# ----------------------------------------------------------------------------
# diffusers names, shapes and files.

# Our module attribute -> diffusers module name, where they differ.
RENAMES = {"to_out": "to_out.0", "net_0_proj": "net.0.proj", "net_2": "net.2"}
_SUFFIX = {"kernel": "weight", "bias": "bias", "weight": "weight"}


def diffusers_names(path: Sequence[Any], depth: int | None = None) -> list[str]:
  """diffusers tensor names of the parameter at NNX `path` (one per block for a stack)."""
  parts = [str(p) for p in path]
  body = ".".join(RENAMES.get(p, p) for p in parts[:-1]) + "." + _SUFFIX[parts[-1]]
  if parts[0] in STACKS:
    rest = body[len(parts[0]) + 1:]
    return [f"{parts[0]}.{i}.{rest}" for i in range(depth)]
  return [body]


def _torch_shape(leaf: str, shape: Sequence[int]) -> tuple[int, ...]:
  """torch shape of one parameter (one block) whose NNX shape is `shape`."""
  return tuple(shape[::-1]) if leaf == "kernel" else tuple(shape)


def _abstract_model(cfg: FluxConfig, *, remat: str = "none", param_dtype=jnp.float32):
  return nnx.eval_shape(lambda: FluxTransformer(cfg, remat=remat, param_dtype=param_dtype,
                                                rngs=nnx.Rngs(0)))


def _param_table(cfg: FluxConfig) -> list[tuple[tuple, str, tuple, list[str]]]:
  """`(nnx path, leaf, per-block torch shape, diffusers names)` of every parameter."""
  depth = {"transformer_blocks": cfg.num_layers,
           "single_transformer_blocks": cfg.num_single_layers}
  table = []
  for path, var in nnx.to_flat_state(nnx.state(_abstract_model(cfg), nnx.Param)):
    shape = tuple(var.get_value().shape)
    stacked = str(path[0]) in STACKS
    leaf = str(path[-1])
    table.append((tuple(path), leaf, _torch_shape(leaf, shape[1:] if stacked else shape),
                  diffusers_names(path, depth.get(str(path[0])))))
  return table


def tensor_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
  """diffusers tensor name -> torch shape, for every tensor of the model."""
  return {name: shape for _, _, shape, names in _param_table(cfg) for name in names}


@dataclasses.dataclass(frozen=True)
class FluxCheckpoint:
  """A located diffusers transformer: its folder, config and weight files.

  Attributes:
    folder: the transformer folder (`transformer/` of a pipeline folder).
    config: config.json's content.
    files: the safetensors files, in shard order (one, or a sharded set).
    index: tensor name -> file, from the index (None for one file).
  """
  folder: str
  config: dict
  files: tuple[str, ...]
  index: dict | None


def locate(path: str | os.PathLike) -> FluxCheckpoint:
  """Finds the config and weights of a diffusers FLUX transformer (reads JSON only).

  Args:
    path: a diffusers pipeline folder (its `transformer/` is read) or a
      transformer folder (`config.json` + `diffusion_pytorch_model.safetensors`,
      or a sharded set with `diffusion_pytorch_model.safetensors.index.json`).

  Raises:
    FileNotFoundError / ValueError naming `path` and what is missing.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"path {path!r} is not a folder (a diffusers FLUX pipeline or "
                            "transformer folder)")
  folder = path
  if (not os.path.isfile(os.path.join(folder, CONFIG_NAME))
      and os.path.isfile(os.path.join(folder, "transformer", CONFIG_NAME))):
    folder = os.path.join(folder, "transformer")
  cfg_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"path {path!r}: no {CONFIG_NAME} in it or in its transformer/ "
                            "subfolder; is it a diffusers FLUX pipeline or transformer folder?")
  with open(cfg_path) as fh:
    try:
      config = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"path {path!r}: {cfg_path} is not valid JSON: {e}") from None
  single, index_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, INDEX_NAME)
  if os.path.isfile(single):
    return FluxCheckpoint(folder, config, (single,), None)
  if os.path.isfile(index_path):
    with open(index_path) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"path {path!r}: {index_path} has no weight_map")
    files = tuple(os.path.join(folder, f) for f in sorted(set(weight_map.values())))
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"path {path!r}: {index_path} names {os.path.basename(f)}, "
                                "which is missing")
    return FluxCheckpoint(folder, config, files,
                          {k: os.path.join(folder, v) for k, v in weight_map.items()})
  found = sorted(f for f in os.listdir(folder) if "safetensors" in f or f.endswith(".bin"))
  raise FileNotFoundError(f"path {path!r}: no {WEIGHTS_NAME} or {INDEX_NAME} in {folder!r} "
                          f"(found {found}); torch .bin weights are not read")


def read_config(path: str | os.PathLike) -> FluxConfig:
  """The `FluxConfig` of a diffusers folder (no weights read)."""
  ckpt = locate(path)
  return FluxConfig.from_dict(ckpt.config, source=os.path.join(ckpt.folder, CONFIG_NAME))


class _Tensors:
  """Lazily opened safetensors files of a checkpoint: shapes, and slices read on demand."""

  def __init__(self, ckpt: FluxCheckpoint):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._handles = [safe_open(f, framework="np") for f in ckpt.files]
    self.where: dict[str, Any] = {}
    for f, h in zip(ckpt.files, self._handles):
      for name in h.keys():
        if ckpt.index is not None and ckpt.index.get(name) not in (None, f):
          raise ValueError(f"checkpoint {ckpt.folder!r}: tensor {name!r} is in "
                           f"{os.path.basename(f)} but the index names "
                           f"{os.path.basename(ckpt.index[name])}")
        self.where[name] = h
    if ckpt.index is not None:
      missing = sorted(set(ckpt.index) - set(self.where))
      if missing:
        raise ValueError(f"checkpoint {ckpt.folder!r}: the index names tensors that no file "
                         f"holds: {missing[:4]}")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.where[name].get_slice(name).get_shape())

  def read(self, name: str, index: tuple) -> np.ndarray:
    return self.where[name].get_slice(name)[index]


def _shard_reader(tensors: _Tensors, names: list[str], leaf: str, stacked: bool, dtype):
  """`callback(index) -> numpy shard` of one parameter for `jax.make_array_from_callback`.

  Reads only the slice of each file tensor that the shard needs; kernels are
  read in torch layout `[out, in]` and transposed to `[in, out]`.
  """
  np_dtype = np.dtype(jnp.dtype(dtype))

  def one(name, idx):
    if leaf == "kernel":
      return np.asarray(tensors.read(name, tuple(idx[::-1]))).T
    return np.asarray(tensors.read(name, tuple(idx)))

  def callback(index):
    index = tuple(index)
    if stacked:
      blocks = range(len(names))[index[0]]
      out = np.stack([one(names[i], index[1:]) for i in blocks])
    else:
      out = one(names[0], index)
    return np.ascontiguousarray(out.astype(np_dtype))

  return callback


def from_diffusers(path: str | os.PathLike, *, dtype=jnp.float32, remat: str = "none",
                   shardings: Any = None) -> FluxTransformer:
  """Builds a `FluxTransformer` from a diffusers folder and loads its weights, tensor by tensor.

  Every tensor in the files must map to a parameter, and every parameter
  must be filled (each with the right shape), or the load fails naming it:
  nothing is ever zero-filled or left at a random value. The model is built
  abstractly (no random initialisation), then each parameter is created with
  `jax.make_array_from_callback` directly in its target sharding, each
  device's shard read from the memory-mapped files: a sharded model is never
  whole on one device, and the host holds at most one parameter's shards
  beyond the page cache of the files (FLUX.1's largest parameter, the single
  stack's `proj_out` kernel, 38 x 15360 x 3072, is 6.7 GiB in float32, 3.3 GiB
  in bf16; `benchmarks/bench_flux_load.py` measures the peak).

  Args:
    path: a pipeline folder (reads `transformer/`) or a transformer folder
      (see `locate`).
    dtype: parameter dtype: float32 (the default, exactly the file's values,
      bf16 -> f32 being exact) or bfloat16.
    remat: the model's per-block remat policy.
    shardings: None (the default device), one `jax.sharding.Sharding` for
      every parameter, or a pytree of them matching
      `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (e.g. the trainer's fsdp
      layout from `train.sharding.state_shardings`).

  Returns:
    the model.

  Raises:
    ValueError / FileNotFoundError naming the path, tensor or parameter.
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
  ckpt = locate(path)
  cfg = FluxConfig.from_dict(ckpt.config, source=os.path.join(ckpt.folder, CONFIG_NAME))
  graphdef, abstract = nnx.split(_abstract_model(cfg, remat=remat, param_dtype=dtype))
  tensors = _Tensors(ckpt)
  flat_shardings = _flat_shardings(shardings)
  used: set[str] = set()
  updates = []
  for (path_, leaf, torch_shape, names), (p2, var) in zip(
      _param_table(cfg), nnx.to_flat_state(abstract)):
    assert tuple(path_) == tuple(p2)
    for name in names:
      if name not in tensors.where:
        raise ValueError(f"checkpoint {ckpt.folder!r}: no tensor {name!r} for parameter "
                         f"{'/'.join(map(str, path_))}; does config.json describe these "
                         "weights?")
      got = tensors.shape(name)
      if got != torch_shape:
        raise ValueError(f"checkpoint {ckpt.folder!r}: tensor {name!r} has shape {got}, the "
                         f"model needs {torch_shape}; does config.json describe these weights?")
      used.add(name)
    shape = tuple(var.get_value().shape)
    sharding = flat_shardings(path_)
    arr = jax.make_array_from_callback(
        shape, sharding, _shard_reader(tensors, names, leaf, str(path_[0]) in STACKS, dtype))
    updates.append((path_, var.replace(arr)))
  unmapped = sorted(set(tensors.where) - used)
  if unmapped:
    raise ValueError(f"checkpoint {ckpt.folder!r}: tensors {unmapped[:8]} "
                     f"({len(unmapped)} in all) map to no parameter of "
                     f"FluxTransformer2DModel({cfg}); nothing was loaded")
  return nnx.merge(graphdef, nnx.from_flat_state(updates))


def _flat_shardings(shardings):
  """`path -> Sharding` from None, one Sharding, or a pure-dict pytree of them."""
  if shardings is None:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return lambda path: default
  if isinstance(shardings, jax.sharding.Sharding):
    return lambda path: shardings

  def lookup(path):
    node = shardings
    for p in path:
      key = p if p in node else str(p)
      if key not in node:
        raise ValueError(f"shardings: no entry for parameter {'/'.join(map(str, path))}")
      node = node[key]
    return node

  return lookup


def diffusers_tensors(params: Mapping, cfg: FluxConfig, *, dtype=None):
  """Yields `(diffusers name, numpy array in torch layout)` for every tensor, block by block.

  Args:
    params: the model's parameters as a pure dict (`nnx.state(model,
      nnx.Param)` as a pure dict, arrays on any devices of this process, or
      numpy).
    cfg: the architecture.
    dtype: tensor dtype (None: each parameter's own).
  """
  for path_, leaf, _, names in _param_table(cfg):
    node = params
    for p in path_:
      node = node[p] if p in node else node[str(p)]
    value = to_host(node)
    target = value.dtype if dtype is None else np.dtype(jnp.dtype(dtype))
    blocks = list(value) if str(path_[0]) in STACKS else [value]
    for name, v in zip(names, blocks):
      v = v.T if leaf == "kernel" else v
      yield name, np.ascontiguousarray(v.astype(target))


def to_host(x) -> np.ndarray:
  """A parameter as one numpy array on this host.

  A sharded array spanning several processes is all-gathered over them (a
  collective: every process must call this for it); a replicated one is
  read from a local copy.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def weights_sha256(files: Sequence[str]) -> str:
  """Hex sha256 of the weights: of the file's bytes, or for a sharded set of each file's in order.

  One file: its own sha256 (what `sha256sum` prints). Several: the sha256 of
  their sha256s concatenated as text, in the given (shard) order.
  """
  digests = [vae_lib.weights_sha256(path) for path in files]
  if len(digests) == 1:
    return digests[0]
  return hashlib.sha256("".join(digests).encode()).hexdigest()


def save_diffusers(model_or_params, folder: str | os.PathLike, *, config: FluxConfig | None = None,
                   dtype=None, max_shard_bytes: int = 10 * 2**30) -> str:
  """Writes a diffusers `FluxTransformer2DModel` folder that `from_pretrained` reads back exactly.

  `config.json` (diffusers' format) and `diffusion_pytorch_model.safetensors`,
  or, above `max_shard_bytes`, numbered shards with
  `diffusion_pytorch_model.safetensors.index.json`, as `save_pretrained` does.
  Host memory: one file shard's tensors at a time.

  Args:
    model_or_params: a `FluxTransformer`, or its parameters as a pure dict
      (then `config` is required).
    folder: output folder (created).
    config: the architecture (None: the model's).
    dtype: tensor dtype in the files (None: the parameters' own).
    max_shard_bytes: the largest file; more is split into shards.

  Returns:
    `folder` as a string.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if isinstance(model_or_params, FluxTransformer):
    cfg = config or model_or_params.config
    params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  else:
    if config is None:
      raise ValueError("config: required when saving a parameter dict")
    cfg, params = config, model_or_params
  folder = os.fspath(folder)
  write = jax.process_index() == 0  # every process gathers (to_host); process 0 writes
  if write:
    os.makedirs(folder, exist_ok=True)
  # The shard plan comes from the shapes, so that each shard is written as soon
  # as its tensors are fetched (its file name needs the shard count).
  itemsize = (np.dtype(jnp.dtype(dtype)).itemsize if dtype is not None
              else max(np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))
  plan: list[list[str]] = [[]]
  size = 0
  for name, shape in tensor_shapes(cfg).items():
    nbytes = math.prod(shape) * itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(name)
    size += nbytes
  for f in os.listdir(folder) if write else ():  # stale weights of an earlier save
    if f.startswith("diffusion_pytorch_model") and "safetensors" in f:
      os.remove(os.path.join(folder, f))
  fname = lambda i: (WEIGHTS_NAME if len(plan) == 1 else
                     f"diffusion_pytorch_model-{i + 1:05d}-of-{len(plan):05d}.safetensors")
  shard_of = {name: i for i, names in enumerate(plan) for name in names}
  pending: dict[int, dict[str, np.ndarray]] = {}
  weight_map, total = {}, 0
  for name, value in diffusers_tensors(params, cfg, dtype=dtype):
    i = shard_of[name]
    pending.setdefault(i, {})[name] = value
    if len(pending[i]) == len(plan[i]):
      tensors = pending.pop(i)
      if write:
        save_file(tensors, os.path.join(folder, fname(i)))
    weight_map[name] = fname(i)
    total += value.nbytes
  if not write:
    return folder
  if len(plan) > 1:
    with open(os.path.join(folder, INDEX_NAME), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
    json.dump(cfg.to_dict(), fh, indent=2)
    fh.write("\n")
  return folder
