"""The API reference (docs/, Sphinx + autodoc + napoleon) builds with warnings as errors,
and documents every public name of `ssim_jax` and `ssim_jax.flow`."""

import os
import subprocess
import sys

import ssim_jax
from ssim_jax import flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_without_warnings_and_cover_the_public_api(tmp_path):
  out = tmp_path / "html"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(out)],
      capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  api = (out / "api.html").read_text(encoding="utf-8")
  flow_page = (out / "flow.html").read_text(encoding="utf-8")
  for name in ssim_jax.__all__:
    assert f'id="ssim_jax.{name}"' in api, name
  for name in flow.__all__:
    if name in ("DEBUG_ENV", "PIXEL_LOSSES"):  # constants, described in decoded_losses
      continue
    assert f'id="ssim_jax.flow.{name}"' in flow_page, name
  guarantees = (out / "guarantees.html").read_text(encoding="utf-8")
  for topic in ("Choosing <code", "padding", "mask_mode", "data_range"):
    assert topic in guarantees, topic
