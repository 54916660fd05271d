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


# ----------------------------------------------------------------------------
# kind="mri": k-space truncation -> Rician noise.


def test_kspace_truncation_keeps_low_frequencies_and_drops_high_ones():
  n = 32
  y, x = np.mgrid[0:n, 0:n]
  low = 0.5 + 0.3 * np.cos(2 * np.pi * 2 * x / n)          # 2 cycles: inside 8 x 8 of k-space
  high = 0.2 * np.cos(2 * np.pi * 10 * y / n)              # 10 cycles: outside (|k| > 4)
  img = np.repeat((low + high)[None, ..., None], 3, axis=-1) * 2 - 1
  lr = deg.degrade(img.astype(np.float32), deg.Degradation(scale=4, kind="mri"))
  assert lr.shape == (1, 8, 8, 3)
  yl, xl = np.mgrid[0:8, 0:8]
  expect = (0.5 + 0.3 * np.cos(2 * np.pi * 2 * xl / 8)) * 2 - 1   # the high band is gone
  np.testing.assert_allclose(lr[0, ..., 0], expect, atol=1e-5)
  # Not the camera chain: area averaging keeps an alias of nothing here but
  # keeps the low band attenuated (box filter), truncation keeps it exactly.
  area = deg.degrade(img.astype(np.float32), deg.Degradation(scale=4))
  assert np.abs(area[0, ..., 0] - expect).max() > 1e-2
  # scale 1 is the identity.
  one = deg.kspace_truncate(np.asarray(img)[..., :1], 1)
  np.testing.assert_allclose(one.real, np.asarray(img)[..., :1], atol=1e-12)


def test_rician_noise_is_biased_in_the_background_and_gaussian_in_tissue():
  # Magnitude noise: mean sigma * sqrt(pi / 2) on a zero background, ~Gaussian
  # with std sigma on bright tissue.
  sigma = 6.0 / 255.0
  d = deg.Degradation(scale=2, noise_level=6.0, kind="mri")
  dark = deg.degrade(np.full((16, 32, 32, 3), -1.0, np.float32), d, _rngs(16))
  m = (dark + 1) / 2
  assert abs(m.mean() / (sigma * np.sqrt(np.pi / 2)) - 1) < 0.05
  assert m.min() >= 0
  bright = deg.degrade(np.full((16, 32, 32, 3), 0.2, np.float32), d, _rngs(16))
  b = (bright + 1) / 2
  assert abs(b.mean() - 0.6) < 2e-3 and abs(b.std() / sigma - 1) < 0.05
  # Per-sample generators, as for the camera chain.
  np.testing.assert_array_equal(deg.degrade(np.full((4, 32, 32, 3), 0.2, np.float32), d,
                                            _rngs(16)[:4]), bright[:4])


def test_bad_degradation_kind_names_the_field():
  with pytest.raises(ValueError, match="data.degradation"):
    deg.check(deg.Degradation(scale=4, kind="ct"))
