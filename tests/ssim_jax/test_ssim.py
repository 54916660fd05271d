"""Tests of ssim_jax.ssim: values, references, masks, transforms."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from skimage import data as sk_data
from skimage.metrics import structural_similarity

from jit_helpers import call, value_and_grad
import ssim_jax
from ssim_jax import checks
from ssim_jax import filters



def _retina_pair(size=64, offset=(0, 0), seed=0, noise=0.05):
  img = sk_data.retina().astype(np.float64) / 255.0
  r, c = 600 + offset[0], 300 + offset[1]
  x = img[r:r + size, c:c + size]
  rng = np.random.default_rng(seed)
  y = np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0)
  return x, y


def _sk(x, y, data_range=1.0):
  return structural_similarity(
      x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=data_range, channel_axis=-1)


def _rand(shape, seed=0, lo=0.0, hi=1.0):
  return jnp.asarray(
      np.random.default_rng(seed).uniform(lo, hi, shape), jnp.float32)


class SSIMValueTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_skimage_on_retina(self):
    # Real fundus crops (disc edge, vessels, dark background), several pairs.
    xs, ys, refs = [], [], []
    for i, (off, noise) in enumerate([((0, 0), 0.05), ((300, 500), 0.02),
                                      ((-500, -250), 0.1)]):
      x, y = _retina_pair(48, off, seed=i, noise=noise)
      xs.append(x)
      ys.append(y)
      refs.append(_sk(x, y))
    f = self.variant(lambda a, b: ssim_jax.ssim(a, b, data_range=1.0))
    got = f(jnp.asarray(np.stack(xs), jnp.float32),
            jnp.asarray(np.stack(ys), jnp.float32))
    chex.assert_shape(got, (3,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(refs), atol=1e-5,
                               rtol=0)

  def test_matches_skimage_data_range_255_and_per_image(self):
    x, y = _retina_pair(40, (100, 100), seed=3)
    x2, y2 = _retina_pair(40, (-200, 400), seed=4)
    got = call(ssim_jax.ssim,
        jnp.asarray(np.stack([x * 255, x2]), jnp.float32),
        jnp.asarray(np.stack([y * 255, y2]), jnp.float32),
        data_range=jnp.asarray([255.0, 1.0]))
    np.testing.assert_allclose(
        np.asarray(got), [_sk(x * 255, y * 255, 255.0), _sk(x2, y2)],
        atol=1e-5, rtol=0)

  def test_identity_is_exactly_one(self):
    x = _rand((3, 20, 24, 2), seed=1)
    for padding in ("valid", "same"):
      np.testing.assert_array_equal(
          np.asarray(call(ssim_jax.ssim, x, x, padding=padding)), 1.0)

  def test_constant_images_identity_and_range(self):
    c = jnp.full((2, 16, 16, 1), 0.73, jnp.float32)
    np.testing.assert_array_equal(np.asarray(call(ssim_jax.ssim, c, c)), 1.0)
    v = call(ssim_jax.ssim, c, c + 0.2)
    self.assertTrue(bool(jnp.all((v <= 1.0) & (v >= -1.0))))
    self.assertLess(float(v[0]), 1.0)

  def test_small_foreground_on_large_constant_background(self):
    # Seed 004: a bright structure on a big flat background went above 1.
    x = np.full((1, 64, 64, 1), 0.9, np.float32)
    y = x.copy()
    x[0, 30:34, 30:34, 0] = 0.1
    y[0, 30:34, 30:34, 0] = 0.12
    m = call(ssim_jax.ssim_map, jnp.asarray(x), jnp.asarray(y))
    self.assertLessEqual(float(jnp.max(m)), 1.0)
    self.assertGreaterEqual(float(jnp.min(m)), -1.0)

  def test_symmetry(self):
    x, y = _rand((2, 18, 18, 3), 1), _rand((2, 18, 18, 3), 2)
    np.testing.assert_allclose(call(ssim_jax.ssim, x, y), call(ssim_jax.ssim, y, x),
                               atol=1e-6)

  def test_same_padding_map_shape_and_value(self):
    x, y = _rand((2, 20, 22, 3), 1), _rand((2, 20, 22, 3), 2)
    m = call(ssim_jax.ssim_map, x, y, padding="same")
    chex.assert_shape(m, (2, 20, 22, 3))
    # Reference: uncentred textbook formula with zero-padded float64 blur.
    ref = _textbook_same(np.asarray(x, np.float64), np.asarray(y, np.float64))
    np.testing.assert_allclose(np.asarray(m), ref, atol=2e-6)

  def test_unbatched_input_drops_batch_axis(self):
    x, y = _rand((20, 20, 3), 1), _rand((20, 20, 3), 2)
    v = call(ssim_jax.ssim, x, y)
    chex.assert_shape(v, ())
    np.testing.assert_allclose(v, call(ssim_jax.ssim, x[None], y[None])[0])
    chex.assert_shape(call(ssim_jax.ssim_map, x, y), (10, 10, 3))

  @parameterized.parameters(jnp.float16, jnp.bfloat16)
  def test_low_precision_inputs_return_float32(self, dtype):
    x, y = _rand((2, 16, 16, 1), 1), _rand((2, 16, 16, 1), 2)
    got = call(ssim_jax.ssim, x.astype(dtype), y.astype(dtype))
    self.assertEqual(got.dtype, jnp.float32)
    want = call(ssim_jax.ssim, x.astype(dtype).astype(jnp.float32),
                         y.astype(dtype).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    xl = x.astype(dtype)
    np.testing.assert_array_equal(np.asarray(call(ssim_jax.ssim, xl, xl)), 1.0)


def _textbook_same(x, y, k=11, sigma=1.5, c1=1e-4, c2=9e-4):
  g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * sigma ** 2))
  g /= g.sum()

  def blur(a):
    out = np.zeros_like(a)
    pad = np.pad(a, ((0, 0), (k // 2, k // 2), (0, 0), (0, 0)))
    for i in range(k):
      out += g[i] * pad[:, i:i + a.shape[1]]
    out2 = np.zeros_like(a)
    pad = np.pad(out, ((0, 0), (0, 0), (k // 2, k // 2), (0, 0)))
    for i in range(k):
      out2 += g[i] * pad[:, :, i:i + a.shape[2]]
    return out2

  mx, my = blur(x), blur(y)
  vx, vy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2
  cov = blur(x * y) - mx * my
  return ((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
          * (2 * cov + c2) / (vx + vy + c2))


class SmallImageTest(parameterized.TestCase):

  @parameterized.parameters((8, 7), (9, 9), (10, 9), (5, 5), (4, 3), (3, 3),
                            (12, 11), (30, 11))
  def test_window_shrinks_to_largest_odd_that_fits(self, side, want):
    self.assertEqual(checks.effective_window(11, side, 40), want)
    x = _rand((1, side, 40, 1), 1)
    m = call(ssim_jax.ssim_map, x, x * 0.5)
    chex.assert_shape(m, (1, side - want + 1, 40 - want + 1, 1))

  def test_shrunk_window_matches_explicit_window(self):
    x, y = _rand((1, 8, 8, 1), 1), _rand((1, 8, 8, 1), 2)
    np.testing.assert_array_equal(call(ssim_jax.ssim, x, y),
                                  call(ssim_jax.ssim, x, y, window_size=7))


class MaskTest(parameterized.TestCase):

  @parameterized.parameters("valid", "same")
  def test_mask_of_ones_equals_no_mask(self, padding):
    x, y = _rand((2, 20, 20, 3), 1), _rand((2, 20, 20, 3), 2)
    ones = jnp.ones((2, 20, 20, 1))
    np.testing.assert_allclose(
        call(ssim_jax.ssim, x, y, mask=ones, padding=padding),
        call(ssim_jax.ssim, x, y, padding=padding), atol=1e-6)
    np.testing.assert_allclose(
        call(ssim_jax.ssim_loss, x, y, mask=ones, padding=padding),
        call(ssim_jax.ssim_loss, x, y, padding=padding), atol=1e-6)

  def test_foreground_ones_mask_equals_no_mask_valid(self):
    x, y = _rand((2, 20, 20, 3), 1), _rand((2, 20, 20, 3), 2)
    np.testing.assert_allclose(
        call(ssim_jax.ssim, x, y, mask=jnp.ones((2, 20, 20, 3)),
                      mask_mode="foreground"),
        call(ssim_jax.ssim, x, y), atol=2e-6)

  def test_weighted_mask_is_a_weighted_mean_of_the_map(self):
    x, y = _rand((2, 20, 20, 1), 1), _rand((2, 20, 20, 1), 2)
    mask = _rand((2, 20, 20, 1), 3)
    smap = call(ssim_jax.ssim_map, x, y)
    w = mask[:, 5:15, 5:15]
    want = jnp.sum(w * smap, axis=(1, 2, 3)) / jnp.sum(w, axis=(1, 2, 3))
    np.testing.assert_allclose(call(ssim_jax.ssim, x, y, mask=mask), want,
                               rtol=1e-6)

  def test_mask_is_not_a_scalar_factor(self):
    # Seed 003 multiplied SSIM by mask.mean(); a mask must select pixels.
    x = _rand((1, 24, 24, 1), 1)
    y = x.at[:, :12].set(_rand((1, 12, 24, 1), 2))
    top = jnp.zeros((1, 24, 24, 1)).at[:, :12].set(1.0)
    bottom = 1.0 - top
    self.assertLess(float(call(ssim_jax.ssim, x, y, mask=top)[0]), 0.5)
    # Weighted mode: windows centred >= 5 rows below the change see equal data.
    far = jnp.zeros((1, 24, 24, 1)).at[:, 17:].set(1.0)
    np.testing.assert_allclose(call(ssim_jax.ssim, x, y, mask=far), 1.0, atol=1e-6)
    # Foreground mode: only masked pixels enter the windows at all.
    np.testing.assert_allclose(
        call(ssim_jax.ssim, x, y, mask=bottom, mask_mode="foreground"), 1.0,
        atol=1e-6)

  @parameterized.parameters("valid", "same")
  def test_foreground_invariant_to_background_values(self, padding):
    x, y = _rand((2, 24, 24, 2), 1), _rand((2, 24, 24, 2), 2)
    mask = jnp.zeros((2, 24, 24, 1)).at[:, 4:20, 6:18].set(1.0)
    base = call(ssim_jax.ssim, x, y, mask=mask, mask_mode="foreground",
                         padding=padding)
    junk = jnp.where(mask > 0, x, 1e4)
    junk_y = jnp.where(mask > 0, y, jnp.nan)
    other = call(ssim_jax.ssim, junk, junk_y, mask=mask, mask_mode="foreground",
                          padding=padding)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(other))

  def test_zero_mask_gives_zero_loss_and_zero_gradient(self):
    x, y = _rand((2, 16, 16, 1), 1), _rand((2, 16, 16, 1), 2)
    zero = jnp.zeros((2, 16, 16, 1))
    for mode in ("weighted", "foreground"):
      loss, g = value_and_grad(ssim_jax.ssim_loss, x, y, mask=zero,
                               mask_mode=mode)
      self.assertEqual(float(loss), 0.0)
      np.testing.assert_array_equal(np.asarray(g), 0.0)
      np.testing.assert_array_equal(
          np.asarray(call(ssim_jax.ssim, x, y, mask=zero, mask_mode=mode)), 0.0)

  def test_loss_weights_images_by_mask_mass(self):
    x, y = _rand((2, 16, 16, 1), 1), _rand((2, 16, 16, 1), 2)
    mask = jnp.stack([jnp.ones((16, 16, 1)), 2 * jnp.ones((16, 16, 1))])
    per = call(ssim_jax.ssim, x, y)
    want = 1 - (per[0] + 2 * per[1]) / 3
    np.testing.assert_allclose(call(ssim_jax.ssim_loss, x, y, mask=mask), want,
                               rtol=1e-6)

  def test_sums_compose_across_chunks(self):
    x, y = _rand((4, 16, 16, 2), 1), _rand((4, 16, 16, 2), 2)
    mask = _rand((4, 16, 16, 1), 3)
    a = call(ssim_jax.ssim_sums, x[:2], y[:2], mask=mask[:2])
    b = call(ssim_jax.ssim_sums, x[2:], y[2:], mask=mask[2:])
    both = ssim_jax.SSIMSums(jnp.concatenate([a.weighted_sum,
                                              b.weighted_sum]),
                             jnp.concatenate([a.mass, b.mass]))
    np.testing.assert_allclose(ssim_jax.loss_from_sums(both),
                               call(ssim_jax.ssim_loss, x, y, mask=mask), rtol=1e-6)


class GradientTest(parameterized.TestCase):

  # Finite gradients for identical, constant and masked inputs in all four
  # padding x mask-mode combinations: test_properties.test_gradients_finite.

  def test_gradient_matches_finite_differences(self):
    x, y = _rand((1, 12, 12, 1), 1), _rand((1, 12, 12, 1), 2)
    f = lambda a: call(ssim_jax.ssim_loss, a, y, window_size=5)
    _, g = value_and_grad(ssim_jax.ssim_loss, x, y, window_size=5)
    d = jnp.zeros_like(x).at[0, 6, 5, 0].set(1.0)
    eps = 1e-2
    fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(g[0, 6, 5, 0]), float(fd), rtol=2e-2)

  @parameterized.product(padding=["valid", "same"],
                          method=["conv", "matmul", "slices"])
  def test_gradient_matches_autodiff_of_the_textbook_formula(self, padding,
                                                            method):
    # Generic images in [0, 1]: no clamp is active and float32 cancellation
    # is small, so the library's gradient (centring with constant offsets,
    # hand-written clamp derivative, chosen lowering) must equal plain
    # autodiff of the textbook SSIM built on conv_general_dilated.
    x, y = _rand((2, 24, 20, 3), 1), _rand((2, 24, 20, 3), 2)
    y = 0.5 * x + 0.5 * y  # correlated, so the structure term matters
    kernel = filters.gaussian_kernel(7, 1.5)

    def textbook(a, b):
      bl = lambda m: filters.blur(m, kernel, padding=padding, method="conv")
      mx, my = bl(a), bl(b)
      vx, vy = bl(a * a) - mx * mx, bl(b * b) - my * my
      cov = bl(a * b) - mx * my
      c1, c2 = 0.01 ** 2, 0.03 ** 2
      smap = ((2 * mx * my + c1) * (2 * cov + c2)
              / ((mx * mx + my * my + c1) * (vx + vy + c2)))
      return 1.0 - jnp.mean(smap)

    value, grads = value_and_grad(ssim_jax.ssim_loss, x, y, argnums=(0, 1),
                                  window_size=7, padding=padding,
                                  filter_method=method)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(
        textbook, argnums=(0, 1)))(x, y)
    np.testing.assert_allclose(value, ref_value, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
      scale = float(jnp.max(jnp.abs(ref)))
      np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=0)

  def test_forward_mode_matches_reverse_mode(self):
    # The clamp has a custom JVP (not a custom VJP): jax.jvp works with the
    # matmul and conv lowerings.
    x, y = _rand((1, 16, 16, 2), 1), _rand((1, 16, 16, 2), 2)
    v = _rand((1, 16, 16, 2), 3) - 0.5
    f = lambda a: ssim_jax.ssim_loss(a, y, filter_method="matmul")
    _, tangent = jax.jit(lambda a, t: jax.jvp(f, (a,), (t,)))(x, v)
    grad = jax.jit(jax.grad(f))(x)
    np.testing.assert_allclose(tangent, jnp.sum(grad * v), rtol=1e-4)

  def test_gradient_nonzero_when_ssim_negative(self):
    # A clamp to [0, 1] would zero this gradient (seed 000).
    x = _rand((1, 16, 16, 1), 1)
    y = 1.0 - x
    self.assertLess(float(call(ssim_jax.ssim, x, y)[0]), 0.0)
    _, g = value_and_grad(ssim_jax.ssim_loss, x, y)
    self.assertGreater(float(jnp.abs(g).sum()), 0.0)


class TransformTest(parameterized.TestCase):

  def test_vmap_matches_batch(self):
    x, y = _rand((3, 16, 16, 2), 1), _rand((3, 16, 16, 2), 2)
    got = jax.vmap(lambda a, b: call(ssim_jax.ssim, a, b))(x, y)
    np.testing.assert_allclose(got, call(ssim_jax.ssim, x, y), atol=1e-6)

  def test_batching_independence(self):
    x, y = _rand((3, 16, 16, 2), 1), _rand((3, 16, 16, 2), 2)
    full = call(ssim_jax.ssim, x, y)
    for i in range(3):
      np.testing.assert_allclose(full[i], call(ssim_jax.ssim, x[i:i + 1],
                                                        y[i:i + 1])[0],
                                 atol=1e-6)

  def test_shard_map_loss_equals_global_loss(self):
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("data",))
    spec = jax.sharding.PartitionSpec("data")
    x, y = _rand((8, 16, 16, 1), 1), _rand((8, 16, 16, 1), 2)
    mask = _rand((8, 16, 16, 1), 3)

    def local(a, b, m):
      return ssim_jax.loss_from_sums(ssim_jax.ssim_sums(a, b, mask=m),
                                     axis_name="data")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3,
                              out_specs=jax.sharding.PartitionSpec()))
    np.testing.assert_allclose(f(x, y, mask),
                               call(ssim_jax.ssim_loss, x, y, mask=mask), rtol=1e-6)
    g = jax.jit(jax.grad(lambda a: f(a, y, mask)))(x)
    _, g_ref = value_and_grad(ssim_jax.ssim_loss, x, y, mask=mask)
    np.testing.assert_allclose(g, g_ref, atol=1e-7, rtol=1e-4)


class L1SSIMMaskTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    ssim_lib = __import__("ssim_jax.ssim", fromlist=["_WARNED"])
    ssim_lib._WARNED.clear()  # each test sees the first use

  def test_mask_weights_both_terms(self):
    x, y = _rand((2, 16, 16, 3), 1), _rand((2, 16, 16, 3), 2)
    roi = np.full((2, 16, 16, 1), 0.3, np.float32)
    roi[:, 4:12, 4:12] = 1.0
    got = call(ssim_jax.l1_ssim_loss, x, y, mask=roi, ssim_weight=0.4)
    w = np.broadcast_to(roi, x.shape)
    l1 = np.sum(w * np.abs(np.asarray(x) - np.asarray(y))) / np.sum(w)
    ssim_term = call(ssim_jax.ssim_loss, x, y, mask=roi, padding="same")
    np.testing.assert_allclose(got, 0.6 * l1 + 0.4 * ssim_term, rtol=1e-5)

  def test_weight_map_is_a_deprecated_alias_that_warns_once(self):
    x, y = _rand((2, 16, 16, 3), 1), _rand((2, 16, 16, 3), 2)
    roi = np.full((2, 16, 16, 1), 0.3, np.float32)
    with pytest.warns(DeprecationWarning, match="weight_map.*mask"):
      old = ssim_jax.l1_ssim_loss(x, y, weight_map=roi)
    np.testing.assert_array_equal(old, ssim_jax.l1_ssim_loss(x, y, mask=roi))
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # a second warning would raise
      ssim_jax.l1_ssim_loss(x, y, weight_map=roi)
    with self.assertRaisesRegex(TypeError, "both mask and weight_map"):
      ssim_jax.l1_ssim_loss(x, y, mask=roi, weight_map=roi)


class LayoutTest(parameterized.TestCase):

  def test_volumes_channels_first(self):
    x, y = _rand((2, 7, 12, 12, 2), 1), _rand((2, 7, 12, 12, 2), 2)
    mask = (_rand((2, 7, 12, 12, 1), 3) > 0.3).astype(jnp.float32)
    first = lambda a: jnp.moveaxis(a, -1, 1)  # [B, C, D, H, W]
    for fn in (ssim_jax.ssim, ssim_jax.ssim_loss, ssim_jax.psnr):
      kw = dict(spatial_dims=3, mask=mask)
      np.testing.assert_allclose(
          call(fn, first(x), first(y), channel_axis=1,
               **dict(kw, mask=first(mask))),
          call(fn, x, y, **kw), rtol=1e-6)
    smap = call(ssim_jax.ssim_map, first(x), first(y), channel_axis=1,
                spatial_dims=3, window_size=5)
    chex.assert_shape(smap, (2, 2, 3, 8, 8))
    np.testing.assert_allclose(
        jnp.moveaxis(smap, 1, -1),
        call(ssim_jax.ssim_map, x, y, spatial_dims=3, window_size=5),
        rtol=1e-6, atol=1e-6)

  def test_channels_first_batch_is_refused_not_misread(self):
    # The field's case: a PyTorch [2, 3, 32, 32] batch read as channels-last
    # would shrink the window to 3 and read the 32 columns as channels.
    x, y = _rand((2, 32, 32, 3), 1), _rand((2, 32, 32, 3), 2)
    nchw = lambda a: jnp.moveaxis(a, -1, 1)
    with self.assertRaisesRegex(ValueError, r"channel_axis=1 for \[B, C, H, W\]"):
      ssim_jax.ssim(nchw(x), nchw(y))
    np.testing.assert_allclose(
        call(ssim_jax.ssim, nchw(x), nchw(y), channel_axis=1),
        call(ssim_jax.ssim, x, y), rtol=1e-6)

  def test_skimage_channel_axis_convention(self):
    # skimage's channel_axis=0 on one [C, H, W] image is ours.
    x, y = _retina_pair(48)
    x, y = np.moveaxis(x, -1, 0), np.moveaxis(y, -1, 0)
    got = call(ssim_jax.ssim, x.astype(np.float32), y.astype(np.float32),
               channel_axis=0)
    want = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=1.0, channel_axis=0)
    np.testing.assert_allclose(got, want, atol=1e-5)


if __name__ == "__main__":
  pytest.main([__file__])
