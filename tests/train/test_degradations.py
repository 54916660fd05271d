"""Tests of train/degradations.py: the LR image of the super-resolution task."""

import numpy as np
import pytest

from train import degradations as deg


def _hr(n=4, size=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _rngs(n, seed=0):
  return [np.random.default_rng([seed, k]) for k in range(n)]


def test_no_degradation_is_the_exact_area_average():
  hr = _hr()
  lr = deg.degrade(hr, deg.Degradation(scale=4))
  np.testing.assert_array_equal(lr, deg.area_downsample(hr, 4))
  np.testing.assert_allclose(lr, hr.reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4)), atol=1e-6)


def test_blur_matches_a_float64_convolution_written_out():
  hr = _hr(n=1, size=24)
  sigma = 1.6
  r = int(np.ceil(3 * sigma))
  t = np.arange(-r, r + 1)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k2 = np.outer(k, k) / np.outer(k, k).sum()
  p = np.pad(hr[0].astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  ref = np.zeros(hr[0].shape)
  for i in range(2 * r + 1):
    for j in range(2 * r + 1):
      ref += k2[i, j] * p[i:i + 24, j:j + 24]
  np.testing.assert_allclose(deg.blur(hr, sigma)[0], ref, atol=1e-6)
  # A constant stays constant (reflected borders lose no mass).
  np.testing.assert_allclose(deg.blur(np.full((1, 16, 16, 3), 0.3), sigma), 0.3, atol=1e-6)


def test_noise_has_the_stated_level_and_bits_round_to_levels():
  hr = np.zeros((8, 64, 64, 3), np.float32)
  d = deg.Degradation(scale=4, noise_level=5.0)
  lr = deg.degrade(hr, d, _rngs(8))
  # One 8-bit level is 2/255 in [-1, 1].
  assert abs(lr.std() / (2 * 5.0 / 255) - 1) < 0.05
  assert abs(lr.mean()) < 2e-3
  lr8 = deg.degrade(hr, d._replace(lr_bits=8), _rngs(8))
  levels = (lr8 + 1) * 255 / 2
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert lr8.min() >= -1 and lr8.max() <= 1


def test_noise_of_a_sample_depends_only_on_its_generator():
  # A process that builds samples 2..3 of a batch gets their noise exactly.
  hr = _hr(n=4)
  d = deg.Degradation(scale=4, blur_sigma=1.0, noise_level=3.0, lr_bits=8)
  full = deg.degrade(hr, d, _rngs(4))
  part = deg.degrade(hr[2:], d, _rngs(4)[2:])
  np.testing.assert_array_equal(full[2:], part)
  assert not np.array_equal(full[0], full[1])
  with pytest.raises(ValueError, match="generator"):
    deg.degrade(hr, d)


@pytest.mark.parametrize("fields,match", [
    (dict(scale=0), "data.scale"),
    (dict(blur_sigma=-1.0), "data.blur_sigma"),
    (dict(noise_level=float("nan")), "data.noise_level"),
    (dict(lr_bits=17), "data.lr_bits"),
    (dict(lr_bits=True), "data.lr_bits"),
])
def test_bad_settings_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    deg.check(deg.Degradation(**{"scale": 4, **fields}))


def test_blur_wider_than_the_crop_is_an_error():
  with pytest.raises(ValueError, match="data.blur_sigma"):
    deg.blur(np.zeros((1, 8, 8, 3)), 4.0)
