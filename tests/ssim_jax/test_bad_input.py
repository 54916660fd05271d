"""Bad-input matrix: every public ssim_jax function x every kind of bad input.

Each case either raises a clear error naming the argument (at trace time,
without compiling anything) or returns the documented finite result. The
counts are asserted at the bottom so the docs can quote them.
"""

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssim_jax

# Every public function that takes an image pair.
FUNCTIONS = {
    "ssim_map": ssim_jax.ssim_map,
    "ssim": ssim_jax.ssim,
    "ssim_sums": ssim_jax.ssim_sums,
    "ssim_loss": ssim_jax.ssim_loss,
    "ms_ssim": functools.partial(ssim_jax.ms_ssim, levels=2, window_size=3),
    "ms_ssim_loss": functools.partial(ssim_jax.ms_ssim_loss, levels=2,
                                      window_size=3),
    "l1_ssim_loss": ssim_jax.l1_ssim_loss,
    "ms_ssim_sums": functools.partial(ssim_jax.ms_ssim_sums, levels=2,
                                      window_size=3),
}

X = np.full((2, 12, 12, 3), 0.5, np.float32)
# A volume batch [B, D, H, W, C] (big enough for the MS-SSIM partials) and
# the option that makes it one.
X3 = np.full((2, 6, 8, 8, 2), 0.5, np.float32)
V = {"spatial_dims": 3}


def _x(shape=(2, 12, 12, 3), dtype=np.float32):
  return np.full(shape, 1, dtype)


# Channels-first images and the option that reads them right.
NCHW = _x((2, 3, 12, 12))
CF = {"channel_axis": 1}


# (case id, x, y, extra kwargs, expected exception, argument named in message)
ERROR_CASES = [
    ("x_rank2", _x((12, 12)), _x((12, 12)), {}, ValueError, "x"),
    ("x_rank5", _x((1, 2, 12, 12, 3)), _x((1, 2, 12, 12, 3)), {}, ValueError,
     "x"),
    ("shape_mismatch", X, _x((2, 12, 13, 3)), {}, ValueError, "y"),
    ("channel_mismatch", X, _x((2, 12, 12, 1)), {}, ValueError, "y"),
    ("x_int", _x(dtype=np.int32), X, {}, TypeError, "x"),
    ("x_uint8", _x(dtype=np.uint8), X, {}, TypeError, "x"),
    ("y_int", X, _x(dtype=np.int64), {}, TypeError, "y"),
    ("x_bool", _x(dtype=np.bool_), X, {}, TypeError, "x"),
    ("x_complex", _x(dtype=np.complex64), X, {}, TypeError, "x"),
    ("x_string", "image", X, {}, TypeError, "x"),
    ("x_none", None, X, {}, TypeError, "x"),
    ("image_1px", _x((2, 1, 1, 3)), _x((2, 1, 1, 3)), {}, ValueError, "x"),
    ("image_2px", _x((2, 2, 12, 3)), _x((2, 2, 12, 3)), {}, ValueError, "x"),
    ("image_2px_wide", _x((2, 12, 2, 3)), _x((2, 12, 2, 3)), {}, ValueError,
     "x"),
    ("zero_channels", _x((2, 12, 12, 0)), _x((2, 12, 12, 0)), {}, ValueError,
     "x"),
    ("window_even", X, X, {"window_size": 4}, ValueError, "window_size"),
    ("window_1", X, X, {"window_size": 1}, ValueError, "window_size"),
    ("window_negative", X, X, {"window_size": -3}, ValueError, "window_size"),
    ("window_float", X, X, {"window_size": 7.0}, TypeError, "window_size"),
    ("sigma_zero", X, X, {"sigma": 0.0}, ValueError, "sigma"),
    ("sigma_negative", X, X, {"sigma": -1.5}, ValueError, "sigma"),
    ("sigma_nan", X, X, {"sigma": float("nan")}, ValueError, "sigma"),
    ("sigma_string", X, X, {"sigma": "1.5"}, TypeError, "sigma"),
    ("k1_zero", X, X, {"k1": 0.0}, ValueError, "k1"),
    ("k2_negative", X, X, {"k2": -0.03}, ValueError, "k2"),
    ("data_range_zero", X, X, {"data_range": 0.0}, ValueError, "data_range"),
    ("data_range_negative", X, X, {"data_range": -1.0}, ValueError,
     "data_range"),
    ("data_range_inf", X, X, {"data_range": float("inf")}, ValueError,
     "data_range"),
    ("data_range_nan", X, X, {"data_range": float("nan")}, ValueError,
     "data_range"),
    ("data_range_tiny", X, X, {"data_range": 1e-40}, ValueError,
     "data_range"),
    ("data_range_huge", X, X, {"data_range": 1e38}, ValueError, "data_range"),
    ("data_range_bool", X, X, {"data_range": True}, TypeError, "data_range"),
    ("data_range_wrong_shape", X, X,
     {"data_range": np.ones((3,), np.float32)}, ValueError, "data_range"),
    ("data_range_array_negative", X, X,
     {"data_range": np.asarray([1.0, -1.0], np.float32)}, ValueError,
     "data_range"),
    ("data_range_complex", X, X,
     {"data_range": np.ones((2,), np.complex64)}, TypeError, "data_range"),
    ("padding_unknown", X, X, {"padding": "full"}, ValueError, "padding"),
    ("padding_unknown_upper", X, X, {"padding": "FULL"}, ValueError,
     "padding"),
    ("filter_method_unknown", X, X, {"filter_method": "fft?"}, ValueError,
     "filter_method"),
    ("mask_negative", X, X, {"mask": -np.ones((2, 12, 12, 1), np.float32)},
     ValueError, "mask"),
    ("mask_nan", X, X,
     {"mask": np.full((2, 12, 12, 1), np.nan, np.float32)}, ValueError,
     "mask"),
    ("mask_rank3", X, X, {"mask": np.ones((12, 12, 1), np.float32)},
     ValueError, "mask"),
    ("mask_wrong_hw", X, X, {"mask": np.ones((2, 11, 12, 1), np.float32)},
     ValueError, "mask"),
    ("mask_wrong_channels", X, X,
     {"mask": np.ones((2, 12, 12, 2), np.float32)}, ValueError, "mask"),
    ("mask_wrong_batch", X, X, {"mask": np.ones((3, 12, 12, 1), np.float32)},
     ValueError, "mask"),
    ("mask_complex", X, X, {"mask": np.ones((2, 12, 12, 1), np.complex64)},
     TypeError, "mask"),
    ("mask_string", X, X, {"mask": "foreground"}, TypeError, "mask"),
    # Volumes (spatial_dims=3) and the per-axis window options.
    ("volume_without_spatial_dims", X3, X3, {}, ValueError,
     "spatial_dims=3"),
    ("volume_rank6", _x((1,) + X3.shape), _x((1,) + X3.shape), V, ValueError,
     "x"),
    ("volume_rank3", _x((8, 8, 2)), _x((8, 8, 2)), V, ValueError, "x"),
    ("volume_depth_2px", _x((2, 2, 8, 8, 2)), _x((2, 2, 8, 8, 2)), V,
     ValueError, "x"),
    ("volume_shape_mismatch", X3, _x((2, 7, 8, 8, 2)), V, ValueError, "y"),
    ("spatial_dims_4", X, X, {"spatial_dims": 4}, ValueError, "spatial_dims"),
    ("spatial_dims_1", X, X, {"spatial_dims": 1}, ValueError, "spatial_dims"),
    ("spatial_dims_float", X3, X3, {"spatial_dims": 3.0}, TypeError,
     "spatial_dims"),
    ("spatial_dims_bool", X, X, {"spatial_dims": True}, TypeError,
     "spatial_dims"),
    ("window_per_axis_length", X3, X3, {**V, "window_size": (3, 3)},
     ValueError, "window_size"),
    ("window_per_axis_even", X3, X3, {**V, "window_size": (3, 4, 3)},
     ValueError, "window_size"),
    ("window_per_axis_float", X3, X3, {**V, "window_size": (3, 3.0, 3)},
     TypeError, "window_size"),
    ("sigma_per_axis_length", X3, X3, {**V, "sigma": (1.0, 1.0)}, ValueError,
     "sigma"),
    ("sigma_per_axis_negative", X3, X3, {**V, "sigma": (1.0, -1.0, 1.0)},
     ValueError, "sigma"),
    ("spacing_length", X3, X3, {**V, "spacing": (1.0, 1.0)}, ValueError,
     "spacing"),
    ("spacing_length_2d", X, X, {"spacing": (3.0, 1.0, 1.0)}, ValueError,
     "spacing"),
    ("spacing_zero", X3, X3, {**V, "spacing": (0.0, 1.0, 1.0)}, ValueError,
     "spacing"),
    ("spacing_negative", X3, X3, {**V, "spacing": (3.0, -0.7, 0.7)},
     ValueError, "spacing"),
    ("spacing_nan", X3, X3, {**V, "spacing": (float("nan"), 1.0, 1.0)},
     ValueError, "spacing"),
    ("spacing_string", X3, X3, {**V, "spacing": "3mm"}, TypeError, "spacing"),
    ("volume_mask_rank4", X3, X3, {**V, "mask": np.ones((2, 6, 8, 8))},
     ValueError, "mask"),
    ("volume_mask_depth", X3, X3, {**V, "mask": np.ones((2, 5, 8, 8, 1))},
     ValueError, "mask"),
    ("volume_data_range_shape", X3, X3,
     {**V, "data_range": np.ones((3,), np.float32)}, ValueError,
     "data_range"),
    # Layout: channel_axis, masks laid out like the images, and input that
    # is probably channels-first read as channels-last.
    ("channel_axis_float", X, X, {"channel_axis": 1.0}, TypeError,
     "channel_axis"),
    ("channel_axis_bool", X, X, {"channel_axis": True}, TypeError,
     "channel_axis"),
    ("channel_axis_none", X, X, {"channel_axis": None}, TypeError,
     "channel_axis"),
    ("channel_axis_too_large", X, X, {"channel_axis": 4}, ValueError,
     "channel_axis"),
    ("channel_axis_too_negative", X, X, {"channel_axis": -5}, ValueError,
     "channel_axis"),
    ("channel_axis_batch", X, X, {"channel_axis": 0}, ValueError,
     "channel_axis"),
    ("channel_axis_batch_negative", X, X, {"channel_axis": -4}, ValueError,
     "channel_axis"),
    ("volume_channel_axis_too_large", X3, X3, {**V, "channel_axis": 5},
     ValueError, "channel_axis"),
    ("mask_channels_last_for_nchw", NCHW, NCHW,
     {**CF, "mask": np.ones((2, 12, 12, 1), np.float32)}, ValueError,
     "mask"),
    ("mask_wrong_channels_nchw", NCHW, NCHW,
     {**CF, "mask": np.ones((2, 2, 12, 12), np.float32)}, ValueError,
     r"mask.*\[B, 1\|C, H, W\]"),
    ("nchw_shape_mismatch", NCHW, _x((2, 3, 12, 13)), CF, ValueError, "y"),
    ("nchw_read_as_nhwc", _x((2, 3, 32, 32)), _x((2, 3, 32, 32)), {},
     ValueError, "channel_axis=1"),
    ("chw_read_as_hwc", _x((3, 32, 32)), _x((3, 32, 32)), {}, ValueError,
     "channel_axis=0"),
    ("nhwc_read_as_nchw", _x((2, 32, 32, 3)), _x((2, 32, 32, 3)), CF,
     ValueError, "channel_axis=3"),
]

# Options that only some functions take.
SPECIFIC_ERROR_CASES = [
    ("ssim_map", {"mask_mode": "fg"}, ValueError, "mask_mode"),
    ("ssim", {"mask_mode": "fg"}, ValueError, "mask_mode"),
    ("ssim_sums", {"mask_mode": None}, ValueError, "mask_mode"),
    ("ssim_loss", {"mask_mode": "Weighted"}, ValueError, "mask_mode"),
    ("ms_ssim", {"mask_mode": "fg"}, ValueError, "mask_mode"),
    ("ms_ssim", {"levels": 0}, ValueError, "levels"),
    ("ms_ssim", {"levels": 2.0}, TypeError, "levels"),
    ("ms_ssim", {"weights": [0.5, 0.3, 0.2]}, ValueError, "weights"),
    ("ms_ssim", {"weights": [0.5, -0.5]}, ValueError, "weights"),
    ("ms_ssim", {"levels": 6}, ValueError, "levels"),
    ("ms_ssim", {"levels": 4}, ValueError, "too small"),
    ("ms_ssim_loss", {"window_size": 7}, ValueError, "too small"),
    ("ms_ssim_loss", {"weights": [1.0, float("nan")]}, ValueError, "weights"),
    ("l1_ssim_loss", {"ssim_weight": 1.5}, ValueError, "ssim_weight"),
    ("l1_ssim_loss", {"ssim_weight": -0.1}, ValueError, "ssim_weight"),
    ("l1_ssim_loss", {"ssim_weight": "0.2"}, TypeError, "ssim_weight"),
    ("l1_ssim_loss", {"mask": np.ones((2, 12, 12, 1), np.float32),
                      "weight_map": np.ones((2, 12, 12, 1), np.float32)},
     TypeError, "weight_map"),
    ("l1_ssim_loss", {"weight_map": -np.ones((2, 12, 12, 1), np.float32)},
     ValueError, "weight_map"),
    ("ms_ssim_sums", {"levels": 0}, ValueError, "levels"),
    ("ms_ssim_sums", {"weights": [0.5, 0.3, 0.2]}, ValueError, "weights"),
    ("ms_ssim_sums", {"levels": 4}, ValueError, "too small"),
]

# PSNR has no window and no SSIM constants: the matrix's cases about those
# do not apply (its options are a subset), and these inputs, errors for SSIM,
# are valid for PSNR (checked in test_documented_results_psnr).
PSNR_VALID = ("image_1px", "image_2px", "image_2px_wide", "volume_depth_2px",
              "nchw_read_as_nhwc",
              "chw_read_as_hwc", "nhwc_read_as_nchw")
PSNR_OPTIONS = set(inspect.signature(ssim_jax.psnr).parameters)
PSNR_CASES = [c for c in ERROR_CASES
              if set(c[3]) <= PSNR_OPTIONS and c[0] not in PSNR_VALID]


@pytest.mark.parametrize("fn_name", list(FUNCTIONS))
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_names_argument(fn_name, case):
  _, x, y, kwargs, exc, arg = case
  with pytest.raises(exc, match=arg):
    # eval_shape: the error must come at trace time, before any compile.
    jax.eval_shape(lambda: FUNCTIONS[fn_name](x, y, **kwargs))


@pytest.mark.parametrize("case", PSNR_CASES, ids=[c[0] for c in PSNR_CASES])
def test_psnr_error_names_argument(case):
  _, x, y, kwargs, exc, arg = case
  with pytest.raises(exc, match=arg):
    jax.eval_shape(lambda: ssim_jax.psnr(x, y, **kwargs))


@pytest.mark.filterwarnings("ignore:l1_ssim_loss.weight_map")  # tested in test_ssim
@pytest.mark.parametrize("case", SPECIFIC_ERROR_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in SPECIFIC_ERROR_CASES])
def test_specific_error_names_argument(case):
  fn_name, kwargs, exc, arg = case
  with pytest.raises(exc, match=arg):
    jax.eval_shape(lambda: FUNCTIONS[fn_name](X, X, **kwargs))


def test_errors_raised_under_jit_too():
  for fn in FUNCTIONS.values():
    with pytest.raises(ValueError, match="window_size"):
      jax.jit(lambda a, b, fn=fn: fn(a, b, window_size=4))(X, X)
    with pytest.raises(ValueError, match="mask"):
      jax.jit(lambda a, b, fn=fn: fn(a, b, mask=jnp.ones((2, 5, 12, 1))))(
          X, X)


def test_device_mask_values_are_not_read():
  # Documented: a jax.Array's values are never read (that would copy them to
  # the host), traced or not; a numpy mask's are (test_error_names_argument).
  f = jax.jit(lambda m: ssim_jax.ssim(X, X, mask=m))
  assert f(-jnp.ones((2, 12, 12, 1))).shape == (2,)
  out = ssim_jax.ssim(X, X, mask=-jnp.ones((2, 12, 12, 1)),
                      data_range=-jnp.ones((2,)))
  assert out.shape == (2,)


# Documented finite results (not errors). Compiled once each.
def test_documented_results():
  x = np.random.default_rng(0).uniform(0, 1, (2, 12, 12, 3)).astype(
      np.float32)
  y = np.random.default_rng(1).uniform(0, 1, (2, 12, 12, 3)).astype(
      np.float32)
  jit = jax.jit
  # NaN / Inf images: the metric propagates NaN (the trainer skips the step).
  nan_x = x.copy()
  nan_x[0, 3, 3, 0] = np.nan
  v = jit(ssim_jax.ssim)(nan_x, y)
  assert np.isnan(v[0]) and np.isfinite(v[1])
  assert np.isnan(jit(ssim_jax.ssim_loss)(nan_x, y))
  inf_x = x.copy()
  inf_x[1, 0, 0, 2] = np.inf
  assert not np.isfinite(jit(ssim_jax.ssim)(inf_x, y)[1])
  # Empty batch: empty per-image results, loss 0.
  empty = np.zeros((0, 12, 12, 3), np.float32)
  assert jit(ssim_jax.ssim)(empty, empty).shape == (0,)
  assert float(jit(ssim_jax.ssim_loss)(empty, empty)) == 0.0
  # Zero mask: per-image 0, loss 0 (gradients tested in test_ssim).
  zero = np.zeros((2, 12, 12, 1), np.float32)
  np.testing.assert_array_equal(
      jit(lambda a, b: ssim_jax.ssim(a, b, mask=zero))(x, y), 0.0)
  assert float(jit(lambda a, b: ssim_jax.l1_ssim_loss(
      a, b, mask=zero))(x, y)) == 0.0
  # Window larger than the image: shrinks (12 px -> 11 stays; 6 px -> 5).
  small = x[:, :6]
  assert jit(ssim_jax.ssim_map)(small, small).shape == (2, 2, 8, 3)
  # Large but representable data_range: finite, close to 1 (constants dominate).
  v = jit(lambda a, b: ssim_jax.ssim(a, b, data_range=1e15))(x, y)
  assert np.all(np.isfinite(v)) and np.all(v > 0.99)
  # Python lists are accepted as arrays.
  out = jax.eval_shape(lambda: ssim_jax.ssim(x.tolist(), y.tolist()))
  assert out.shape == (2,)


def test_documented_results_volumes():
  rng = np.random.default_rng(2)
  x = rng.uniform(0, 1, X3.shape).astype(np.float32)
  nan_x = x.copy()
  nan_x[1, 2, 3, 3, 0] = np.nan
  v = jax.jit(lambda a: ssim_jax.ssim(a, x, spatial_dims=3))(nan_x)
  assert np.isfinite(v[0]) and np.isnan(v[1])
  zero = np.zeros(X3.shape[:-1] + (1,), np.float32)
  loss, g = jax.jit(jax.value_and_grad(lambda a: ssim_jax.ssim_loss(
      a, x[::-1], mask=zero, spatial_dims=3)))(x)
  assert float(loss) == 0.0 and not np.any(np.asarray(g))


def test_documented_results_layout():
  x = np.random.default_rng(3).uniform(0, 1, (2, 12, 12, 3)).astype(
      np.float32)
  # padding in either case (lax's and Flax's spelling).
  np.testing.assert_array_equal(ssim_jax.ssim(x, x[::-1], padding="SAME"),
                                ssim_jax.ssim(x, x[::-1], padding="same"))
  # Genuinely small images with many channels: a window that fits passes
  # the channels-first check (nothing shrinks), and gives a number.
  small = np.random.default_rng(4).uniform(0, 1, (2, 3, 32, 32)).astype(
      np.float32)
  assert ssim_jax.ssim(small, small[::-1], window_size=3).shape == (2,)
  # Small images with few channels still shrink the window, as documented.
  assert ssim_jax.ssim_map(x[:, :6], x[:, :6]).shape == (2, 2, 8, 3)


def test_documented_results_psnr():
  rng = np.random.default_rng(5)
  for case_id in PSNR_VALID:
    _, x, y, kwargs, _, _ = next(c for c in ERROR_CASES if c[0] == case_id)
    x = rng.uniform(0, 1, np.shape(x)).astype(np.float32)
    out = ssim_jax.psnr(x, x * 0.5, **kwargs)
    assert np.all(np.isfinite(np.asarray(out))), case_id


def test_case_counts():
  # Quoted in the docs (reliability).
  n_matrix = len(ERROR_CASES) * len(FUNCTIONS)
  assert (len(ERROR_CASES), len(FUNCTIONS)) == (83, 8)
  assert n_matrix == 664
  assert len(PSNR_CASES) == 52
  assert len(SPECIFIC_ERROR_CASES) == 21
