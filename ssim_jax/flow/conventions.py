"""Rectified-flow conventions: interpolation, velocity target, timestep weight, z0.

    x_t = (1 - t) * z0 + t * noise,   v = noise - z0,   t in [0, 1], t = 0 clean.
    z0_pred = x_t - t * v_pred        (= z0 + t * (v - v_pred))
    w(t)  = clip((max_t - t) / max_t, 0, 1)                  per image

`t` is per image: `[B]` (or a scalar), broadcast over the latent axes.
"""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _per_image(t: jax.Array, ndim: int) -> jax.Array:
  """Broadcasts per-image `t` (`[B]`, scalar, or any leading shape) to `ndim`."""
  t = jnp.asarray(t)
  if t.ndim > ndim:
    raise ValueError(f"t has rank {t.ndim}, more than the latents' rank {ndim}")
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def timestep_weight(t: jax.Array, *, max_t: float) -> jax.Array:
  """Per-image SSIM/pixel-loss weight `clip((max_t - t) / max_t, 0, 1)`.

  Low-noise steps (t near 0) get weight 1, t >= max_t weight 0: a prediction
  from a very noisy input is too poor for a structural loss to help.

  Args:
    t: flow times, any shape (e.g. `[B]`), t = 0 clean.
    max_t: threshold > 0 (a Python float, or a concrete array).

  Returns:
    float32 weights in [0, 1], same shape as `t`.

  Raises:
    ValueError: `max_t <= 0` (or not finite) when it is concrete.

  Example:
    >>> timestep_weight(jnp.array([0.0, 0.15, 0.5]), max_t=0.3)
    Array([1. , 0.5, 0. ], dtype=float32)
  """
  if not isinstance(max_t, jax.core.Tracer):
    if isinstance(max_t, bool) or not (
        isinstance(max_t, numbers.Real) or
        (isinstance(max_t, (np.ndarray, jax.Array)) and max_t.size == 1)):
      raise TypeError(f"max_t must be a real number, got {max_t!r}")
    value = float(np.asarray(max_t).reshape(()))
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"max_t must be a finite number > 0, got {max_t!r}")
  t = jnp.asarray(t, jnp.float32)
  return jnp.clip((max_t - t) / max_t, 0.0, 1.0)


def interpolate(z0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """`x_t = (1 - t) z0 + t noise`, `t` broadcast per image.

  Args:
    z0: clean latents `[B, ...]`.
    noise: same shape as `z0`.
    t: `[B]` (or scalar, or a prefix shape of `z0` such as `[B, T]` per token).

  Returns:
    `x_t`, shape of `z0`.

  Example:
    >>> z0, noise = jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3))
    >>> interpolate(z0, noise, jnp.array([0.25, 1.0]))[:, 0, 0, 0]
    Array([0.25, 1.  ], dtype=float32)
  """
  chex.assert_equal_shape([z0, noise])
  tb = _per_image(t, z0.ndim).astype(z0.dtype)
  return (1 - tb) * z0 + tb * noise


def velocity_target(z0: jax.Array, noise: jax.Array) -> jax.Array:
  """Rectified-flow velocity `v = noise - z0` (constant along the path).

  Args:
    z0: clean latents `[B, ...]`.
    noise: same shape as `z0`.

  Returns:
    `v`, shape of `z0`.

  Example:
    >>> velocity_target(jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3))).mean()
    Array(1., dtype=float32)
  """
  chex.assert_equal_shape([z0, noise])
  return noise - z0


def reconstruct_z0(
    x_t: jax.Array,
    v_pred: jax.Array,
    t: jax.Array,
    *,
    z0: jax.Array | None = None,
    noise: jax.Array | None = None,
    supervised: jax.Array | None = None,
) -> jax.Array:
  """Predicted clean latent `x_t - t * v_pred`.

  With both `z0` and `noise` given the same quantity is computed as
  `z0 + t * (v - v_pred)` (the seed's form): identical gradient, and exactly
  `z0` when `v_pred == v` (the other form rounds). Where `supervised` is False
  or `t == 0` (conditioning / clean tokens) the clean `z0` is kept, when given.

  Args:
    x_t: noisy latents `[B, ...]`.
    v_pred: predicted velocities, shape of `x_t`.
    t: `[B]` per image (or a prefix shape of `x_t`, e.g. `[B, T]` per token).
    z0: optional clean latents, shape of `x_t`.
    noise: optional noise, shape of `x_t` (used only with `z0`).
    supervised: optional bool, a prefix shape of `x_t` like `t`.

  Returns:
    `z0_pred`, shape and dtype of `x_t`.

  Example:
    >>> z0, noise, t = jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3)), jnp.array([0.25, 1.0])
    >>> x_t, v = interpolate(z0, noise, t), velocity_target(z0, noise)
    >>> bool(jnp.all(reconstruct_z0(x_t, v, t) == z0))    # a perfect velocity gives z0
    True
  """
  chex.assert_equal_shape([x_t, v_pred])
  tb = _per_image(t, x_t.ndim).astype(x_t.dtype)
  if z0 is not None:
    chex.assert_equal_shape([x_t, z0])
  if z0 is not None and noise is not None:
    chex.assert_equal_shape([x_t, noise])
    pred = z0 + tb * (velocity_target(z0, noise) - v_pred)
  else:
    pred = x_t - tb * v_pred
  if z0 is None:
    return pred
  keep = tb == 0
  if supervised is not None:
    keep = jnp.logical_or(keep, jnp.logical_not(_per_image(supervised, x_t.ndim)))
  return jnp.where(keep, z0, pred)
