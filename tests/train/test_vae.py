"""Tests of train/models/vae.py: shapes, KL, frozen use under jit, diffusers weights."""

import jax
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
