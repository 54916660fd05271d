"""Tests of train/models/vae.py: shapes, KL, frozen use under jit, diffusers weights."""

import jax
import jax.extend  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from train.models import vae as vae_lib

TINY = dict(channels=(8, 16), latent_channels=4, norm_groups=4)


def _tiny(seed=0, **kw):
  return vae_lib.VAE(**{**TINY, **kw}, rngs=nnx.Rngs(seed))


def test_demo_config_shapes_without_flops():
  # The demo: 64x64 RGB -> 16x16x4 latents (two downsamplings).
  vae = vae_lib.VAE(channels=(32, 64, 64), latent_channels=4, rngs=nnx.Rngs(0))
  assert vae.downsample_factor == 4
  graphdef, params = nnx.split(vae)

  def roundtrip(params, x):
    m = nnx.merge(graphdef, params)
    mean, logvar = m.encode(x)
    return mean, logvar, m.decode(mean)
  mean, logvar, rec = jax.eval_shape(roundtrip, params,
                                     jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert mean.shape == logvar.shape == (2, 16, 16, 4)
  assert rec.shape == (2, 64, 64, 3)


def test_tiny_widths_and_no_downsampling():
  # channels=(4,) (the trainer's tiny config): GroupNorm groups are capped.
  vae = vae_lib.VAE(channels=(4,), latent_channels=2, rngs=nnx.Rngs(0))
  mean, logvar = vae.encode(jnp.zeros((1, 16, 16, 3)))
  assert mean.shape == (1, 16, 16, 2)
  assert vae.decode(mean).shape == (1, 16, 16, 3)


def test_call_reconstruction_and_kl():
  vae = _tiny()
  x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3)))
  out = vae(x)
  mean, logvar = vae.encode(x)
  np.testing.assert_allclose(out.reconstruction, vae.decode(mean), atol=1e-6)
  kl = 0.5 * np.sum(np.square(mean) + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(out.kl, kl, rtol=1e-5)
  assert np.all(np.asarray(out.kl) >= 0)
  sampled = vae(x, key=jax.random.PRNGKey(1))
  assert not np.allclose(sampled.reconstruction, out.reconstruction)
  assert np.isfinite(np.asarray(sampled.reconstruction)).all()


def test_latent_scaling_roundtrip():
  vae = _tiny(scaling_factor=0.18215, shift_factor=0.1)
  z = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4))
  np.testing.assert_allclose(vae.scale_latents(z), (z - 0.1) * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="channels"):
    vae_lib.VAE(channels=(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="latent_channels"):
    vae_lib.VAE(channels=(8,), latent_channels=0, rngs=nnx.Rngs(0))
  vae = _tiny()
  with pytest.raises(ValueError, match="divisible"):
    vae.encode(jnp.zeros((1, 15, 16, 3)))
  with pytest.raises(ValueError, match="z must be"):
    vae.decode(jnp.zeros((1, 8, 8, 3)))


def test_frozen_params_are_jit_arguments_and_grads_reach_latents():
  vae = _tiny()
  graphdef, params = nnx.split(vae)

  @jax.jit
  def loss(z, params):
    return jnp.mean(jnp.square(nnx.merge(graphdef, params).decode(z)))

  z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  g = jax.grad(loss)(z, params)
  assert g.shape == z.shape and np.abs(np.asarray(g)).sum() > 0
  # Params are arguments: the jaxpr holds no large baked-in constants.
  jaxpr = jax.make_jaxpr(loss)(z, params)
  assert sum(np.size(c) for c in jaxpr.consts) < 100


def _save(tree, path):
  save_file({k: np.ascontiguousarray(v) for k, v in tree.items()}, str(path))


def test_load_diffusers_safetensors_roundtrip(tmp_path):
  src = _tiny(seed=0)
  dst = _tiny(seed=1)
  x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3)))
  assert not np.allclose(src(x).reconstruction, dst(x).reconstruction)
  sd = vae_lib.diffusers_state_dict(src)
  # diffusers names and torch layouts.
  assert sd["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
  assert sd["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (8, 8, 3, 3)
  assert sd["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (16, 16, 3, 3)
  assert sd["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (16, 16)
  assert sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape == (8, 16, 1, 1)
  assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
  # Old-style attention names are accepted.
  old = dict(sd)
  for new, legacy in (("to_q", "query"), ("to_out.0", "proj_attn")):
    key = f"decoder.mid_block.attentions.0.{new}.weight"
    old[key.replace(new, legacy)] = old.pop(key)
  _save(old, tmp_path / "vae.safetensors")
  vae_lib.load_diffusers_safetensors(dst, tmp_path / "vae.safetensors")
  np.testing.assert_array_equal(src(x).reconstruction, dst(x).reconstruction)


def _torch_conv2d(x_nhwc, w_oihw, b, padding):
  """torch.nn.functional.conv2d by its definition (cross-correlation, OIHW weights).

  Written out in numpy so that the layout test needs no torch install.
  """
  kh, kw = w_oihw.shape[2:]
  xp = np.pad(x_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h = xp.shape[1] - kh + 1
  w = xp.shape[2] - kw + 1
  out = np.zeros(x_nhwc.shape[:1] + (h, w, w_oihw.shape[0]), np.float64)
  for u in range(kh):
    for v in range(kw):
      out += np.einsum("nhwc,oc->nhwo", xp[:, u:u + h, v:v + w], w_oihw[:, :, u, v])
  return out + b


def test_loaded_conv_matches_torch_layout(tmp_path):
  # torch's conv2d with the checkpoint's weight gives the model's conv_in output.
  vae = _tiny()
  sd = vae_lib.diffusers_state_dict(vae)
  rng = np.random.default_rng(0)
  sd = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in sd.items()}
  _save(sd, tmp_path / "vae.safetensors")
  vae_lib.load_diffusers_safetensors(vae, tmp_path / "vae.safetensors")
  x = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
  ours = vae.encoder.conv_in(jnp.asarray(x))
  ref = _torch_conv2d(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  # Linear layers: torch x @ W.T + b.
  a = rng.normal(size=(5, 16)).astype(np.float32)
  w = sd["encoder.mid_block.attentions.0.to_q.weight"]
  b = sd["encoder.mid_block.attentions.0.to_q.bias"]
  np.testing.assert_allclose(vae.encoder.mid_block.attentions[0].to_q(jnp.asarray(a)),
                             a @ w.T + b, rtol=1e-4, atol=1e-4)


def test_load_rejects_mismatched_checkpoints(tmp_path):
  vae = _tiny()
  sd = vae_lib.diffusers_state_dict(vae)
  missing = dict(sd)
  missing.pop("decoder.conv_out.bias")
  _save(missing, tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match="decoder.conv_out.bias"):
    vae_lib.load_diffusers_safetensors(vae, tmp_path / "missing.safetensors")
  wrong = dict(sd)
  wrong["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  _save(wrong, tmp_path / "wrong.safetensors")
  with pytest.raises(ValueError, match="encoder.conv_in.weight"):
    vae_lib.load_diffusers_safetensors(vae, tmp_path / "wrong.safetensors")


# ----------------------------------------------------------------------------
# from_diffusers / save_diffusers on numpy-written diffusers folders.

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import diffusers_vae_fixtures as fx  # noqa: E402


def _images(n=2, size=16, seed=0):
  return jnp.tanh(jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3)))


@pytest.mark.parametrize("family", sorted(fx.FAMILIES))
def test_from_diffusers_builds_each_family_from_config(tmp_path, family):
  cfg = fx.FAMILIES[family]
  folder = fx.write_folder(tmp_path / family, cfg, seed=1)
  vae = vae_lib.from_diffusers(folder)
  # Architecture and latent conventions come from config.json.
  assert vae.channels == tuple(cfg["block_out_channels"])
  assert vae.latent_channels == cfg["latent_channels"]
  assert vae.downsample_factor == 4
  assert vae.scaling_factor == cfg["scaling_factor"]
  assert vae.shift_factor == (cfg.get("shift_factor") or 0.0)
  assert vae.use_quant_conv == vae.use_post_quant_conv == (family in ("sd15", "sdxl"))
  assert vae.force_upcast == cfg.get("force_upcast", True)  # diffusers' default: True
  assert vae.dtype == jnp.float32
  x = _images()
  mean, logvar = vae.encode(x)
  assert mean.shape == logvar.shape == (2, 4, 4, cfg["latent_channels"])
  assert mean.dtype == jnp.float32
  rec = vae.decode(mean)
  assert rec.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(rec)).all()
  # The weights are the file's, in the model's layout (torch OIHW -> HWIO).
  tensors = fx.random_tensors(cfg, seed=1)
  np.testing.assert_array_equal(
      vae.decoder.conv_in.kernel.get_value(),
      tensors["decoder.conv_in.weight"].transpose(2, 3, 1, 0))
  # Diffusion latents: (mean - shift) * scale, and back.
  lat = vae.scale_latents(mean)
  np.testing.assert_allclose(lat, (mean - vae.shift_factor) * cfg["scaling_factor"],
                             rtol=1e-6)
  np.testing.assert_allclose(vae.unscale_latents(lat), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_save_diffusers_roundtrip_is_exact(tmp_path, family):
  cfg = fx.FAMILIES[family]
  vae = vae_lib.from_diffusers(fx.write_folder(tmp_path / "src", cfg, seed=2))
  out = vae_lib.save_diffusers(vae, tmp_path / "out", sample_size=64)
  with open(os.path.join(out, "config.json")) as fh:
    written = json.load(fh)
  # diffusers' config format: every AutoencoderKL field, the family's values.
  assert set(written) == set(vae_lib.DIFFUSERS_DEFAULTS) | {"_class_name"}
  for k, v in cfg.items():
    want = 0.0 if (k == "shift_factor" and v is None) else v
    assert written[k] == want, k
  # diffusers' tensor names exactly (so AutoencoderKL.from_pretrained loads it).
  from safetensors.numpy import load_file
  saved = load_file(os.path.join(out, vae_lib.WEIGHTS_NAME))
  assert {k: v.shape for k, v in saved.items()} == fx.tensor_shapes(cfg)
  np.testing.assert_array_equal(saved["encoder.conv_out.weight"],
                                fx.random_tensors(cfg, seed=2)["encoder.conv_out.weight"])
  back = vae_lib.from_diffusers(out)
  x = _images()
  np.testing.assert_array_equal(back.decode(vae.encode(x)[0]), vae.decode(vae.encode(x)[0]))
  assert (back.scaling_factor, back.shift_factor, back.force_upcast) == (
      vae.scaling_factor, vae.shift_factor, vae.force_upcast)


def test_save_diffusers_of_trainer_vaes(tmp_path):
  # The trainer's tiny VAE (widths 4 < 32 groups: capped to 4 everywhere) is
  # expressible: norm_num_groups=4. Mixed caps are not, and say why.
  vae = vae_lib.VAE(channels=(4,), latent_channels=2, mid_attention=False,
                    scaling_factor=0.5, shift_factor=0.1, rngs=nnx.Rngs(0))
  back = vae_lib.from_diffusers(vae_lib.save_diffusers(vae, tmp_path / "tiny"))
  assert json.load(open(tmp_path / "tiny" / "config.json"))["norm_num_groups"] == 4
  assert not back.mid_attention and back.downsample_factor == 1
  x = _images(size=8)
  np.testing.assert_array_equal(back(x).reconstruction, vae(x).reconstruction)
  with pytest.raises(ValueError, match="norm_groups"):
    vae_lib.save_diffusers(vae_lib.VAE(channels=(4, 8), rngs=nnx.Rngs(0)), tmp_path / "bad")


def test_bf16_weights_and_compute_with_float32_statistics(tmp_path):
  cfg = fx.FAMILIES["flux"]
  folder = fx.write_folder(tmp_path / "flux", cfg, seed=3)
  f32 = vae_lib.from_diffusers(folder)
  # force_upcast=True in the config: a bf16 request decodes in float32 ...
  up = vae_lib.from_diffusers(folder, dtype=jnp.bfloat16)
  assert up.dtype == jnp.float32
  assert up.decoder.conv_in.kernel.get_value().dtype == jnp.float32
  # ... unless the user overrides it.
  bf = vae_lib.from_diffusers(folder, dtype=jnp.bfloat16, force_upcast=False)
  assert bf.dtype == jnp.bfloat16
  dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(bf, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  z = f32.encode(_images())[0]
  out = bf.decode(z)  # float32 latents are cast by the model
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(f32.decode(z))
  rms = np.sqrt(np.mean((np.asarray(out, np.float32) - ref) ** 2) / np.mean(ref ** 2))
  assert rms < 0.05, rms
  # Every reduction (GroupNorm moments, softmax max/sum) runs on float32;
  # convolutions and matmuls take bf16 operands.
  graphdef, params = nnx.split(bf)
  jaxpr = jax.make_jaxpr(lambda p, z: nnx.merge(graphdef, p).decode(z))(params, z)
  seen = {"reduce": set(), "conv": set(), "exp": set()}

  def walk(jp):
    for eqn in jp.eqns:
      name = eqn.primitive.name
      kind = ("reduce" if name in ("reduce_sum", "reduce_max") else
              "conv" if name == "conv_general_dilated" else "exp" if name == "exp" else None)
      if kind:
        seen[kind] |= {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  assert seen["reduce"] == {"float32"}, seen
  assert seen["exp"] == {"float32"}, seen
  assert seen["conv"] == {"bfloat16"}, seen


def test_bf16_file_loads_exactly(tmp_path):
  import ml_dtypes
  cfg = fx.FAMILIES["sd3"]
  tensors = fx.random_tensors(cfg, seed=4, dtype=ml_dtypes.bfloat16)
  folder = fx.write_folder(tmp_path / "bf", cfg, tensors=tensors)
  vae = vae_lib.from_diffusers(folder, dtype="bfloat16", force_upcast=False)
  np.testing.assert_array_equal(
      np.asarray(vae.encoder.conv_in.kernel.get_value()).astype(np.float32),
      tensors["encoder.conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))
  out = vae_lib.save_diffusers(vae, tmp_path / "bf_out")  # bf16 params -> BF16 tensors
  from safetensors.numpy import load_file
  assert load_file(os.path.join(out, vae_lib.WEIGHTS_NAME))["encoder.conv_in.weight"].dtype \
      == ml_dtypes.bfloat16


def test_pipeline_folder_and_file_plus_config(tmp_path):
  cfg = fx.FAMILIES["sdxl"]
  fx.write_folder(tmp_path / "pipe" / "vae", cfg, seed=5)
  (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "X"}')
  a = vae_lib.from_diffusers(tmp_path / "pipe")
  weights = tmp_path / "pipe" / "vae" / vae_lib.WEIGHTS_NAME
  alone = tmp_path / "alone.safetensors"
  shutil.copy(weights, alone)
  b = vae_lib.from_diffusers(alone, config=dict(cfg))
  c = vae_lib.from_diffusers(alone, config=tmp_path / "pipe" / "vae" / "config.json")
  d = vae_lib.from_diffusers(weights)  # config.json next to the file
  x = _images()
  for m in (b, c, d):
    np.testing.assert_array_equal(m.encode(x)[0], a.encode(x)[0])


_FLUX = fx.FAMILIES["flux"]
CONFIG_ERRORS = [
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 3}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"latents_mean": [0.0] * 16}, "latents_mean"),
    ({"latents_std": [1.0] * 16}, "latents_std"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
    ({"block_out_channels": []}, "block_out_channels"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"scaling_factor": -1.0}, "scaling_factor"),
    ({"shift_factor": "0.1"}, "shift_factor"),
    ({"use_quant_conv": 1}, "use_quant_conv"),
    ({"mid_block_add_attention": "yes"}, "mid_block_add_attention"),
    ({"force_upcast": None}, "force_upcast"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"_class_name": "AutoencoderKLQwenImage"}, "_class_name"),
]


@pytest.mark.parametrize("change,field", CONFIG_ERRORS, ids=[f for _, f in CONFIG_ERRORS])
def test_unsupported_config_fields_are_named(change, field):
  with pytest.raises(ValueError, match=f"'{field}'"):
    vae_lib.vae_kwargs_from_diffusers_config({**_FLUX, **change})


def test_config_that_does_not_match_the_tensors_names_them(tmp_path):
  # An SD-layout file (quant convs) under a FLUX-style config: the extra tensors are named.
  sd = fx.random_tensors(fx.FAMILIES["sd15"] | {"latent_channels": 16})
  fx.write_folder(tmp_path / "a", _FLUX, tensors=sd)
  with pytest.raises(ValueError, match="unexpected.*post_quant_conv"):
    vae_lib.from_diffusers(tmp_path / "a")
  # A FLUX file under an SD config: the missing quant convs are named.
  fx.write_folder(tmp_path / "b", fx.FAMILIES["sd15"] | {"latent_channels": 16},
                  tensors=fx.random_tensors(_FLUX))
  with pytest.raises(ValueError, match="missing.*quant_conv"):
    vae_lib.from_diffusers(tmp_path / "b")
  # Wrong latent_channels: the first mismatching tensor is named with both shapes.
  fx.write_folder(tmp_path / "c", _FLUX | {"latent_channels": 4},
                  tensors=fx.random_tensors(_FLUX))
  with pytest.raises(ValueError, match=r"conv_\w+\.weight: checkpoint shape .*torch layout"):
    vae_lib.from_diffusers(tmp_path / "c")
  # Original (LDM/BFL) names get a hint.
  fx.write_folder(tmp_path / "d", _FLUX, tensors={"encoder.down.0.block.0.conv1.weight":
                                                  np.zeros((8, 8, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="from_single_file"):
    vae_lib.from_diffusers(tmp_path / "d")


def test_bad_paths_and_arguments_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vae_lib.from_diffusers(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae_lib.from_diffusers(tmp_path / "empty")
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(json.dumps(_FLUX))
  (tmp_path / "noweights" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="fp16.safetensors"):
    vae_lib.from_diffusers(tmp_path / "noweights")
  (tmp_path / "model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match=r"\.bin"):
    vae_lib.from_diffusers(tmp_path / "model.bin")
  (tmp_path / "lone.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="config"):
    vae_lib.from_diffusers(tmp_path / "lone.safetensors")
  folder = fx.write_folder(tmp_path / "ok", _FLUX)
  with pytest.raises(ValueError, match="dtype"):
    vae_lib.from_diffusers(folder, dtype=jnp.int8)
  with pytest.raises(ValueError, match="config must be None"):
    vae_lib.from_diffusers(folder, config=_FLUX)
  with pytest.raises(ValueError, match="force_upcast"):
    vae_lib.from_diffusers(folder, force_upcast="no")


def _np_group_norm(x, scale, bias, groups, eps=1e-6):
  """torch.nn.GroupNorm on NHWC: contiguous channel groups, biased variance."""
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mu = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def test_loaded_blocks_match_numpy_references_of_diffusers_maths(tmp_path):
  """ResnetBlock2D (with shortcut), the mid-block Attention and Downsample2D, by definition."""
  cfg = fx.FAMILIES["sd15"]
  t = {k: v.astype(np.float64) for k, v in fx.random_tensors(cfg, seed=6).items()}
  vae = vae_lib.from_diffusers(fx.write_folder(tmp_path / "m", cfg, seed=6))
  rng = np.random.default_rng(0)
  g = cfg["norm_num_groups"]

  p = "encoder.down_blocks.1.resnets.0"  # 8 -> 16 channels: has conv_shortcut
  x = rng.normal(size=(2, 8, 8, 8)) * 3 + 1
  h = _torch_conv2d(_silu(_np_group_norm(x, t[f"{p}.norm1.weight"], t[f"{p}.norm1.bias"], g)),
                    t[f"{p}.conv1.weight"], t[f"{p}.conv1.bias"], 1)
  h = _torch_conv2d(_silu(_np_group_norm(h, t[f"{p}.norm2.weight"], t[f"{p}.norm2.bias"], g)),
                    t[f"{p}.conv2.weight"], t[f"{p}.conv2.bias"], 1)
  ref = _torch_conv2d(x, t[f"{p}.conv_shortcut.weight"], t[f"{p}.conv_shortcut.bias"], 0) + h
  ours = vae.encoder.down_blocks[1].resnets[0](jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

  p = "decoder.mid_block.attentions.0"
  x = rng.normal(size=(2, 4, 4, 16))
  y = _np_group_norm(x, t[f"{p}.group_norm.weight"], t[f"{p}.group_norm.bias"], g)
  y = y.reshape(2, 16, 16)
  q, k, v = (y @ t[f"{p}.{n}.weight"].T + t[f"{p}.{n}.bias"] for n in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(16)  # one head of dim = channels
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ref = x + ((a @ v) @ t[f"{p}.to_out.0.weight"].T + t[f"{p}.to_out.0.bias"]).reshape(x.shape)
  ours = vae.decoder.mid_block.attentions[0](jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

  p = "encoder.down_blocks.0.downsamplers.0.conv"  # F.pad (0, 1, 0, 1), conv stride 2
  x = rng.normal(size=(1, 8, 8, 8))
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  ref = _torch_conv2d(xp, t[f"{p}.weight"], t[f"{p}.bias"], 0)[:, ::2, ::2]
  ours = vae.encoder.down_blocks[0].downsamplers[0](jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
