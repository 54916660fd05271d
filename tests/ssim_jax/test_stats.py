"""Tests of ssim_jax.stats: accuracy, clamping, masked statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssim_jax import filters
from ssim_jax import stats

KERNEL = filters.gaussian_kernel(7, 1.5)


def _blur64(a, k, padding):
  """float64 separable reference blur of [B, H, W, C]."""
  r = len(k) // 2
  if padding == "same":
    a = np.pad(a, ((0, 0), (r, r), (r, r), (0, 0)))
  h, w = a.shape[1] - 2 * r, a.shape[2] - 2 * r
  out = sum(k[i] * a[:, i:i + h] for i in range(len(k)))
  return sum(k[j] * out[:, :, j:j + w] for j in range(len(k)))


@functools.lru_cache(maxsize=None)
def _local(padding):
  return jax.jit(lambda x, y: stats.local_stats(
      x, y, kernel=KERNEL, padding=padding, filter_method="auto"))


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("offset", [0.0, 0.9, 100.0])
def test_local_stats_match_float64_reference(padding, offset):
  rng = np.random.default_rng(0)
  # Small variations on a large offset: the cancellation-prone regime.
  x = offset + 0.01 * rng.uniform(0, 1, (2, 16, 18, 2))
  y = offset + 0.01 * rng.uniform(0, 1, (2, 16, 18, 2))
  st = _local(padding)(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y32 = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  # Renormalised in float64: a float32 kernel sums to 1 only to ~1e-7, which
  # alone biases E[x^2]-E[x]^2 by ~1e-7 * offset^2 (pytorch-msssim's error).
  k = KERNEL.astype(np.float64) / KERNEL.astype(np.float64).sum()
  mx, my = _blur64(x32, k, padding), _blur64(y32, k, padding)
  vx = _blur64(x32 * x32, k, padding) - mx * mx
  cov = _blur64(x32 * y32, k, padding) - mx * my
  scale = max(offset, 1.0)
  np.testing.assert_allclose(st.mu_x, mx, atol=2e-6 * scale)
  # Variance ~1e-5: an uncentred float32 E[x^2]-E[x]^2 at offset 100 would
  # be off by ~1e-3; centring keeps it near float32 resolution of the data.
  tol = 1e-9 if padding == "valid" else 2e-6 * scale ** 2
  np.testing.assert_allclose(st.var_x, vx, atol=tol)
  np.testing.assert_allclose(st.cov, cov, atol=tol)


def test_clamps_hold():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 1)), jnp.float32)
  for y in (x, 1.0 - x, jnp.full_like(x, 0.3), x + 1e-7):
    st = _local("valid")(x, y)
    assert np.all(np.asarray(st.var_x) >= 0)
    assert np.all(np.asarray(st.var_y) >= 0)
    bound = np.sqrt(np.asarray(st.var_x) * np.asarray(st.var_y))
    assert np.all(np.abs(np.asarray(st.cov)) <= bound * (1 + 1e-6) + 1e-30)
    assert np.all(2 * np.abs(np.asarray(st.cov))
                  <= np.asarray(st.var_x) + np.asarray(st.var_y))


def test_identical_inputs_give_identical_statistics():
  x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (1, 12, 12, 2)),
                  jnp.float32)
  for padding in ("valid", "same"):
    st = _local(padding)(x, x)
    np.testing.assert_array_equal(st.var_x, st.var_y)
    np.testing.assert_array_equal(st.var_x, st.cov)
    np.testing.assert_array_equal(st.mu_x, st.mu_y)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_masked_stats_with_binary_mask(padding):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(0, 1, (1, 14, 14, 1)), jnp.float32)
  y = jnp.asarray(rng.uniform(0, 1, (1, 14, 14, 1)), jnp.float32)
  mask = np.zeros((1, 14, 14, 1), np.float32)
  mask[:, 2:12, 4:10] = 1.0
  f = jax.jit(lambda a, b, m: stats.masked_local_stats(
      a, b, m, kernel=KERNEL, padding=padding, filter_method="auto"))
  st, mass = f(x, y, mask)
  k = KERNEL.astype(np.float64)
  m64 = mask.astype(np.float64)
  x64 = np.asarray(x, np.float64)
  w = _blur64(m64, k, padding)
  has = w > 1e-6
  mx = _blur64(m64 * x64, k, padding) / np.where(has, w, 1)
  vx = _blur64(m64 * x64 ** 2, k, padding) / np.where(has, w, 1) - mx ** 2
  np.testing.assert_allclose(np.asarray(st.mu_x)[has], mx[has], atol=1e-5)
  np.testing.assert_allclose(np.asarray(st.var_x)[has], vx[has], atol=1e-5)
  np.testing.assert_allclose(np.asarray(mass), np.where(has, w, 0), atol=1e-6)
  for field in st:
    assert np.all(np.isfinite(np.asarray(field)))


def test_masked_stats_ones_mask_equals_unmasked_valid():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 2)), jnp.float32)
  y = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 2)), jnp.float32)
  st, _ = jax.jit(lambda a, b: stats.masked_local_stats(
      a, b, jnp.ones((2, 12, 12, 1)), kernel=KERNEL, padding="valid",
      filter_method="auto"))(x, y)
  ref = _local("valid")(x, y)
  for a, b in zip(st, ref):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clamp_moments_derivative_is_the_identity():
  # Random moments inside and outside the bounds, and every kink: var == 0,
  # both zero, cov exactly at +-bound, x == y (cov == var).
  rng = np.random.default_rng(5)
  n = 4096
  var_x = np.concatenate([rng.uniform(-0.5, 2.0, n), [0, 0, 1, 1, .25, 4]])
  var_y = np.concatenate([rng.uniform(-0.5, 2.0, n), [0, 1, 1, 1, .25, 1]])
  cov = np.concatenate([rng.uniform(-2.0, 2.0, n), [0, 0, 1, -1, .25, 2]])
  primals = tuple(jnp.asarray(a, jnp.float32) for a in (var_x, var_y, cov))
  tangents = tuple(jnp.asarray(rng.normal(size=n + 6), jnp.float32)
                   for _ in range(3))
  out, d_out = jax.jit(lambda p, t: jax.jvp(stats.clamp_moments, p, t))(
      primals, tangents)
  # Values: the clamps (many active here).
  vx, vy = np.maximum(var_x, 0), np.maximum(var_y, 0)
  bound = np.minimum(np.sqrt(vx * vy), 0.5 * (vx + vy))
  np.testing.assert_allclose(out[0], vx, rtol=1e-6)
  np.testing.assert_allclose(out[1], vy, rtol=1e-6)
  np.testing.assert_allclose(out[2], np.clip(cov, -bound, bound), rtol=1e-6,
                             atol=1e-7)
  assert np.mean(np.abs(cov) > bound) > 0.3
  # Derivative: the unclamped moments' (the clamps are inactive in exact
  # arithmetic), so no tangent depends on which side of a kink rounding
  # fell; reverse mode is its transpose.
  for d, t in zip(d_out, tangents):
    np.testing.assert_array_equal(d, t)
  w = tuple(jnp.asarray(rng.normal(size=n + 6), jnp.float32) for _ in range(3))
  g = jax.grad(lambda p: sum(jnp.sum(wi * o) for wi, o in
                             zip(w, stats.clamp_moments(*p))))(primals)
  for gi, wi in zip(g, w):
    np.testing.assert_array_equal(gi, wi)


def test_same_padding_bakes_no_image_sized_constant():
  # The border mass of 'same' padding is an outer product built in the
  # graph: an [H, W] host constant would be baked into every executable
  # (8 MB and ~1.5 s of compile time at 1080p, benchmarks/README.md).
  x = jnp.zeros((1, 96, 128, 1), jnp.float32)
  text = jax.jit(lambda a, b: stats.local_stats(
      a, b, kernel=KERNEL, padding="same", filter_method="auto")
                 ).lower(x, x).as_text()
  constants = [line for line in text.splitlines() if "constant" in line]
  assert constants, "expected some constants in the lowered module"
  assert not any("96x128" in line for line in constants), [
      line[:120] for line in constants if "96x128" in line]
