"""Hypothesis property tests of the SSIM guarantees.

One jitted function per property (compiled once, fixed small shapes);
hypothesis varies the values: random, constant, near 0, near data_range,
low precision. The profile in tests/conftest.py keeps it deterministic.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import ssim_jax

B, H, W, C = 2, 12, 12, 2
SHAPE = (B, H, W, C)


@st.composite
def images(draw, data_range=1.0):
  """float32 images [B, H, W, C] in [0, data_range] of several kinds."""
  kind = draw(st.sampled_from(
      ["uniform", "constant", "near_zero", "near_range", "blob", "binary"]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    a = rng.uniform(0, 1, SHAPE)
  elif kind == "constant":
    a = np.full(SHAPE, draw(st.floats(0, 1)))
  elif kind == "near_zero":
    a = rng.uniform(0, 1e-4, SHAPE)
  elif kind == "near_range":
    a = 1.0 - rng.uniform(0, 1e-4, SHAPE)
  elif kind == "blob":
    # Small foreground on a large constant background (seed 004).
    a = np.full(SHAPE, draw(st.floats(0, 1)))
    a[:, 5:7, 5:7] = rng.uniform(0, 1, (B, 2, 2, C))
  else:
    a = (rng.uniform(0, 1, SHAPE) > 0.5).astype(np.float64)
  return (a * data_range).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _f(name, **static):
  return jax.jit(functools.partial(getattr(ssim_jax, name), **static))


@functools.lru_cache(maxsize=None)
def _masked(padding, mode):
  return jax.jit(lambda a, b, m: ssim_jax.ssim(a, b, mask=m, padding=padding,
                                              mask_mode=mode))


@functools.lru_cache(maxsize=None)
def _grad(padding, mode):
  return jax.jit(jax.grad(
      lambda a, b, m: ssim_jax.ssim_loss(a, b, mask=m, padding=padding,
                                         mask_mode=mode), argnums=(0, 1)))


dtypes = st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16])
paddings = st.sampled_from(["valid", "same"])


@given(images(), images(), dtypes, paddings)
def test_range_and_identity(x, y, dtype, padding):
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  f = _f("ssim_map", padding=padding)
  m = np.asarray(f(x, y))
  assert m.dtype == np.float32
  assert np.all(np.isfinite(m))
  assert np.all(m <= 1.0) and np.all(m >= -1.0)
  np.testing.assert_array_equal(np.asarray(f(x, x)), 1.0)
  loss = float(_f("ssim_loss", padding=padding)(x, y))
  assert 0.0 <= loss <= 2.0


@given(images(), images())
def test_symmetry(x, y):
  f = _f("ssim")
  np.testing.assert_allclose(f(x, y), f(y, x), atol=2e-6)


@given(images(data_range=255.0), images(data_range=255.0))
def test_range_with_data_range_255(x, y):
  v = np.asarray(_f("ssim", data_range=255.0)(x, y))
  assert np.all(np.abs(v) <= 1.0)


@given(images(), images(), st.integers(0, B - 1))
def test_batching_independence(x, y, i):
  full = _f("ssim")(x, y)
  # Replacing the other images changes nothing for image i.
  x2 = np.array(x)
  y2 = np.array(y)
  other = 1 - i
  x2[other] = 0.3
  y2[other] = np.random.default_rng(i).uniform(0, 1, (H, W, C))
  np.testing.assert_allclose(_f("ssim")(x2, y2)[i], full[i], atol=1e-6)


@given(images(), images(), paddings)
def test_mask_of_ones_equals_no_mask(x, y, padding):
  ones = np.ones((B, H, W, 1), np.float32)
  np.testing.assert_allclose(
      _f("ssim", padding=padding)(x, y),
      _masked(padding, "weighted")(x, y, ones), atol=1e-6)


@given(images(), images(), images(), st.integers(0, 3), paddings)
def test_foreground_invariant_to_background(x, y, junk, r0, padding):
  mask = np.zeros((B, H, W, 1), np.float32)
  mask[:, r0:r0 + 7, 2:10] = 1.0
  f = _masked(padding, "foreground")
  base = f(x, y, mask)
  other = f(np.where(mask > 0, x, junk), np.where(mask > 0, y, 1.0 - junk),
            mask)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(other))
  assert np.all(np.abs(np.asarray(base)) <= 1.0)


@given(images(), images(), st.sampled_from(["ones", "zeros", "box", "soft"]),
       paddings, st.sampled_from(["weighted", "foreground"]),
       st.booleans())
def test_gradients_finite(x, y, mask_kind, padding, mode, identical):
  if identical:
    y = x
  mask = np.ones((B, H, W, 1), np.float32)
  if mask_kind == "zeros":
    mask[:] = 0.0
  elif mask_kind == "box":
    mask[:] = 0.0
    mask[:, 3:9, 4:8] = 1.0
  elif mask_kind == "soft":
    mask = np.random.default_rng(0).uniform(0, 1, mask.shape).astype(
        np.float32)
  gx, gy = _grad(padding, mode)(x, y, mask)
  assert np.all(np.isfinite(np.asarray(gx)))
  assert np.all(np.isfinite(np.asarray(gy)))
