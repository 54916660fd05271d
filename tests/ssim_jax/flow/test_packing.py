"""`ssim_jax/flow/packing.py`: patches and packed variable-size batches."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssim_jax import flow

F = 4          # decoder upsampling factor (latent -> pixels)
C_LAT = 3      # latent channels


def _key(i):
  return jax.random.PRNGKey(i)


@hypothesis.given(h=st.integers(1, 3), w=st.integers(1, 3), p=st.integers(1, 3),
                  c=st.integers(1, 4), lead=st.integers(0, 2),
                  order=st.sampled_from(["pqc", "cpq"]))
def test_patchify_roundtrip(h, w, p, c, lead, order):
  shape = (2,) * lead + (h * p, w * p, c)
  z = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  tok = flow.patchify(z, patch_size=p, patch_order=order)
  assert tok.shape == (2,) * lead + (h * w, p * p * c)
  np.testing.assert_array_equal(
      flow.unpatchify(tok, grid_hw=(h, w), patch_size=p, patch_order=order), z)
  np.testing.assert_array_equal(
      flow.patchify(flow.unpatchify(tok, grid_hw=(h, w), patch_size=p, patch_order=order),
                    patch_size=p, patch_order=order), tok)


def test_cpq_order_is_channel_then_patch_row_then_column():
  # FLUX's token of the 2x2 patch at grid (i, j): value [c, ph, pw] = z[2i + ph, 2j + pw, c]
  # (tests/train/test_flux.py checks it against diffusers' _pack_latents itself).
  z = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)
  tok = np.asarray(flow.patchify(jnp.asarray(z), patch_size=2, patch_order="cpq"))
  i, j = 1, 2
  np.testing.assert_array_equal(tok[i * 3 + j].reshape(3, 2, 2),
                                z[2 * i:2 * i + 2, 2 * j:2 * j + 2].transpose(2, 0, 1))


def test_unpatchify_matches_seed_einsum():
  # The seed: tok.view(h, w, p, p, c); einsum("hwpqc->chpwq").reshape(c, h*p, w*p)
  h, w, p, c = 2, 3, 2, 4
  tok = np.random.default_rng(0).normal(size=(h * w, p * p * c)).astype(np.float32)
  seed = np.einsum("hwpqc->chpwq", tok.reshape(h, w, p, p, c)).reshape(c, h * p, w * p)
  ours = flow.unpatchify(jnp.asarray(tok), grid_hw=(h, w), patch_size=p)
  np.testing.assert_array_equal(ours, np.moveaxis(seed, 0, -1))


def test_patch_errors():
  with pytest.raises(ValueError, match="patch_size"):
    flow.patchify(jnp.zeros((5, 4, 2)), patch_size=2)
  with pytest.raises(ValueError, match="grid_hw"):
    flow.unpatchify(jnp.zeros((6, 8)), grid_hw=(2, 2), patch_size=2)
  with pytest.raises(ValueError, match="patch_order"):
    flow.patchify(jnp.zeros((4, 4, 2)), patch_size=2, patch_order="chw")
  with pytest.raises(ValueError, match="latent_hw_list"):
    flow.PackedLayout.from_sizes([(4, 4), (3, 4)], 2)
  with pytest.raises(TypeError, match="patch_size"):
    flow.PackedLayout.from_sizes([(4, 4)], 2.0)


def test_packed_layout_roundtrip_every_image():
  layout = flow.PackedLayout.from_sizes([(4, 6), (8, 8), (2, 2), (4, 6)], 2)
  assert hash(layout) == hash(flow.PackedLayout.from_sizes(
      [[4, 6], [8, 8], [2, 2], [4, 6]], 2))
  lat = [jax.random.normal(_key(i), hw + (C_LAT,))
         for i, hw in enumerate(layout.latent_hw)]
  tokens = flow.pack(lat, layout)
  assert tokens.shape == (layout.num_tokens, 4 * C_LAT)
  assert layout.num_tokens == 6 + 16 + 1 + 6
  padded, mask = jax.jit(flow.unpack, static_argnums=1)(tokens, layout)
  assert padded.shape == (4, 8, 8, C_LAT) and mask.shape == (4, 8, 8, 1)
  for i, (h, w) in enumerate(layout.latent_hw):
    np.testing.assert_array_equal(padded[i, :h, :w], lat[i])
    np.testing.assert_array_equal(mask[i, :h, :w], 1.0)
    outside = np.asarray(mask[i, ..., 0]) == 0
    np.testing.assert_array_equal(np.asarray(padded[i])[outside], 0.0)
    assert float(mask[i].sum()) == h * w
  np.testing.assert_array_equal(flow.pack_padded(padded, layout), tokens)
  # Per-image values from the first token, and back to tokens.
  t_img = jnp.array([0.1, 0.2, 0.3, 0.4])
  t_tok = flow.token_values(t_img, layout)
  assert t_tok.shape == (layout.num_tokens,)
  np.testing.assert_array_equal(flow.image_values(t_tok, layout), t_img)
  np.testing.assert_array_equal(layout.mask(downsample=F)[1], 1.0)
  assert layout.mask(downsample=F)[2].sum() == 2 * 2 * F * F
