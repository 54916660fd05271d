"""Tests of ssim_jax.ms_ssim: golden values, range, masks, gradients."""

import importlib
import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jit_helpers import call, value_and_grad
import ssim_jax
ms_lib = importlib.import_module("ssim_jax.ms_ssim")


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _golden_script():
  path = os.path.join(_ROOT, "scripts", "make_ms_ssim_golden.py")
  spec = importlib.util.spec_from_file_location("make_ms_ssim_golden", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape),
                     jnp.float32)


# Small pyramids keep the tests fast: 3 levels of a 3-tap window need 9 px.
SMALL = dict(levels=3, window_size=3)


class GoldenTest(parameterized.TestCase):

  def test_matches_pytorch_msssim_golden_values(self):
    script = _golden_script()
    golden = np.load(os.path.join(_ROOT, "tests", "fixtures",
                                  "ms_ssim_golden.npz"))
    for seed, (name, shape, crops, noise, ws, weights, scale) in enumerate(
        script.CASES):
      xs, ys = script.make_pair(shape, crops, noise, seed, scale)
      levels = 5 if weights is None else len(weights)
      got = call(ssim_jax.ms_ssim, jnp.asarray(xs, jnp.float32),
                 jnp.asarray(ys, jnp.float32), data_range=scale,
                 window_size=ws, levels=levels, weights=weights)
      np.testing.assert_allclose(np.asarray(got), golden[name], atol=1e-5,
                                 rtol=0, err_msg=name)


class MSSSIMTest(parameterized.TestCase):

  def test_identity_is_one_and_range(self):
    x, y = _rand((2, 20, 24, 3), 1), _rand((2, 20, 24, 3), 2)
    np.testing.assert_array_equal(
        np.asarray(call(ssim_jax.ms_ssim, x, x, **SMALL)), 1.0)
    v = call(ssim_jax.ms_ssim, x, y, **SMALL)
    chex.assert_shape(v, (2,))
    self.assertTrue(bool(jnp.all((v >= 0) & (v <= 1))))
    # Anti-correlated: negative cs at some scale clips to 0 (relu), not NaN.
    v = call(ssim_jax.ms_ssim, x, 1.0 - x, **SMALL)
    chex.assert_tree_all_finite(v)
    self.assertTrue(bool(jnp.all((v >= 0) & (v <= 1))))

  def test_single_level_is_relu_ssim(self):
    x, y = _rand((2, 16, 16, 1), 1), _rand((2, 16, 16, 1), 2)
    np.testing.assert_allclose(
        call(ssim_jax.ms_ssim, x, y, levels=1, weights=[1.0]),
        jnp.maximum(call(ssim_jax.ssim, x, y), 0.0), atol=1e-6)

  def test_too_small_names_minimum_and_fitting_settings(self):
    x = jnp.zeros((1, 100, 120, 1))
    with pytest.raises(ValueError, match=r"minimum side is 161") as e:
      call(ssim_jax.ms_ssim, x, x)
    self.assertIn("levels=4", str(e.value))
    self.assertIn("window_size=7", str(e.value))
    self.assertEqual(ms_lib.min_size(5, 11), 161)

  def test_default_weights_and_fewer_levels(self):
    self.assertEqual(ms_lib._check_levels(5, None), ms_lib.DEFAULT_WEIGHTS)
    w3 = ms_lib._check_levels(3, None)
    np.testing.assert_allclose(sum(w3), 1.0)
    np.testing.assert_allclose(np.asarray(w3) / w3[0],
                               np.asarray(ms_lib.DEFAULT_WEIGHTS[:3]) / 0.0448)

  @parameterized.parameters("weighted", "foreground")
  def test_mask_of_ones_equals_no_mask(self, mode):
    # Even sides: with odd sides the plain pyramid counts the padding zero as
    # data (pytorch-msssim), the foreground pyramid does not (mask-weighted).
    x, y = _rand((2, 20, 24, 2), 1), _rand((2, 20, 24, 2), 2)
    np.testing.assert_allclose(
        call(ssim_jax.ms_ssim, x, y, mask=jnp.ones((2, 20, 24, 1)),
             mask_mode=mode, **SMALL),
        call(ssim_jax.ms_ssim, x, y, **SMALL), atol=2e-6)

  def test_foreground_invariant_to_background(self):
    x, y = _rand((2, 24, 24, 1), 1), _rand((2, 24, 24, 1), 2)
    mask = jnp.zeros((2, 24, 24, 1)).at[:, 3:21, 2:20].set(1.0)
    base = call(ssim_jax.ms_ssim, x, y, mask=mask, mask_mode="foreground", **SMALL)
    other = call(ssim_jax.ms_ssim, jnp.where(mask > 0, x, 50.0),
                             jnp.where(mask > 0, y, jnp.inf), mask=mask,
                             mask_mode="foreground", **SMALL)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(other))

  def test_loss_mass_weighting_and_zero_mask(self):
    x, y = _rand((2, 16, 16, 1), 1), _rand((2, 16, 16, 1), 2)
    mask = jnp.concatenate([jnp.ones((1, 16, 16, 1)),
                            3 * jnp.ones((1, 16, 16, 1))])
    per = call(ssim_jax.ms_ssim, x, y, **SMALL)
    np.testing.assert_allclose(
        call(ssim_jax.ms_ssim_loss, x, y, mask=mask, **SMALL),
        1 - (per[0] + 3 * per[1]) / 4, rtol=1e-6)
    zero = jnp.zeros_like(mask)
    for mode in ("foreground",):  # the mode with the most where-guards
      loss, g = value_and_grad(ssim_jax.ms_ssim_loss, x, y, mask=zero,
                               mask_mode=mode, **SMALL)
      self.assertEqual(float(loss), 0.0)
      np.testing.assert_array_equal(np.asarray(g), 0.0)

  # Foreground exercises the masked pyramid; the unmasked gradient is covered
  # by test_api.test_losses_are_differentiable_scalars (compiles are costly).
  @parameterized.parameters(("foreground",))
  def test_gradients_finite_anticorrelated_identical_constant(self, mode):
    x = _rand((1, 20, 20, 1), 1)
    c = jnp.full((1, 20, 20, 1), 0.4)
    mask = jnp.ones((1, 20, 20, 1)).at[:, :4].set(0.0)
    for a, b in ((x, 1.0 - x), (x, x), (c, c), (c, x)):
      _, g = value_and_grad(ssim_jax.ms_ssim_loss, a, b, argnums=(0, 1),
                            mask=mask, mask_mode=mode, **SMALL)
      chex.assert_tree_all_finite(g)

  def test_safe_pow_continuous_with_finite_gradient(self):
    for w in (0.0448, 0.3, 1.0):
      grad = jax.grad(lambda v, w=w: ms_lib._safe_pow(v, w))
      for v in (-1.0, 0.0, 1e-9, ms_lib._POW_EPS, 0.5):
        self.assertTrue(np.isfinite(float(grad(jnp.float32(v)))))
      eps = ms_lib._POW_EPS
      np.testing.assert_allclose(ms_lib._safe_pow(jnp.float32(eps), w),
                                 eps ** w, rtol=1e-5)
      np.testing.assert_allclose(
          ms_lib._safe_pow(jnp.float32(eps * 1.0001), w), eps ** w,
          rtol=1e-3)
      self.assertEqual(float(ms_lib._safe_pow(jnp.float32(-0.2), w)),
                       0.0 if w else 1.0)

  def test_unbatched_and_vmap(self):
    x, y = _rand((3, 16, 16, 2), 1), _rand((3, 16, 16, 2), 2)
    full = call(ssim_jax.ms_ssim, x, y, **SMALL)
    np.testing.assert_allclose(call(ssim_jax.ms_ssim, x[1], y[1], **SMALL),
                               full[1], atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(lambda a, b: call(ssim_jax.ms_ssim, a, b, **SMALL))(x, y), full,
        atol=1e-6)

  def test_odd_sizes_pool_like_pytorch(self):
    # avg_pool2d(kernel 2, padding 1) on odd sides == one leading zero row.
    a = jnp.arange(15.0).reshape(1, 3, 5, 1)
    p = ms_lib._pool(a)
    chex.assert_shape(p, (1, 2, 3, 1))
    np.testing.assert_allclose(p[0, 0, 0, 0], 0.0)
    np.testing.assert_allclose(p[0, 1, 1, 0], (6 + 7 + 11 + 12) / 4)


class MSSSIMSumsTest(parameterized.TestCase):

  @parameterized.parameters(None, "weighted", "foreground")
  def test_sums_give_ms_ssim_and_its_loss(self, mode):
    x, y = _rand((3, 20, 20, 2), 1), _rand((3, 20, 20, 2), 2)
    y = 0.7 * x + 0.3 * y
    kwargs = dict(SMALL)
    if mode is not None:
      # Unequal mask masses: the images must count by their mass.
      mask = (_rand((3, 20, 20, 1), 3) > jnp.asarray([0.2, 0.5, 0.8])[
          :, None, None, None]).astype(jnp.float32)
      kwargs.update(mask=mask, mask_mode=mode)
    sums = call(ssim_jax.ms_ssim_sums, x, y, **kwargs)
    chex.assert_shape([sums.weighted_sum, sums.mass], (3,))
    np.testing.assert_allclose(sums.weighted_sum / sums.mass,
                               call(ssim_jax.ms_ssim, x, y, **kwargs),
                               rtol=1e-6)
    np.testing.assert_allclose(
        ssim_jax.loss_from_sums(sums), call(ssim_jax.ms_ssim_loss, x, y,
                                            **kwargs), rtol=1e-6)
    if mode is None:  # level-0 map positions x channels, as ssim_sums counts
      np.testing.assert_array_equal(sums.mass, 18 * 18 * 2)

  def test_unbatched_sums_are_scalars(self):
    x, y = _rand((20, 20, 2), 1), _rand((20, 20, 2), 2)
    sums = call(ssim_jax.ms_ssim_sums, x, y, **SMALL)
    chex.assert_shape([sums.weighted_sum, sums.mass], ())

  def test_shard_map_loss_equals_whole_batch_loss(self):
    # The batch split over 8 devices: each device's per-image sums, reduced
    # with loss_from_sums(axis_name=...), give the whole batch's loss and
    # gradient.
    devices = np.array(jax.devices()[:8])
    self.assertLen(devices, 8)
    mesh = jax.sharding.Mesh(devices, ("data",))
    spec = jax.sharding.PartitionSpec("data")
    x, y = _rand((16, 20, 20, 1), 1), _rand((16, 20, 20, 1), 2)
    y = 0.6 * x + 0.4 * y
    mask = (_rand((16, 20, 20, 1), 3) > 0.3).astype(jnp.float32)

    def local(a, b, m):
      return ssim_jax.loss_from_sums(
          ssim_jax.ms_ssim_sums(a, b, mask=m, **SMALL), axis_name="data")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3,
                              out_specs=jax.sharding.PartitionSpec()))
    whole, g_ref = value_and_grad(ssim_jax.ms_ssim_loss, x, y, mask=mask,
                                  **SMALL)
    np.testing.assert_allclose(f(x, y, mask), whole, rtol=1e-6)
    g = jax.jit(jax.grad(lambda a: f(a, y, mask)))(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-7, rtol=1e-4)


if __name__ == "__main__":
  pytest.main([__file__])
