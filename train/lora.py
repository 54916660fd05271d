"""LoRA: low-rank adapters on the velocity model's linear layers; the base stays frozen.

A targeted layer's kernel `W` (`[in..., out...]`, NNX layout) is used as
`W + (alpha / rank) * A @ B` with `A [in..., rank]` and `B [rank, out...]`:
the LoRA update of diffusers/PEFT (`W_torch + (alpha / r) lora_B @ lora_A`),
PEFT's initialisation (A uniform in +-1/sqrt(fan_in), B zero: the model starts
as the base). Only A and B are trained: they are the train state's
parameters, with their optimizer state; the base is a frozen jit argument in
the compute dtype, sharded like the state (ZeRO-3), and is in no checkpoint.

The update is folded into the kernel where the model uses it: for the
stacked blocks inside the scan body, after the block's gather (so only one
block's folded kernel exists at a time), for the other layers before the
model is assembled. The model code is unchanged.

Layout of the LoRA parameters: the model's parameter tree (pure dict)
restricted to the targeted layers, each holding `{'lora_A', 'lora_B'}` next
to where its `kernel` is; stacked layers keep their leading depth axis.
The factors are `nnx.LoRAParam`s attached to the targeted layers (`attach`),
so the model's full parameter tree holds them next to each `kernel`; `split`
separates the trainable factors from the frozen base and `combine` joins them
again inside the step.

Targets are `fnmatch` patterns over module names in diffusers' naming, a
stacked block's index written `*`: `transformer_blocks.*.attn.to_q`,
`single_transformer_blocks.*.proj_mlp` (FLUX), `blocks.*.attn.query` (DiT).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LORA_KEYS = ("lora_A", "lora_B")
# diffusers' FLUX LoRA scripts (train_dreambooth_lora_flux.py): attention q/k/v/out of both
# streams and the MLPs; in single blocks, their q/k/v and the MLP linears (proj_mlp, proj_out).
DEFAULT_TARGETS = {
    "flux": ("*transformer_blocks.*.attn.to_q", "*transformer_blocks.*.attn.to_k",
             "*transformer_blocks.*.attn.to_v", "transformer_blocks.*.attn.to_out.0",
             "transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
             "transformer_blocks.*.attn.add_v_proj", "transformer_blocks.*.attn.to_add_out",
             "transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2",
             "transformer_blocks.*.ff_context.net.0.proj", "transformer_blocks.*.ff_context.net.2",
             "single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out"),
    "dit": ("blocks.*.attn.query", "blocks.*.attn.key", "blocks.*.attn.value",
            "blocks.*.attn.out", "blocks.*.mlp1", "blocks.*.mlp2"),
}


def module_name(path: Sequence[Any], *, stacks: Sequence[str],
                renames: Mapping[str, str]) -> str:
  """A module's name in diffusers' naming: renamed parts, `*` after a stack key."""
  parts = []
  for i, p in enumerate(path):
    parts.append(renames.get(str(p), str(p)))
    if i == 0 and str(p) in stacks:
      parts.append("*")
  return ".".join(parts)


class Target:
  """One adapted layer: its params path, diffusers name, and the kernel's in/out axes."""

  def __init__(self, path: tuple[str, ...], name: str, lead: tuple[int, ...],
               in_dims: tuple[int, ...], out_dims: tuple[int, ...]):
    self.path, self.name, self.lead = path, name, lead
    self.in_dims, self.out_dims = in_dims, out_dims


def find_targets(model: nnx.Module, patterns: Sequence[str], *, stacks: Sequence[str],
                 renames: Mapping[str, str]) -> list[Target]:
  """The linear layers of `model` (abstract is fine) whose names match `patterns`.

  Raises:
    ValueError naming `lora.targets` and a pattern that matches no linear layer.
  """
  found: list[Target] = []
  used = {p: False for p in patterns}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, (nnx.Linear, nnx.LinearGeneral)):
      continue
    name = module_name(path, stacks=stacks, renames=renames)
    hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
    if not hits:
      continue
    for p in hits:
      used[p] = True
    shape = tuple(node.kernel.get_value().shape)
    lead = shape[:1] if str(path[0]) in stacks else ()
    body = shape[len(lead):]
    if isinstance(node, nnx.Linear):
      n_in = 1
    else:
      n_in = len(node.in_features) if isinstance(node.in_features, tuple) else 1
    found.append(Target(tuple(str(p) for p in path), name, lead, body[:n_in], body[n_in:]))
  unused = [p for p, u in used.items() if not u]
  if unused:
    raise ValueError(f"lora.targets: {unused} match no linear layer of the model (names are "
                     "diffusers', a stacked block's index written '*', e.g. "
                     "'transformer_blocks.*.attn.to_q')")
  return sorted(found, key=lambda t: t.path)


def attach(model: nnx.Module, targets: Sequence[Target], *, rank: int, key,
           abstract: bool = False) -> nnx.Module:
  """Adds `lora_A`, `lora_B` (`nnx.LoRAParam`, float32) to each target layer of `model`, in place.

  PEFT's initialisation: A uniform in +-1/sqrt(fan_in), B zero, so the model
  starts as the base. The layers' own call ignores them: the velocity model
  folds them into the kernel (`fold`). `abstract`: `jax.ShapeDtypeStruct`s
  instead of arrays (memory plans).
  """
  for i, t in enumerate(targets):
    layer = model
    for p in t.path:
      layer = getattr(layer, p)
    a_shape, b_shape = t.lead + t.in_dims + (rank,), t.lead + (rank,) + t.out_dims
    if abstract:
      a, b = (jax.ShapeDtypeStruct(s, jnp.float32) for s in (a_shape, b_shape))
    else:
      bound = 1.0 / math.sqrt(math.prod(t.in_dims))
      a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
      b = jnp.zeros(b_shape, jnp.float32)
    layer.lora_A = nnx.LoRAParam(a)
    layer.lora_B = nnx.LoRAParam(b)
  return model


def _set(tree: dict, path: Sequence[str], value) -> None:
  node = tree
  for p in path[:-1]:
    node = node.setdefault(p, {})
  node[path[-1]] = value


def combine(base: Mapping, lora: Mapping) -> dict:
  """One tree with the LoRA factors next to the kernels they adapt (base is not copied)."""
  out = dict(base)
  for k, v in lora.items():
    if k in LORA_KEYS:
      out[k] = v
    else:
      if k not in out or not isinstance(out[k], Mapping):
        raise ValueError(f"lora params: {k!r} is not a module of the base model")
      out[k] = combine(out[k], v)
  return out


def split(tree: Mapping) -> tuple[dict, dict]:
  """`combine` inverted: `(base, lora)`."""
  base, lora = {}, {}
  for k, v in tree.items():
    if k in LORA_KEYS:
      lora[k] = v
    elif isinstance(v, Mapping):
      b, l = split(v)
      base[k] = b
      if l:
        lora[k] = l
    else:
      base[k] = v
  return base, lora


def delta(a, b, scale: float):
  """`scale * A @ B` of one layer (no depth axis): `[in..., r] x [r, out...] -> [in..., out...]`."""
  return scale * jnp.tensordot(a, b, axes=1)


def fold(tree: Mapping, scale: float, *, skip: Sequence[str] = ()) -> dict:
  """`tree` with each adapted `kernel` replaced by `kernel + scale A @ B` (A, B stay, unused).

  The sum is formed in float32 and cast to the kernel's dtype. Subtrees under
  the keys in `skip` (the stacks: folded per block inside their scan, where
  A and B have no depth axis) are left as they are.
  """
  out = {}
  for k, v in tree.items():
    out[k] = fold(v, scale) if isinstance(v, Mapping) and k not in skip else v
  if "lora_A" in tree:
    kernel = tree["kernel"]
    d = delta(tree["lora_A"].astype(jnp.float32), tree["lora_B"].astype(jnp.float32), scale)
    out["kernel"] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
  return out


# ----------------------------------------------------------------------------
# diffusers LoRA files (PEFT format): `transformer.<module>.lora_A.weight [r, in]`,
# `transformer.<module>.lora_B.weight [out, r]`, update `lora_B @ lora_A * lora_alpha / r`.

LORA_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "transformer"


def _get(tree: Mapping, path: Sequence[str]):
  node = tree
  for p in path:
    node = node[p]
  return node


def _blocks(t: Target):
  """`(block index or None, the layer's name)` for every layer a target stands for."""
  if not t.lead:
    return [(None, t.name)]
  return [(i, t.name.replace("*", str(i), 1)) for i in range(t.lead[0])]


def to_diffusers(lora: Mapping, targets: Sequence[Target], *, scale: float) -> dict:
  """PEFT-format tensors `{name: numpy}` of host LoRA params, the scale folded into `lora_B`.

  The file then needs `lora_alpha = r` (diffusers' default without metadata):
  any loader gives the same update.
  """
  out = {}
  for t in targets:
    node = _get(lora, t.path)
    a_all, b_all = np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32)
    rank = a_all.shape[-1]
    for i, name in _blocks(t):
      a = a_all if i is None else a_all[i]
      b = b_all if i is None else b_all[i]
      out[f"{PREFIX}.{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
      out[f"{PREFIX}.{name}.lora_B.weight"] = np.ascontiguousarray(
          (scale * b.reshape(rank, -1)).T)
  return out


def save_diffusers(lora: Mapping, targets: Sequence[Target], folder: str, *, scale: float,
                   rank: int) -> str:
  """Writes `folder/pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`.

  `lora` holds numpy arrays (gathered to this host). The metadata records the
  adapter config (`r`, `lora_alpha = r`, the target modules) as diffusers'
  `save_lora_weights` does. Returns the file's path.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = to_diffusers(lora, targets, scale=scale)
  os.makedirs(folder, exist_ok=True)
  # diffusers' own metadata (FluxPipeline.save_lora_weights): the LoraConfig fields,
  # prefixed with the component; every adapted layer by its full name, so that PEFT
  # adapts exactly these (a bare "proj_out" would match the top-level one too).
  modules = sorted(name for t in targets for _, name in _blocks(t))
  config = {"r": rank, "lora_alpha": rank, "target_modules": modules, "init_lora_weights": True}
  meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
      {f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
  path = os.path.join(folder, LORA_FILE)
  save_file(tensors, path, metadata=meta)
  return path


def load_diffusers(path: str, targets: Sequence[Target], *, rank: int, scale: float) -> dict:
  """LoRA params from a diffusers / PEFT FLUX LoRA file, for these targets and our scale.

  `lora_alpha` comes from the file's `lora_adapter_metadata` (diffusers) or
  `<module>.alpha` tensors (kohya), else it is `r` (diffusers' default); the
  file's `lora_alpha / r` is re-expressed in our `scale` through `B`.

  Raises:
    ValueError naming `lora.init_from` and the key, module or rank that does not fit.
  """
  import json  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="np") as f:
      raw = {k: f.get_tensor(k) for k in f.keys()}
      meta = f.metadata() or {}
  except Exception as e:  # pylint: disable=broad-except  (missing file, not safetensors)
    raise ValueError(f"lora.init_from: cannot read {path!r}: {e}") from None
  file_alpha = None
  if "lora_adapter_metadata" in meta:
    adapter = json.loads(meta["lora_adapter_metadata"])
    file_alpha = adapter.get(f"{PREFIX}.lora_alpha", adapter.get("lora_alpha"))
  strip = lambda k: k[len(PREFIX) + 1:] if k.startswith(PREFIX + ".") else k
  tensors = {strip(k): np.asarray(v, np.float32) for k, v in raw.items()}
  used: set[str] = set()
  tree: dict = {}
  for t in targets:
    a_blocks, b_blocks = [], []
    for _, name in _blocks(t):
      ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
      if ka not in tensors or kb not in tensors:
        raise ValueError(f"lora.init_from: {path!r} has no {ka} / {kb} (lora.targets "
                         f"adapts {t.name}); set lora.targets to the file's modules")
      a, b = tensors[ka], tensors[kb]
      if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"lora.init_from: {path!r} has rank {a.shape[0]} at {ka}; set "
                         f"--config.lora.rank={a.shape[0]}")
      alpha = tensors.get(f"{name}.alpha")
      alpha = float(alpha) if alpha is not None else (file_alpha or rank)
      used.update((ka, kb, f"{name}.alpha"))
      a_blocks.append(a.T.reshape(t.in_dims + (rank,)))
      b_blocks.append((b.T * (alpha / rank) / scale).reshape((rank,) + t.out_dims))
    stack = (lambda xs: np.stack(xs)) if t.lead else (lambda xs: xs[0])
    _set(tree, t.path, {"lora_A": jnp.asarray(stack(a_blocks)),
                        "lora_B": jnp.asarray(stack(b_blocks))})
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"lora.init_from: {path!r} holds {unused[:4]} ({len(unused)} tensors) for "
                     "modules lora.targets does not adapt; nothing was loaded")
  return tree


def merge_host(tree: Mapping, scale: float) -> dict:
  """Host (numpy) parameters with the LoRA update merged into each kernel, factors dropped.

  For export: float32 `kernel + scale A @ B`, per block in the stacks.
  """
  out = {}
  for k, v in tree.items():
    if k in LORA_KEYS:
      continue
    out[k] = merge_host(v, scale) if isinstance(v, Mapping) else v
  if "lora_A" in tree:
    a, b = np.asarray(tree["lora_A"], np.float32), np.asarray(tree["lora_B"], np.float32)
    kernel = np.asarray(tree["kernel"], np.float32)
    if a.ndim - 1 + b.ndim - 1 == kernel.ndim:  # one layer
      out["kernel"] = kernel + scale * np.tensordot(a, b, axes=1)
    else:  # stacked: a leading depth axis on A, B and the kernel
      out["kernel"] = kernel + scale * np.stack([np.tensordot(x, y, axes=1) for x, y in zip(a, b)])
  return out
