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
  vy = _blur64(y32 * y32, k, padding) - my * my
  cov = _blur64(x32 * y32, k, padding) - mx * my
  scale = max(offset, 1.0)
  np.testing.assert_allclose(st.mu_x, mx, atol=2e-6 * scale)
  # Variance ~1e-5: an uncentred float32 E[x^2]-E[x]^2 at offset 100 would
  # be off by ~1e-3; centring keeps it near float32 resolution of the data.
  tol = 1e-9 if padding == "valid" else 2e-6 * scale ** 2
  np.testing.assert_allclose(st.var_sum, vx + vy, atol=2 * tol)
  np.testing.assert_allclose(st.cov, cov, atol=tol)


def test_clamps_hold():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 1)), jnp.float32)
  for y in (x, 1.0 - x, jnp.full_like(x, 0.3), x + 1e-7):
    st = _local("valid")(x, y)
    assert np.all(np.asarray(st.var_sum) >= 0)
    assert np.all(2 * np.abs(np.asarray(st.cov)) <= np.asarray(st.var_sum))


def test_identical_inputs_give_identical_statistics():
  x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (1, 12, 12, 2)),
                  jnp.float32)
  for padding in ("valid", "same"):
    st = _local(padding)(x, x)
    np.testing.assert_array_equal(st.var_sum, 2 * np.asarray(st.cov))
    np.testing.assert_array_equal(st.mu_x, st.mu_y)
    # The four-blur statistics of volumes and of masked windows too.
    v = jnp.broadcast_to(x[:, None], (1, 3, 12, 12, 2))
    st = jax.jit(lambda a: stats.local_stats(
        a, a, kernel=filters.gaussian_kernel(3, 1.0), padding=padding,
        filter_method="auto"))(v)
    np.testing.assert_array_equal(st.var_sum, 2 * np.asarray(st.cov))
    mask = (np.arange(12)[None, :, None, None] % 3 > 0) * np.float32(0.7)
    st, _ = jax.jit(lambda a, m: stats.masked_local_stats(
        a, a, m, kernel=KERNEL, padding=padding, filter_method="auto"))(
            x, jnp.asarray(np.broadcast_to(mask, (1, 12, 12, 1))))
    np.testing.assert_array_equal(st.var_sum, 2 * np.asarray(st.cov))
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
  y64 = np.asarray(y, np.float64)
  my = _blur64(m64 * y64, k, padding) / np.where(has, w, 1)
  vx = _blur64(m64 * x64 ** 2, k, padding) / np.where(has, w, 1) - mx ** 2
  vy = _blur64(m64 * y64 ** 2, k, padding) / np.where(has, w, 1) - my ** 2
  np.testing.assert_allclose(np.asarray(st.mu_x)[has], mx[has], atol=1e-5)
  np.testing.assert_allclose(np.asarray(st.var_sum)[has], (vx + vy)[has],
                             atol=2e-5)
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
  # Random moments inside and outside the bounds, and every kink: var_sum
  # == 0, both zero, cov exactly at +-var_sum / 2 (x == y: cov == var_sum/2).
  rng = np.random.default_rng(5)
  n = 4096
  var_sum = np.concatenate([rng.uniform(-0.5, 2.0, n), [0, 0, 2, 2, .5, 4]])
  cov = np.concatenate([rng.uniform(-2.0, 2.0, n), [0, 1, 1, -1, .25, 2]])
  primals = tuple(jnp.asarray(a, jnp.float32) for a in (var_sum, cov))
  tangents = tuple(jnp.asarray(rng.normal(size=n + 6), jnp.float32)
                   for _ in range(2))
  out, d_out = jax.jit(lambda p, t: jax.jvp(stats.clamp_moments, p, t))(
      primals, tangents)
  # Values: the clamps (many active here).
  s = np.maximum(np.asarray(primals[0], np.float64), 0)
  np.testing.assert_array_equal(out[0], s)
  np.testing.assert_array_equal(out[1], np.clip(np.asarray(primals[1]),
                                                -0.5 * s, 0.5 * s))
  assert np.mean(np.abs(cov) > 0.5 * s) > 0.3
  # The range guarantee of the contrast-structure term holds exactly.
  assert np.all(np.asarray(out[0]) >= 0)
  assert np.all(2 * np.abs(np.asarray(out[1])) <= np.asarray(out[0]))
  # Derivative: the unclamped moments' (the clamps are inactive in exact
  # arithmetic), so no tangent depends on which side of a kink rounding
  # fell; reverse mode is its transpose.
  for d, t in zip(d_out, tangents):
    np.testing.assert_array_equal(d, t)
  w = tuple(jnp.asarray(rng.normal(size=n + 6), jnp.float32) for _ in range(2))
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
