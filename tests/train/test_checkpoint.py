"""Tests of train/checkpoint.py: round trip, keep-N, damaged latest, SIGTERM, kill -9, workdir."""

import glob
import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(k: float):
  return {
      "params": {"w": jnp.arange(60.0).reshape(6, 10) + k, "b": jnp.full((4,), k, jnp.bfloat16)},
      "opt": {"count": jnp.int32(k), "mu": np.linspace(0, 1, 5).astype(np.float32) * k},
      "rng": jax.random.PRNGKey(int(k)),
  }


def _assert_tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract():
  return jax.eval_shape(lambda: _state(0.0))


def test_round_trip_keep_n_and_interval(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2, save_interval_steps=2,
                               install_sigterm_handler=False) as ck:
    assert ck.restore_latest(_abstract()) == (None, 0)
    saved = [s for s in range(1, 7) if ck.save(s, _state(s), meta={"step": s})]
    assert saved == [2, 4, 6]  # off-interval steps are skipped
    assert ck.save(7, _state(7), force=True)
    ck.wait()
    assert ck.all_steps() == [6, 7]  # keep 2
    state, step, meta = ck.restore_latest(_abstract(), return_meta=True)
  assert step == 7 and meta == {}
  _assert_tree_equal(state, _state(7))
  # A fresh manager (a restarted process) sees the same steps.
  with checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False) as ck2:
    state, step = ck2.restore_latest(_abstract())
    _, meta6 = ck2.restore(6, _abstract())
  assert step == 7 and meta6 == {"step": 6}
  _assert_tree_equal(state, _state(7))


def test_input_iterator_state_is_saved_with_the_step_and_restored(tmp_path):
  # The iterator's state is taken when save() is called (async save or not):
  # the restored iterator yields the batches the saving one yielded next.
  import ml_collections
  from train import input_pipeline
  cfg = ml_collections.ConfigDict(dict(dir="", hr_size=16, scale=4, num_val=2, noise_level=3.0))
  ds = input_pipeline.make_datasets(cfg, batch_size_per_process=2, seed=1)
  with checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False) as ck:
    with ds.train_iter(0) as it:
      next(it), next(it)
      assert ck.save(2, _state(2), data_iterator=it)
      after = [next(it) for _ in range(3)]  # while the save may still be running
    assert ck.save(3, _state(3))  # no iterator: no data item
    ck.wait()
  with checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False) as ck:
    with ds.train_iter(0) as resumed:
      assert ck.restore_data(2, resumed) and resumed.step == 2
      got = [next(resumed) for _ in range(3)]
      assert not ck.restore_data(3, resumed)
  assert "process_0-of-1.json" in os.listdir(tmp_path / "ck" / "2" / "data")  # one per process
  for x, y in zip(after, got):
    np.testing.assert_array_equal(x.lowres, y.lowres)
    np.testing.assert_array_equal(x.highres, y.highres)


# orbax leaves an asyncio callback behind after a failed restore (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty_files", "remove_metadata"])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    ck.save(1, _state(1))
    ck.save(2, _state(2))
  files = [f for f in glob.glob(str(d / "2" / "state" / "**"), recursive=True)
           if os.path.isfile(f)]
  data_files = [f for f in files if f"{os.sep}d{os.sep}" in f]
  assert data_files
  if damage == "truncate":
    for f in data_files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif damage == "flip":
    for f in data_files:
      b = bytearray(open(f, "rb").read())
      b[len(b) // 2] ^= 0xFF
      open(f, "wb").write(bytes(b))
  elif damage == "empty_files":
    for f in files:
      open(f, "wb").close()
  else:
    os.remove(d / "2" / "state" / "_METADATA")
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
      state, step = ck.restore_latest(_abstract())
      assert step == 1
      _assert_tree_equal(state, _state(1))
      assert "checkpoint step 2" in caplog.text and "damaged" in caplog.text
      # The damaged step is moved aside (kept), so the resumed run saves it again.
      assert ck.all_steps() == [1]
      assert len(os.listdir(str(d) + ".damaged")) == 1
      assert ck.save(2, _state(22))
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    state, step = ck.restore_latest(_abstract())
  assert step == 2
  _assert_tree_equal(state, _state(22))


def test_fingerprint_catches_silent_change(tmp_path, monkeypatch):
  # A change that the storage layer cannot detect (valid data, wrong values).
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    real = ck._manager.restore

    def tampered(step, args=None):
      out = real(step, args=args)
      if step == 2 and "state" in out:
        out["state"]["params"]["w"] = out["state"]["params"]["w"].at[0, 0].add(1.0)
      return out

    monkeypatch.setattr(ck._manager, "restore", tampered)
    with pytest.raises(ValueError, match="fingerprint"):
      ck.restore(2, _abstract())
    _, step = ck.restore_latest(_abstract())
  assert step == 1


def test_changed_state_layout_is_an_error_not_a_fallback(tmp_path):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    ck.save(1, _state(1))
    ck.save(2, _state(2))
  other = jax.eval_shape(lambda: {**_state(0), "params": {"w": jnp.zeros((6, 11)),
                                                          "b": jnp.zeros(4, jnp.bfloat16)}})
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    with pytest.raises(checkpoint.StructureMismatchError, match="step 2.*different state"):
      ck.restore_latest(other)
    assert ck.all_steps() == [1, 2]  # nothing skipped or deleted
    _, step = ck.restore_latest(_abstract())
  assert step == 2


def test_all_damaged_gives_no_state(tmp_path):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    ck.save(3, _state(3))
  os.remove(d / "3" / "state" / "_METADATA")
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    assert ck.restore_latest(_abstract()) == (None, 0)


def test_sigterm_sets_flag_and_handler_is_restored(tmp_path):
  old = signal.getsignal(signal.SIGTERM)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  try:
    assert not ck.preemption_requested(0)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
    assert ck.preemption_requested(1)
  finally:
    ck.close()
  assert signal.getsignal(signal.SIGTERM) is old


def test_with_several_processes_preemption_is_agreed_every_n_steps(tmp_path, monkeypatch):
  """Two (faked) processes: the flags are all-gathered only every
  preemption_check_every steps, so the steps between never wait on each other;
  a SIGTERM is acted on at the next agreement step."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = []
  ck = checkpoint.Checkpointer(tmp_path / "ck", preemption_check_every=3)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathered.append(int(x[0])) or np.stack([x, np.zeros_like(x)]))
  try:
    assert [ck.agrees_at(s) for s in range(1, 7)] == [False, False, True] * 2
    assert not any(ck.preemption_requested(s) for s in (1, 2, 3))
    os.kill(os.getpid(), signal.SIGTERM)
    assert [ck.preemption_requested(s) for s in (4, 5, 6)] == [False, False, True]
    assert gathered == [0, 1]  # at steps 3 and 6 only
  finally:
    ck.close()


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from train import checkpoint
    ck = checkpoint.Checkpointer(sys.argv[1], install_sigterm_handler=False)
    big = lambda k: {"w": jnp.full((2048, 2048), float(k)), "v": jnp.full((1024, 1024), -float(k))}
    ck.save(1, big(1)); ck.wait()
    for k in range(2, 100):
      ck.save(k, big(k))  # returns once copied to host; written in the background
      print("saving", k, flush=True)
    time.sleep(60)
""")


def test_kill9_during_async_save_never_leaves_a_half_checkpoint(tmp_path):
  d = str(tmp_path / "ck")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, d], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env, text=True)
  try:
    assert proc.stdout.readline().startswith("saving 2")
    proc.kill()  # SIGKILL while step 2 (at least) is being written
  finally:
    proc.wait(30)
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    abstract = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32),
                "v": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    state, step = ck.restore_latest(abstract)
    # Leftovers of the killed save are not steps and are cleaned up at start.
    assert all(str(s).isdigit() for s in ck.all_steps())
  assert not glob.glob(os.path.join(d, "*tmp*"))
  assert step >= 1
  # Whatever step is restored is complete and consistent.
  assert (np.asarray(state["w"]) == step).all() and (np.asarray(state["v"]) == -step).all()


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from train import checkpoint
    ck = checkpoint.Checkpointer(sys.argv[1], save_interval_steps=10**9)
    for step in range(1, 100000):
      state = {"w": jnp.full((4,), float(step))}
      ck.save(step, state)  # off-interval: nothing written
      if step == 3:
        print("running", flush=True)
      if ck.preemption_requested(step):
        ck.save(step, state, force=True)
        ck.close()
        print("saved", step, flush=True)
        sys.exit(0)
      time.sleep(0.01)
    sys.exit(3)
""")


def test_sigterm_from_outside_saves_before_exit(tmp_path):
  d = str(tmp_path / "ck")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, d], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env, text=True)
  try:
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
  finally:
    proc.wait(60)
  assert proc.returncode == 0  # handled: not killed by the signal
  saved = int(out.split()[-1])
  assert saved >= 3
  with checkpoint.Checkpointer(d, install_sigterm_handler=False) as ck:
    assert ck.all_steps() == [saved]
    state, step = ck.restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  assert step == saved and (np.asarray(state["w"]) == saved).all()


def test_check_workdir_ok_and_creates(tmp_path):
  d = tmp_path / "new" / "run"
  checkpoint.check_workdir(str(d), min_free_bytes=1)
  assert d.is_dir() and not os.listdir(d)  # the probe file is removed


def test_check_workdir_not_writable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  # A path under a regular file cannot be created, even by root.
  with pytest.raises(checkpoint.WorkdirError, match="cannot be created"):
    checkpoint.check_workdir(str(blocker / "run"))
  with pytest.raises(checkpoint.WorkdirError, match="not a directory|cannot be created"):
    checkpoint.check_workdir(str(blocker))
  if os.geteuid() != 0:  # permission bits do not bind root
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
      with pytest.raises(checkpoint.WorkdirError, match="not writable"):
        checkpoint.check_workdir(str(ro))
    finally:
      os.chmod(ro, 0o700)


def test_check_workdir_probe_write_fails(tmp_path, monkeypatch):
  # What a read-only mount gives (simulated: permission bits do not bind root).
  def refuse(*a, **k):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
  with pytest.raises(checkpoint.WorkdirError, match="not writable"):
    checkpoint.check_workdir(str(tmp_path))


def test_check_workdir_disk_full(tmp_path):
  with pytest.raises(checkpoint.WorkdirError, match="free"):
    checkpoint.check_workdir(str(tmp_path), min_free_bytes=1 << 62)


def test_sharded_state_round_trip_and_fingerprint(tmp_path):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  host = {"w": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "step": np.int32(4)}
  state = {"w": jax.device_put(host["w"], sharded), "step": jax.device_put(host["step"], replicated)}
  assert checkpoint.fingerprint(state) == checkpoint.fingerprint(host)
  assert checkpoint.fingerprint(host) != checkpoint.fingerprint({**host, "step": np.int32(5)})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False) as ck:
    ck.save(4, state)
    restored, step = ck.restore_latest(abstract)
  assert step == 4 and restored["w"].sharding == sharded
  _assert_tree_equal(restored, host)


def test_fsdp_state_restores_onto_another_mesh_and_continues_identically(tmp_path):
  """A train state saved on the (4, 2) fsdp layout restores onto (2, 4) and (8, 1)
  layouts (fingerprints checked on restore), and one more step from each equals the
  step taken on the saving mesh."""
  import optax  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "b": jnp.zeros((8,), jnp.float32)}
  batches = [{"x": rng.normal(size=(16, 16)).astype(np.float32)} for _ in range(2)]
  tx = optax.adam(1e-2)

  def loss(p, b, frozen):
    del frozen
    return jnp.mean(jnp.square(jnp.tanh(b["x"] @ p["w"] + p["b"]) - 0.5)), {}

  def step_on(fsdp, state, batch):
    mesh = sharding.make_mesh(fsdp=fsdp)
    train_step = step_lib.make_train_step(loss, tx, mesh, min_shard_size=0)
    return train_step(state, step_lib.shard_batch(batch, mesh), {}, jax.random.PRNGKey(0))[0]

  saved = step_lib.place_state(step_lib.init_state(params, tx), sharding.make_mesh(fsdp=2),
                               min_shard_size=0)
  saved = step_on(2, saved, batches[0])
  assert saved.params["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  # The step donates its state: step from a copy, `saved` is saved below.
  expected = jax.device_get(step_on(2, jax.tree.map(jnp.copy, saved), batches[1]).params)
  with checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False) as ck:
    ck.save(1, saved)
    ck.wait()
    for fsdp in (4, 1):
      layout = sharding.state_shardings(saved, sharding.make_mesh(fsdp=fsdp), min_shard_size=0)
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              saved, layout)
      restored, step = ck.restore_latest(abstract)
      assert step == 1
      assert restored.params["w"].sharding == layout.params["w"]
      _assert_tree_equal(restored, jax.device_get(saved))
      got = jax.device_get(step_on(fsdp, restored, batches[1]).params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   expected, got)


def test_checkpoint_written_before_the_ema_field_restores(tmp_path, monkeypatch, caplog):
  """A TrainState saved by the code before `TrainState.ema` existed (the NamedTuple
  itself, five fields) restores as it was; with EMA turned on its EMA starts from the
  restored params (a warning says so). A state with EMA round-trips, and restoring
  it without EMA is a changed state (an error), not damage."""
  from typing import Any, NamedTuple  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top

  class OldTrainState(NamedTuple):
    step: Any
    params: Any
    opt_state: Any
    skipped: Any
    consecutive_skips: Any

  def restore(ck, state):  # onto `state`'s shapes and shardings; `state` when nothing is saved
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    return loop._restore(ck, shapes, lambda: state)

  tx = optax.adam(1e-2)
  params = {"w": jnp.arange(8.0) - 3.0}
  plain, with_ema = step_lib.init_state(params, tx), step_lib.init_state(params, tx, ema=True)
  ck = checkpoint.Checkpointer(tmp_path / "ck", install_sigterm_handler=False)
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "_stored", lambda tree: tree)  # the save of the code before
    ck.save(1, OldTrainState(*plain[:5])._replace(step=jnp.int32(1)), force=True)
  ck.wait()
  restored = restore(ck, plain)
  assert restored.ema is None and int(restored.step) == 1
  _assert_tree_equal(restored.params, params)
  with caplog.at_level(logging.WARNING):
    restored = restore(ck, with_ema)
  assert "has no EMA" in caplog.text and not os.path.exists(str(tmp_path / "ck.damaged"))
  _assert_tree_equal(restored.ema, params)
  assert restored.ema["w"] is not restored.params["w"]  # own buffers: the step donates both
  ck.save(2, restored._replace(ema={"w": jnp.ones(8)}), force=True)
  ck.wait()
  again = restore(ck, with_ema)
  assert int(again.step) == 1
  _assert_tree_equal(again.ema, {"w": jnp.ones(8)})
  with pytest.raises(checkpoint.StructureMismatchError):
    restore(ck, plain)
  ck.close()
