"""The velocity model of the flow stage: the one place where a model is chosen, built and called.

`for_config(config)` returns the `VelocityModel` named by `config.model`:

- `"dit"` (train/models/dit.py): the small DiT trained from scratch or from a
  `dit.pretrained` folder; it sees the low-resolution image itself.
- `"flux"` (train/models/flux.py): FLUX.1 [dev] / [schnell] / Kontext [dev]
  from a diffusers folder (`flux.pretrained`), or a random FLUX of the
  `flux.*` architecture (tests, plans). It is conditioned Kontext's way: the
  low-resolution image, resized to the target size, is encoded by the frozen
  VAE into clean latent tokens appended after the noisy target tokens with
  `img_ids[..., 0] = 1`; the velocity is read from the first N output tokens.
  Text enters as fixed prompt embeddings (`flux.prompt_embeds`).

The step (train/step.py), the loop and its sampler (train/loop.py) and the
export call a model only through this interface, so a new model plugs in
here. Every method works on latents `[B, h, w, c]` (the VAE's scaled latents)
and times t `[B]` in [0, 1] with `x_t = (1 - t) z0 + t noise`, `v = noise - z0`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssim_jax import flow
from train import sharding as sharding_lib
from train.models import dit as dit_lib
from train.models import flux as flux_lib

MODELS = ("dit", "flux")
FLUX_PATCH = 2  # FLUX packs 2 x 2 latent patches per token (diffusers' _pack_latents)
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def str_keys(tree):
  """Pure-dict params with str keys (orbax-friendly; nnx.merge accepts them)."""
  if isinstance(tree, dict):
    return {str(k): str_keys(v) for k, v in tree.items()}
  return tree


def split_model(model: nnx.Module):
  """`(graphdef, params, rest)`: params = nnx.Param leaves, rest = other state, as pure dicts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, str_keys(nnx.to_pure_dict(params)), str_keys(nnx.to_pure_dict(rest))


def init_split(make_model: Callable[[], nnx.Module], *, abstract: bool = False):
  """`(graphdef, params, rest)` of `make_model()`, initialised in ONE jitted call.

  Eager NNX initialisation dispatches (and on CPU compiles) every initialiser
  op separately, which costs tens of seconds on a busy 2-core machine; the
  graph structure comes from `nnx.eval_shape` (no FLOPs). `abstract`: params
  and rest as `jax.ShapeDtypeStruct`s (nothing allocated; memory planning).
  """
  graphdef, _, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)

  @jax.jit
  def init():
    _, params, rest = nnx.split(make_model(), nnx.Param, ...)
    return str_keys(nnx.to_pure_dict(params)), str_keys(nnx.to_pure_dict(rest))

  params, rest = jax.eval_shape(init) if abstract else init()
  return graphdef, params, rest


def cast_floating(tree, dtype):
  """Casts floating leaves to `dtype` (the bf16 compute copy of float32 params)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class VelocityModel:
  """What the flow stage needs of a velocity model (subclassed per model).

  Attributes:
    name: `config.model`.
    stacks: params keys of the stacked `[depth, ...]` block parameters
      (scanned; a sharded step gathers one block at a time).
  """
  name = ""
  stacks: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config

  def build(self, *, mesh=None, abstract: bool = False):
    """`(graphdef, params, rest)`: initialised from `config.seed`, or loaded pretrained.

    `abstract`: params as `jax.ShapeDtypeStruct`s (no weights read where the
    architecture is known without them). `mesh`: loaded weights are placed
    straight into the train state's fsdp layout on it.
    """
    raise NotImplementedError

  def frozen_inputs(self) -> dict[str, np.ndarray]:
    """Fixed model inputs besides the VAE (host arrays, jit arguments of the step)."""
    return {}

  def condition(self, frozen: Mapping[str, Any], lowres: jax.Array,
                encode: Callable[[jax.Array], jax.Array], image_hw: tuple[int, int]) -> Any:
    """The conditioning pytree of `lowres` `[B, hl, wl, 3]` in [-1, 1] (computed once per batch).

    `encode(images [B, H, W, 3]) -> latents [B, h, w, c]` is the frozen VAE's
    (scaled latents); `image_hw` = (H, W), the size of the generated image.
    """
    raise NotImplementedError

  def velocity(self, graphdef, params, x_t: jax.Array, t: jax.Array, cond: Any, *,
               compute_dtype, prepare_block: Mapping[str, Callable] | None = None) -> jax.Array:
    """`v_pred` float32 `[B, h, w, c]` of `x_t` `[B, h, w, c]` at times `t` `[B]`.

    `params` are float32 master weights, cast to `compute_dtype` here (before
    any gather, so a sharded block is gathered in the compute dtype).
    `prepare_block`: `{stack: fn}` applied to one block's params in the scan.
    """
    raise NotImplementedError

  def image_tokens(self, latent_shape) -> int:
    """Tokens of one generated image (FLUX's image sequence length for the time shift)."""
    raise NotImplementedError

  def sequence_length(self, latent_shape) -> int:
    """Tokens the transformer processes per image (image, condition and text): throughput."""
    return self.image_tokens(latent_shape)

  def describe_pretrained(self) -> dict[str, Any] | None:
    """Provenance (path, weights, sha256) of pretrained weights the run starts from, or None."""
    return None

  def export(self, params, workdir: str) -> str:
    """Writes the trained model under `WORKDIR/export/`; returns the folder.

    Called on every process (sharded parameters are gathered); process 0 writes.
    """
    raise NotImplementedError


class DiTVelocity(VelocityModel):
  """The small DiT (train/models/dit.py): the low-resolution image is its condition."""
  name = "dit"
  stacks = (dit_lib.STACKED,)

  def build(self, *, mesh=None, abstract: bool = False):
    del mesh
    c = self.config
    dit = init_split(lambda: dit_lib.DiT(
        latent_channels=c.vae.latent_channels, patch_size=c.dit.patch_size,
        hidden_size=c.dit.hidden_size, depth=c.dit.depth, num_heads=c.dit.num_heads,
        mlp_ratio=c.dit.mlp_ratio, remat=c.dit.remat, rngs=nnx.Rngs(c.seed + 1)),
                     abstract=abstract)
    if c.dit.pretrained:  # fine-tuning: start from a base model's weights
      from train import config as config_lib  # pylint: disable=g-import-not-at-top
      try:
        _, params = dit_lib.load_pretrained(c.dit.pretrained, like=dit[1])
      except ValueError as e:
        raise config_lib.ConfigError(f"config.{e}") from None
      dit = (dit[0], params, dit[2])
    return dit

  def condition(self, frozen, lowres, encode, image_hw):
    del frozen, encode, image_hw
    return lowres

  def velocity(self, graphdef, params, x_t, t, cond, *, compute_dtype, prepare_block=None):
    dit = nnx.merge(graphdef, cast_floating(params, compute_dtype))
    return dit(x_t.astype(compute_dtype), t, cond.astype(compute_dtype),
               prepare_block=(prepare_block or {}).get(dit_lib.STACKED)).astype(jnp.float32)

  def image_tokens(self, latent_shape) -> int:
    h, w, _ = latent_shape
    p = self.config.dit.patch_size
    return (h // p) * (w // p)

  def export(self, params, workdir):
    folder = os.path.join(workdir, "export", "dit")
    c = self.config
    host = jax.tree.map(flux_lib.to_host, params)  # every process takes part
    if jax.process_index() == 0:
      dit_lib.save_pretrained(host, folder, model_config={
          "latent_channels": c.vae.latent_channels,
          **{k: c.dit[k] for k in dit_lib.CONFIG_FIELDS if k != "latent_channels"}})
    return folder


# ----------------------------------------------------------------------------
# FLUX.

FLUX_ARCH_FIELDS = ("num_layers", "num_single_layers", "attention_head_dim",
                    "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                    "guidance_embeds", "axes_dims_rope")
PROMPT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def flux_architecture(config) -> flux_lib.FluxConfig:
  """The FLUX transformer of a run: `flux.pretrained`'s config.json, else the `flux.*` fields.

  `in_channels` is 4 x the VAE's latent channels either way (2 x 2 patches).

  Raises:
    ValueError naming `flux.pretrained` (unreadable folder) or the field.
  """
  fc = config.flux
  if fc.pretrained:
    try:
      return flux_lib.read_config(fc.pretrained)
    except (OSError, ValueError) as e:
      raise ValueError(f"flux.pretrained: {e}") from None
  kw = {k: fc[k] for k in FLUX_ARCH_FIELDS}
  kw["axes_dims_rope"] = list(kw["axes_dims_rope"])
  kw["in_channels"] = FLUX_PATCH ** 2 * config.vae.latent_channels
  try:
    return flux_lib.FluxConfig.from_dict(kw, source="config.flux")
  except ValueError as e:
    raise ValueError(str(e).replace("config.flux: ", "flux.", 1)) from None


def read_prompt_embeds(path: str) -> dict[str, np.ndarray]:
  """`{'prompt_embeds': [L, D], 'pooled_prompt_embeds': [P]}` float32 from a safetensors file.

  The file is what `scripts/encode_prompt.py` writes: diffusers'
  `FluxPipeline.encode_prompt` outputs for one prompt (a leading batch axis
  of 1 is accepted).

  Raises:
    ValueError naming `flux.prompt_embeds`.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"flux.prompt_embeds: no file {path!r} (make one with "
                     "scripts/encode_prompt.py)")
  try:
    raw = load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (safetensors' own errors)
    raise ValueError(f"flux.prompt_embeds: {path!r} is not a safetensors file: {e}") from None
  missing = [k for k in PROMPT_KEYS if k not in raw]
  if missing:
    raise ValueError(f"flux.prompt_embeds: {path!r} lacks {missing} (has {sorted(raw)})")
  out = {}
  for k, want in zip(PROMPT_KEYS, (2, 1)):
    v = np.asarray(raw[k]).astype(np.float32)
    if v.ndim == want + 1 and v.shape[0] == 1:
      v = v[0]
    if v.ndim != want:
      raise ValueError(f"flux.prompt_embeds: {k} in {path!r} has shape {v.shape}; expected "
                       + ("[L, joint_attention_dim]" if want == 2 else "[pooled_projection_dim]"))
    if not np.all(np.isfinite(v)):
      raise ValueError(f"flux.prompt_embeds: {k} in {path!r} is not finite")
    out[k] = v
  return out


# FLUX.1's published scheduler settings (scheduler/scheduler_config.json of
# FLUX.1 [dev] and Kontext [dev]): the resolution-dependent shift.
FLUX_SHIFT = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096}


def scheduler_shift(config) -> dict[str, float]:
  """The time shift's settings: `config.shift`, or the pipeline's scheduler config if it has one.

  With `flux.pretrained` a pipeline folder holding
  `scheduler/scheduler_config.json`, its `base_shift`, `max_shift`,
  `base_image_seq_len` and `max_image_seq_len` are used (logged).
  """
  out = {k: float(config.shift[k]) for k in FLUX_SHIFT}
  if config.get("model", "dit") == "flux" and config.flux.pretrained:
    path = os.path.join(config.flux.pretrained, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
      with open(path) as fh:
        sched = json.load(fh)
      found = {k: float(sched[k]) for k in FLUX_SHIFT if k in sched}
      if found:
        logging.info("time shift from %s: %s", path, found)
      out.update(found)
  return out


class FluxVelocity(VelocityModel):
  """FLUX.1 from diffusers, conditioned on the low-resolution image the Kontext way."""
  name = "flux"
  stacks = flux_lib.STACKS

  def __init__(self, config):
    super().__init__(config)
    self.arch = flux_architecture(config)
    g = config.flux.guidance
    self.guidance = None if g is None else float(g)

  def build(self, *, mesh=None, abstract: bool = False):
    c = self.config
    dtype = PARAM_DTYPES[c.flux.param_dtype]
    make = lambda: flux_lib.FluxTransformer(self.arch, remat=c.flux.remat, param_dtype=dtype,
                                            rngs=nnx.Rngs(c.seed + 1))
    if not c.flux.pretrained or abstract:  # random weights, or shapes only (plans)
      return init_split(make, abstract=abstract)
    graphdef, shapes, rest = init_split(make, abstract=True)
    shardings = None
    if mesh is not None:  # straight into the train state's layout: never whole on a device
      shardings = sharding_lib.state_shardings(shapes, mesh,
                                               min_shard_size=c.mesh.min_shard_size)
    model = flux_lib.from_diffusers(c.flux.pretrained, dtype=dtype, remat=c.flux.remat,
                                    shardings=shardings)
    _, params, _ = split_model(model)
    return graphdef, params, rest

  def frozen_inputs(self):
    c = self.config.flux
    if c.prompt_embeds:
      return read_prompt_embeds(c.prompt_embeds)
    # No prompt file: zero embeddings (what an empty conditioning gives the
    # text stream: attention to L zero tokens), documented in the README.
    return {"prompt_embeds": np.zeros((c.prompt_length, self.arch.joint_attention_dim),
                                      np.float32),
            "pooled_prompt_embeds": np.zeros((self.arch.pooled_projection_dim,), np.float32)}

  def condition(self, frozen, lowres, encode, image_hw):
    b = lowres.shape[0]
    # Resized to the target size (bicubic), then encoded: clean condition latents.
    up = jax.image.resize(lowres.astype(jnp.float32), (b, *image_hw, 3), method="cubic")
    z = encode(jnp.clip(up, -1.0, 1.0))
    prompt, pooled = frozen["prompt_embeds"], frozen["pooled_prompt_embeds"]
    return {"tokens": flow.patchify(z, patch_size=FLUX_PATCH, patch_order="cpq"),
            "txt": jnp.broadcast_to(prompt[None], (b,) + prompt.shape),
            "pooled": jnp.broadcast_to(pooled[None], (b,) + pooled.shape)}

  def velocity(self, graphdef, params, x_t, t, cond, *, compute_dtype, prepare_block=None):
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype))
    b, h, w, _ = x_t.shape
    gh, gw = h // FLUX_PATCH, w // FLUX_PATCH
    tokens = flow.patchify(x_t.astype(compute_dtype), patch_size=FLUX_PATCH, patch_order="cpq")
    n = tokens.shape[1]
    hidden = jnp.concatenate([tokens, cond["tokens"].astype(compute_dtype)], axis=1)
    img_ids = np.concatenate([flux_lib.latent_image_ids(gh, gw, index=0),
                              flux_lib.latent_image_ids(gh, gw, index=1)])
    txt_ids = np.zeros((cond["txt"].shape[1], 3), np.float32)
    guidance = None if self.guidance is None else jnp.full((b,), self.guidance, jnp.float32)
    out = model(hidden, cond["txt"].astype(compute_dtype), cond["pooled"].astype(compute_dtype),
                t, img_ids, txt_ids, guidance, prepare_block=prepare_block)
    return flow.unpatchify(out[:, :n], grid_hw=(gh, gw), patch_size=FLUX_PATCH,
                           patch_order="cpq").astype(jnp.float32)

  def image_tokens(self, latent_shape) -> int:
    h, w, _ = latent_shape
    return (h // FLUX_PATCH) * (w // FLUX_PATCH)

  def sequence_length(self, latent_shape) -> int:
    return 2 * self.image_tokens(latent_shape) + self.config.flux.prompt_length

  def describe_pretrained(self):
    if not self.config.flux.pretrained:
      return None
    ckpt = flux_lib.locate(self.config.flux.pretrained)
    return {"path": os.path.abspath(self.config.flux.pretrained), "folder": ckpt.folder,
            "weights": [os.path.abspath(f) for f in ckpt.files],
            "sha256": flux_lib.weights_sha256(ckpt.files), "config": ckpt.config}

  def export(self, params, workdir):
    folder = os.path.join(workdir, "export", "transformer")
    return flux_lib.save_diffusers(params, folder, config=self.arch)


_MODELS = {"dit": DiTVelocity, "flux": FluxVelocity}


def for_config(config) -> VelocityModel:
  """The velocity model named by `config.model` ('dit' when the field is absent)."""
  name = config.get("model", "dit")
  if name not in _MODELS:
    raise ValueError(f"model: must be one of {MODELS}, got {name!r}")
  return _MODELS[name](config)
