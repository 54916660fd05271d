"""The plain SSIM map of NCHW planes (`ssim_jax/planes.py`), the one definition of the map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssim_jax
from ssim_jax import filters
from ssim_jax import planes


@pytest.mark.parametrize("shape,kernel_size,padding,want", [
    ((2, 32, 40, 3), 11, "valid", (22, 30)),
    ((2, 32, 40, 3), 11, "same", (32, 40)),
    ((1, 9, 32, 40, 1), (3, 7, 11), "valid", (7, 26, 30)),
])
def test_map_sides(shape, kernel_size, padding, want):
  assert planes.map_sides(shape, kernel_size, padding) == want


def test_layout_round_trip():
  a = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
  assert planes.to_nchw(a).shape == (2, 3, 5, 6)
  np.testing.assert_array_equal(planes.to_nhwc(planes.to_nchw(a)), a)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_nchw_map_is_the_public_map_and_cs_bounds_it(padding):
  k = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(k[0], (2, 24, 28, 3))
  y = jnp.clip(x + 0.1 * jax.random.normal(k[1], x.shape), 0, 1)
  kernel = (filters.gaussian_kernel(7, 1.5),) * 2
  c = jnp.full((2,), 1e-4), jnp.full((2,), 9e-4)
  smap = planes.ssim_map_nchw(planes.to_nchw(x), planes.to_nchw(y), kernel=kernel, c1=c[0],
                              c2=c[1], padding=padding, filter_method="matmul")
  want = ssim_jax.ssim_map(x, y, window_size=7, padding=padding, filter_method="matmul")
  np.testing.assert_allclose(planes.to_nhwc(smap), want, atol=1e-6)
  cs = planes.ssim_map_nchw(planes.to_nchw(x), planes.to_nchw(y), kernel=kernel, c1=c[0],
                            c2=c[1], padding=padding, filter_method="matmul", term="cs")
  # l <= 1 elementwise, so |SSIM| <= |cs|; and the two differ (luminance is not all 1).
  assert np.all(np.abs(np.asarray(smap)) <= np.abs(np.asarray(cs)) + 1e-6)
  assert not np.allclose(smap, cs)


def test_plain_sums_are_weighted_map_sums():
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.uniform(k[0], (2, 20, 20, 2))
  y = jax.random.uniform(k[1], (2, 20, 20, 2))
  w = jax.random.uniform(k[2], (2, 14, 14, 2))
  kernel = (filters.gaussian_kernel(7, 1.5),) * 2
  c1, c2 = jnp.full((2,), 1e-4), jnp.full((2,), 9e-4)
  opts = dict(kernel=kernel, c1=c1, c2=c2, padding="valid", filter_method="conv")
  smap = planes.to_nhwc(planes.ssim_map_nchw(planes.to_nchw(x), planes.to_nchw(y), **opts))
  per_plane = planes.plain_weighted_plane_sums(x, y, w, **opts)
  np.testing.assert_allclose(per_plane, jnp.sum(w * smap, axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(planes.plain_weighted_ssim_sum(x, y, w, **opts),
                             jnp.sum(w * smap, axis=(1, 2, 3)), rtol=1e-5)
