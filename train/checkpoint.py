"""Checkpoints (orbax-checkpoint), workdir checks and preemption handling.

Promises (tested in tests/train/test_checkpoint.py):

- `check_workdir` fails at START with a clear error when the workdir cannot be
  created or written, or its disk has less than `min_free_bytes` free.
- A checkpoint is a directory `<dir>/<step>/` written by orbax's
  `CheckpointManager`: into a temporary directory first, renamed when complete
  (atomic on POSIX file systems), so a process killed with -9 during an async
  save leaves only a temporary directory that is never listed as a step.
- Every save also stores a fingerprint of each array (two wrapping uint32 sums
  of its bit pattern, computed on device) in the JSON metadata item.
  `restore_latest` recomputes it after restoring: a step whose files are
  missing, truncated or silently altered fails to restore or mismatches, is
  reported with a warning and moved to `<dir>.damaged/` (never deleted), and
  the previous intact step is restored instead. A checkpoint of a differently
  shaped state (the config changed) is an error, not damage.
- `Checkpointer` installs a SIGTERM handler (main thread only) that only sets
  a flag; the loop polls `preemption_requested(step)` every step, saves and
  exits. Orbax's `reached_preemption(step)` (the JAX distributed preemption
  service: a host-side check, its agreement runs in the background) is
  honoured at every step. With one process the flag answers at the next step;
  with several, the flags are all-gathered (a host sync) only every
  `preemption_check_every` steps (`agrees_at(step)`), so that all processes
  agree on the same step without waiting on each other at every step (every
  process must call it every step).
- `save(..., data_iterator=it)` also writes the input iterator's state (item
  `data`, grain's checkpoint handler: one JSON file per process) at the same
  step; `restore_data(step, it)` puts it back, so a resumed run sees the same
  batches.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MIN_FREE_BYTES = 256 * 1024 * 1024  # a checkpoint of the demo models is ~10 MB


class WorkdirError(RuntimeError):
  """The workdir cannot be used (not writable, disk full)."""


def check_workdir(workdir: str, *, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
  """Fails fast when `workdir` cannot hold logs and checkpoints.

  Creates the directory if needed, writes and deletes a probe file, and checks
  the free space of its file system.

  Args:
    workdir: run directory.
    min_free_bytes: required free space in bytes.

  Raises:
    WorkdirError: naming the workdir and the reason.
  """
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
    raise WorkdirError(f"workdir must be a non-empty path, got {workdir!r}")
  workdir = os.fspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"workdir={workdir!r} cannot be created: {e}") from e
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir={workdir!r} is not a directory")
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=workdir)
    try:
      os.write(fd, b"ssim_jax")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir={workdir!r} is not writable: {e}") from e
  st = os.statvfs(workdir)
  free = st.f_bavail * st.f_frsize
  if free < min_free_bytes:
    raise WorkdirError(
        f"workdir={workdir!r}: only {free / 2**20:.1f} MiB free on its disk, "
        f"{min_free_bytes / 2**20:.1f} MiB required for logs and checkpoints "
        "(free space or point --workdir elsewhere)")


# ----------------------------------------------------------------------------
# Fingerprints.


def _leaf_fingerprint(x) -> jax.Array:
  """Two uint32 wrapping sums of the bit pattern of `x` (plain and position-weighted)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    nbytes = x.dtype.itemsize
    if nbytes == 8:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      utype = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[nbytes]
      bits = jax.lax.bitcast_convert_type(x, utype).astype(jnp.uint32)
  bits = bits.reshape(-1)
  pos = (jnp.arange(bits.size, dtype=jnp.uint32) % jnp.uint32(65521)) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * pos, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(leaves):
  return [_leaf_fingerprint(x) for x in leaves]


def _global_fingerprint(x: jax.Array) -> np.ndarray:
  """Fingerprint of an array sharded over processes, replicated to every process."""
  sharding = x.sharding
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(f"cannot fingerprint a multi-process array with {type(sharding).__name__}")
  out = jax.jit(_leaf_fingerprint, out_shardings=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec()))(x)
  return np.asarray(out.addressable_data(0))


def fingerprint(tree) -> list[list[int]]:
  """Per-leaf fingerprints of a pytree as JSON-able ints (leaf order of `tree`).

  The same in every process: a replicated multi-process array is fingerprinted
  from its local copy, a sharded one by a replicated global reduction.
  """
  leaves = jax.tree.leaves(tree)
  local, local_idx, out = [], [], [None] * len(leaves)
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        x = x.addressable_data(0)
      else:
        out[i] = _global_fingerprint(x)
        continue
    local.append(x)
    local_idx.append(i)
  for i, fp in zip(local_idx, jax.device_get(_fingerprints(local))):
    out[i] = fp
  return [[int(a) for a in np.asarray(fp)] for fp in out]


def structure(tree) -> list[list]:
  """`[[path, shape, dtype], ...]` of a pytree of arrays or ShapeDtypeStructs."""
  return [[jax.tree_util.keystr(path), [int(d) for d in np.shape(x)],
           str(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)]
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


class StructureMismatchError(ValueError):
  """A checkpoint holds a differently shaped state (e.g. the config changed)."""


def _is_namedtuple(tree) -> bool:
  return isinstance(tree, tuple) and hasattr(tree, "_fields")


def _stored(tree):
  """What orbax writes of a state: a NamedTuple as the dict of its fields that are not None.

  Orbax stores a None field as a key, which a checkpoint written before that
  field existed lacks (and its restore then fails): an optional field that is
  None (`TrainState.ema` without EMA) leaves the files as they were.
  """
  if _is_namedtuple(tree):
    return {k: v for k, v in tree._asdict().items() if v is not None}
  return tree


# ----------------------------------------------------------------------------
# Preemption.


class _PreemptionFlag:
  """SIGTERM -> flag; restores the previous handler on `uninstall()`."""

  def __init__(self):
    self._event = threading.Event()
    self._old = None
    self._installed = False

  def install(self, signum=signal.SIGTERM) -> bool:
    if threading.current_thread() is not threading.main_thread():
      logging.warning("SIGTERM handler not installed: not on the main thread; "
                      "preemption is then detected only through orbax")
      return False
    self._signum = signum
    self._old = signal.signal(signum, self._handle)
    self._installed = True
    return True

  def _handle(self, signum, frame):
    del frame
    # Only set a flag: the loop saves at a step boundary (never mid-step).
    logging.warning("received signal %d: checkpointing at the next step and exiting", signum)
    self._event.set()

  def uninstall(self):
    if self._installed and threading.current_thread() is threading.main_thread():
      signal.signal(self._signum, self._old if self._old is not None else signal.SIG_DFL)
      self._installed = False

  def is_set(self) -> bool:
    return self._event.is_set()


def install_preemption_handler(signum=signal.SIGTERM) -> _PreemptionFlag:
  """Installs a handler for `signum` that only sets a flag; returns the flag.

  `flag.is_set()` polls it, `flag.uninstall()` restores the previous handler.
  """
  flag = _PreemptionFlag()
  flag.install(signum)
  return flag


# ----------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Periodic, keep-N, async checkpoints of a train-state pytree.

  Args:
    directory: checkpoint directory (created).
    max_to_keep: newest steps kept on disk.
    save_interval_steps: `save(step)` writes only when `step` is a multiple
      of it (or `force=True`).
    async_save: write in a background thread after copying to host.
    install_sigterm_handler: install the SIGTERM flag handler (main thread).
    preemption_check_every: with several processes, steps between the
      all-gathers that agree on a preemption (`preemption_requested`).

  Example:
    ckpt = Checkpointer(workdir + "/ckpt", save_interval_steps=500)
    state, step = ckpt.restore_latest(jax.eval_shape(lambda: state0))
    ...
    ckpt.save(step, state)
    if ckpt.preemption_requested(step):
      ckpt.save(step, state, force=True); ckpt.wait(); sys.exit(...)
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True, install_sigterm_handler: bool = True,
               preemption_check_every: int = 1):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if preemption_check_every < 1:
      raise ValueError(f"preemption_check_every must be >= 1, got {preemption_check_every}")
    self._ocp = ocp
    self.save_interval_steps = int(save_interval_steps)
    self.preemption_check_every = int(preemption_check_every)
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # The interval is applied in `save` (step % interval == 0, also for
        # the first save, which orbax would always take).
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        # Leftovers of a save killed mid-way are removed at start.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta", "data"))
    self._flag = install_preemption_handler() if install_sigterm_handler else None

  # -- saving -----------------------------------------------------------------

  def save(self, step: int, state: Any, *, force: bool = False,
           meta: Mapping[str, Any] | None = None, data_iterator: Any = None) -> bool:
    """Saves `state` at `step` (async); returns whether a save was started.

    Args:
      step: training step (directory name).
      state: pytree of jax / numpy arrays (params, optimizer state, rng, ...).
      force: save even off the interval.
      meta: JSON-serialisable extra information (config, ...).
      data_iterator: the input iterator (`get_state()`, e.g. a
        `train.input_pipeline.TrainIterator`); its state is taken now, before
        this returns, and written by this process.
    """
    ocp = self._ocp
    step = int(step)
    if not self.saves_at(step, force=force):
      return False  # free: nothing is read from the devices
    if step in self._manager.all_steps():
      return False  # already saved (e.g. a final save right after a periodic one)
    meta = dict(meta or {})
    meta["_fingerprint"] = fingerprint(state)
    meta["_structure"] = structure(state)
    items = dict(state=ocp.args.StandardSave(_stored(state)), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def saves_at(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, force=force)` writes (and so reads the state from the devices)."""
    return bool(force or int(step) % self.save_interval_steps == 0)

  # -- restoring --------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Completed checkpoint steps, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores one step; raises on any damage (missing, truncated, altered).

    Returns:
      `(state, meta)`.

    Raises:
      StructureMismatchError: the step holds a differently shaped state.
      Exception: any other error means the step is damaged.
    """
    ocp = self._ocp
    step = int(step)
    # The small JSON item first: a different state layout is the user's
    # change (config, model), not damage, and must not be skipped silently.
    meta = dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"] or {})
    saved, wanted = meta.pop("_structure", None), structure(abstract_state)
    if saved is not None and saved != wanted:
      diff = [f"{a} vs {b}" for a, b in zip(saved, wanted) if a != b][:3]
      raise StructureMismatchError(
          f"checkpoint step {step} in {self.directory} holds a different state "
          f"({len(saved)} arrays) than this run expects ({len(wanted)} arrays); first "
          f"differences (saved vs expected): {diff}. The config or model changed: use a "
          "new workdir, or restore the config of the run that wrote it.")
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(_stored(abstract_state)),
                                meta=ocp.args.JsonRestore()))
    state = out["state"]
    if _is_namedtuple(abstract_state):
      state = abstract_state._replace(**state)
    expected = meta.pop("_fingerprint", None)
    if expected is None:
      raise ValueError(f"checkpoint step {step} has no fingerprint in its metadata")
    got = fingerprint(state)
    if got != expected:
      bad = sum(a != b for a, b in zip(got, expected)) + abs(len(got) - len(expected))
      raise ValueError(f"checkpoint step {step}: {bad} array(s) differ from the "
                       "fingerprints written at save time (corrupted files)")
    return state, meta

  def restore_data(self, step: int, data_iterator: Any) -> bool:
    """Sets `data_iterator` to the input state saved at `step`; False when there is none.

    A checkpoint written without a data iterator (or by an older version) has
    none; the caller then positions the iterator by step.
    """
    if not os.path.isdir(os.path.join(self.directory, str(int(step)), "data")):
      return False
    import grain  # pylint: disable=g-import-not-at-top
    self._manager.restore(int(step), args=self._ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return True

  def restore_latest(self, abstract_state: Any, *, return_meta: bool = False):
    """Restores the newest intact checkpoint.

    Damaged steps (newest first) are skipped with a warning naming the step
    and the error, and moved to `<directory>.damaged/` so that the resumed
    run can save those steps again. A checkpoint of a differently shaped state (changed config)
    is not damage: `StructureMismatchError` is raised.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) like
        the state, e.g. `jax.eval_shape(init_fn)`.
      return_meta: also return the metadata dict.

    Returns:
      `(state, step)` (or `(state, step, meta)`), `(None, 0[, {}])` when there
      is no intact checkpoint.
    """
    damaged = []
    found = None
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
      except StructureMismatchError:
        raise  # not damage: never fall back past (and later delete) good checkpoints
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s is damaged and is skipped "
                        "(%s: %s); trying the previous one", step, self.directory,
                        type(e).__name__, str(e)[:500])
        damaged.append(step)
        continue
      found = (state, step, meta)
      break
    if damaged:
      self._quarantine(damaged)
    if found is None:
      return (None, 0, {}) if return_meta else (None, 0)
    state, step, meta = found
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return (state, step, meta) if return_meta else (state, step)

  def _quarantine(self, steps: list[int]) -> None:
    """Moves damaged steps to `<directory>.damaged/` (kept for inspection).

    They must leave the manager's directory: the resumed run saves those step
    numbers again, and keep-N must not count them.
    """
    target = self.directory.rstrip(os.sep) + ".damaged"
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(target, f"{step}-{stamp}")
        if os.path.exists(src):
          os.replace(src, dst)
          logging.warning("moved damaged checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("ssim_jax_checkpoint_quarantine")
    self._manager.reload()

  # -- preemption -------------------------------------------------------------

  def agrees_at(self, step: int) -> bool:
    """Whether `preemption_requested(step)` all-gathers over processes (a host sync)."""
    return jax.process_count() > 1 and int(step) % self.preemption_check_every == 0

  def preemption_requested(self, step: int) -> bool:
    """True when a SIGTERM arrived or orbax reports a preemption sync point.

    Every process must call this at every step. Orbax's sync point is agreed
    by all processes by construction. The SIGTERM flag answers at once with
    one process; with several, it is agreed by all-gathering the local flags
    at the steps of `agrees_at` only (else it waits for the next such step).
    """
    local = bool(self._flag is not None and self._flag.is_set())
    try:
      synced = bool(self._manager.reached_preemption(int(step)))
    except Exception:  # pylint: disable=broad-except
      synced = False  # no distributed preemption service: the signal flag alone decides
    if jax.process_count() == 1:
      return local or synced
    if not self.agrees_at(step):
      return synced
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray([local or synced], np.int32))
    return bool(np.any(flags))

  # -- lifecycle --------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves are on disk (raises their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves, closes the manager, restores the SIGTERM handler."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    finally:
      if self._flag is not None:
        self._flag.uninstall()
        self._flag = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_numpy(directory: str, step: int) -> Any:
  """The state saved at `step` under `directory` as numpy arrays, for offline checks.

  Reads the checkpoint's own metadata, so no template (model, mesh or device
  count) is needed: runs on any topology can be compared leaf by leaf.

  Args:
    directory: a Checkpointer directory (e.g. `<workdir>/flow`).
    step: the step to read.

  Returns:
    The saved pytree (a nested dict) with `np.ndarray` leaves.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    md = c.metadata(path)
    tree = md.item_metadata.tree if hasattr(md, "item_metadata") else md
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return c.restore(path, restore_args=args)
