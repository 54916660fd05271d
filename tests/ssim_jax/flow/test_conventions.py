"""`ssim_jax/flow/conventions.py`: interpolation, velocity target, timestep weight, z0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssim_jax import flow


def _key(i):
  return jax.random.PRNGKey(i)


def test_timestep_weight_values_and_errors():
  t = jnp.array([0.0, 0.15, 0.3, 0.9, -0.1])
  np.testing.assert_allclose(flow.timestep_weight(t, max_t=0.3),
                             [1.0, 0.5, 0.0, 0.0, 1.0], atol=1e-6)
  for bad in (0.0, -0.3, float("nan")):
    with pytest.raises(ValueError, match="max_t"):
      flow.timestep_weight(t, max_t=bad)
  with pytest.raises(TypeError, match="max_t"):
    flow.timestep_weight(t, max_t="0.3")


def test_interpolate_velocity_and_exact_reconstruction():
  z0 = jax.random.normal(_key(0), (3, 4, 4, 2))
  noise = jax.random.normal(_key(1), (3, 4, 4, 2))
  t = jnp.array([0.0, 0.37, 1.0])
  x_t = flow.interpolate(z0, noise, t)
  np.testing.assert_allclose(x_t[1], 0.63 * z0[1] + 0.37 * noise[1], rtol=1e-6)
  np.testing.assert_array_equal(x_t[0], z0[0])
  np.testing.assert_array_equal(x_t[2], noise[2])
  v = flow.velocity_target(z0, noise)
  # The (z0, noise) form is bitwise exact when v_pred == v.
  exact = flow.reconstruct_z0(x_t, v, t, z0=z0, noise=noise)
  np.testing.assert_array_equal(exact, z0)
  # The x_t form agrees up to rounding.
  np.testing.assert_allclose(flow.reconstruct_z0(x_t, v, t), z0, atol=1e-5)
  # Same gradient w.r.t. v_pred in both forms (d z0_pred / d v_pred = -t).
  g1 = jax.grad(lambda vp: flow.reconstruct_z0(x_t, vp, t).sum())(v)
  g2 = jax.grad(lambda vp: flow.reconstruct_z0(x_t, vp, t, z0=z0, noise=noise
                                               ).sum())(v)
  np.testing.assert_allclose(g1, g2, atol=1e-7)
  np.testing.assert_allclose(g1[1], -0.37 * np.ones((4, 4, 2)), rtol=1e-6)


def test_reconstruct_keeps_clean_latent_where_unsupervised():
  z0 = jax.random.normal(_key(0), (3, 4, 4, 2))
  x_t = jax.random.normal(_key(1), (3, 4, 4, 2))
  v_pred = jax.random.normal(_key(2), (3, 4, 4, 2))
  t = jnp.array([0.0, 0.5, 0.5])
  sup = jnp.array([True, True, False])
  out = flow.reconstruct_z0(x_t, v_pred, t, z0=z0, supervised=sup)
  np.testing.assert_array_equal(out[0], z0[0])   # t == 0
  np.testing.assert_array_equal(out[2], z0[2])   # not supervised
  np.testing.assert_allclose(out[1], x_t[1] - 0.5 * v_pred[1], rtol=1e-6)
  # Per-token t over a packed sequence [T, D] works the same way.
  tok_t = jnp.array([0.0, 0.2, 0.2])
  tok = flow.reconstruct_z0(x_t[:, 0, 0], v_pred[:, 0, 0], tok_t, z0=z0[:, 0, 0])
  np.testing.assert_array_equal(tok[0], z0[0, 0, 0])
