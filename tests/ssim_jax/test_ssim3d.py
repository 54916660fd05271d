"""Volumetric SSIM (`spatial_dims=3`): references, guarantees, masks,
MS-SSIM's pyramid, the depth-slab derivative and transformations.

Volumes are small (about 12x16x16) and come from `phantom` (ellipsoids in
air), so that the whole file stays within a few tens of seconds on 2 cores.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from jit_helpers import call
from phantom import distort
from phantom import phantom
import ssim_jax
from ssim_jax import checks
from ssim_jax import fused
from ssim_jax import planes
ms_lib = importlib.import_module("ssim_jax.ms_ssim")

SHAPE = (12, 16, 16)


def _pair(shape=SHAPE, batch=2, channels=1, seed=0):
  """Phantom volumes x and distorted y, float32 `[B, D, H, W, C]`."""
  xs = np.stack([phantom(shape, seed=seed + i) for i in range(batch)])
  ys = np.stack([distort(v, seed=seed + 10 + i) for i, v in enumerate(xs)])
  xs = np.repeat(xs[..., None], channels, axis=-1)
  ys = np.repeat(ys[..., None], channels, axis=-1)
  return xs, ys


# --- references ---


def test_matches_skimage_on_volumes():
  x, y = _pair((14, 18, 20))
  data_range = np.asarray([1.0, 1.5], np.float32)
  got = np.asarray(call(ssim_jax.ssim, x, y, data_range=data_range,
                        spatial_dims=3))
  ref = [structural_similarity(
      x[i, ..., 0].astype(np.float64), y[i, ..., 0].astype(np.float64),
      gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=float(data_range[i])) for i in range(2)]
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert abs(ref[0] - ref[1]) > 1e-3  # the per-image data_range mattered


def _correlate_f64(a, taps, axis, padding):
  """float64 'valid' / zero-'same' correlation along one axis (numpy)."""
  k = len(taps)
  if padding == "same":
    pads = [(0, 0)] * a.ndim
    pads[axis] = (k // 2, k // 2)
    a = np.pad(a, pads)
  n = a.shape[axis] - k + 1
  return sum(t * np.take(a, np.arange(j, j + n), axis=axis)
             for j, t in enumerate(taps))


def _ssim_map_f64(x, y, sizes, sigmas, padding, data_range=1.0):
  """Textbook SSIM map in float64 (E[x^2] - E[x]^2 is exact enough there)
  with one Gaussian window per axis, written independently of ssim_jax."""
  def taps(k, s):
    c = np.arange(k) - (k - 1) / 2
    g = np.exp(-c ** 2 / (2 * s * s))
    return g / g.sum()

  def blur(a):
    for axis, (k, s) in enumerate(zip(sizes, sigmas)):
      a = _correlate_f64(a, taps(k, s), axis, padding)
    return a

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = blur(x), blur(y)
  vx, vy = blur(x * x) - mx * mx, blur(y * y) - my * my
  cov = blur(x * y) - mx * my
  return ((2 * mx * my + c1) * (2 * cov + c2)
          / ((mx * mx + my * my + c1) * (vx + vy + c2)))


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_anisotropic_window_matches_float64_separable_reference(padding):
  x, y = _pair(batch=1)
  sizes, sigmas = (3, 5, 7), (0.6, 1.1, 1.7)
  got = np.asarray(call(ssim_jax.ssim_map, x, y, window_size=sizes,
                        sigma=sigmas, padding=padding, spatial_dims=3))
  ref = _ssim_map_f64(x[0, ..., 0].astype(np.float64),
                      y[0, ..., 0].astype(np.float64), sizes, sigmas, padding)
  assert got.shape == (1,) + ref.shape + (1,)
  np.testing.assert_allclose(got[0, ..., 0], ref, atol=1e-5, rtol=0)


def test_spacing_makes_sigma_physical_and_sets_the_window():
  # CT-like voxels 3 x 0.7 x 0.7 mm, sigma 1.5 mm: sigma in voxels
  # (0.5, 2.14, 2.14), windows covering +-3.5 sigma: (5, 17, 17).
  w = checks.check_window(None, 1.5, spatial_dims=3, spacing=(3.0, 0.7, 0.7))
  assert w.sizes == (5, 17, 17)
  np.testing.assert_allclose(w.sigmas, (0.5, 1.5 / 0.7, 1.5 / 0.7))
  # The rule gives the 2-D default for sigma 1.5 voxels.
  assert checks.check_window(None, 1.5, spatial_dims=2,
                             spacing=(1.0, 1.0)).sizes == (11, 11)
  x, y = _pair((10, 20, 20))
  by_spacing = call(ssim_jax.ssim_map, x, y, spatial_dims=3,
                    spacing=(3.0, 0.7, 0.7))
  explicit = call(ssim_jax.ssim_map, x, y, spatial_dims=3,
                  window_size=(5, 17, 17), sigma=(0.5, 1.5 / 0.7, 1.5 / 0.7))
  assert by_spacing.shape == (2, 6, 4, 4, 1)
  np.testing.assert_array_equal(by_spacing, explicit)


def test_axes_shorter_than_their_window_shrink():
  x, y = _pair((6, 16, 16), batch=1)
  # One window size: shrinks as a whole, as in 2-D (6 -> 5 on every axis).
  assert call(ssim_jax.ssim_map, x, y, spatial_dims=3).shape == (
      1, 2, 12, 12, 1)
  # Per-axis windows shrink axis by axis.
  assert call(ssim_jax.ssim_map, x, y, spatial_dims=3,
              window_size=(11, 11, 11)).shape == (1, 2, 6, 6, 1)


def test_volume_constant_along_depth_equals_2d():
  # With D equal to the window, the 'valid' 3-D map is one slice: the 2-D
  # map of the repeated image (the window is normalised along D).
  x, y = _pair(batch=2)
  x2, y2 = x[:, 5], y[:, 5]
  x3 = np.repeat(x2[:, None], 7, axis=1)
  y3 = np.repeat(y2[:, None], 7, axis=1)
  m3 = call(ssim_jax.ssim_map, x3, y3, window_size=7, spatial_dims=3)
  m2 = call(ssim_jax.ssim_map, x2, y2, window_size=7)
  np.testing.assert_allclose(m3[:, 0], m2, atol=2e-6)


# --- guarantees ---


def _kinds():
  rng = np.random.default_rng(3)
  shape = (2,) + SHAPE + (1,)
  blob = np.full(shape, 0.5)
  blob[:, 5:7, 6:9, 6:9] = rng.uniform(0, 1, (2, 2, 3, 3, 1))
  return {
      "phantom": _pair()[0],
      "constant": np.full(shape, 0.3),
      "blob": blob,
      "near_zero": rng.uniform(0, 1e-4, shape),
      "near_range": 1.0 - rng.uniform(0, 1e-4, shape),
  }


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_range_and_identity(padding, dtype):
  f = jax.jit(functools.partial(ssim_jax.ssim_map, padding=padding,
                                spatial_dims=3))
  kinds = _kinds()
  y = jnp.asarray(_pair()[1], dtype)
  for name, a in kinds.items():
    a = jnp.asarray(a, dtype)
    m = np.asarray(f(a, y))
    assert m.dtype == np.float32
    assert np.all(np.isfinite(m)) and np.all(np.abs(m) <= 1.0), name
    np.testing.assert_array_equal(np.asarray(f(a, a)), 1.0, err_msg=name)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_gradients_finite(padding):
  mask = np.zeros((2,) + SHAPE + (1,), np.float32)
  mask[:, 3:9, 4:12, 4:12] = 1.0

  @jax.jit
  def grads(a, b, m):
    out = []
    for mode in ("weighted", "foreground"):
      out += jax.grad(lambda a, b: ssim_jax.ssim_loss(
          a, b, mask=m, mask_mode=mode, padding=padding, spatial_dims=3),
          argnums=(0, 1))(a, b)
    out.append(jax.grad(lambda a: ssim_jax.l1_ssim_loss(
        a, b, padding=padding, spatial_dims=3))(a))
    return out

  kinds = _kinds()
  for name, a in kinds.items():
    for b in (a, kinds["phantom"]):
      for m in (mask, np.zeros_like(mask)):
        for g in grads(a, b, m):
          assert np.all(np.isfinite(np.asarray(g))), name


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_foreground_ignores_background_and_ones_mask_is_no_mask(padding):
  x, y = _pair()
  mask = (x > 0).astype(np.float32)  # the body: air is background
  f = jax.jit(lambda a, b, m: ssim_jax.ssim(
      a, b, mask=m, mask_mode="foreground", padding=padding, spatial_dims=3))
  ref = np.asarray(f(x, y, mask))
  x_bg = np.where(mask > 0, x, np.nan).astype(np.float32)
  y_bg = np.where(mask > 0, y, 7.0).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(f(x_bg, y_bg, mask)), ref)
  assert np.all(np.isfinite(ref))
  ones = np.ones_like(mask)
  np.testing.assert_allclose(
      call(ssim_jax.ssim, x, y, mask=ones, padding=padding, spatial_dims=3),
      call(ssim_jax.ssim, x, y, padding=padding, spatial_dims=3),
      atol=1e-6)


def test_unbatched_vmap_grad_and_shard_map():
  x, y = _pair(batch=8, channels=2)
  batched = call(ssim_jax.ssim, x, y, spatial_dims=3)
  one = jax.jit(lambda a, b: ssim_jax.ssim(a, b, spatial_dims=3))
  np.testing.assert_allclose(one(x[0], y[0]), batched[0], atol=1e-6)
  vmapped = jax.jit(jax.vmap(lambda a, b: ssim_jax.ssim(a, b,
                                                        spatial_dims=3)))
  np.testing.assert_allclose(vmapped(x, y), batched, atol=1e-6)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  spec = jax.sharding.PartitionSpec("data")

  def local(a, b):
    return ssim_jax.loss_from_sums(
        ssim_jax.ssim_sums(a, b, spatial_dims=3), axis_name="data")

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec),
                          out_specs=jax.sharding.PartitionSpec())
  got = jax.jit(jax.value_and_grad(sharded))(x, y)
  ref = jax.jit(jax.value_and_grad(
      lambda a: ssim_jax.ssim_loss(a, y, spatial_dims=3)))(x)
  # float32 partial sums over 8 devices vs one sum: last-bits differences.
  np.testing.assert_allclose(got[0], ref[0], rtol=5e-5)
  np.testing.assert_allclose(got[1], ref[1], atol=1e-7, rtol=1e-4)


# --- the depth-slab derivative ---


@pytest.mark.parametrize("padding,masked", [("valid", False), ("same", True)])
def test_slabbed_derivative_matches_autodiff_float64(padding, masked):
  # Rounding-insensitive: both routes in float64 (the slab route differs
  # from autodiff only in the order of sums).
  x, y = _pair(batch=1, channels=2, seed=5)
  kernel = tuple(ssim_jax.filters.gaussian_kernel(k, 1.5) for k in (5, 7, 7))
  with jax.enable_x64(True):
    x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    out = (SHAPE if padding == "same"
           else tuple(n - k + 1 for n, k in zip(SHAPE, (5, 7, 7))))
    # Weights exact in float32 (the fused route takes float32 weights).
    w = (jnp.asarray(np.random.default_rng(2).uniform(
        0, 1, (1,) + out + (2,)).astype(np.float32), jnp.float64)
         if masked else jnp.ones((1,) * 5))
    c1 = jnp.full((1,), 1e-4, jnp.float64)
    c2 = jnp.full((1,), 9e-4, jnp.float64)
    opts = dict(kernel=kernel, c1=c1, c2=c2, padding=padding,
                filter_method="matmul")

    def slabbed(a, b):
      return jnp.sum(fused.weighted_ssim_sum(
          a, b, w, planes_per_chunk=1, slab_depth=3, **opts))

    def plain(a, b):
      return jnp.sum(planes.plain_weighted_ssim_sum(a, b, w, **opts))

    got = jax.jit(jax.value_and_grad(slabbed, argnums=(0, 1)))(x64, y64)
    ref = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x64, y64)
    gx_only = jax.jit(jax.grad(slabbed))(x64, y64)
  tol = 1e-12
  np.testing.assert_allclose(got[0], ref[0], rtol=tol)
  for g, r in zip(got[1], ref[1]):
    np.testing.assert_allclose(g, r, atol=tol)
  np.testing.assert_allclose(gx_only, ref[1][0], atol=tol)


def test_slabs_bound_the_gradient_memory():
  # Compiled temp memory of the gradient (XLA memory analysis): slabs keep
  # the centred inputs and the gradient, whole volumes ~7.6 maps, plain
  # autodiff ~4.75 (benchmarks/README.md has the CT-sized figures).
  # Deep enough that the slabs' K_D - 1 halo slices do not dominate.
  shape = (1, 384, 32, 32, 1)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  kernel = ssim_jax.filters.gaussian_kernel(11, 1.5)
  c = jnp.full((1,), 1e-4)
  opts = dict(kernel=kernel, c1=c, c2=c, padding="valid",
              filter_method="matmul")

  def temp(slab):
    def loss(a, b):
      if slab is None:
        return jnp.sum(planes.plain_weighted_ssim_sum(
            a, b, jnp.ones((1,) * 5), **opts))
      return jnp.sum(fused.weighted_ssim_sum(
          a, b, jnp.ones((1,) * 5), planes_per_chunk=1, slab_depth=slab,
          **opts))
    return (jax.jit(jax.grad(loss)).lower(x, x).compile().memory_analysis()
            .temp_size_in_bytes)

  volume = 4 * np.prod(shape)
  slabbed, whole, plain = temp(8), temp(0), temp(None)
  ratios = (slabbed / volume, whole / volume, plain / volume)
  # Measured with the four-blur statistics (Zen 4): 3.5, 7.6 and 4.75
  # volumes (at D = 96 the halo made the slabs 5.0 vs 4.75 for autodiff).
  assert slabbed < 0.7 * whole and slabbed < 0.85 * plain, ratios


# --- MS-SSIM ---


def test_ms_ssim_pyramid_keeps_thin_axes():
  # H and W halve at every level; D (7, window 7) never does.
  assert ms_lib.pyramid_axes((7, 40, 40), (7, 5, 5)) == (2, 3)
  assert ms_lib.pyramid_axes((16, 40, 40), (7, 5, 5)) == (1, 2, 3)
  assert ms_lib.min_sizes(3, (7, 5, 5)) == (7, 17, 17)
  # So a volume constant along D with D equal to the window has the 2-D
  # MS-SSIM of its image at every level.
  rng = np.random.default_rng(4)
  x2 = rng.uniform(0, 1, (2, 40, 36, 1)).astype(np.float32)
  y2 = np.clip(x2 + 0.2 * rng.normal(size=x2.shape), 0, 1).astype(np.float32)
  x3 = np.repeat(x2[:, None], 5, axis=1)
  y3 = np.repeat(y2[:, None], 5, axis=1)
  opts = dict(levels=3, window_size=5)
  v3 = call(ssim_jax.ms_ssim, x3, y3, spatial_dims=3, **opts)
  v2 = call(ssim_jax.ms_ssim, x2, y2, **opts)
  np.testing.assert_allclose(v3, v2, atol=2e-6)
  assert np.all(np.asarray(v2) < 0.95)


def test_ms_ssim_foreground_mask_follows_the_pyramid():
  x, y = _pair((8, 20, 20))
  mask = (x > 0).astype(np.float32)
  f = jax.jit(lambda a, b, m: ssim_jax.ms_ssim_loss(
      a, b, mask=m, mask_mode="foreground", levels=2, window_size=5,
      spatial_dims=3))
  ref = f(x, y, mask)
  x_bg = np.where(mask > 0, x, 9.0).astype(np.float32)
  np.testing.assert_array_equal(f(x_bg, y, mask), ref)
  g = jax.jit(jax.grad(f))(x, y, mask)
  assert np.all(np.isfinite(np.asarray(g)))
  assert 0.0 < float(ref) < 1.0


def test_ms_ssim_too_small_names_minimum_size_per_axis():
  x = np.zeros((1, 4, 40, 40, 1), np.float32)
  with pytest.raises(ValueError, match=r"minimum size per axis \(D, H, W\) "
                     r"is \(5, 17, 17\)") as e:
    jax.eval_shape(lambda: ssim_jax.ms_ssim(x, x, levels=3, window_size=5,
                                            spatial_dims=3))
  assert "use a smaller window" in str(e.value)
