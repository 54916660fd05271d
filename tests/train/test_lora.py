"""LoRA (train/lora.py): the adapters diffusers loads, and what the trainer folds in.

The adapter file is checked against diffusers itself: `load_lora_adapter` (PEFT)
on the same base must give the outputs of our merged model.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import config as config_lib
from train import lora
from train import velocity
from train.models import flux

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import flux_tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
import optional  # noqa: E402  (tests/ is on the path)

torch = optional.require("torch")
diffusers = optional.require("diffusers")
optional.require("peft")

SMALL = dict(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2,
             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
             pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("base")
  torch.manual_seed(0)
  diffusers.FluxTransformer2DModel(**SMALL).eval().save_pretrained(folder)
  return str(folder)


def _inputs(b=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = flux.latent_image_ids(2, 3)
  return dict(hidden_states=rng.normal(size=(b, 6, 32)).astype(np.float32),
              encoder_hidden_states=rng.normal(size=(b, 4, 12)).astype(np.float32),
              pooled_projections=rng.normal(size=(b, 6)).astype(np.float32),
              timestep=np.array([0.3, 0.7], np.float32), img_ids=ids,
              txt_ids=np.zeros((4, 3), np.float32), guidance=np.full((b,), 3.5, np.float32))


def _ours(graphdef, params, inp):
  with jax.default_matmul_precision("highest"):
    model = nnx.merge(graphdef, params)
    return np.asarray(model(*(jnp.asarray(inp[k]) for k in (
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
                            inp["img_ids"], inp["txt_ids"], jnp.asarray(inp["guidance"])))


def _theirs(model, inp):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inp.items()}).sample.numpy()


def _adapted(base_folder, rank=4, alpha=8.0, seed=3):
  """The base with default-target LoRA factors, B random (a trained adapter's stand-in)."""
  cfg = flux_tiny.get_config()
  cfg.flux.pretrained = base_folder
  cfg.lora.rank, cfg.lora.alpha = rank, alpha
  model = velocity.for_config(cfg)
  graphdef, params, _ = model.build()
  base, factors = lora.split(params)
  key = jax.random.PRNGKey(seed)
  leaves, treedef = jax.tree.flatten(factors)
  factors = jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)])
  return model, graphdef, base, factors


def test_default_targets_are_diffusers_flux_lora_modules(base_folder):
  model, _, _, factors = _adapted(base_folder)
  names = {t.name for t in model.lora_targets()}
  assert "transformer_blocks.*.attn.to_out.0" in names
  assert "transformer_blocks.*.ff_context.net.2" in names
  assert "single_transformer_blocks.*.proj_out" in names
  assert "single_transformer_blocks.*.attn.to_q" in names
  assert "proj_out" not in names and "x_embedder" not in names  # not the top-level layers
  assert len(names) == 12 + 5  # double: 8 attention + 4 MLP; single: q, k, v + 2 MLP
  a = factors["transformer_blocks"]["attn"]["to_q"]["lora_A"]
  assert a.shape == (1, 16, 4)  # [depth, in, rank]


def test_exported_adapter_in_diffusers_equals_our_merged_model(base_folder, tmp_path):
  """Our LoRA file, loaded by diffusers (PEFT) onto the base, gives our outputs; the merged
  export, loaded by diffusers, gives them too."""
  model, graphdef, base, factors = _adapted(base_folder)
  params = lora.combine(base, factors)
  host = jax.tree.map(np.asarray, params)
  merged = lora.merge_host(host, model.lora_scale)
  ours = _ours(graphdef, lora.combine(merged, jax.tree.map(np.asarray, factors)), _inputs())
  path = lora.save_diffusers(lora.split(host)[1], model.lora_targets(), str(tmp_path / "lora"),
                             scale=model.lora_scale, rank=model.lora_rank)
  ref = diffusers.FluxTransformer2DModel.from_pretrained(base_folder).eval()
  before = _theirs(ref, _inputs())
  ref.load_lora_adapter(str(tmp_path / "lora"), weight_name=os.path.basename(path),
                        prefix="transformer")
  after = _theirs(ref, _inputs())
  assert np.abs(after - before).max() > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(ours, after, atol=2e-5 * np.abs(after).max())
  out = flux.save_diffusers(merged, tmp_path / "merged", config=model.arch)
  back = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
  np.testing.assert_allclose(_theirs(back, _inputs()), after, atol=2e-5 * np.abs(after).max())


def test_init_from_reads_back_the_same_update(base_folder, tmp_path):
  model, _, _, factors = _adapted(base_folder, rank=4, alpha=8.0)
  host = jax.tree.map(np.asarray, factors)
  targets = model.lora_targets()
  path = lora.save_diffusers(host, targets, str(tmp_path), scale=model.lora_scale, rank=4)
  # Read with another alpha (scale 0.5): B is re-expressed so that scale * A @ B is the same.
  back = lora.load_diffusers(path, targets, rank=4, scale=0.5)
  for t in targets:
    mine, theirs = lora._get(host, t.path), lora._get(back, t.path)
    np.testing.assert_allclose(
        0.5 * np.einsum("dir,dro->dio", theirs["lora_A"], theirs["lora_B"]),
        model.lora_scale * np.einsum("dir,dro->dio", mine["lora_A"], mine["lora_B"]),
        rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="lora.rank=4"):
    lora.load_diffusers(path, targets, rank=8, scale=1.0)
  with pytest.raises(ValueError, match="lora.init_from.*match|holds"):
    lora.load_diffusers(path, targets[:3], rank=4, scale=1.0)


def test_fold_adds_the_update_where_the_kernel_is_used():
  """`fold` on a layer (no depth axis): the kernel becomes kernel + scale A @ B, for a
  Linear and for the DiT's LinearGeneral attention projections ([in, heads, dim])."""
  rng = np.random.default_rng(0)
  k = rng.normal(size=(6, 2, 3)).astype(np.float32)
  a = rng.normal(size=(6, 4)).astype(np.float32)
  b = rng.normal(size=(4, 2, 3)).astype(np.float32)
  out = lora.fold({"q": {"kernel": jnp.asarray(k), "lora_A": jnp.asarray(a),
                         "lora_B": jnp.asarray(b)}}, 0.5)
  np.testing.assert_allclose(np.asarray(out["q"]["kernel"]),
                             k + 0.5 * np.einsum("ir,rhd->ihd", a, b), rtol=1e-5, atol=1e-6)
  assert "lora_A" in out["q"]  # kept: the module still holds the (unused) factors


def test_dit_targets_and_errors():
  cfg = tiny.get_config()
  cfg.lora.rank = 2
  config_lib.validate(cfg, num_devices=1)
  names = [t.name for t in velocity.for_config(cfg).lora_targets()]
  assert names and all(n.startswith("blocks.*.") for n in names)
  cfg.lora.targets = ("blocks.*.attn.nothing",)
  with pytest.raises(config_lib.ConfigError, match="lora.targets.*blocks.\\*.attn.nothing"):
    config_lib.validate(cfg, num_devices=1)
  cfg.lora.targets = ()
  cfg.lora.init_from = "/nonexistent.safetensors"
  with pytest.raises(config_lib.ConfigError, match="lora.init_from"):
    config_lib.validate(cfg, num_devices=1)


@pytest.mark.slow
def test_flux_tiny_lora_run_exports_an_adapter_diffusers_loads(base_folder, tmp_path):
  """configs/flux_tiny.py from a diffusers folder with lora.rank=4 (2 devices, fsdp 2):
  only the adapters train (the checkpoint holds them and their optimizer state, not
  the base); the exported pytorch_lora_weights.safetensors, loaded by diffusers onto
  that same base, gives the outputs of the merged export/transformer."""
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = flux_tiny.get_config()
  cfg.flux.pretrained = base_folder
  cfg.lora.rank = 4
  cfg.mesh.fsdp = 2
  cfg.flow.learning_rate = 3e-2  # a visible update in 4 steps
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2])
  assert not results["preempted"] and results["skipped"]["flow"] == 0
  saved = loop.ckpt_lib.load_numpy(os.path.join(workdir, "flow"), cfg.flow.steps)
  last_keys = {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(saved["params"])}
  assert last_keys == {"lora_A", "lora_B"}  # the adapters only: no base weights
  adapters = sum(x.size for x in jax.tree.leaves(saved["params"]))
  moments = sum(x.size for x in jax.tree.leaves(saved["opt_state"]) if np.ndim(x))
  assert moments == 2 * adapters < flux.read_config(base_folder).num_params()
  adapter = os.path.join(workdir, "export", "lora")
  merged = diffusers.FluxTransformer2DModel.from_pretrained(
      os.path.join(workdir, "export", "transformer")).eval()
  ref = diffusers.FluxTransformer2DModel.from_pretrained(base_folder).eval()
  before = _theirs(ref, _inputs())
  ref.load_lora_adapter(adapter, weight_name=lora.LORA_FILE, prefix="transformer")
  after = _theirs(ref, _inputs())
  assert np.abs(after - before).max() > 1e-4 * np.abs(before).max()  # the adapter trained
  np.testing.assert_allclose(_theirs(merged, _inputs()), after, atol=2e-5 * np.abs(after).max())
