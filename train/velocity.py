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
from train import config as config_lib
from train import lora as lora_lib
from train import sharding as sharding_lib
from train.models import dit as dit_lib
from train.models import flux as flux_lib

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

  With `lora.rank > 0` the model carries LoRA factors on the `lora.targets`
  layers (train/lora.py): `build` attaches them, `velocity` folds them into
  the kernels (the stacks' inside their scan, after the gather), `export`
  writes the merged model and the adapter file.

  Attributes:
    name: `config.model`.
    stacks: params keys of the stacked `[depth, ...]` block parameters
      (scanned; a sharded step gathers one block at a time).
    renames: our module names -> diffusers' (LoRA target names, export).
    lora_rank: 0 (no LoRA) or the adapters' rank.
    lora_scale: `lora.alpha / lora.rank`.
  """
  name = ""
  stacks: tuple[str, ...] = ()
  renames: Mapping[str, str] = {}

  def __init__(self, config):
    self.config = config
    lc = config.get("lora", None)
    self.lora_rank = int(lc.rank) if lc is not None else 0
    alpha = None if lc is None else lc.get("alpha", None)
    self.lora_scale = (float(alpha) if alpha is not None else self.lora_rank) / max(
        self.lora_rank, 1)

  def make_model(self, *, param_dtype=jnp.float32) -> nnx.Module:
    """The model with `config.seed`'s random weights (no LoRA), for `init_split`."""
    raise NotImplementedError

  def lora_targets(self) -> list[lora_lib.Target]:
    """The layers `lora.targets` adapts (their names, paths and kernel shapes).

    Raises:
      ValueError naming `lora.targets` for a pattern that matches no layer.
    """
    patterns = tuple(self.config.lora.targets) or lora_lib.DEFAULT_TARGETS[self.name]
    return lora_lib.find_targets(nnx.eval_shape(self.make_model), patterns,
                                 stacks=self.stacks, renames=self.renames)

  def with_lora(self, built, *, abstract: bool = False):
    """`built` = (graphdef, params, rest) with LoRA factors attached (unchanged without LoRA).

    The factors are PEFT-initialised from `config.seed`, or read from
    `lora.init_from` (a diffusers / PEFT LoRA file).
    """
    if not self.lora_rank:
      return built
    graphdef, params, rest = built
    model = nnx.merge(graphdef, params, rest)
    targets = self.lora_targets()
    lora_lib.attach(model, targets, rank=self.lora_rank, abstract=abstract,
                    key=jax.random.PRNGKey(self.config.seed + 2))
    graphdef, params, rest = split_model(model)
    if self.config.lora.init_from and not abstract:
      base, _ = lora_lib.split(params)
      loaded = lora_lib.load_diffusers(self.config.lora.init_from, targets,
                                       rank=self.lora_rank, scale=self.lora_scale)
      params = lora_lib.combine(base, loaded)
    return graphdef, params, rest

  def fold_lora(self, params, prepare_block):
    """`(params, prepare_block)` with the LoRA updates folded into the kernels where used.

    The non-stacked layers are folded here; each stack's `prepare_block`
    becomes gather-then-fold, so a block's update is formed only while it runs.
    `params` come already cast to the compute dtype (so a block's factors are
    gathered in bf16 in a bf16 run); `lora.fold` forms the sum in float32 from
    those values.
    """
    if not self.lora_rank:
      return params, prepare_block
    prepare = dict(prepare_block or {})
    scale = self.lora_scale
    folded = {k: (lambda p, g=prepare.get(k): lora_lib.fold(g(p) if g else p, scale))
              for k in self.stacks}
    return lora_lib.fold(params, scale, skip=self.stacks), folded

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

  def pretrained_files(self) -> list[str]:
    """The weight files of the pretrained model the run starts from ([] for none, or the DiT's)."""
    return []

  def describe_pretrained(self) -> dict[str, Any] | None:
    """Provenance (path, weights, sha256) of pretrained weights the run starts from, or None."""
    return None

  def export(self, params, workdir: str) -> str:
    """Writes the trained model under `WORKDIR/export/`; returns the folder.

    `params`: the model's full parameters (with LoRA: base and factors
    together). Called on every process (sharded parameters are gathered);
    process 0 writes.
    """
    raise NotImplementedError

  def export_lora(self, params, workdir: str) -> dict:
    """The params to export: with LoRA, writes `WORKDIR/export/lora/` and merges the update.

    Without LoRA, `params` as they are (a writer that gathers one tensor at a
    time never holds the whole model on the host); with LoRA, numpy
    parameters with the update merged into the kernels (float32).
    """
    if not self.lora_rank:
      return params
    host = jax.tree.map(flux_lib.to_host, params)  # every process takes part
    _, factors = lora_lib.split(host)
    if jax.process_index() == 0:
      lora_lib.save_diffusers(factors, self.lora_targets(),
                              os.path.join(workdir, "export", "lora"),
                              scale=self.lora_scale, rank=self.lora_rank)
    return lora_lib.merge_host(host, self.lora_scale)


class DiTVelocity(VelocityModel):
  """The small DiT (train/models/dit.py): the low-resolution image is its condition."""
  name = "dit"
  stacks = (dit_lib.STACKED,)

  def make_model(self, *, param_dtype=jnp.float32):
    del param_dtype  # float32 (the DiT's master weights)
    c = self.config
    return dit_lib.DiT(
        latent_channels=c.vae.latent_channels, patch_size=c.dit.patch_size,
        hidden_size=c.dit.hidden_size, depth=c.dit.depth, num_heads=c.dit.num_heads,
        mlp_ratio=c.dit.mlp_ratio, remat=c.dit.remat, rngs=nnx.Rngs(c.seed + 1))

  def build(self, *, mesh=None, abstract: bool = False):
    del mesh
    c = self.config
    dit = init_split(self.make_model, abstract=abstract)
    if c.dit.pretrained:  # fine-tuning: start from a base model's weights
      try:
        _, params = dit_lib.load_pretrained(c.dit.pretrained, like=dit[1])
      except ValueError as e:
        raise config_lib.ConfigError(f"config.{e}") from None
      dit = (dit[0], params, dit[2])
    return self.with_lora(dit, abstract=abstract)

  def condition(self, frozen, lowres, encode, image_hw):
    del frozen, encode, image_hw
    return lowres

  def velocity(self, graphdef, params, x_t, t, cond, *, compute_dtype, prepare_block=None):
    params, prepare_block = self.fold_lora(cast_floating(params, compute_dtype), prepare_block)
    dit = nnx.merge(graphdef, params)
    return dit(x_t.astype(compute_dtype), t, cond.astype(compute_dtype),
               prepare_block=(prepare_block or {}).get(dit_lib.STACKED)).astype(jnp.float32)

  def image_tokens(self, latent_shape) -> int:
    h, w, _ = latent_shape
    p = self.config.dit.patch_size
    return (h // p) * (w // p)

  def export(self, params, workdir):
    folder = os.path.join(workdir, "export", "dit")
    c = self.config
    host = jax.tree.map(flux_lib.to_host, self.export_lora(params, workdir))  # every process
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
# The shift's settings (`config.shift`; a FLUX pipeline's scheduler_config.json has them too).
SHIFT_FIELDS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def scheduler_shift(config) -> dict[str, float]:
  """The time shift's settings: `config.shift`, or the pipeline's scheduler config if it has one.

  With `flux.pretrained` a pipeline folder holding
  `scheduler/scheduler_config.json`, its `base_shift`, `max_shift`,
  `base_image_seq_len` and `max_image_seq_len` are used (logged).
  """
  out = {k: float(config.shift[k]) for k in SHIFT_FIELDS}
  if config.get("model", "dit") == "flux" and config.flux.pretrained:
    path = os.path.join(config.flux.pretrained, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
      with open(path) as fh:
        sched = json.load(fh)
      found = {k: float(sched[k]) for k in SHIFT_FIELDS if k in sched}
      if found:
        logging.info("time shift from %s: %s", path, found)
      out.update(found)
  return out


class FluxVelocity(VelocityModel):
  """FLUX.1 from diffusers, conditioned on the low-resolution image the Kontext way."""
  name = "flux"
  stacks = flux_lib.STACKS
  renames = flux_lib.RENAMES

  def __init__(self, config):
    super().__init__(config)
    self.arch = flux_architecture(config)
    g = config.flux.guidance
    self.guidance = None if g is None else float(g)

  def make_model(self, *, param_dtype=jnp.float32):
    c = self.config
    return flux_lib.FluxTransformer(self.arch, remat=c.flux.remat, param_dtype=param_dtype,
                                    rngs=nnx.Rngs(c.seed + 1))

  @property
  def base_dtype(self):
    """The base weights' dtype: `flux.param_dtype`; with LoRA the compute dtype (frozen)."""
    c = self.config
    if self.lora_rank:
      return jnp.bfloat16 if c.precision == "bfloat16" else jnp.float32
    return PARAM_DTYPES[c.flux.param_dtype]

  def build(self, *, mesh=None, abstract: bool = False):
    c = self.config
    make = lambda: self.make_model(param_dtype=self.base_dtype)
    if not c.flux.pretrained or abstract:  # random weights, or shapes only (plans)
      return self.with_lora(init_split(make, abstract=abstract), abstract=abstract)
    graphdef, shapes, rest = init_split(make, abstract=True)
    shardings = None
    if mesh is not None:  # straight into the train state's layout: never whole on a device
      shardings = sharding_lib.state_shardings(shapes, mesh,
                                               min_shard_size=c.mesh.min_shard_size)
    model = flux_lib.from_diffusers(c.flux.pretrained, dtype=self.base_dtype,
                                    remat=c.flux.remat, shardings=shardings)
    _, params, _ = split_model(model)
    return self.with_lora((graphdef, params, rest))

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
    params, prepare_block = self.fold_lora(cast_floating(params, compute_dtype), prepare_block)
    model = nnx.merge(graphdef, params)
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

  def pretrained_files(self):
    if not self.config.flux.pretrained:
      return []
    return list(flux_lib.locate(self.config.flux.pretrained).files)

  def describe_pretrained(self):
    if not self.config.flux.pretrained:
      return None
    ckpt = flux_lib.locate(self.config.flux.pretrained)
    return {"path": os.path.abspath(self.config.flux.pretrained), "folder": ckpt.folder,
            "weights": [os.path.abspath(f) for f in ckpt.files],
            "sha256": flux_lib.weights_sha256(ckpt.files), "config": ckpt.config}

  def export(self, params, workdir):
    folder = os.path.join(workdir, "export", "transformer")
    return flux_lib.save_diffusers(self.export_lora(params, workdir), folder, config=self.arch)


_MODELS = {"dit": DiTVelocity, "flux": FluxVelocity}


def for_config(config) -> VelocityModel:
  """The velocity model named by `config.model` ('dit' when the field is absent)."""
  name = config.get("model", "dit")
  if name not in _MODELS:
    raise ValueError(f"model: must be one of {config_lib.MODELS}, got {name!r}")
  return _MODELS[name](config)
