"""ssim_jax.psnr against skimage's peak_signal_noise_ratio (float64) and a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from jit_helpers import call
import ssim_jax


def _pair(shape, seed, noise=0.05):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, shape)
  y = np.clip(x + noise * rng.normal(size=shape), 0, 1)
  return x.astype(np.float32), y.astype(np.float32)


def _skimage(x, y, data_range):
  # skimage takes one image; float64 (the float32 inputs, upcast).
  return np.asarray([peak_signal_noise_ratio(
      a.astype(np.float64), b.astype(np.float64), data_range=d)
                     for a, b, d in zip(x, y, np.broadcast_to(data_range, len(x)))])


@pytest.mark.parametrize("data_range", [1.0, 255.0, np.asarray([1.0, 2.0, 0.5])])
def test_equals_skimage_per_image(data_range):
  x, y = _pair((3, 32, 40, 3), 0)
  scale = np.reshape(np.broadcast_to(data_range, 3), (3, 1, 1, 1)).astype(np.float32)
  x, y = x * scale, y * scale
  dr = data_range if np.isscalar(data_range) else data_range.astype(np.float32)
  got = call(ssim_jax.psnr, x, y, data_range=dr)
  assert got.dtype == jnp.float32 and got.shape == (3,)
  np.testing.assert_allclose(got, _skimage(x, y, data_range), atol=1e-4)


def test_volumes_equal_skimage():
  x, y = _pair((2, 6, 16, 16, 1), 1)
  got = call(ssim_jax.psnr, x, y, spatial_dims=3)
  np.testing.assert_allclose(got, _skimage(x, y, 1.0), atol=1e-4)


def test_binary_mask_is_psnr_of_the_masked_pixels():
  x, y = _pair((2, 24, 24, 3), 2)
  mask = np.zeros((2, 24, 24, 1), np.float32)
  mask[0, 4:20, 2:10] = 1
  mask[1, :8] = 1
  got = call(ssim_jax.psnr, x, y, mask=mask)
  want = [peak_signal_noise_ratio(x[b][mask[b, ..., 0] > 0].astype(np.float64),
                                  y[b][mask[b, ..., 0] > 0].astype(np.float64),
                                  data_range=1.0) for b in range(2)]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_weighted_mask_against_float64_reference():
  x, y = _pair((2, 16, 16, 3), 3)
  w = np.random.default_rng(4).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  got = call(ssim_jax.psnr, x, y, mask=w, data_range=2.0)
  d = (x.astype(np.float64) - y) ** 2
  mse = (w * d).sum(axis=(1, 2, 3)) / w.sum(axis=(1, 2, 3))
  np.testing.assert_allclose(got, 10 * np.log10(4.0 / mse), atol=1e-4)
  # A mask of ones equals no mask.
  np.testing.assert_allclose(call(ssim_jax.psnr, x, y, mask=np.ones_like(w)),
                             call(ssim_jax.psnr, x, y), atol=1e-5)


def test_channels_first_unbatched_and_layout_of_the_mask():
  x, y = _pair((2, 16, 20, 3), 5)
  mask = np.zeros((2, 16, 20, 1), np.float32)
  mask[:, 3:9] = 1
  last = call(ssim_jax.psnr, x, y, mask=mask)
  first = call(ssim_jax.psnr, np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1),
               mask=np.moveaxis(mask, -1, 1), channel_axis=1)
  np.testing.assert_allclose(first, last, rtol=1e-6)
  one = call(ssim_jax.psnr, x[1], y[1], mask=mask[1])
  assert one.shape == ()
  np.testing.assert_allclose(one, last[1], rtol=1e-6)


def test_identical_images_inf_and_zero_mask_zero_with_zero_gradient():
  x, y = _pair((2, 8, 8, 1), 6)
  assert np.all(np.isinf(call(ssim_jax.psnr, x, x)))  # as skimage
  zero = np.zeros((2, 8, 8, 1), np.float32)
  value, grad = jax.jit(jax.value_and_grad(
      lambda a: jnp.sum(ssim_jax.psnr(a, y, mask=zero))))(x)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_gradient_matches_float64_formula():
  # d PSNR / d x = -20 / ln(10) * (x - y) / (N * MSE)
  x, y = _pair((1, 8, 8, 2), 7)
  g = jax.jit(jax.grad(lambda a: ssim_jax.psnr(a, y)[0]))(x)
  d = x.astype(np.float64) - y
  want = -20.0 / np.log(10.0) * d / np.sum(d * d)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_small_images_have_no_window_rule():
  x, y = _pair((2, 1, 2, 3), 8)
  np.testing.assert_allclose(call(ssim_jax.psnr, x, y), _skimage(x, y, 1.0),
                             atol=1e-4)
