"""Fault injection end to end: each scenario runs the real CLI in a subprocess.

`python -m train --config=configs/tiny.py --workdir=... --config.faults...` with
2 CPU devices per subprocess (a NaN on one device must skip the step on all).
Covered here (not elsewhere): NaN/Inf batch and NaN inside the model -> step
skipped, counted, parameters, optimizer state and EMA bit-identical; kill -9 at a
random step and the same command again -> bit-identical final parameters to an
uninterrupted run; a corrupted latest checkpoint of a real run -> previous one
restored with a warning and the run completes (again bit-identical); corrupted
images in a data folder -> run completes, skipped count reported; an unwritable
workdir -> a clear error before data or models are touched. Plus in-process
unit tests of train/faults.py (off = free, validation, traced once).

The subprocesses share a persistent compilation cache (a temporary directory)
so that only the first one compiles.
"""

import glob
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint
from train import config as config_lib
from train import faults
from train import writer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

V, F = 5, 5  # vae and flow steps: global steps 1..5 are vae, 6..10 flow
NAN_BATCH = (2, 8)  # vae step 2, flow step 3
NAN_MODEL = (4, 7)  # vae step 4, flow step 2 (7 and 8: two consecutive skips)
# EMA on: the flow stage's EMA must be skipped and resumed bit-identically too.
COMMON = [f"--config.vae.steps={V}", f"--config.flow.steps={F}", "--config.ema.decay=0.9",
          "--config.faults.nan_batch_steps=(%s)" % ",".join(map(str, NAN_BATCH)),
          "--config.faults.nan_model_steps=(%s)" % ",".join(map(str, NAN_MODEL))]


# ----------------------------------------------------------------------------
# Helpers.


def _env(cache_dir):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
              XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
              PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _cli(workdir, *flags, cache_dir, timeout=600):
  """Runs the CLI; returns (returncode, stdout, stderr)."""
  proc = subprocess.run(
      [sys.executable, "-m", "train", "--config=configs/tiny.py", f"--workdir={workdir}",
       *flags], cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


def _steps(d):
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _load(workdir, stage, step):
  """TrainState of a checkpoint as a dict of numpy arrays (any device topology)."""
  return checkpoint.load_numpy(os.path.join(workdir, stage), step)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y, equal_nan=False)
      for x, y in zip(la, lb))


def _last_scalars(logdir):
  """Last value of each scalar tag in the TensorBoard event files."""
  return {tag: values[-1] for tag, values in writer.read_scalars(logdir).items()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted run with the NaN faults, checkpointing every step."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  rc, out, err = _cli(workdir, *COMMON, "--config.ckpt_every=1", "--config.ckpt_max_to_keep=20",
                      cache_dir=cache_dir)
  assert rc == 0, err[-5000:]
  return workdir, out, err


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, cache_dir):
  """The same faults, killed with SIGKILL at a random step, then the same command again."""
  seed = int(os.environ.get("SSIM_JAX_FAULT_SEED", random.randrange(1 << 30)))
  kill = random.Random(seed).randint(2, V + F - 1)
  workdir = str(tmp_path_factory.mktemp("killed"))
  # --verbosity=0: the restore is logged at INFO, which the CLI hides by default.
  cmd = [*COMMON, "--config.ckpt_every=2", f"--config.faults.kill_at_step={kill}",
         "--verbosity=0"]
  rc, _, err = _cli(workdir, *cmd, cache_dir=cache_dir)
  info = f"kill_at_step={kill} (SSIM_JAX_FAULT_SEED={seed})"
  assert rc == -9, f"{info}: expected SIGKILL, got rc={rc}\n{err[-3000:]}"
  on_disk = {s: _steps(os.path.join(workdir, s)) for s in ("vae", "flow")}
  rc2, out2, err2 = _cli(workdir, *cmd, cache_dir=cache_dir)
  assert rc2 == 0, f"{info}: restart failed\n{err2[-5000:]}"
  return workdir, cmd, kill, info, on_disk, out2, err2


# ----------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_nan_batch_and_nan_in_model_are_skipped_bit_identically(reference):
  workdir, out, err = reference
  for n in NAN_BATCH:
    assert f"faults: NaN/Inf batch at global step {n}" in err
  for n in NAN_MODEL:
    assert f"faults: NaN inside the model at global step {n}" in err
  assert "Validation" in out  # the run completed and evaluated
  for stage, offset, total in (("vae", 0, V), ("flow", V, F)):
    bad = sorted(n - offset for n in NAN_BATCH + NAN_MODEL if offset < n <= offset + total)
    assert len(bad) == 2
    states = {k: _load(workdir, stage, k) for k in range(1, total + 1)}
    for k in range(2, total + 1):
      before, after = states[k - 1], states[k]
      same = _equal(before["params"], after["params"])
      assert same == (k in bad), (stage, k)
      assert _equal(before["opt_state"], after["opt_state"]) == (k in bad), (stage, k)
      if stage == "flow":
        assert _equal(before["ema"], after["ema"]) == (k in bad), (stage, k)
      assert int(after["skipped"]) == sum(b <= k for b in bad)
      assert int(after["step"]) == k
    assert int(states[total]["skipped"]) == 2
    # Counted in the TensorBoard logs too.
    scalars = _last_scalars(os.path.join(workdir, "logs"))
    assert scalars[f"{stage}/skipped_total"] == (total, 2.0)
    for leaf in jax.tree.leaves(states[total]["params"]):
      assert np.all(np.isfinite(leaf))


@pytest.mark.slow
def test_kill9_then_same_command_resumes_bit_identically(reference, killed_and_resumed):
  ref_dir = reference[0]
  workdir, _, kill, info, on_disk, _, err2 = killed_and_resumed
  assert os.path.exists(os.path.join(workdir, "faults", f"killed_at_step_{kill}_p0"))
  # Resumed from the last COMPLETE checkpoint of the interrupted stage.
  stage = "vae" if kill <= V else "flow"
  if on_disk[stage]:
    last = max(on_disk[stage])
    assert last <= kill - (0 if stage == "vae" else V) - 1, info
    assert re.search(rf"restored checkpoint step {last} from \S*{os.sep}{stage}\b", err2), info
  for st, total in (("vae", V), ("flow", F)):
    a, b = _load(ref_dir, st, total), _load(workdir, st, total)
    assert _equal(a["params"], b["params"]), f"{info}: {st} params differ"
    assert _equal(a["opt_state"], b["opt_state"]), f"{info}: {st} optimizer state differs"
    assert _equal(a.get("ema"), b.get("ema")), f"{info}: {st} EMA differs"
    assert int(a["skipped"]) == int(b["skipped"]) == 2, info


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_of_a_real_run(reference, killed_and_resumed, tmp_path,
                                                   cache_dir):
  ref_dir = reference[0]
  src, cmd = killed_and_resumed[0], killed_and_resumed[1]
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  latest = max(_steps(os.path.join(workdir, "flow")))
  assert latest == F
  files = [f for f in glob.glob(os.path.join(workdir, "flow", str(latest), "state", "d", "*"))
           if os.path.isfile(f)]
  assert files
  for f in files:  # flip one byte in the middle of each data file
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2] ^= 0xFF
    open(f, "wb").write(bytes(b))
  rc, out, err = _cli(workdir, *cmd, cache_dir=cache_dir)
  assert rc == 0, err[-5000:]
  assert re.search(rf"checkpoint step {latest} in \S+ is damaged and is skipped", err), err[-3000:]
  assert os.listdir(os.path.join(workdir, "flow.damaged"))  # kept, not deleted
  assert "Validation" in out
  a, b = _load(ref_dir, "flow", F), _load(workdir, "flow", F)
  assert _equal(a["params"], b["params"])


@pytest.mark.slow
def test_corrupted_images_are_skipped_and_counted(tmp_path, cache_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(data / f"good{i}.png")
  good = (data / "good0.png").read_bytes()
  (data / "truncated.png").write_bytes(good[: len(good) // 2])
  (data / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg " * 10)
  (data / "empty.tif").write_bytes(b"")
  rc, out, err = _cli(str(tmp_path / "run"), f"--config.data.dir={data}",
                      "--config.vae.steps=2", "--config.flow.steps=2", cache_dir=cache_dir)
  assert rc == 0, err[-5000:]
  assert re.search(r"skipped 3 of 6 image files", err), err[-3000:]
  for name in ("truncated.png", "garbage.jpg", "empty.tif"):
    assert name in err
  assert "Validation" in out


def test_unwritable_workdir_fails_at_start_with_a_clear_error(tmp_path, cache_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = str(blocker / "run")
  # A missing data dir too: the workdir error must come first (before data and models).
  rc, out, err = _cli(workdir, "--config.data.dir=/nonexistent/ssim_jax_data",
                      cache_dir=cache_dir, timeout=300)
  assert rc == 2, err[-3000:]
  assert f"error: workdir={workdir!r} cannot be created" in err
  assert "Traceback" not in err and "data.dir" not in err


# ----------------------------------------------------------------------------
# train/faults.py in-process: free when off, validation, traced once.


def test_off_by_default_and_free():
  cfg = tiny.get_config()
  assert not faults.enabled(cfg)
  fn = jax.jit(lambda s, b, f, k: (s, {}))
  assert faults.wrap_train_step(fn, cfg, stage="vae", workdir="/unused") is fn
  x = jnp.ones((2, 3))
  assert faults.model_fault(x, {"image": x}) is x
  config_lib.validate(cfg, num_devices=1)


@pytest.mark.parametrize("field,value,match", [
    ("nan_batch_steps", (0,), "nan_batch_steps"),
    ("nan_model_steps", ("3",), "nan_model_steps"),
    ("kill_at_step", -1, "kill_at_step"),
    ("nan_batch_steps", (2, True), "nan_batch_steps"),
])
def test_bad_fault_config_names_the_field(field, value, match):
  cfg = tiny.get_config()
  with cfg.unlocked():
    cfg.faults[field] = value
  with pytest.raises(config_lib.ConfigError, match=rf"config\.faults\.{match}"):
    config_lib.validate(cfg, num_devices=1)


class _State(NamedTuple):
  step: jax.Array


def test_injector_poisons_the_right_steps_on_all_devices_and_traces_once():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = tiny.get_config()
  with cfg.unlocked():
    cfg.faults.nan_batch_steps = (2,)
    cfg.faults.nan_model_steps = (3,)
  seen, traces = [], [0]

  @jax.jit
  def step(state, batch, frozen, key):
    traces[0] += 1
    out = faults.model_fault(batch["image"], batch)
    return _State(state.step + 1), {"finite": jnp.isfinite(out).all(axis=(1, 2, 3))}

  wrapped = faults.wrap_train_step(step, cfg, stage="vae", workdir="/unused")
  state = _State(jax.device_put(jnp.int32(0), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())))
  for _ in range(4):
    batch = {"image": jax.device_put(np.zeros((8, 2, 2, 1), np.float32), sharding)}
    state, m = wrapped(state, batch, {}, None)
    seen.append(np.asarray(m["finite"]))
  assert traces[0] == 1  # same shapes and shardings at every step, faults or not
  np.testing.assert_array_equal(seen[0], np.ones(8, bool))
  np.testing.assert_array_equal(seen[1], [False] + [True] * 6 + [False])  # NaN first, Inf last
  np.testing.assert_array_equal(seen[2], [False] + [True] * 7)  # NaN inside the "model"
  np.testing.assert_array_equal(seen[3], np.ones(8, bool))


def _train_imports(path: str) -> set[str]:
  """The `train.*` modules a source file imports (at any depth of the file)."""
  import ast  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "train":
      out.update(f"{node.module}.{a.name}" if node.module == "train" else node.module
                 for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "train")
  return out


def test_faults_and_config_do_not_import_each_other():
  # config validates config.faults; faults injects them; neither needs the other.
  assert "train.config" not in _train_imports(os.path.join(ROOT, "train", "faults.py"))
  assert "train.faults" not in _train_imports(os.path.join(ROOT, "train", "config.py"))
