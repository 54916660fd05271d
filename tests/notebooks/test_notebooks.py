"""Executes the notebooks top to bottom in reduced mode (SSIM_JAX_NOTEBOOK_SMALL=1).

The kernel is this interpreter (a kernelspec written to a temporary
JUPYTER_PATH pointing at `sys.executable`), so the notebooks see the same
packages as pytest; the working directory is the repository root, where
`configs/` and the package sources live. The committed notebooks must have
their outputs stripped.
"""

import json
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
KERNEL = "ssim-jax-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernelspec for this interpreter and the reduced-mode environment."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ssim_jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("SSIM_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  # Keep the kernel off the other test workers' cores as far as XLA allows.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")


def _run(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError naming the cell on any error
  return nb


def _text(nb):
  """All stream and text/plain outputs, concatenated."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "error":
        raise AssertionError(f"cell errored: {out.get('ename')}: {out.get('evalue')}")
      if "text" in out:
        parts.append(out["text"])
      parts.append(out.get("data", {}).get("text/plain", ""))
  return "".join(parts)


def _num_images(nb):
  return sum("image/png" in out.get("data", {})
             for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "flow_loss.ipynb"])
def test_committed_outputs_are_stripped(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_quickstart_runs(kernel_env):
  nb = _run("quickstart.ipynb")
  text = _text(nb)
  assert "reduced mode: True" in text
  # The 004 case: the naive float32/bfloat16 SSIM and ssim_jax's maximum.
  naive = dict(re.findall(r"naive (\w+)\s*: max SSIM ([\d.]+)", text))
  assert float(naive["bfloat16"]) > 1.0, text
  m = re.search(r"004 case: ssim_jax max SSIM = ([-\d.]+) \(<= 1: True\), "
                r"bfloat16 inputs: ([-\d.]+) \(<= 1: True\)", text)
  assert m and float(m.group(1)) <= 1.0 and float(m.group(2)) <= 1.0, text
  whole = float(re.search(r"whole-image SSIM ([\d.]+)", text).group(1))
  fg = float(re.search(r"foreground SSIM\s+([\d.]+)", text).group(1))
  assert fg < whole  # the background no longer inflates the score
  assert "vae/total" in text and "flow/total" in text  # loss curves were read back
  assert _num_images(nb) >= 4  # maps, 004 case, loss curves, grid


@pytest.mark.slow
def test_flow_loss_runs(kernel_env):
  nb = _run("flow_loss.ipynb")
  text = _text(nb)
  assert "reduced mode: True" in text
  m = re.search(r"decoded (\d+) of (\d+) images; zero-weight images decoded: (\d+)", text)
  assert m, text
  decoded, total, zero_decoded = (int(g) for g in m.groups())
  assert decoded < total and zero_decoded == 0
  assert "zero-weight gradients all zero: True" in text
  # SSIM_LOSS_DEBUG=1 printed one line per image; the w = 0 ones were not decoded.
  flags = re.findall(r"\[ssim_loss\] image \d+: t=[\d.]+ weight=([\d.]+) ssim=[-\d.]+ "
                     r"decoded=(True|False)", text)
  assert len(flags) == total, text
  assert all((float(w) > 0) == (d == "True") for w, d in flags), flags
  assert _num_images(nb) >= 2  # the stage-by-stage grid and w(t)
