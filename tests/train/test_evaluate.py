"""Tests of train/evaluate.py: ODE sampler, metrics vs bicubic, grid PNG, table."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import evaluate


def _straight_path_field(x, t, z0):
  # The exact velocity of x_t = (1 - t) z0 + t noise, written as a field of
  # (x, t): v = (x - z0) / t = noise - z0 along the path.
  return (x - z0) / t[:, None, None, None]


def test_euler_is_exact_on_the_straight_path():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  z0 = jax.random.normal(k1, (3, 4, 4, 2))
  noise = jax.random.normal(k2, (3, 4, 4, 2))
  sample = jax.jit(functools.partial(evaluate.ode_sample, _straight_path_field,
                                     num_steps=7))
  np.testing.assert_allclose(sample(noise, z0), z0, atol=1e-5)


def test_constant_velocity_exact_for_euler_and_heun():
  z0 = jnp.linspace(-1, 1, 2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
  noise = jnp.cos(jnp.arange(18.0)).reshape(2, 3, 3, 1)
  v = lambda x, t, c: c
  for method in ("euler", "heun"):
    out = evaluate.ode_sample(v, noise, noise - z0, num_steps=5, method=method)
    np.testing.assert_allclose(out, z0, atol=1e-6)


def test_discretisation_of_a_nonlinear_field():
  # dx/dt = x from t=1 to 0: exact x(0) = x(1) / e; Euler gives (1 - 1/N)^N x(1).
  x1 = jnp.ones((1, 2, 2, 1))
  grow = lambda x, t, c: x
  euler = evaluate.ode_sample(grow, x1, None, num_steps=10)
  heun = evaluate.ode_sample(grow, x1, None, num_steps=10, method="heun")
  np.testing.assert_allclose(euler, (1 - 0.1) ** 10, rtol=1e-5)
  assert abs(float(heun[0, 0, 0, 0]) - math.exp(-1)) < abs(float(euler[0, 0, 0, 0]) - math.exp(-1))


def test_sampler_bad_arguments():
  with pytest.raises(ValueError, match="num_steps"):
    evaluate.ode_sample(lambda x, t, c: x, jnp.zeros((1, 2, 2, 1)), None, num_steps=0)
  with pytest.raises(ValueError, match="method"):
    evaluate.ode_sample(lambda x, t, c: x, jnp.zeros((1, 2, 2, 1)), None, num_steps=1,
                        method="rk4")


def test_bicubic_upsample():
  lo = jnp.full((2, 4, 5, 3), 0.3)
  up = evaluate.bicubic_upsample(lo, 4)
  assert up.shape == (2, 16, 20, 3)
  np.testing.assert_allclose(up, 0.3, atol=1e-6)


def test_ms_ssim_settings():
  assert evaluate.ms_ssim_levels(64) == 3
  assert evaluate.ms_ssim_levels(160) == 4 and evaluate.ms_ssim_levels(161) == 5
  assert evaluate.ms_ssim_levels(20) == 1
  w = evaluate.ms_ssim_weights(3)
  assert len(w) == 3 and sum(w) == pytest.approx(1.0)
  assert evaluate.ssim_window(64) == 11 and evaluate.ssim_window(8) == 7


def _images(b=2, size=32, scale=4):
  rng = np.random.default_rng(0)
  lo = rng.uniform(-1, 1, (b, size // scale, size // scale, 3)).astype(np.float32)
  target = np.asarray(evaluate.bicubic_upsample(jnp.asarray(lo), scale))
  target = np.clip(target + 0.3 * rng.standard_normal(target.shape), -1, 1).astype(np.float32)
  lowres = target.reshape(b, size // scale, scale, size // scale, scale, 3).mean((2, 4))
  return lowres, target


def test_evaluate_sr_perfect_model_beats_bicubic():
  lowres, target = _images()
  res = evaluate.evaluate_sr(target, lowres, target, scale=4)
  assert list(res) == ["bicubic", "model"]
  assert list(res["model"]) == ["psnr", "ssim", "ms_ssim"]
  assert math.isinf(res["model"]["psnr"])
  assert res["model"]["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert res["model"]["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
  b = res["bicubic"]
  assert math.isfinite(b["psnr"]) and 5 < b["psnr"] < 40
  assert 0 < b["ssim"] < 0.99 and 0 < b["ms_ssim"] < 0.99
  noisy = evaluate.evaluate_sr(np.zeros_like(target), lowres, target, scale=4)["model"]
  assert noisy["psnr"] < b["psnr"] and noisy["ssim"] < b["ssim"]


def test_per_image_metrics_are_per_crop_and_average_to_evaluate_sr():
  # Crop i's metrics do not depend on the other crops of the batch (paired
  # comparisons of runs use them), and their means are evaluate_sr's table.
  lowres, target = _images()
  rng = np.random.default_rng(5)
  pred = np.clip(target + 0.1 * rng.standard_normal(target.shape), -1, 1).astype(np.float32)
  per = evaluate.evaluate_sr_per_image(pred, lowres, target, scale=4)
  means = evaluate.evaluate_sr(pred, lowres, target, scale=4)
  for method in ("bicubic", "model"):
    for m in evaluate.METRICS:
      assert per[method][m].shape == (len(target),)
      assert means[method][m] == pytest.approx(per[method][m].mean(), rel=1e-6)
  one = evaluate.evaluate_sr_per_image(pred[1:2], lowres[1:2], target[1:2], scale=4)
  for m in evaluate.METRICS:
    assert one["model"][m][0] == pytest.approx(per["model"][m][1], rel=1e-5)
  # image_metrics: the same numbers for any pair of images.
  im = evaluate.image_metrics(pred, target)
  for m in evaluate.METRICS:
    np.testing.assert_allclose(im[m], per["model"][m], rtol=1e-6)
  assert len(set(np.round(per["model"]["ssim"], 6))) > 1  # not a broadcast mean


def test_evaluate_sr_shape_mismatch():
  lowres, target = _images()
  with pytest.raises(ValueError, match="lowres"):
    evaluate.evaluate_sr(target, lowres[:, :4], target, scale=4)


def test_ssim_map_and_grid_png(tmp_path):
  lowres, target = _images(b=3, size=16)
  bic = np.asarray(evaluate.bicubic_upsample(jnp.asarray(lowres), 4))
  smap = evaluate.ssim_map_image(target, target)
  assert smap.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(smap, 1.0, atol=1e-4)
  smap_bic = evaluate.ssim_map_image(bic, target)
  assert smap_bic.min() >= 0 and smap_bic.max() <= 1 and smap_bic.mean() < 0.99
  path = tmp_path / "eval" / "grid.png"
  grid = evaluate.save_grid(str(path), lowres, bic, target, target, smap_bic)
  png = np.asarray(Image.open(path))
  pad, head = 2, 12
  assert png.shape == (head + 3 * (16 + pad) + pad, 5 * (16 + pad) + pad, 3)
  np.testing.assert_array_equal(png, grid)
  # Row 1, target column (index 3) holds the target image.
  y0, x0 = head + pad + 1 * (16 + pad), pad + 3 * (16 + pad)
  expect = np.round(np.clip((target[1] + 1) / 2, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(png[y0:y0 + 16, x0:x0 + 16], expect)
  # Low-res column is the nearest-neighbour upsampled input.
  lo_col = png[y0:y0 + 16, pad:pad + 16]
  np.testing.assert_array_equal(lo_col[::4, ::4], lo_col[3::4, 3::4])


def test_format_table():
  text = evaluate.format_table({"bicubic": {"ms_ssim": 0.8, "ssim": 0.71, "psnr": 24.5},
                                "model": {"psnr": 26.123, "ssim": 0.8, "ms_ssim": 0.9}})
  lines = text.splitlines()
  assert len(lines) == 4 and len({len(l) for l in lines}) == 1
  assert lines[0].split() == ["method", "PSNR", "(dB)", "SSIM", "MS-SSIM"]
  assert lines[3].startswith("model") and "26.12" in lines[3] and "0.9000" in lines[3]
  partial = evaluate.format_table({"model": {"psnr": 20.0, "ssim": 0.5, "ms_ssim": 0.6},
                                   "vae": {"psnr": 30.0, "ssim": 0.9}})
  assert partial.splitlines()[-1].split() == ["vae", "30.00", "0.9000", "-"]
  with pytest.raises(ValueError):
    evaluate.format_table({})
