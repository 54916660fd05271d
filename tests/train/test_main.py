"""The command line (`python -m train`): `--compile_only` plans and exits without a workdir;
`--profile_steps` is parsed and checked."""

import os
import subprocess
import sys

import pytest
from absl import app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compile_only_prints_each_stage_plan_and_trains_nothing(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(
      [sys.executable, "-m", "train", f"--config={ROOT}/configs/tiny.py", "--compile_only",
       "--config.dit.remat=full"],
      cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("vae", "flow"):
    assert f"memory plan (stage {stage}): per device" in proc.stdout, proc.stdout
    assert f"stage {stage}: " in proc.stdout and " parameters" in proc.stdout
  assert os.listdir(tmp_path) == []  # no workdir, no checkpoint, no logs


def test_profile_steps_flag_is_parsed_and_checked():
  from train import __main__ as main  # pylint: disable=g-import-not-at-top
  assert main.parse_profile_steps("3,5") == (3, 5)
  assert main.parse_profile_steps(None) is None
  for bad in ("5", "5,3", "0,2", "a,b"):
    with pytest.raises(app.UsageError, match="--profile_steps"):
      main.parse_profile_steps(bad)
