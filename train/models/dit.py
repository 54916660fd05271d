"""A small DiT velocity model over VAE latent tokens, for super-resolution.

Input: the noisy latent `x_t` `[B, h, w, c]`, the flow time `t` `[B]` in [0, 1]
and the low-resolution image `[B, hl, wl, 3]` in [-1, 1]. The low-resolution
image is resized to the latent grid and patchified with the same patch size, so
each token sees its own noisy latent patch and the matching low-resolution
patch; `t` enters through adaptive LayerNorm (scale/shift/gate per block,
zero-initialised gates: every block starts as the identity, as in DiT).

Output: the velocity `v_pred` `[B, h, w, c]`, same shape and dtype as `x_t`.

The `depth` blocks are ONE `Block` module whose parameters are stacked
`[depth, ...]` (`DiT.blocks`), applied with `jax.lax.scan`: the compiled
program holds one block whatever the depth, and each scan iteration is where
a sharded run gathers that block's parameters (`prepare_block`, see
train/step.py). `remat` picks what the backward pass recomputes per block:
'none' (keep every activation), 'full' (keep only the block inputs,
recompute the rest, gathers included) or 'dots_saveable' (keep the matmul
outputs, recompute the elementwise ops). Saved model folders keep the
per-block layout (`blocks.<i>.<name>`, as before the blocks were stacked):
`save_pretrained` unstacks, `load_pretrained` stacks.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssim_jax import flow
from train.models import stacking

REMAT_POLICIES = stacking.REMAT_POLICIES
remat_block = stacking.remat_block
STACKED = "blocks"  # params key of the stacked [depth, ...] block parameters (sharding.STACKED)


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 1e4) -> jax.Array:
  """Sinusoidal embedding of `t` `[B]` (scaled by 1000, as in DiT) -> `[B, dim]`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _pos_embedding_2d(gh: int, gw: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding `[gh*gw, dim]` (a constant, not a Param)."""
  def one_d(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  yy, xx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  emb = np.concatenate([one_d(yy, dim // 2), one_d(xx, dim // 2)], axis=1)
  return emb.astype(np.float32)


class Block(nnx.Module):
  """Pre-norm transformer block with adaLN-zero modulation from the time embedding."""

  def __init__(self, hidden: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=hidden,
                                       decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, rngs=rngs)
    self.mlp1 = nnx.Linear(hidden, hidden * mlp_ratio, rngs=rngs)
    self.mlp2 = nnx.Linear(hidden * mlp_ratio, hidden, rngs=rngs)
    # Zero init: shift = scale = gate = 0, so the block is the identity at init.
    self.ada = nnx.Linear(hidden, 6 * hidden, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    s1, b1, g1, s2, b2, g2 = jnp.split(self.ada(nnx.silu(c))[:, None], 6, axis=-1)
    h = self.norm1(x) * (1 + s1) + b1
    x = x + g1 * self.attn(h)
    h = self.norm2(x) * (1 + s2) + b2
    x = x + g2 * self.mlp2(nnx.gelu(self.mlp1(h)))
    return x


class DiT(nnx.Module):
  """Velocity model `v = DiT(x_t, t, lowres)` over latent tokens.

  Args:
    latent_channels: channels `c` of the VAE latent.
    patch_size: latent pixels per token side.
    hidden_size, depth, num_heads, mlp_ratio: transformer size.
    remat: per-block rematerialisation policy (`REMAT_POLICIES`).
    rngs: parameter initialisation.
  """

  def __init__(self, *, latent_channels: int, patch_size: int, hidden_size: int,
               depth: int, num_heads: int, mlp_ratio: int, remat: str = "none",
               rngs: nnx.Rngs):
    remat_block(lambda: None, remat)  # validates the policy name
    self.latent_channels = latent_channels
    self.patch_size = patch_size
    self.hidden_size = hidden_size
    self.remat = remat
    token_dim = patch_size * patch_size * latent_channels
    cond_dim = patch_size * patch_size * 3
    self.embed = nnx.Linear(token_dim + cond_dim, hidden_size, rngs=rngs)
    self.t_mlp1 = nnx.Linear(hidden_size, hidden_size, rngs=rngs)
    self.t_mlp2 = nnx.Linear(hidden_size, hidden_size, rngs=rngs)
    # Initialised one by one (the same numbers as the per-block layout had),
    # then stacked into one Block whose every parameter is [depth, ...].
    self.blocks = stacking.stack([Block(hidden_size, num_heads, mlp_ratio, rngs=rngs)
                                  for _ in range(depth)])
    self.final_norm = nnx.LayerNorm(hidden_size, use_scale=False, use_bias=False, rngs=rngs)
    self.final_ada = nnx.Linear(hidden_size, 2 * hidden_size,
                                kernel_init=nnx.initializers.zeros, rngs=rngs)
    # Zero output layer: v_pred = 0 at init (a stable start for flow matching).
    self.out = nnx.Linear(hidden_size, token_dim, kernel_init=nnx.initializers.zeros,
                          rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, lowres: jax.Array, *,
               prepare_block=None) -> jax.Array:
    """Args: x_t `[B,h,w,c]`, t `[B]`, lowres `[B,hl,wl,3]`. Returns v_pred `[B,h,w,c]`.

    `prepare_block(params) -> params`, if given, maps one block's parameters
    (a pure dict, the stacked ones without their depth axis) inside the scan
    body before the block runs: a sharded step all-gathers them there, so
    only the running block is ever whole (and, under remat, it is gathered
    again in the backward pass).
    """
    b, h, w, c = x_t.shape
    if c != self.latent_channels:
      raise ValueError(f"x_t: expected {self.latent_channels} channels, got shape {x_t.shape}")
    if t.shape != (b,):
      raise ValueError(f"t: expected shape ({b},), got {t.shape}")
    if lowres.ndim != 4 or lowres.shape[0] != b or lowres.shape[-1] != 3:
      raise ValueError(f"lowres: expected [{b}, hl, wl, 3], got {lowres.shape}")
    p = self.patch_size
    dtype = x_t.dtype
    cond = jax.image.resize(lowres.astype(dtype), (b, h, w, 3), method="bilinear")
    tok = flow.patchify(x_t, patch_size=p)  # [B, T, p*p*c]
    ctok = flow.patchify(cond, patch_size=p)  # [B, T, p*p*3]
    x = self.embed(jnp.concatenate([tok, ctok], axis=-1))
    x = x + jnp.asarray(_pos_embedding_2d(h // p, w // p, self.hidden_size), dtype)[None]
    temb = timestep_embedding(t, self.hidden_size).astype(dtype)
    temb = self.t_mlp2(nnx.silu(self.t_mlp1(temb)))
    x = stacking.scan(self.blocks, x, lambda block, x: block(x, temb), remat=self.remat,
                      prepare_block=prepare_block)
    shift, scale = jnp.split(self.final_ada(nnx.silu(temb))[:, None], 2, axis=-1)
    x = self.final_norm(x) * (1 + scale) + shift
    v = self.out(x)
    return flow.unpatchify(v, grid_hw=(h // p, w // p), patch_size=p).astype(dtype)


# ----------------------------------------------------------------------------
# Pretrained weights: a folder with `config.json` (the constructor's
# arguments) and `model.safetensors` (parameters by their NNX path), numpy
# only, so a shipped base model loads without the trainer's checkpoints.

CONFIG_FIELDS = ("latent_channels", "patch_size", "hidden_size", "depth", "num_heads",
                 "mlp_ratio")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k in sorted(tree, key=str):
      yield from _flatten(tree[k], prefix + (str(k),))
  else:
    yield ".".join(prefix), tree


def save_pretrained(params, folder, *, model_config) -> None:
  """Writes `params` (a pure dict, as the trainer holds them) and the model config.

  Args:
    params: nested dict of arrays, `nnx.split(dit, nnx.Param, ...)[1]` as a
      pure dict.
    folder: output folder (created).
    model_config: mapping with the `CONFIG_FIELDS` (the `DiT` arguments).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(folder, exist_ok=True)
  cfg = {k: int(model_config[k]) for k in CONFIG_FIELDS}
  tensors = {name: np.ascontiguousarray(np.asarray(v, np.float32))
             for name, v in _flatten(unstack_blocks(params))}
  save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump({"_class_name": "DiT", **cfg}, f, indent=2, sort_keys=True)


def load_pretrained(folder, *, like=None) -> tuple[dict, dict]:
  """`(model_config, params)` of a folder written by `save_pretrained`.

  Args:
    folder: the folder.
    like: optional params of the model to fill (a nested dict); the loaded
      params must have its tree and shapes, and are cast to its dtypes.

  Raises:
    ValueError: naming the file or field that is missing or malformed, or the
      parameters that do not fit `like`.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  model_config = read_config(folder)
  w_path = os.path.join(folder, WEIGHTS_NAME)
  params: dict = {}
  for name, value in load_file(w_path).items():
    node = params
    *parents, leaf = name.split(".")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  params = stack_blocks(params)
  if like is not None:
    params = _fit(params, like, folder)
  return model_config, params


def unstack_blocks(params: dict) -> dict:
  """The per-block file layout: `{'blocks': {name: [depth, ...]}}` -> `{'blocks': {'<i>': {name: ...}}}`."""
  if STACKED not in params or _is_per_block(params[STACKED]):
    return params
  depth = {np.shape(x)[0] for x in jax.tree.leaves(params[STACKED])}
  if len(depth) != 1:
    raise ValueError(f"params[{STACKED!r}]: stacked leaves disagree on depth {sorted(depth)}")
  per_block = {str(i): jax.tree.map(lambda x, i=i: np.asarray(x)[i], params[STACKED])
               for i in range(depth.pop())}
  return {**params, STACKED: per_block}


def stack_blocks(params: dict) -> dict:
  """The model's layout from the per-block one (`unstack_blocks` inverted); stacked stays."""
  if STACKED not in params or not _is_per_block(params[STACKED]):
    return params
  per_block = params[STACKED]
  ids = sorted(int(k) for k in per_block)
  if ids != list(range(len(ids))):
    raise ValueError(f"params[{STACKED!r}]: block indices {ids} are not 0..{len(ids) - 1}")
  blocks = [per_block[k] for k in sorted(per_block, key=int)]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return {**params, STACKED: stacked}


def _is_per_block(tree) -> bool:
  return isinstance(tree, dict) and bool(tree) and all(str(k).isdigit() for k in tree)


def read_config(folder) -> dict:
  """The `CONFIG_FIELDS` of a `save_pretrained` folder (no weights read).

  Raises:
    ValueError: `dit.pretrained=...: ...` naming the missing file or fields.
  """
  cfg_path = os.path.join(folder, CONFIG_NAME)
  for p in (cfg_path, os.path.join(folder, WEIGHTS_NAME)):
    if not os.path.isfile(p):
      raise ValueError(f"dit.pretrained={str(folder)!r}: {os.path.basename(p)} not found "
                       "(a folder written by train.models.dit.save_pretrained)")
  with open(cfg_path) as f:
    raw = json.load(f)
  missing = [k for k in CONFIG_FIELDS if not isinstance(raw.get(k), int)]
  if missing:
    raise ValueError(f"dit.pretrained={str(folder)!r}: {CONFIG_NAME} lacks integer "
                     f"fields {missing}")
  return {k: raw[k] for k in CONFIG_FIELDS}


def _fit(loaded: dict, like, folder) -> dict:
  want, got = dict(_flatten(like)), dict(_flatten(loaded))
  if want.keys() != got.keys():
    raise ValueError(
        f"dit.pretrained={str(folder)!r}: parameters do not match the model: missing "
        f"{sorted(want.keys() - got.keys())[:4]}, unexpected {sorted(got.keys() - want.keys())[:4]}")
  for name, v in want.items():
    if np.shape(v) != np.shape(got[name]):
      raise ValueError(f"dit.pretrained={str(folder)!r}: {name} has shape "
                       f"{np.shape(got[name])}, the model needs {np.shape(v)}")
  return jax.tree.map(lambda t, a: jnp.asarray(a, jnp.asarray(t).dtype), like,
                      _like_keys(loaded, like))


def _like_keys(tree, like):
  """`tree` with the key objects of `like` (str names from the file -> the model's keys)."""
  if isinstance(like, dict):
    by_name = {str(k): k for k in like}
    return {by_name[str(k)]: _like_keys(v, like[by_name[str(k)]]) for k, v in tree.items()}
  return tree
