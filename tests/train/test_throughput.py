"""train/throughput.py: tokens per image, the interval scalars, the profiler."""

import os
import sys

import pytest

from train import throughput

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top


def test_tokens_per_image_are_what_the_velocity_model_processes():
  from train import velocity  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config()
  cfg.dit.patch_size = 2
  assert velocity.for_config(cfg).sequence_length((8, 12, 4)) == 4 * 6  # the DiT's patches
  cfg.model = "flux"  # FLUX: target and condition tokens (2 x 2 patches) and the prompt's
  cfg.vae.latent_channels = 4
  cfg.flux.prompt_length = 7
  assert velocity.for_config(cfg).sequence_length((8, 12, 4)) == 2 * 4 * 6 + 7


def test_interval_scalars(monkeypatch):
  clock = iter([10.0, 14.0, 14.0, 15.0, 16.0])
  monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
  meter = throughput.Meter(images_per_step=32, tokens_per_image=64, flops=2e12, peak=1e12)
  meter.start()  # 10
  got = meter.interval(8)  # 4 s for 8 steps
  assert got == {"step_time_s": 0.5, "steps_per_sec": 2.0, "images_per_sec": 64.0,
                 "tokens_per_sec": 64.0 * 64, "mfu": 2e12 / (0.5 * 1e12)}
  assert meter.interval(0) == {}  # no step since: nothing (14 -> 14)
  no_peak = throughput.Meter(images_per_step=32, flops=2e12)
  no_peak.start()  # 15
  # No peak (CPU): no MFU at all, not a zero; no tokens per image: no tokens/s.
  assert set(no_peak.interval(1)) == {"step_time_s", "steps_per_sec", "images_per_sec"}


def test_profiler_validates_its_steps(tmp_path):
  with pytest.raises(ValueError, match="profile steps"):
    throughput.Profiler(3, 2, str(tmp_path))
