"""Every blur lowering computes the reference filter (values and gradients)."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssim_jax import filters

FAST = tuple(m for m in filters.METHODS if m != "conv")


def _reference_np(x, kernel, padding):
  """float64 numpy separable correlation, zero 'same' borders."""
  x = np.asarray(x, np.float64)
  k = np.asarray(kernel, np.float64)
  r = len(k) // 2
  if padding == "same":
    x = np.pad(x, [(0, 0), (r, r), (r, r), (0, 0)])
  ho, wo = x.shape[1] - len(k) + 1, x.shape[2] - len(k) + 1
  y = sum(k[j] * x[:, j:j + ho] for j in range(len(k)))
  return sum(k[j] * y[:, :, j:j + wo] for j in range(len(k)))


@st.composite
def cases(draw):
  k = draw(st.sampled_from([1, 3, 5, 7, 11]))
  padding = draw(st.sampled_from(["valid", "same"]))
  lo = k if padding == "valid" else 1
  h = draw(st.integers(lo, lo + 20))
  w = draw(st.integers(lo, lo + 20))
  b = draw(st.integers(1, 2))
  c = draw(st.integers(1, 4))
  sigma = draw(st.sampled_from([0.5, 1.5, 3.0]))
  seed = draw(st.integers(0, 2**16))
  return (b, h, w, c), k, sigma, padding, seed


@hypothesis.settings(max_examples=8)
@hypothesis.given(cases())
def test_lowerings_match_reference(case):
  shape, k, sigma, padding, seed = case
  kernel = filters.gaussian_kernel(k, sigma)
  x = jax.random.uniform(jax.random.key(seed), shape, jnp.float32)
  ref = filters.blur(x, kernel, padding=padding, method="conv")
  np.testing.assert_allclose(ref, _reference_np(x, kernel, padding),
                             atol=1e-6, rtol=0)
  cot = jax.random.normal(jax.random.key(seed + 1), ref.shape)

  def loss(x, method):
    return jnp.sum(cot * filters.blur(x, kernel, padding=padding,
                                      method=method))

  g_ref = jax.grad(loss)(x, "conv")
  for method in FAST:
    out = filters.blur(x, kernel, padding=padding, method=method)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0, err_msg=method)
    np.testing.assert_allclose(jax.grad(loss)(x, method), g_ref, atol=1e-6,
                               rtol=0, err_msg=method)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("hw", [(301, 203), (203, 301), (301, 40)])
def test_long_axes_use_blocks_and_stay_exact(method, padding, hw):
  # Long axes: several blocks of 64 outputs of the banded matmul plus a
  # ragged tail, along H (middle-axis gemm) and W (minor-axis gemm); a
  # narrow W takes the transposed H pass.
  kernel = filters.gaussian_kernel(11, 1.5)
  x = jax.random.uniform(jax.random.key(3), (1, *hw, 2))
  ref = filters.blur(x, kernel, padding=padding, method="conv")
  out = jax.jit(lambda x: filters.blur(x, kernel, padding=padding,
                                       method=method))(x)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_asymmetric_kernel_and_its_adjoint(method, padding):
  # Not a Gaussian: catches a backward that forgets to flip the kernel and
  # the unpaired-tap path of the slice lowering.
  kernel = np.array([0.1, 0.5, 0.2, 0.15, 0.05], np.float32)
  x = jax.random.uniform(jax.random.key(4), (2, 13, 9, 3))
  cot = jax.random.normal(jax.random.key(5), x.shape if padding == "same"
                          else (2, 9, 5, 3))

  def loss(x, m):
    return jnp.sum(cot * filters.blur(x, kernel, padding=padding, method=m))

  np.testing.assert_allclose(
      filters.blur(x, kernel, padding=padding, method=method),
      _reference_np(x, kernel, padding), atol=1e-6, rtol=0)
  np.testing.assert_allclose(jax.grad(loss)(x, method),
                             jax.grad(loss)(x, "conv"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", filters.METHODS)
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_nchw_layout_equals_nhwc(method, padding):
  kernel = filters.gaussian_kernel(7, 1.5)
  x = jax.random.uniform(jax.random.key(7), (2, 150, 31, 3))
  x_nchw = jnp.transpose(x, (0, 3, 1, 2))
  cot = jax.random.normal(jax.random.key(8), filters.blur(
      x_nchw, kernel, padding=padding, method="conv", layout="NCHW").shape)

  def loss(a, m):
    return jnp.sum(cot * filters.blur(a, kernel, padding=padding, method=m,
                                      layout="NCHW"))

  out = filters.blur(x_nchw, kernel, padding=padding, method=method,
                     layout="NCHW")
  ref = filters.blur(x, kernel, padding=padding, method="conv")
  np.testing.assert_allclose(jnp.transpose(out, (0, 2, 3, 1)), ref,
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(jax.grad(loss)(x_nchw, method),
                             jax.grad(loss)(x_nchw, "conv"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", FAST)
def test_second_order_gradient_matches(method):
  # Reverse over reverse (the slice lowering's custom_vjp has no forward
  # mode; its backward is itself differentiable).
  kernel = filters.gaussian_kernel(5, 1.0)
  x = jax.random.uniform(jax.random.key(6), (1, 12, 10, 1))

  def loss(x, m):
    return jnp.sum(filters.blur(x, kernel, padding="same", method=m) ** 3)

  def grad_norm_grad(m):
    return jax.grad(lambda x: jnp.sum(jax.grad(loss)(x, m) ** 2))(x)

  np.testing.assert_allclose(grad_norm_grad(method), grad_norm_grad("conv"),
                             atol=1e-5, rtol=0)


def test_choose_method_is_a_known_lowering():
  for backend in ("cpu", "gpu", "tpu"):
    assert filters.choose_method((16, 256, 256, 15),
                                 backend=backend) in filters.METHODS
  kernel = filters.gaussian_kernel(3, 1.0)
  x = jnp.ones((1, 8, 8, 1))
  forced = filters.blur(x, kernel, method="matmul")
  np.testing.assert_allclose(filters.blur(x, kernel), forced, atol=1e-6)


def test_bad_arguments_raise():
  kernel = filters.gaussian_kernel(11, 1.5)
  x = jnp.ones((1, 16, 16, 1))
  with pytest.raises(ValueError, match="method"):
    filters.blur(x, kernel, method="fft")
  with pytest.raises(ValueError, match="layout"):
    filters.blur(x, kernel, layout="HWCN")
  with pytest.raises(ValueError, match="padding"):
    filters.blur(x, kernel, padding="reflect")
  with pytest.raises(ValueError, match="H and W"):
    filters.blur(jnp.ones((1, 8, 16, 1)), kernel, padding="valid")
  with pytest.raises(ValueError, match="odd"):
    filters.blur(x, np.ones(4, np.float32) / 4)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    filters.blur(jnp.ones((16, 16, 1)), kernel)
