"""FLUX.1's transformer against diffusers' own `FluxTransformer2DModel` (torch, CPU), part by part.

Every test builds diffusers' model from a small config with random weights,
`save_pretrained`s it, loads the folder with `train.models.flux` and compares
outputs in float32 at matmul precision 'highest': the whole model to 2e-5 of
the output scale, with and without the guidance input, with Kontext's
condition ids, from one file and from a sharded set.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssim_jax import flow
from train import sharding
from train.models import flux
import optional  # tests/ is on the path

torch = optional.require("torch")
diffusers = optional.require("diffusers")

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
TOL = 2e-5  # of the output's largest magnitude


def _torch_model(guidance_embeds, seed=0, **over):
  torch.manual_seed(seed)
  return diffusers.FluxTransformer2DModel(
      **{**TINY, "guidance_embeds": guidance_embeds, **over}).eval()


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
  """A tiny FLUX.1 [dev]-like transformer (guidance input) saved by diffusers."""
  folder = tmp_path_factory.mktemp("flux_dev")
  model = _torch_model(True)
  model.save_pretrained(folder)
  return str(folder), model


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
  """[schnell]-like (no guidance input), saved as a sharded set with its index."""
  folder = tmp_path_factory.mktemp("flux_schnell")
  model = _torch_model(False, seed=1)
  model.save_pretrained(folder, max_shard_size="40KB")
  return str(folder), model


def _inputs(b=2, grid=(3, 4), l=5, kontext=False, seed=0, in_channels=8):
  rng = np.random.default_rng(seed)
  h, w = grid
  img_ids = flux.latent_image_ids(h, w)
  if kontext:  # the condition image's tokens after the target's, img_ids[..., 0] = 1
    img_ids = np.concatenate([img_ids, flux.latent_image_ids(h, w, index=1)])
  n = img_ids.shape[0]
  return dict(
      hidden_states=rng.normal(size=(b, n, in_channels)).astype(np.float32),
      encoder_hidden_states=rng.normal(size=(b, l, TINY["joint_attention_dim"])).astype(
          np.float32),
      pooled_projections=rng.normal(size=(b, TINY["pooled_projection_dim"])).astype(np.float32),
      timestep=rng.uniform(0.05, 1.0, size=(b,)).astype(np.float32),
      img_ids=img_ids, txt_ids=np.zeros((l, 3), np.float32),
      guidance=np.full((b,), 3.5, np.float32))


def _torch_out(model, inp):
  with torch.no_grad():
    kw = {k: torch.tensor(v) for k, v in inp.items()}
    if not model.config.guidance_embeds:
      kw["guidance"] = None
    return model(**kw).sample.numpy()


def _jax_out(model, inp, dtype=jnp.float32):
  g = inp["guidance"] if model.config.guidance_embeds else None
  with jax.default_matmul_precision("highest"):
    out = model(jnp.asarray(inp["hidden_states"], dtype), jnp.asarray(inp["encoder_hidden_states"]),
                jnp.asarray(inp["pooled_projections"]), jnp.asarray(inp["timestep"]),
                inp["img_ids"], inp["txt_ids"], None if g is None else jnp.asarray(g))
  return np.asarray(out.astype(jnp.float32))


def _assert_close(ours, ref):
  scale = np.abs(ref).max()
  assert scale > 0.1  # a real output, not a degenerate one
  err = np.abs(ours - ref).max()
  assert err <= TOL * scale, (err, scale)


@pytest.mark.parametrize("kontext", [False, True])
def test_dev_model_matches_diffusers(dev_folder, kontext):
  folder, ref_model = dev_folder
  inp = _inputs(kontext=kontext)
  _assert_close(_jax_out(flux.from_diffusers(folder), inp), _torch_out(ref_model, inp))


def test_schnell_model_from_sharded_safetensors_matches_diffusers(schnell_folder):
  folder, ref_model = schnell_folder
  files = os.listdir(folder)
  assert flux.INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2
  inp = _inputs(kontext=True, seed=3)
  model = flux.from_diffusers(folder)
  assert not model.config.guidance_embeds
  _assert_close(_jax_out(model, inp), _torch_out(ref_model, inp))


def test_every_tensor_maps_to_a_parameter_and_loads_exactly(dev_folder):
  folder, ref_model = dev_folder
  model = flux.from_diffusers(folder)
  ours = dict(flux.diffusers_tensors(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config))
  theirs = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
  assert ours.keys() == theirs.keys()
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  assert flux.tensor_shapes(model.config) == {k: v.shape for k, v in theirs.items()}
  assert model.config.num_params() == sum(v.size for v in theirs.values())


def test_rope_matches_flux_pos_embed():
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed
  ids = np.concatenate([np.zeros((7, 3), np.float32),
                        flux.latent_image_ids(5, 6), flux.latent_image_ids(5, 6, index=1)])
  cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.tensor(ids))
  cos, sin = flux.rope_tables(ids, (16, 56, 56))
  np.testing.assert_array_equal(np.asarray(cos), cos_ref.numpy())  # float64 then float32
  np.testing.assert_array_equal(np.asarray(sin), sin_ref.numpy())
  # Traced ids take the float32 path: close, not bit-equal.
  cos_t, _ = jax.jit(lambda i: flux.rope_tables(i, (16, 56, 56)))(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(cos_t), cos_ref.numpy(), atol=1e-5)


def test_time_embedding_matches_diffusers(dev_folder):
  folder, ref_model = dev_folder
  model = flux.from_diffusers(folder)
  t = np.array([0.0, 0.25, 1.0], np.float32)
  g = np.array([3.5, 1.0, 7.0], np.float32)
  pooled = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model.time_text_embed(torch.tensor(t) * 1000, torch.tensor(g) * 1000,
                                    torch.tensor(pooled)).numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model.time_text_embed(jnp.asarray(t) * 1000, jnp.asarray(g) * 1000,
                                            jnp.asarray(pooled)))
  # float32 sinusoids of t * 1000 (up to 1000 rad): torch's and XLA's cos differ
  # by ulps of the argument, so the bound is the whole model's, of the scale.
  _assert_close(ours, ref)


def _one_block(stack, i):
  """Block i of a stacked module, as a module of its own."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


def test_one_double_and_one_single_block_match_diffusers(dev_folder):
  folder, ref_model = dev_folder
  model = flux.from_diffusers(folder)
  rng = np.random.default_rng(5)
  b, l, n, d = 2, 5, 12, 32
  txt = rng.normal(size=(b, l, d)).astype(np.float32)
  img = rng.normal(size=(b, n, d)).astype(np.float32)
  temb = rng.normal(size=(b, d)).astype(np.float32)
  ids = np.concatenate([np.zeros((l, 3), np.float32), flux.latent_image_ids(3, 4)])
  rope = flux.rope_tables(ids, TINY["axes_dims_rope"])
  rope_t = tuple(torch.tensor(np.asarray(r)) for r in rope)
  with torch.no_grad():
    ref_txt, ref_img = ref_model.transformer_blocks[1](
        torch.tensor(img), torch.tensor(txt), torch.tensor(temb), rope_t)
    ref_single_txt, ref_single_img = ref_model.single_transformer_blocks[0](
        torch.tensor(img), torch.tensor(txt), torch.tensor(temb), rope_t)
  with jax.default_matmul_precision("highest"):
    out_txt, out_img = _one_block(model.transformer_blocks, 1)(
        (jnp.asarray(txt), jnp.asarray(img)), jnp.asarray(temb), rope)
    single = _one_block(model.single_transformer_blocks, 0)(
        jnp.concatenate([jnp.asarray(txt), jnp.asarray(img)], 1), jnp.asarray(temb), rope)
  for ours, ref in ((out_txt, ref_txt), (out_img, ref_img), (single[:, :l], ref_single_txt),
                    (single[:, l:], ref_single_img)):
    _assert_close(np.asarray(ours), ref.numpy())


def test_bfloat16_against_float32(dev_folder):
  """bf16 parameters and compute against the float32 model: the relative L2 error is
  that of diffusers' own model cast to bf16 (the timestep too is cast before the
  factor 1000, as diffusers does), printed for the record (-s)."""
  folder, ref_model = dev_folder
  inp = _inputs(kontext=True)
  f32 = _jax_out(flux.from_diffusers(folder), inp)
  bf16_model = flux.from_diffusers(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(bf16_model)))
  bf16 = _jax_out(bf16_model, inp, dtype=jnp.bfloat16)
  ref_bf16_model = _torch_model(True).to(torch.bfloat16)
  with torch.no_grad():
    kw = {k: torch.tensor(v) for k, v in inp.items()}
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
      kw[k] = kw[k].to(torch.bfloat16)
    ref_bf16 = ref_bf16_model(**kw).sample.float().numpy()
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  ours, theirs = rel(bf16, f32), rel(ref_bf16, _torch_out(ref_model, inp))
  print(f"FLUX tiny, bf16 vs float32 relative L2: ours {ours:.2e}, diffusers' {theirs:.2e}; "
        f"ours vs diffusers' in bf16 {rel(bf16, ref_bf16):.2e}")
  assert 1e-3 < ours < 1.25 * theirs  # bf16 really used, and no worse than diffusers'
  assert rel(bf16, ref_bf16) < 0.5 * theirs  # the same bf16 rounding points as diffusers'


def test_save_diffusers_then_diffusers_loads_the_same_model(dev_folder, tmp_path):
  folder, ref_model = dev_folder
  model = flux.from_diffusers(folder)
  out = flux.save_diffusers(model, tmp_path / "saved", max_shard_bytes=30_000)  # sharded too
  assert flux.INDEX_NAME in os.listdir(out)
  back = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
  assert back.config.guidance_embeds and back.config.num_layers == TINY["num_layers"]
  inp = _inputs(kontext=True, seed=2)
  np.testing.assert_array_equal(_torch_out(back, inp), _torch_out(ref_model, inp))
  reloaded = flux.from_diffusers(out)
  for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(model)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loads_tensor_by_tensor_into_the_fsdp_layout(dev_folder):
  """With the trainer's fsdp shardings on 8 devices, each device holds only its shards
  (1/8 of every split parameter) and the values are the file's."""
  folder, _ = dev_folder
  mesh = sharding.make_mesh(fsdp=8)
  _, abstract = nnx.split(flux._abstract_model(flux.read_config(folder)), nnx.Param)
  shardings = sharding.state_shardings(nnx.to_pure_dict(abstract), mesh, min_shard_size=64)
  model = flux.from_diffusers(folder, shardings=shardings)
  ref = flux.from_diffusers(folder)
  split = 0
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ref)),
                  strict=True):
    if a.sharding.spec != jax.sharding.PartitionSpec():
      split += 1
      assert a.addressable_shards[0].data.size * 8 == a.size
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert split > 20


def _rewrite(folder, dst, edit):
  """Copies a single-file checkpoint with its tensors changed by `edit(dict)`."""
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst)
  tensors = load_file(os.path.join(folder, flux.WEIGHTS_NAME))
  edit(tensors)
  save_file(tensors, os.path.join(dst, flux.WEIGHTS_NAME))
  with open(os.path.join(folder, flux.CONFIG_NAME)) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, flux.CONFIG_NAME), "w") as f:
    json.dump(cfg, f)
  return str(dst)


def test_load_fails_naming_unmapped_missing_or_misshapen_tensors(dev_folder, tmp_path):
  folder, _ = dev_folder
  extra = _rewrite(folder, tmp_path / "extra",
                   lambda t: t.update({"pos_embed.proj.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(ValueError, match="pos_embed.proj.weight"):
    flux.from_diffusers(extra)
  missing = _rewrite(folder, tmp_path / "missing",
                     lambda t: t.pop("single_transformer_blocks.1.attn.norm_k.weight"))
  with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.attn\.norm_k\.weight.*"
                                       r"single_transformer_blocks/attn/norm_k/weight"):
    flux.from_diffusers(missing)
  shape = _rewrite(folder, tmp_path / "shape",
                   lambda t: t.update({"x_embedder.weight": np.zeros((32, 9), np.float32)}))
  with pytest.raises(ValueError, match=r"x_embedder.weight.*\(32, 9\).*\(32, 8\)"):
    flux.from_diffusers(shape)
  with pytest.raises(FileNotFoundError, match="transformer"):
    flux.from_diffusers(tmp_path)


def test_pipeline_folder_reads_its_transformer(dev_folder, tmp_path):
  folder, _ = dev_folder
  pipe = tmp_path / "pipe"
  os.makedirs(pipe)
  os.symlink(folder, pipe / "transformer")
  assert flux.locate(pipe).folder == str(pipe / "transformer")
  assert flux.read_config(pipe) == flux.read_config(folder)


def test_config_rejects_fields_diffusers_does_not_have():
  with pytest.raises(ValueError, match="num_blocks"):
    flux.FluxConfig.from_dict({"num_blocks": 3})
  with pytest.raises(ValueError, match="axes_dims_rope"):
    flux.FluxConfig.from_dict({"attention_head_dim": 16, "axes_dims_rope": [4, 4, 4]})


def test_pack_order_is_diffusers_pack_latents():
  """`flow.patchify(..., patch_order='cpq')` is FluxPipeline._pack_latents on NHWC latents,
  and `unpatchify` is `_unpack_latents`."""
  from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
  rng = np.random.default_rng(0)
  b, c, h, w = 2, 16, 6, 8
  nchw = rng.normal(size=(b, c, h, w)).astype(np.float32)
  ref = FluxPipeline._pack_latents(torch.tensor(nchw), b, c, h, w).numpy()
  nhwc = jnp.asarray(nchw.transpose(0, 2, 3, 1))
  tokens = flow.patchify(nhwc, patch_size=2, patch_order="cpq")
  np.testing.assert_array_equal(np.asarray(tokens), ref)
  back = FluxPipeline._unpack_latents(torch.tensor(ref), h * 8, w * 8, 8).numpy()
  ours = flow.unpatchify(tokens, grid_hw=(h // 2, w // 2), patch_size=2, patch_order="cpq")
  np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), back)
