"""End-to-end trainer tests on the tiny config: outputs, resume equality, SIGTERM save."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import loop
from train import velocity

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


def test_sampler_noise_of_a_crop_depends_on_the_key_and_its_index_only():
  # Runs with another number of held-out crops sample crop i from the same noise.
  cfg = tiny.get_config()
  (vg, vp, vr), (dg, dp, _) = loop.build_models(cfg)
  down = 2 ** (len(cfg.vae.channels) - 1)
  lat = (cfg.data.hr_size // down, cfg.data.hr_size // down, cfg.vae.latent_channels)
  sample = loop.make_sampler(cfg, velocity.for_config(cfg), dg, vg, vr, lat,
                             compute_dtype=jnp.float32)
  lr = cfg.data.hr_size // cfg.data.scale
  lowres = jax.random.uniform(jax.random.PRNGKey(1), (4, lr, lr, 3), minval=-1, maxval=1)
  key = jax.random.PRNGKey(7)
  frozen = {"vae": vp, "model": {}}
  full = np.asarray(sample(dp, frozen, lowres, key))
  np.testing.assert_allclose(np.asarray(sample(dp, frozen, lowres[:2], key)), full[:2], atol=1e-6)
  assert not np.allclose(full[0], full[1])


def test_end_to_end_writes_checkpoints_events_and_grid(reference_run):
  workdir, results = reference_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  n = saved["num_val"]
  for method in ("bicubic", "model", "vae reconstruction"):
    assert {m: len(v) for m, v in saved["per_crop"][method].items()} == {
        "psnr": n, "ssim": n, "ms_ssim": n}
  np.testing.assert_allclose(np.mean(saved["per_crop"]["model"]["ssim"]),
                             results["flow"]["model"]["ssim"], rtol=1e-5)
  assert np.load(os.path.join(workdir, "eval", "final.npz"))["pred"].shape[0] == n
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
  for name in ("vae", "model"):
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


def _rel_l2(a, b):
  """||a - b|| / ||a|| over all leaves of two param lists."""
  num = sum(float(np.sum(np.square(x.astype(np.float64) - y))) for x, y in zip(a, b))
  den = sum(float(np.sum(np.square(x.astype(np.float64)))) for x in a)
  return (num / den) ** 0.5


def test_tiny_flow_step_trains_to_the_same_params_on_every_mesh():
  """Meshes (8,1), (4,2), (2,4), (1,8): the tiny flow stage (velocity mse + decoded
  pixel + SSIM, psum over both axes) gives the same params after 4 steps, while
  the per-device params and optimizer state shrink (measured from the arrays)."""
  from train import memory as memory_lib  # pylint: disable=g-import-not-at-top
  from train import step as step_lib
  cfg = tiny.get_config()
  rng = np.random.default_rng(0)
  hr, lr = cfg.data.hr_size, cfg.data.hr_size // cfg.data.scale
  batches = [{"highres": rng.uniform(-1, 1, (cfg.batch_size, hr, hr, 3)).astype(np.float32),
              "lowres": rng.uniform(-1, 1, (cfg.batch_size, lr, lr, 3)).astype(np.float32)}
             for _ in range(4)]
  params, plans = {}, {}
  # The models and the loss are built once (loop.build_programs); the step is
  # made for each mesh exactly as build_programs makes it.
  progs = loop.build_programs(cfg, step_lib.make_mesh(jax.devices()))
  vae_graphdef, vae_params, vae_rest = progs.vae
  loss_fn = step_lib.make_flow_loss(cfg, progs.velocity, progs.model[0], vae_graphdef, vae_rest,
                                    compute_dtype=jnp.float32)
  for fsdp in (1, 2, 4, 8):
    mesh = step_lib.make_mesh(jax.devices(), fsdp=fsdp)
    flow_step = step_lib.make_train_step(
        loss_fn, progs.flow_tx, mesh,
        make_inputs=step_lib.make_flow_inputs(
            cfg, progs.latent_shape, image_tokens=progs.velocity.image_tokens(progs.latent_shape)),
        lr_schedule=progs.flow_schedule, min_shard_size=cfg.mesh.min_shard_size)
    state = step_lib.place_state(progs.initial_state("flow"), mesh,
                                 min_shard_size=cfg.mesh.min_shard_size)
    frozen = step_lib.replicate({"vae": vae_params, "model": {}}, mesh)
    key = jax.random.PRNGKey(0)
    first = step_lib.shard_batch(batches[0], mesh)
    plans[fsdp] = memory_lib.plan(flow_step.lower(state, first, frozen, key).compile(), state)
    for b in batches:
      state, metrics = flow_step(state, step_lib.shard_batch(b, mesh), frozen, key)
      assert int(metrics["skipped"]) == 0
    assert flow_step.trace_count() == 1  # the plan's compile was the step's
    params[fsdp] = leaves(step_lib.replicate(state.params, mesh))
  for fsdp in (2, 4, 8):
    assert _rel_l2(params[1], params[fsdp]) < 1e-5, fsdp
    for a, b in zip(params[1], params[fsdp]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert plans[fsdp].params < plans[1].params and plans[fsdp].opt_state < plans[1].opt_state
    assert plans[fsdp].arguments < plans[1].arguments
  assert plans[8].params < plans[4].params < plans[2].params
  assert not all(np.array_equal(a, b) for a, b in
                 zip(params[1], leaves(progs.model[1])))  # they trained


def test_fsdp_run_resumed_on_another_mesh_matches_the_data_parallel_run(reference_run,
                                                                        tmp_path, capsys):
  """fsdp=4 on 8 devices stops mid-flow; the run is resumed with fsdp=2 (orbax restores
  the (2,4) checkpoint onto the (4,2) layout) and ends with the flow params of the
  plain data-parallel reference; the memory plan is printed before step 1."""
  _, ref = reference_run
  workdir = str(tmp_path)
  cfg = tiny.get_config()
  cfg.mesh.fsdp = 4
  r1 = loop.train_and_evaluate(cfg, workdir, devices=jax.devices(), stop_after={"flow": 2})
  assert r1["preempted"]
  out = capsys.readouterr().out
  assert "memory plan (stage vae): per device" in out
  assert "memory plan (stage flow): per device" in out
  cfg.mesh.fsdp = 2
  r2 = loop.train_and_evaluate(cfg, workdir, devices=jax.devices())
  assert not r2["preempted"] and r2["skipped"] == {"vae": 0, "flow": 0}
  a, b = leaves(ref["params"]["model"]), leaves(r2["params"]["model"])
  assert _rel_l2(a, b) < 1e-5
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # The VAE: conv biases in front of a GroupNorm have a zero gradient up to
  # float32 rounding, which Adam normalises to steps of up to lr: those may
  # differ by lr * steps (as between processes, test_multiprocess.py); the
  # rest agrees to 1e-5.
  a, b = leaves(ref["params"]["vae"]), leaves(r2["params"]["vae"])
  close = np.concatenate([np.isclose(x, y, rtol=1e-5, atol=1e-5).ravel() for x, y in zip(a, b)])
  assert close.mean() > 0.95, close.mean()
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=0, atol=cfg.vae.learning_rate * cfg.vae.steps)


def test_a_step_that_does_not_fit_stops_before_step_1(tmp_path, monkeypatch):
  """The device reports 1 MiB (as a GPU reports bytes_limit): the compiled vae step
  needs more, so the run stops before training with the fields to change, and no
  checkpoint is written."""
  from train import memory as memory_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory_lib, "device_limit", lambda device=None: 2**18)
  with pytest.raises(memory_lib.MemoryPlanError) as e:
    loop.train_and_evaluate(tiny.get_config(), str(tmp_path), devices=jax.devices()[:2])
  msg = str(e.value)
  assert "memory plan (stage vae): per device" in msg and "of 256.00 KiB on the device" in msg
  for field in memory_lib.FIELDS:
    assert f"config.{field}" in msg
  assert not [d for d in os.listdir(os.path.join(str(tmp_path), "vae")) if d.isdigit()]


# ----------------------------------------------------------------------------
# A loop that never waits for the device between its sync points.


@pytest.fixture
def transfer_guard_on_cpu(monkeypatch):
  """Makes `jax.transfer_guard_device_to_host` effective on CPU for this test.

  An accelerator raises on a device-to-host copy under the guard; XLA:CPU hands
  numpy its buffer without a copy and the guard never fires (jax#16602). Every
  read of a jax.Array's value goes through `ArrayImpl._value`: checked here
  against the guard in force, explicit reads (`jax.device_get`) included.
  """
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  value = array_lib.ArrayImpl._value

  def guarded(self):
    if jax_config.transfer_guard_device_to_host.value in ("disallow", "disallow_explicit"):
      raise RuntimeError(f"Disallowed device-to-host transfer: shape={self.shape}")
    return value.fget(self)

  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded))
  with pytest.raises(RuntimeError, match="Disallowed device-to-host"):
    with jax.transfer_guard_device_to_host("disallow"):
      int(jnp.zeros((), jnp.int32) + 1)
  monkeypatch.setattr(loop, "STEP_TRANSFER_GUARD", "disallow")


def _loop_config(**fields):
  cfg = tiny.get_config()
  cfg.vae.steps = cfg.flow.steps = 6
  cfg.log_every = 3
  cfg.ckpt_every = 3
  cfg.update_from_flattened_dict(fields)  # {"ema.decay": 0.9, ...}
  return cfg


def test_loop_reads_the_device_only_at_logging_steps(tmp_path, monkeypatch,
                                                     transfer_guard_on_cpu):
  """Steps 2, 4, 5 of each stage (not logging, checkpoint or last steps) run under
  the device-to-host transfer guard "disallow", with gradient accumulation and EMA
  on; the logging steps write step time, images/s, tokens/s (flow) and MFU (with
  a peak for the device: CPU has none), and --profile_steps' trace is written."""
  from train import memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, "peak_flops_per_second", lambda device=None: 1e12)
  cfg = _loop_config(grad_accum_steps=2, **{"ema.decay": 0.9})
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2],
                                    profile_steps=(4, 5))
  assert not results["preempted"] and results["skipped"] == {"vae": 0, "flow": 0}
  scalars = loop.writer_lib.read_scalars(os.path.join(workdir, "logs"))
  for stage in ("vae", "flow"):
    assert [s for s, _ in scalars[f"{stage}/total"]] == [3, 6]
    # Timed from the first step on: the logging steps 3 and 6 both report.
    for tag in ("step_time_s", "steps_per_sec", "images_per_sec", "mfu"):
      assert [s for s, _ in scalars[f"{stage}/{tag}"]] == [3, 6], (stage, tag)
    for (_, sps), (_, ips) in zip(scalars[f"{stage}/steps_per_sec"],
                                  scalars[f"{stage}/images_per_sec"]):
      np.testing.assert_allclose(ips, sps * 16, rtol=1e-5)  # 8 images x 2 micro-batches
    assert all(0 < v for _, v in scalars[f"{stage}/mfu"])
  assert "vae/tokens_per_sec" not in scalars
  lat = cfg.data.hr_size // 2 ** (len(cfg.vae.channels) - 1) // cfg.dit.patch_size
  for (_, ips), (_, tps) in zip(scalars["flow/images_per_sec"], scalars["flow/tokens_per_sec"]):
    np.testing.assert_allclose(tps, ips * lat * lat, rtol=1e-5)
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  # ema.use_for_eval: the EMA of the last checkpoint is what was evaluated and exported.
  saved = loop.ckpt_lib.load_numpy(os.path.join(workdir, "flow"), 6)
  got = leaves(results["params"]["model"])
  assert all(np.array_equal(a, b) for a, b in zip(got, leaves(saved["ema"])))
  assert not all(np.array_equal(a, b) for a, b in zip(got, leaves(saved["params"])))


def test_a_device_read_between_logging_steps_is_caught(tmp_path, monkeypatch,
                                                       transfer_guard_on_cpu):
  """The control: a step that reads a device value (as the loop did every step before)
  fails under the guard at the first step that is not a sync point."""
  reads = []

  def reading_step(train_step, config, **kw):
    del config, kw
    def step(state, *args):
      reads.append(int(state.step))  # the old loop's `int(state.consecutive_skips)`
      return train_step(state, *args)
    return step

  monkeypatch.setattr(loop.faults_lib, "wrap_train_step", reading_step)
  with pytest.raises(RuntimeError, match="Disallowed device-to-host"):
    loop.train_and_evaluate(_loop_config(), str(tmp_path), devices=jax.devices()[:2])
  assert reads == [0]  # step 1 (a sync point) read; step 2 did not get to


def test_too_many_skips_stop_at_the_step_that_hit_the_limit(tmp_path):
  """NaN batches at vae steps 2 and 3 with max_consecutive_skips=2: the limit is hit
  at step 3, between logging steps. The loop finds out at step 4 and names step 3;
  steps 4.. changed nothing, and no checkpoint was written past step 2."""
  cfg = _loop_config(max_consecutive_skips=2, log_every=4, ckpt_every=2,
                     **{"faults.nan_batch_steps": (2, 3)})
  with pytest.raises(loop.TooManySkipsError) as e:
    loop.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2])
  assert str(e.value).startswith(
      "stage vae: 2 consecutive steps had a non-finite loss or gradient (last at step 3, "
      "2 skipped in total)")
  assert sorted(int(d) for d in os.listdir(tmp_path / "vae") if d.isdigit()) == [2]
