"""Tests of ssim_jax.fused: the chunked analytic derivative of the SSIM sum.

Every derivative of the fused route is compared with plain autodiff of the
same sum (`planes.plain_weighted_ssim_sum`), which test_ssim pins to the
textbook formula; where the inputs make float32 rounding decisive (the flat
patch), both float32 routes are compared with that sum run in float64.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssim_jax
from ssim_jax import filters
from ssim_jax import fused
from ssim_jax import planes

_KERNEL = filters.gaussian_kernel(7, 1.5)


def _pair(shape, seed=0, flat=True):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, shape)
  y = np.clip(x + rng.normal(0.0, 0.2, shape), 0.0, 1.0)
  if flat:
    # A flat patch: zero variances there exercise the clamp subgradients.
    x[:, :5, :5, :] = 0.5
    y[:, :5, :5, :] = 0.5
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _consts(b, data_range=1.0):
  return (jnp.full((b,), (0.01 * data_range) ** 2, jnp.float32),
          jnp.full((b,), (0.03 * data_range) ** 2, jnp.float32))


def _weights(shape, padding, masked, seed=1):
  if not masked:
    return jnp.ones((1, 1, 1, 1), jnp.float32)
  b, h, w, _ = shape
  k = _KERNEL.shape[0]
  if padding == "valid":
    h, w = h - k + 1, w - k + 1
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 2, (b, h, w, 1)),
                     jnp.float32)


def _both(padding, method, chunk):
  """(fused, plain) as functions of (x, y, weights, c1, c2)."""
  opts = dict(kernel=_KERNEL, padding=padding, filter_method=method)

  def f(x, y, w, c1, c2):
    return fused.weighted_ssim_sum(x, y, w, c1=c1, c2=c2,
                                   planes_per_chunk=chunk, **opts)

  def g(x, y, w, c1, c2):
    return planes.plain_weighted_ssim_sum(x, y, w, c1=c1, c2=c2, **opts)

  return f, g


def _case(shape, *, seed, padding="valid", masked=False, chunk=1,
          method="matmul", flat=True):
  """Inputs `(x, y, w, c1, c2)` and the `(fused, plain)` functions."""
  x, y = _pair(shape, seed=seed, flat=flat)
  c1, c2 = _consts(shape[0])
  return (x, y, _weights(shape, padding, masked), c1, c2), _both(
      padding, method, chunk)


def _close(a, b, scale=None):
  a, b = np.asarray(a), np.asarray(b)
  scale = np.abs(b).max() if scale is None else scale
  np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale + 1e-9)


def _float64_value_and_grads(loss, x, y):
  """Value and both gradients of `loss` (a function of the plain route's
  float32-or-float64 arguments) computed in float64: the reference that
  float32 results on any CPU are compared with."""
  with jax.enable_x64(True):
    x64, y64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, y))
    v, (gx, gy) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x64, y64)
    return np.asarray(v), np.asarray(gx), np.asarray(gy)


# Chunk sizes: one chunk, chunks that divide the planes, and chunks whose
# last one is topped up with padding planes (7 planes in chunks of 3).
# The flat patch of `_pair` is where the moment bounds hold with equality:
# at 'same' borders the 7x7 windows of the corner pixels see only the patch
# (x == y == 0.5) and the zero padding, so 2 cov == var_sum in exact
# arithmetic, and a float32 clamp there is decided by rounding.
@pytest.mark.parametrize("shape,chunk,padding,masked", [
    ((2, 23, 30, 3), 6, "valid", False),
    ((2, 23, 30, 3), 6, "same", True),
    ((2, 23, 30, 3), 2, "valid", True),
    ((2, 23, 30, 3), 2, "same", False),
    ((7, 19, 17, 1), 3, "valid", False),
    ((7, 19, 17, 1), 3, "same", True),
])
def test_value_and_gradients_match_float64(shape, chunk, padding, masked):
  (x, y, w, c1, c2), (f, g) = _case(shape, seed=0, padding=padding,
                                     masked=masked, chunk=chunk)
  cotangent = np.arange(1.0, shape[0] + 1.0)

  def loss(fn, a, b):
    # Distinct per-image cotangents: the gradient maps must scale per image.
    dt = a.dtype
    return jnp.sum(fn(a, b, w.astype(dt), c1.astype(dt), c2.astype(dt))
                   * jnp.asarray(cotangent, dt))

  v_ref, gx_ref, gy_ref = _float64_value_and_grads(
      functools.partial(loss, g), x, y)
  for fn in (f, g):  # the fused route and plain autodiff, both float32
    v, (gx, gy) = jax.jit(jax.value_and_grad(
        functools.partial(loss, fn), argnums=(0, 1)))(x, y)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    # Measured max |float32 - float64| / max |float64| over these cases:
    # <= 2.6e-6 on Zen 4 (AVX-512) and with --xla_cpu_max_isa=AVX2; 2e-5
    # leaves 8x. A clamp subgradient chosen by rounding was off by 4.5e-4
    # (issue 12).
    _close(gx, gx_ref)
    _close(gy, gy_ref)
  assert np.abs(gx_ref).max() > 0
  # One image differentiated at a time (the other's blurs are skipped).
  _close(jax.grad(functools.partial(loss, f))(x, y), gx_ref)
  _close(jax.grad(functools.partial(loss, f), argnums=1)(x, y), gy_ref)


@pytest.mark.parametrize("term,padding,masked", [
    ("cs", "valid", False), ("cs", "same", True), ("ssim", "valid", True)])
def test_plane_sums_match_float64(term, padding, masked):
  # Per image and channel sums (MS-SSIM's finest scale uses term="cs"),
  # each plane with its own cotangent.
  shape = (2, 23, 30, 3)
  x, y = _pair(shape, seed=12)
  w = _weights(shape, padding, masked)
  c1, c2 = _consts(shape[0])
  cotangent = np.arange(1.0, 7.0).reshape(2, 3)
  opts = dict(kernel=_KERNEL, padding=padding, term=term)

  def loss(fn, a, b, **kw):
    dt = a.dtype
    return jnp.sum(fn(a, b, w.astype(dt), c1=c1.astype(dt), c2=c2.astype(dt),
                      **opts, **kw) * jnp.asarray(cotangent, dt))

  plain = functools.partial(loss, planes.plain_weighted_plane_sums,
                            filter_method="matmul")
  v_ref, gx_ref, gy_ref = _float64_value_and_grads(plain, x, y)
  got = functools.partial(loss, fused.weighted_plane_sums,
                          filter_method="matmul", planes_per_chunk=4)
  v, (gx, gy) = jax.jit(jax.value_and_grad(got, argnums=(0, 1)))(x, y)
  np.testing.assert_allclose(v, v_ref, rtol=1e-6)
  _close(gx, gx_ref)
  _close(gy, gy_ref)
  sums = fused.weighted_plane_sums(
      x, y, w, c1=c1, c2=c2, filter_method="matmul", planes_per_chunk=4,
      **opts)
  assert sums.shape == (2, 3)
  with pytest.raises(ValueError, match="term"):
    fused.weighted_plane_sums(x, y, w, c1=c1, c2=c2, kernel=_KERNEL,
                              padding="valid", filter_method="matmul",
                              planes_per_chunk=1, term="luminance")


@pytest.mark.parametrize("method", filters.METHODS)
def test_every_lowering(method):
  (x, y, w, c1, c2), (f, g) = _case((1, 20, 26, 2), seed=2, method=method)
  gf = jax.grad(lambda a: f(a, y, w, c1, c2)[0])(x)
  gg = jax.grad(lambda a: g(a, y, w, c1, c2)[0])(x)
  _close(gf, gg)


def test_forward_mode_and_second_order():
  shape = (2, 18, 21, 2)
  # No flat patch: second derivatives are compared off the clamps' kinks.
  (x, y, w, c1, c2), (f, g) = _case(shape, seed=3, padding="same",
                                     masked=True, chunk=2, flat=False)
  v = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)

  def scalar(fn):
    return lambda a: jnp.sum(fn(a, y, w, c1, c2))

  # jvp (forward mode) == <grad, v>.
  _, jv = jax.jvp(scalar(f), (x,), (v,))
  np.testing.assert_allclose(jv, jnp.vdot(jax.grad(scalar(g))(x), v),
                             rtol=1e-4)
  # Hessian-vector product: the rule itself is differentiated.
  hvp_f = jax.jit(lambda a, t: jax.jvp(jax.grad(scalar(f)), (a,), (t,))[1])
  hvp_g = jax.jit(lambda a, t: jax.jvp(jax.grad(scalar(g)), (a,), (t,))[1])
  hvp_f, hvp_g = hvp_f(x, v), hvp_g(x, v)
  # Second derivatives in float32 differ by rounding in a few pixels
  # (~0.3%); a wrong rule would be off by O(1).
  err = np.linalg.norm(np.asarray(hvp_f - hvp_g))
  assert err < 1e-3 * np.linalg.norm(np.asarray(hvp_g)), err


def test_tangents_of_weights_and_constants_fall_back_to_autodiff():
  (x, y, w, _, _), (f, g) = _case((2, 20, 20, 1), seed=5, masked=True)

  def by_range(fn):
    # data_range computed from the image: the constants depend on x.
    def h(a, m):
      c1, c2 = _consts(2, data_range=jnp.max(a, axis=(1, 2, 3)) + 0.5)
      return jnp.sum(fn(a, y, m, c1, c2))
    return h

  gf = jax.grad(by_range(f), argnums=(0, 1))(x, w)
  gg = jax.grad(by_range(g), argnums=(0, 1))(x, w)
  _close(gf[0], gg[0])
  _close(gf[1], gg[1])


def test_vmap_of_gradient():
  (x, y, w, c1, c2), (f, g) = _case((2, 16, 19, 1), seed=6)

  def grad_one(fn):
    return jax.grad(lambda a, b: jnp.sum(fn(a[None], b[None], w, c1[:1],
                                            c2[:1])))

  _close(jax.jit(jax.vmap(grad_one(f)))(x, y),
         jax.jit(jax.vmap(grad_one(g)))(x, y))


def test_nan_propagates_to_value_and_gradient():
  (x, y, w, c1, c2), (f, _) = _case((1, 16, 16, 1), seed=7)
  x = x.at[0, 8, 8, 0].set(jnp.nan)
  v, gx = jax.value_and_grad(lambda a: f(a, y, w, c1, c2)[0])(x)
  assert np.isnan(v)
  assert np.isnan(np.asarray(gx)).any()


def _has_custom_jvp(fn, *args):
  # The fused rule is the only custom_jvp taking symbolic zeros (the moment
  # clamp's is another custom_jvp).
  return "symbolic_zeros=True" in str(jax.make_jaxpr(fn)(*args))


def test_api_routes_auto_through_the_fused_derivative():
  shape = (1, 150, 141, 2)
  x, y = _pair(shape, seed=8)

  def loss(method):
    return lambda a: ssim_jax.ssim_loss(a, y, filter_method=method)

  assert _has_custom_jvp(loss("auto"), x)
  # A named lowering runs under plain autodiff (the reference behaviour).
  assert not _has_custom_jvp(loss("matmul"), x)
  _close(jax.jit(jax.grad(loss("auto")))(x),
         jax.jit(jax.grad(loss("matmul")))(x))
  l1 = jax.jit(jax.grad(
      lambda a: ssim_jax.l1_ssim_loss(a, y, filter_method="auto")))
  l1_ref = jax.jit(jax.grad(
      lambda a: ssim_jax.l1_ssim_loss(a, y, filter_method="matmul")))
  _close(l1(x), l1_ref(x))
  # A weighted mask and per-image data_range take the fused route too.
  m = jnp.asarray(np.random.default_rng(10).uniform(0, 1, shape[:3] + (1,)),
                  jnp.float32)

  def masked(method):
    return jax.jit(jax.grad(lambda a: ssim_jax.ssim_loss(
        a, y, mask=m, data_range=jnp.asarray([2.0]), filter_method=method)))

  assert _has_custom_jvp(
      lambda a: ssim_jax.ssim_loss(a, y, mask=m, data_range=jnp.asarray([2.0])),
      x)
  _close(masked("auto")(x), masked("matmul")(x))


def _ms_ssim_loss_reference(a, b, mask):
  """1 - MS-SSIM (5 levels, 11-tap window, 'valid', weighted mask) from the
  plain route's pieces, in the dtype of `a` (float64 for the reference: the
  public API casts to float32)."""
  ms_lib = importlib.import_module("ssim_jax.ms_ssim")
  kernel = (filters.gaussian_kernel(11, 1.5),) * 2
  c1, c2 = (jnp.full((a.shape[0],), (k * 1.0) ** 2, a.dtype)
            for k in (0.01, 0.03))
  factors, mass0 = [], None
  for level, weight in enumerate(ms_lib.DEFAULT_WEIGHTS):
    last = level == len(ms_lib.DEFAULT_WEIGHTS) - 1
    w = (jnp.ones((1,) * 4, a.dtype) if mask is None
         else planes.align_mask(mask, kernel, "valid"))
    total = planes.plain_weighted_plane_sums(
        a, b, w, kernel=kernel, c1=c1, c2=c2, padding="valid",
        filter_method="matmul", term="ssim" if last else "cs")
    map_shape = (a.shape[0], a.shape[1] - 10, a.shape[2] - 10, a.shape[3])
    mass = jnp.sum(jnp.broadcast_to(w, map_shape), axis=(1, 2))
    mass0 = mass if level == 0 else mass0
    factors.append(ms_lib._safe_pow(total / mass, weight))
    if not last:
      axes = ms_lib.pyramid_axes(a.shape[1:3], (11, 11))
      a, b = ms_lib._pool(a, axes), ms_lib._pool(b, axes)
      mask = None if mask is None else ms_lib._pool(mask, axes)
  per_channel = functools.reduce(lambda p, q: p * q, factors)
  value = jnp.sum(mass0 * per_channel, axis=-1) / jnp.sum(mass0, axis=-1)
  return 1.0 - jnp.mean(value)


def test_ms_ssim_finest_scale_takes_the_fused_derivative():
  # Level 0 of a 176x176 pyramid has 166x166 maps (fused route); the
  # coarser levels run under plain autodiff. Both images' gradients match a
  # float64 run of the plain route, with and without a weighted mask.
  shape = (1, 176, 176, 2)
  x, y = _pair(shape, seed=13)
  m = jnp.asarray(np.random.default_rng(14).uniform(0, 1, shape[:3] + (1,)),
                  jnp.float32)
  for mask in (None, m):
    def loss(a, b, method="auto", mask=mask):
      return ssim_jax.ms_ssim_loss(a, b, mask=mask, filter_method=method)

    assert _has_custom_jvp(loss, x, y)
    assert not _has_custom_jvp(functools.partial(loss, method="matmul"), x, y)
    v_ref, gx_ref, gy_ref = _float64_value_and_grads(
        lambda a, b, mask=mask: _ms_ssim_loss_reference(
            a, b, None if mask is None else mask.astype(a.dtype)), x, y)
    # The reference is the API's computation.
    np.testing.assert_allclose(
        _ms_ssim_loss_reference(x, y, mask), loss(x, y, "matmul"), rtol=1e-5)
    v, (gx, gy) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, y)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    _close(gx, gx_ref)
    _close(gy, gy_ref)


def test_fused_gradient_keeps_less_memory():
  # The backward pass keeps no residual maps; compiled temp memory of the
  # gradient (XLA memory analysis) is below plain autodiff's.
  shape = (2, 160, 160, 3)
  (x, y, w, c1, c2), (f, g) = _case(shape, seed=9)

  def temp(fn):
    grad = jax.jit(jax.grad(lambda a: jnp.sum(fn(a, y, w, c1, c2))))
    return grad.lower(x).compile().memory_analysis().temp_size_in_bytes

  image = 4 * np.prod(shape)
  assert temp(f) < 0.6 * temp(g), (temp(f) / image, temp(g) / image)


def test_rejects_bad_chunk():
  x, y = _pair((1, 16, 16, 1))
  c1, c2 = _consts(1)
  with pytest.raises(ValueError, match="planes_per_chunk"):
    fused.weighted_ssim_sum(x, y, jnp.ones((1, 1, 1, 1)), kernel=_KERNEL,
                            c1=c1, c2=c2, padding="valid",
                            filter_method="matmul", planes_per_chunk=0)


def test_gradient_under_shard_map():
  # Data-parallel training: the fused rule inside `jax.shard_map`, partial
  # sums psum'd, equals the global loss's gradient by plain autodiff.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  x, y = _pair((2, 140, 150, 1), seed=11)

  def local(a, b):
    return ssim_jax.loss_from_sums(ssim_jax.ssim_sums(a, b), axis_name="data")

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec),
                          out_specs=jax.sharding.PartitionSpec())
  assert _has_custom_jvp(sharded, x, y)
  got = jax.jit(jax.grad(sharded))(x, y)
  ref = jax.jit(jax.grad(
      lambda a: ssim_jax.ssim_loss(a, y, filter_method="matmul")))(x)
  _close(got, ref)
