"""End-to-end trainer tests on the tiny config: outputs, resume equality, SIGTERM save."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  results = loop.train_and_evaluate(tiny.get_config(), workdir, devices=jax.devices()[:2])
  return workdir, results


def test_end_to_end_writes_checkpoints_events_and_grid(reference_run):
  workdir, results = reference_run
  assert not results["preempted"]
  assert set(results["flow"]) == {"bicubic", "model"}
  for method in ("bicubic", "model"):
    assert np.isfinite(results["flow"][method]["psnr"])
    assert -1.0 <= results["flow"][method]["ssim"] <= 1.0
  cfg = tiny.get_config()
  assert os.path.isdir(os.path.join(workdir, "vae", str(cfg.vae.steps)))
  assert os.path.isdir(os.path.join(workdir, "flow", str(cfg.flow.steps)))
  assert glob.glob(os.path.join(workdir, "logs", "**", "events.out.tfevents.*"), recursive=True)
  assert os.path.getsize(results["grid"]) > 0 and results["grid"].endswith(".png")
  assert results["skipped"] == {"vae": 0, "flow": 0}


def test_fine_tuning_starts_from_the_exported_base_model(reference_run, tmp_path):
  """A run's WORKDIR/export/dit is a base model: fine-tuning from it reports it as
  the base row, which is exactly the run's own final model (same VAE and sampler)."""
  workdir, ref = reference_run
  export = os.path.join(workdir, "export", "dit")
  cfg = tiny.get_config()
  cfg.dit.pretrained = export
  cfg.flow.steps = 2
  out = loop.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2])
  assert out["base"] == ref["flow"]["model"]
  assert out["flow"]["model"] != ref["flow"]["model"]
  with open(os.path.join(str(tmp_path), "results.json")) as f:
    table = json.load(f)["validation"]
  assert set(table) == {"bicubic", "base model (dit.pretrained)", "fine-tuned model",
                        "vae reconstruction"}


def test_resume_gives_identical_params(reference_run, tmp_path, monkeypatch):
  """Stop mid-vae, then mid-flow, resume each time: bit-identical final params on CPU.

  Each resume restores the input iterator's state saved in the checkpoint."""
  _, ref = reference_run
  restored = []
  real = loop.ckpt_lib.Checkpointer.restore_data
  def spy(self, step, it):
    ok = real(self, step, it)
    restored.append((os.path.basename(self.directory), step, ok, it.step))
    return ok
  monkeypatch.setattr(loop.ckpt_lib.Checkpointer, "restore_data", spy)
  workdir = str(tmp_path)
  cfg = tiny.get_config()
  r1 = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2], stop_after={"vae": 2})
  assert r1["preempted"]
  r2 = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2], stop_after={"flow": 2})
  assert r2["preempted"]
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "flow")) if d.isdigit()) == [2]
  with open(os.path.join(workdir, "flow", "2", "data", "process_0-of-1.json")) as f:
    assert json.load(f)["step"] == 2
  r3 = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2])
  assert not r3["preempted"]
  assert ("vae", 2, True, 2) in restored and ("flow", 2, True, 2) in restored
  for name in ("vae", "dit"):
    a, b = leaves(ref["params"][name]), leaves(r3["params"][name])
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.Popen(
      [sys.executable, "-m", "train", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.vae.steps=100000", "--config.ckpt_every=100000"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    # Wait until training is under way (the first logged scalars exist).
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if glob.glob(os.path.join(workdir, "logs", "**", "events.out.tfevents.*"), recursive=True) \
          and os.path.isdir(os.path.join(workdir, "vae")):
        break
      time.sleep(0.5)
    time.sleep(3.0)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out
  assert "preempted" in out
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "vae")) if d.isdigit()]
  assert steps and max(steps) > 0, out
