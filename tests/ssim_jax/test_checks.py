"""Tests of ssim_jax.checks helpers (shapes they return, window rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssim_jax import checks


@pytest.mark.parametrize("side,want", [(3, 3), (4, 3), (5, 5), (8, 7),
                                       (9, 9), (10, 9), (11, 11), (64, 11)])
def test_effective_window(side, want):
  assert checks.effective_window(11, side, 100) == want
  assert checks.effective_window(11, 100, side) == want
  # The seed's rule `min(H, W) | 1` overshoots for even sizes.
  if side % 2 == 0 and side < 11:
    assert (side | 1) > side and want <= side


def test_check_images_casts_and_batches():
  x = np.zeros((5, 6, 2), np.float16)
  im = checks.check_images(x, x)
  assert im.x.shape == (1, 5, 6, 2) and im.x.dtype == jnp.float32
  assert not im.batched
  im = checks.check_images(x[None], x[None].astype(jnp.bfloat16))
  assert im.batched and im.y.dtype == jnp.float32


def test_check_mask_broadcasts():
  shape = (3, 8, 9, 4)
  m = checks.check_mask(np.ones((1, 8, 9, 1)), shape, batched=True)
  assert m.shape == (3, 8, 9, 1) and m.dtype == jnp.float32
  m = checks.check_mask(np.ones((3, 8, 9, 4), bool), shape, batched=True)
  assert m.shape == (3, 8, 9, 4)
  m = checks.check_mask(np.ones((8, 9, 1)), (1, 8, 9, 4), batched=False)
  assert m.shape == (1, 8, 9, 1)
  assert checks.check_mask(None, shape, batched=True) is None


def test_check_data_range():
  np.testing.assert_array_equal(checks.check_data_range(2.0, 3), [2.0] * 3)
  np.testing.assert_array_equal(
      checks.check_data_range(np.float32(5.0), 2), [5.0, 5.0])
  np.testing.assert_array_equal(
      checks.check_data_range(np.asarray([1.0, 255.0]), 2), [1.0, 255.0])
  # Traced values cannot be checked; shape still is.
  out = jax.jit(lambda d: checks.check_data_range(d, 2))(jnp.asarray([-1.0,
                                                                      1.0]))
  assert out.shape == (2,)
  with pytest.raises(ValueError, match="data_range"):
    jax.jit(lambda d: checks.check_data_range(d, 2))(jnp.ones((3,)))


def test_filter_method_choices_follow_filters_module():
  from ssim_jax import filters  # pylint: disable=g-import-not-at-top
  for m in ("auto",) + tuple(filters.METHODS):
    assert checks.check_filter_method(m) == m
  with pytest.raises(ValueError, match="filter_method"):
    checks.check_filter_method("nope")
