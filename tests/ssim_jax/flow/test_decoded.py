"""`ssim_jax/flow/decoded.py`: the decoded, timestep-weighted SSIM and pixel losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import ssim_jax
from ssim_jax import flow

F = 4          # decoder upsampling factor (latent -> pixels)
C_LAT = 3      # latent channels
WIN = 5        # SSIM window used throughout (small images)


def _key(i):
  return jax.random.PRNGKey(i)


def _conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def make_conv_decoder(seed=0, c_lat=C_LAT):
  """A tiny conv decoder: conv3x3 -> tanh -> nearest x4 -> conv3x3 -> tanh.

  Its receptive field crosses latent borders, so decoding a padded latent
  differs from decoding the image alone near the border.
  """
  k1, k2 = jax.random.split(_key(100 + seed))
  params = dict(w1=jax.random.normal(k1, (3, 3, c_lat, 8)) * 0.4,
                w2=jax.random.normal(k2, (3, 3, 8, 3)) * 0.3)

  def decode(p, z):
    h = jnp.tanh(_conv(z, p["w1"]))
    h = jnp.repeat(jnp.repeat(h, F, axis=1), F, axis=2)
    return jnp.tanh(_conv(h, p["w2"]))
  return params, decode


def make_local_decoder(seed=0, c_lat=C_LAT):
  """A per-latent-pixel decoder (linear -> tanh -> depth-to-space x4)."""
  params = dict(w=jax.random.normal(_key(200 + seed), (c_lat, F * F * 3)) * 0.5)

  def decode(p, z):
    y = jnp.tanh(z @ p["w"])
    n, h, w, _ = y.shape
    y = y.reshape(n, h, w, F, F, 3).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, h * F, w * F, 3)
  return params, decode


def _images(n, h, w, seed=1):
  return jnp.tanh(jax.random.normal(_key(seed), (n, h, w, 3)))


def _reference_loss(latents, images, weights, decode, *, padding="valid",
                    pixel_loss="l1"):
  """Image by image: no chunks, no sorting, no skipping, weighted sums by hand.

  `latents`/`images` are sequences of single images or equal-size batches
  (a batch is decoded at once: each image's decode and SSIM are independent).
  """
  num = mass = pnum = pmass = 0.0
  for z, x, w in zip(latents, images, weights):
    batched = z.ndim == 4
    z, x, w = (z, x, jnp.asarray(w)) if batched else (z[None], x[None], jnp.asarray(w)[None])
    pred = decode(z)
    s = ssim_jax.ssim_sums(pred * 0.5 + 0.5, x * 0.5 + 0.5, window_size=WIN,
                           padding=padding)
    num = num + jnp.sum(w * s.weighted_sum)
    mass = mass + jnp.sum(w * s.mass)
    d = pred - x
    per = jnp.abs(d) if pixel_loss == "l1" else jnp.square(d)
    pnum = pnum + jnp.sum(w * jnp.sum(per, axis=(1, 2, 3)))
    pmass = pmass + jnp.sum(w) * np.prod(per.shape[1:])
  return 1.0 - num / mass, pnum / pmass


N_IMG = 5


@functools.lru_cache(maxsize=None)
def _shared_step():
  """ONE compiled loss+grad (conv decoder, chunks of 2) reused by several tests:
  weights are an argument, so new weights do not recompile."""
  params, decode = make_conv_decoder()

  @jax.jit
  def step(z, images, w, params):
    def loss(z, params):
      out = flow.decoded_losses(z, images, w, functools.partial(decode, params),
                                window_size=WIN, chunk_size=2)
      return out.ssim + out.pixel, out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(z, params)
  return params, decode, step


def _finite(tree):
  return all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(tree))


def test_perfect_velocity_gives_ssim_of_decoded_z0():
  params, decode, step = _shared_step()
  z0 = jax.random.normal(_key(0), (N_IMG, 4, 4, C_LAT))
  noise = jax.random.normal(_key(1), (N_IMG, 4, 4, C_LAT))
  t = jnp.array([0.05, 0.1, 0.2, 0.5, 0.0])
  images = _images(N_IMG, 16, 16)
  x_t = flow.interpolate(z0, noise, t)
  v = flow.velocity_target(z0, noise)
  w = flow.timestep_weight(t, max_t=0.3)
  z0_pred = jax.jit(flow.reconstruct_z0)(x_t, v, t, z0=z0, noise=noise)
  np.testing.assert_array_equal(z0_pred, z0)
  (_, out), _ = step(z0_pred, images, w, params)
  dec = decode(params, z0)
  per = ssim_jax.ssim(dec * 0.5 + 0.5, images * 0.5 + 0.5, window_size=WIN)
  expect = 1.0 - jnp.sum(w * per) / jnp.sum(w)   # equal map sizes per image
  np.testing.assert_allclose(out.ssim, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.per_image_ssim[w > 0], per[w > 0], rtol=1e-5,
                             atol=1e-6)
  pix = jnp.sum(w * jnp.mean(jnp.abs(dec - images), axis=(1, 2, 3))) / jnp.sum(w)
  np.testing.assert_allclose(out.pixel, pix, rtol=1e-5)
  np.testing.assert_allclose(out.weight_mass, jnp.sum(w), rtol=1e-6)
  # weights [1, .67, .33, 0, 1]: chunks {0,4}, {1,2}, {3} -> image 3 skipped.
  np.testing.assert_array_equal(out.decoded, np.asarray(w) > 0)


@pytest.mark.parametrize("chunk_size,remat,pixel_loss", [
    (1, True, "l2"), (4, False, "l1"), (6, True, "l1")])
def test_chunking_and_remat_do_not_change_loss_or_grads(chunk_size, remat,
                                                        pixel_loss):
  params, decode = make_conv_decoder()
  n = 6
  z = jax.random.normal(_key(0), (n, 4, 4, C_LAT))
  images = _images(n, 16, 16)
  w = jnp.array([0.0, 0.7, 1.0, 0.0, 0.2, 0.5])

  def loss(z, params):
    out = flow.decoded_losses(z, images, w, functools.partial(decode, params),
                              window_size=WIN, pixel_loss=pixel_loss,
                              chunk_size=chunk_size, remat=remat)
    return out.ssim + 0.5 * out.pixel

  def ref(z, params):
    s, px = _reference_loss([z], [images], [w], functools.partial(decode, params),
                            pixel_loss=pixel_loss)
    return s + 0.5 * px

  val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(z, params)
  rval, rgrads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(z, params)
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               grads, rgrads)
  assert _finite(grads)
  # Zero-weight images get exactly zero gradient.
  np.testing.assert_array_equal(grads[0][np.asarray(w) == 0], 0.0)


def test_zero_weight_images_do_not_affect_loss_or_grads():
  params, _, step = _shared_step()
  z = jax.random.normal(_key(0), (N_IMG, 4, 4, C_LAT))
  images = _images(N_IMG, 16, 16)
  # Sorted by weight, chunks of 2: {3, 4}, {1, 0}, {2, filler}: image 0
  # (weight 0) is decoded next to a positive one, image 2 is skipped.
  w = jnp.array([0.0, 0.3, 0.0, 1.0, 0.6])
  (v1, out1), (gz1, gp1) = step(z, images, w, params)
  zero = np.asarray(w) == 0
  z2 = jnp.where(zero[:, None, None, None], 5.0 * z[::-1], z)
  images2 = jnp.where(zero[:, None, None, None], -images, images)
  (v2, _), (gz2, gp2) = step(z2, images2, w, params)
  np.testing.assert_array_equal(out1.decoded, [True, True, False, True, True])
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               (gz1, gp1), (gz2, gp2))
  np.testing.assert_array_equal(gz1[zero], 0.0)


def test_zero_weight_chunks_are_not_decoded():
  # NaN latents in an all-zero-weight chunk never reach the decoder: the loss
  # and gradients stay finite (a select, as under vmap, would give NaN).
  params, _, step = _shared_step()
  z = jax.random.normal(_key(0), (N_IMG, 4, 4, C_LAT))
  z = z.at[1].set(jnp.nan).at[3].set(jnp.nan)
  images = _images(N_IMG, 16, 16)
  w = jnp.array([1.0, 0.0, 0.4, 0.0, 0.0])
  (val, out), grads = step(z, images, w, params)
  assert np.isfinite(val) and _finite(grads)
  np.testing.assert_array_equal(out.decoded, [True, False, True, False, False])
  # ... whereas NaN in a decoded chunk is NOT hidden.
  (val_nan, _), _ = step(z.at[0].set(jnp.nan), images, w, params)
  assert np.isnan(val_nan)
  # All weights zero: nothing decoded, loss 0 with zero gradient (not NaN).
  (val0, out0), grads0 = step(z, images, jnp.zeros((N_IMG,)), params)
  assert float(val0) == 0.0 and not np.asarray(out0.decoded).any()
  for g in jax.tree.leaves(grads0):
    np.testing.assert_array_equal(g, 0.0)


def _packed_problem(decoder):
  layout = flow.PackedLayout.from_sizes([(4, 6), (6, 4), (4, 6), (6, 6)], 2)
  params, decode = decoder()
  lat = [jax.random.normal(_key(i), hw + (C_LAT,))
         for i, hw in enumerate(layout.latent_hw)]
  tokens = flow.pack(lat, layout)
  hm, wm = layout.max_hw
  gts = [_images(1, h * F, w * F, seed=10 + i)[0]
         for i, (h, w) in enumerate(layout.latent_hw)]
  images = jnp.zeros((layout.num_images, hm * F, wm * F, 3))
  for i, g in enumerate(gts):
    images = images.at[i, :g.shape[0], :g.shape[1]].set(g)
  w = jnp.array([0.8, 0.0, 1.0, 0.3])
  return layout, params, decode, tokens, images, gts, w


@pytest.mark.parametrize("mode", ["layout", "mask_valid", "mask_same"])
def test_packed_mixed_sizes_equal_image_by_image(mode):
  # With `layout` any decoder (here a conv one) is exact; with a validity mask
  # the padded latent enters the decoder, so a per-pixel decoder is used.
  decoder = make_conv_decoder if mode == "layout" else make_local_decoder
  layout, params, decode, tokens, images, gts, w = _packed_problem(decoder)
  padding = "same" if mode == "mask_same" else "valid"

  def packed_loss(tokens, params):
    latents, _ = flow.unpack(tokens, layout)
    kw = (dict(layout=layout) if mode == "layout" else
          dict(valid_mask=jnp.asarray(layout.mask(downsample=F))))
    out = flow.decoded_losses(latents, images, w, functools.partial(decode, params),
                              window_size=WIN, padding=padding, chunk_size=2, **kw)
    return out.ssim + out.pixel

  def ref_loss(tokens, params):
    lat, _ = flow.unpack(tokens, layout)
    crops = [lat[i, :h, :ww] for i, (h, ww) in enumerate(layout.latent_hw)]
    s, p = _reference_loss(crops, gts, w, functools.partial(decode, params),
                           padding=padding)
    return s + p

  val, grads = jax.jit(jax.value_and_grad(packed_loss, argnums=(0, 1)))(tokens, params)
  rval, rgrads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(tokens, params)
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               grads, rgrads)
  assert _finite(grads)
  # The weight-0 image's tokens get no gradient.
  start, count = layout.starts[1], layout.tokens_per_image[1]
  np.testing.assert_array_equal(grads[0][start:start + count], 0.0)


def test_padding_leaks_through_conv_decoder_without_layout():
  # Documents why `layout=` exists: a conv decoder sees the zero padding.
  # Also: a latent-resolution validity mask is upsampled to pixels.
  layout, params, decode, tokens, images, gts, w = _packed_problem(make_conv_decoder)
  latents, lat_mask = flow.unpack(tokens, layout)
  dec = functools.partial(decode, params)
  masked, masked_lat, exact = jax.jit(lambda latents, lat_mask: (
      flow.decoded_losses(latents, images, w, dec, window_size=WIN,
                          valid_mask=jnp.asarray(layout.mask(downsample=F))),
      flow.decoded_losses(latents, images, w, dec, window_size=WIN,
                          valid_mask=lat_mask),
      flow.decoded_losses(latents, images, w, dec, window_size=WIN,
                          layout=layout)))(latents, lat_mask)
  np.testing.assert_allclose(masked_lat.ssim, masked.ssim, rtol=1e-6)
  np.testing.assert_allclose(masked_lat.pixel, masked.pixel, rtol=1e-6)
  assert abs(float(masked.ssim) - float(exact.ssim)) > 1e-6


def test_multi_device_equals_single_device():
  n_dev = 4
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n_dev])
  params, decode = make_conv_decoder()
  n = 8
  z = jax.random.normal(_key(0), (n, 4, 4, C_LAT))
  images = _images(n, 16, 16)
  w = jnp.array([0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.2, 0.9])

  def local(z, images, w, params, axis_name=None):
    out = flow.decoded_losses(z, images, w, functools.partial(decode, params),
                              window_size=WIN, axis_name=axis_name)
    return jnp.stack([out.ssim, out.pixel, out.weight_mass])

  sharded = jax.jit(jax.shard_map(
      functools.partial(local, axis_name="data"), mesh=mesh,
      in_specs=(P("data"), P("data"), P("data"), P()), out_specs=P()))
  np.testing.assert_allclose(sharded(z, images, w, params),
                             jax.jit(local)(z, images, w, params), rtol=1e-5)


def test_debug_print_only_traced_when_enabled(monkeypatch, capfd):
  params, decode = make_local_decoder()
  z = jax.random.normal(_key(0), (2, 4, 4, C_LAT))
  images = _images(2, 16, 16)
  w = jnp.array([0.5, 0.0])
  t = jnp.array([0.15, 0.6])
  # A fresh function per check: the variable is read at trace time and jax
  # caches traces per function.
  def make_f():
    return lambda z: flow.decoded_losses(
        z, images, w, functools.partial(decode, params), window_size=WIN, t=t,
        chunk_size=1).ssim

  def prints():
    names = [e.primitive.name for e in jax.make_jaxpr(make_f())(z).jaxpr.eqns]
    return [n for n in names if "debug" in n]

  monkeypatch.delenv(flow.DEBUG_ENV, raising=False)
  assert prints() == []
  monkeypatch.setenv(flow.DEBUG_ENV, "1")
  assert len(prints()) == 1
  f = make_f()
  jax.block_until_ready(jax.jit(f)(z))
  jax.effects_barrier()
  printed = capfd.readouterr().out
  assert "image 0: t=0.1500 weight=0.5000" in printed
  assert "image 1: t=0.6000 weight=0.0000 ssim=0.0000 decoded=False" in printed


def test_ms_ssim_term_is_weighted_mean_of_per_image_ms_ssim():
  # ms_ssim_levels=L: the SSIM term is 1 - sum w_i MS-SSIM_i / sum w_i, from
  # the same single decode; gradients finite; zero-weight images ignored.
  from ssim_jax.ms_ssim import ms_ssim
  params, decode = make_conv_decoder()
  dec = functools.partial(decode, params)
  z = jax.random.normal(_key(3), (4, 8, 8, C_LAT))
  images = _images(4, 32, 32, seed=4)
  w = jnp.array([1.0, 0.5, 0.0, 0.25])

  def loss(z):
    out = flow.decoded_losses(z, images, w, dec, window_size=WIN, chunk_size=2,
                              ms_ssim_levels=2)
    return out.ssim, out
  (value, out), grad = jax.value_and_grad(loss, has_aux=True)(z)
  per = ms_ssim(dec(z) * 0.5 + 0.5, images * 0.5 + 0.5, window_size=WIN, levels=2)
  np.testing.assert_allclose(value, 1.0 - jnp.sum(w * per) / jnp.sum(w), rtol=1e-5)
  np.testing.assert_allclose(out.per_image_ssim[w > 0], per[w > 0], rtol=1e-5)
  # Not the single-scale SSIM term.
  single = flow.decoded_losses(z, images, w, dec, window_size=WIN).ssim
  assert abs(float(single) - float(value)) > 1e-3
  assert _finite(grad) and float(jnp.abs(grad[2]).max()) == 0.0
  with pytest.raises(ValueError, match="ms_ssim_levels"):
    flow.decoded_losses(z, images, w, dec, window_size=WIN, ms_ssim_levels=0)


def test_decoded_losses_argument_errors():
  params, decode = make_local_decoder()
  dec = functools.partial(decode, params)
  z = jnp.zeros((2, 4, 4, C_LAT))
  images = jnp.zeros((2, 16, 16, 3))
  w = jnp.ones((2,))
  with pytest.raises(ValueError, match="chunk_size"):
    flow.decoded_losses(z, images, w, dec, chunk_size=0)
  with pytest.raises(ValueError, match="pixel_loss"):
    flow.decoded_losses(z, images, w, dec, pixel_loss="l3")
  with pytest.raises(ValueError, match="decode_fn returned shape"):
    flow.decoded_losses(z, images[:, :8, :8], w, dec, window_size=WIN)
  with pytest.raises(ValueError, match="valid_mask"):
    flow.decoded_losses(z, images, w, dec, valid_mask=jnp.ones((2, 5, 5, 1)))
  with pytest.raises(TypeError, match="layout"):
    flow.decoded_losses(z, images, w, dec, layout=((4, 4), (4, 4)))
  with pytest.raises(TypeError, match="data_range"):
    flow.decoded_losses(z, images, w, dec, data_range=jnp.ones((2,)))


@pytest.mark.parametrize("levels,masked", [(1, False), (1, True), (2, False)])
def test_micro_batches_with_the_batch_masses_add_up_to_the_batch(levels, masked):
  # Gradient accumulation: a batch split into micro-batches whose weight masses
  # differ a lot. With the whole batch's masses (decoded_masses) the shares add
  # up to the batch's losses and gradients; each micro-batch normalised by its
  # own mass (the default) does not.
  params, decode = make_conv_decoder()
  n, size = 6, (8 if levels > 1 else 4)
  z = jax.random.normal(_key(5), (n, size, size, C_LAT))
  images = _images(n, size * F, size * F, seed=6)
  w = jnp.array([1.0, 0.9, 0.8, 0.05, 0.0, 0.02])  # micro-batch masses 2.7 vs 0.07
  valid = None
  if masked:
    valid = jnp.ones((n, size * F, size * F, 1)).at[::2, :, -3:].set(0.0)
  kw = dict(window_size=WIN, chunk_size=2, ms_ssim_levels=levels, valid_mask=valid)

  def loss(z, lo, hi, masses=None):
    out = flow.decoded_losses(z[lo:hi], images[lo:hi], w[lo:hi], functools.partial(
        decode, params), masses=masses, **dict(kw, valid_mask=None if valid is None
                                                else valid[lo:hi]))
    return out.ssim + 3.0 * out.pixel, out

  (whole, ref), g_whole = jax.value_and_grad(loss, has_aux=True)(z, 0, n)
  masses = flow.decoded_masses(images, w, valid_mask=valid, window_size=WIN,
                               ms_ssim_levels=levels)
  outs, grads = [], []
  for lo, hi in ((0, 3), (3, n)):
    (_, out), g = jax.value_and_grad(loss, has_aux=True)(z, lo, hi, masses)
    outs.append(out)
    grads.append(g)
  np.testing.assert_allclose(1.0 - sum(1.0 - o.ssim for o in outs), ref.ssim, rtol=1e-5)
  np.testing.assert_allclose(sum(o.pixel for o in outs), ref.pixel, rtol=1e-5)
  np.testing.assert_allclose(grads[0] + grads[1], g_whole, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_whole).max()) > 1e-4
  # The per-micro-batch normalisation (the mistake) is far off.
  own = [jax.value_and_grad(loss, has_aux=True)(z, lo, hi)[1] for lo, hi in ((0, 3), (3, n))]
  assert not np.allclose(own[0] + own[1], g_whole, rtol=1e-2, atol=1e-5)


def test_decoded_masses_argument_errors():
  images, w = jnp.zeros((2, 16, 16, 3)), jnp.ones((2,))
  with pytest.raises(ValueError, match="ms_ssim_levels"):
    flow.decoded_masses(images, w, ms_ssim_levels=0)
  with pytest.raises(ValueError, match="valid_mask"):
    flow.decoded_masses(images, w, valid_mask=jnp.ones((2, 4, 4, 1)))
  params, decode = make_local_decoder()
  with pytest.raises(TypeError, match="masses"):
    flow.decoded_losses(jnp.zeros((2, 4, 4, C_LAT)), images, w,
                        functools.partial(decode, params), masses=(1.0, 2.0))
