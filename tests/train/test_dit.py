"""The DiT's stacked, scanned blocks: per-block model folders convert on load, same outputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ssim_jax import flow
from train.models import dit as dit_lib

ASSET = os.path.join(os.path.dirname(dit_lib.__file__), os.pardir, "assets", "retina_dit_base")


def _model(cfg, *, remat="none", seed=0):
  return dit_lib.DiT(**cfg, remat=remat, rngs=nnx.Rngs(seed))


def _per_block_forward(model, per_block, x_t, t, lowres):
  """The DiT's forward as it was before the blocks were stacked: a Python loop
  over `depth` separate Block modules, each merged from its own `blocks.<i>.*`."""
  b, h, w, _ = x_t.shape
  p = model.patch_size
  cond = jax.image.resize(lowres, (b, h, w, 3), method="bilinear")
  x = model.embed(jnp.concatenate([flow.patchify(x_t, patch_size=p),
                                   flow.patchify(cond, patch_size=p)], axis=-1))
  x = x + dit_lib._pos_embedding_2d(h // p, w // p, model.hidden_size)[None]
  temb = model.t_mlp2(nnx.silu(model.t_mlp1(dit_lib.timestep_embedding(t, model.hidden_size))))
  block_def = nnx.split(model.blocks)[0]
  for i in range(len(per_block)):
    x = nnx.merge(block_def, per_block[str(i)])(x, temb)
  shift, scale = jnp.split(model.final_ada(nnx.silu(temb))[:, None], 2, axis=-1)
  v = model.out(model.final_norm(x) * (1 + scale) + shift)
  return flow.unpatchify(v, grid_hw=(h // p, w // p), patch_size=p)


def _inputs(cfg, b=3, size=16, seed=1):
  rng = np.random.default_rng(seed)
  x_t = jnp.asarray(rng.normal(size=(b, size, size, cfg["latent_channels"])), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(b,)), jnp.float32)
  lowres = jnp.asarray(rng.uniform(-1, 1, size=(b, size, size, 3)), jnp.float32)
  return x_t, t, lowres


def test_shipped_per_block_base_model_loads_stacked_with_unchanged_outputs():
  """train/assets/retina_dit_base holds `blocks.<i>.*` tensors (the layout before
  scanning); loaded, they are stacked [depth, ...] and the scanned forward gives
  the per-block loop's outputs."""
  cfg, params = dit_lib.load_pretrained(ASSET)
  names = load_file(os.path.join(ASSET, dit_lib.WEIGHTS_NAME)).keys()
  assert any(n.startswith("blocks.3.") for n in names)  # the file is per-block
  model = _model(cfg)
  like = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _, params = dit_lib.load_pretrained(ASSET, like=like)
  q = params["blocks"]["attn"]["query"]["kernel"]
  assert q.shape == (cfg["depth"], cfg["hidden_size"], cfg["num_heads"],
                     cfg["hidden_size"] // cfg["num_heads"])
  nnx.update(model, params)
  x_t, t, lowres = _inputs(cfg)
  got = model(x_t, t, lowres)
  per_block = dit_lib.unstack_blocks(params)["blocks"]
  want = _per_block_forward(model, per_block, x_t, t, lowres)
  assert float(jnp.max(jnp.abs(want))) > 0.1  # a trained model: not the zero output
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Block 2 of the file is block 2 of the stack.
  raw = load_file(os.path.join(ASSET, dit_lib.WEIGHTS_NAME))
  np.testing.assert_array_equal(np.asarray(params["blocks"]["mlp1"]["kernel"][2]),
                                raw["blocks.2.mlp1.kernel"])


@pytest.mark.parametrize("remat", dit_lib.REMAT_POLICIES)
def test_remat_policies_give_the_same_values_and_gradients(remat):
  cfg = dict(latent_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=2,
             mlp_ratio=2)
  x_t, t, lowres = _inputs(cfg)
  # Non-zero gates and output layer, so every block contributes to the loss.
  params = jax.tree.map(lambda x: 0.05 * jnp.ones_like(x) + x,
                        nnx.to_pure_dict(nnx.state(_model(cfg), nnx.Param)))
  graphdef = nnx.split(_model(cfg, remat=remat))[0]
  ref_def = nnx.split(_model(cfg))[0]

  def loss(p, gdef):
    return jnp.mean(jnp.square(nnx.merge(gdef, p)(x_t, t, lowres)))

  v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef)
  v0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, ref_def)
  np.testing.assert_allclose(v, v0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, g0)
  assert float(jnp.abs(g["blocks"]["mlp1"]["kernel"][0]).max()) > 0


def test_save_writes_per_block_and_round_trips(tmp_path):
  cfg = dict(latent_channels=4, patch_size=2, hidden_size=16, depth=2, num_heads=2,
             mlp_ratio=2)
  params = nnx.to_pure_dict(nnx.state(_model(cfg, seed=3), nnx.Param))
  dit_lib.save_pretrained(params, tmp_path, model_config=cfg)
  names = load_file(os.path.join(tmp_path, dit_lib.WEIGHTS_NAME)).keys()
  assert "blocks.1.ada.kernel" in names and "blocks.ada.kernel" not in names
  _, loaded = dit_lib.load_pretrained(tmp_path, like=params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_unknown_remat_policy_names_it():
  with pytest.raises(ValueError, match="remat"):
    _model(dict(latent_channels=4, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                mlp_ratio=2), remat="some")
