"""The docs (docs/, Sphinx + autodoc + napoleon) build with warnings as errors, document every
public name of `ssim_jax` and `ssim_jax.flow`, and hold the guides; the README stays short."""

import glob
import os
import re
import subprocess
import sys

import pytest

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
  for topic in ("Choosing <code", "padding", "mask_mode", "data_range", "channel_axis",
                "static_argnames"):
    assert topic in guarantees, topic
  # Every page is in the toctree (Sphinx -W fails on a page outside it) and was built.
  for page in PAGES:
    assert (out / f"{page}.html").exists(), page
  # Every figure is shown by some page.
  images = " ".join(p.read_text(encoding="utf-8") for p in out.glob("*.html"))
  for fig in glob.glob(os.path.join(ROOT, "docs", "figures", "*.png")):
    assert os.path.basename(fig) in images, fig


# The README's topics that live in the docs, and the migration guide.
PAGES = ("api", "guarantees", "volumes", "flow", "migration", "field_failures", "benchmarks",
         "reliability", "trainer", "flux", "main_job", "study", "pod", "repository")
# User-facing text names what happened, not where it was tracked.
LAB_NOTES = [
    (re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"), "a commit hash"),
    (re.compile(r"\bissue \d+", re.I), "an issue number"),
    (re.compile(r"field report \d+|report 00\d", re.I), "a field report number"),
    (re.compile(r"\bthe seed'?s?\b(?! \d)", re.I), "'the seed' (say what it was)"),
    (re.compile(r"quiet machine|machine was shared|other jobs|otherwise idle", re.I),
     "a note on machine load"),
]


def _user_facing():
  paths = [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "*.rst")))
  return [(p, open(p, encoding="utf-8").read()) for p in paths]


def test_readme_is_short_and_in_order():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  assert len(text.splitlines()) <= 300
  order = ["## Install", "<!-- library-example -->", "| function |", "## Guarantees",
           "## The trainer: quick start", "<!-- test-command -->", "## Fine-tuning FLUX",
           "## Links"]
  positions = [text.index(marker) for marker in order]
  assert positions == sorted(positions), order


@pytest.mark.parametrize("pattern,what", LAB_NOTES, ids=[w for _, w in LAB_NOTES])
def test_user_facing_text_has_no_lab_notes(pattern, what):
  for path, text in _user_facing():
    found = pattern.findall(text)
    assert not found, f"{os.path.relpath(path, ROOT)} has {what}: {found[:3]}"
