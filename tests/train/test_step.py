"""The data-parallel train step: device-count invariance, skip-on-non-finite, trace once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from train import step as step_lib

AXIS = step_lib.AXIS


def toy_loss(params, batch, frozen):
  """A local mean (like the velocity mse) + a globally normalised weighted term
  (like decoded_losses' psum(sum)/psum(mass)) + a frozen argument."""
  pred = jnp.tanh(batch["x"] @ params["w"] + params["b"]) * frozen["scale"]
  err = jnp.mean(jnp.square(pred - batch["y"]), axis=-1)  # [b]
  mse = jnp.mean(err)
  wsum = jax.lax.psum(jnp.sum(batch["wt"] * jnp.abs(pred - batch["y"]).mean(-1)), AXIS)
  mass = jax.lax.psum(jnp.sum(batch["wt"]), AXIS)
  weighted = wsum / mass
  return mse + 0.5 * weighted, {"mse": jax.lax.pmean(mse, AXIS), "weighted": weighted}


def toy_setup(batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
            "b": jnp.zeros((4,), jnp.float32)}
  batches = [{"x": rng.normal(size=(batch_size, 4)).astype(np.float32),
              "y": rng.normal(size=(batch_size, 4)).astype(np.float32),
              "wt": rng.uniform(size=(batch_size,)).astype(np.float32)} for _ in range(4)]
  return params, batches


def run(devices, params, batches, *, loss_fn=toy_loss, tx=None):
  mesh = step_lib.make_mesh(devices)
  tx = tx or optax.adam(1e-2)
  state = step_lib.replicate(step_lib.init_state(params, tx), mesh)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  train_step = step_lib.make_train_step(loss_fn, tx, mesh)
  out = []
  for b in batches:
    state, metrics = train_step(state, step_lib.shard_batch(b, mesh), frozen,
                                jax.random.PRNGKey(0))
    out.append(jax.device_get(metrics))
  return jax.device_get(state), out, train_step


def test_one_vs_eight_devices_same_loss_and_params():
  assert jax.device_count() == 8, "tests/conftest.py configures 8 CPU devices"
  params, batches = toy_setup()
  s1, m1, _ = run(jax.devices()[:1], params, batches)
  s8, m8, _ = run(jax.devices(), params, batches)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["mse"], b["mse"], rtol=1e-5)
    np.testing.assert_allclose(a["weighted"], b["weighted"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s1.params, s8.params)
  # And the params did move (the test would pass trivially otherwise).
  assert not np.allclose(s8.params["w"], params["w"])


def _toy_global_loss(p, b):
  """The toy's loss on the whole (unsharded) batch `b`, written independently of the step."""
  pred = jnp.tanh(b["x"] @ p["w"] + p["b"]) * 2.0
  mse = jnp.mean(jnp.square(pred - b["y"]))
  w = jnp.sum(b["wt"] * jnp.abs(pred - b["y"]).mean(-1)) / jnp.sum(b["wt"])
  return mse + 0.5 * w


def test_gradient_is_the_global_gradient():
  """pmean of local grads == grad of the global loss (no hidden factor of n)."""
  params, batches = toy_setup()
  b = batches[0]

  expected = optax.tree.norm(jax.grad(_toy_global_loss, argnums=0)(params, b))
  _, m8, _ = run(jax.devices(), params, batches[:1], tx=optax.sgd(0.0))
  np.testing.assert_allclose(m8[0]["grad_norm"], expected, rtol=1e-5)


def _state_bits(state):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves((state.params, state.opt_state))]


@pytest.mark.parametrize("where", ["batch", "model"])
def test_non_finite_step_is_skipped_bit_identically(where):
  params, batches = toy_setup()
  mesh = step_lib.make_mesh()
  tx = optax.adam(1e-2)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)

  def nan_in_model(p, batch, fr):
    # A NaN produced inside the model on ONE device only (device 3).
    loss, m = toy_loss(p, batch, fr)
    bad = (jax.lax.axis_index(AXIS) == 3) & (batch["x"][0, 0] > -100)
    return jnp.where(bad & batch["poison"][0], jnp.nan, loss), m

  loss_fn = toy_loss if where == "batch" else nan_in_model
  train_step = step_lib.make_train_step(loss_fn, tx, mesh)
  state = step_lib.replicate(step_lib.init_state(params, tx), mesh)
  key = jax.random.PRNGKey(0)

  def prep(b, poison):
    b = dict(b)
    if where == "batch":
      if poison:
        b["x"] = b["x"].copy()
        b["x"][5, 2] = np.nan  # one sample, on one device
    else:
      b["poison"] = np.full((b["x"].shape[0],), poison)
    return step_lib.shard_batch(b, mesh)

  state, m = train_step(state, prep(batches[0], False), frozen, key)
  assert int(m["skipped"]) == 0 and int(state.skipped) == 0
  before = _state_bits(jax.device_get(state))
  for i in range(2):
    state, m = train_step(state, prep(batches[1], True), frozen, key)
    assert int(m["skipped"]) == 1
    assert int(state.skipped) == i + 1 and int(state.consecutive_skips) == i + 1
    assert _state_bits(jax.device_get(state)) == before  # params AND opt state
  assert int(state.step) == 3
  state, m = train_step(state, prep(batches[2], False), frozen, key)
  assert int(m["skipped"]) == 0 and int(state.consecutive_skips) == 0
  assert int(state.skipped) == 2
  assert _state_bits(jax.device_get(state)) != before
  assert train_step.trace_count() == 1


def test_step_traces_once():
  params, batches = toy_setup()
  _, _, train_step = run(jax.devices(), params, batches)
  assert train_step.trace_count() == 1


# ----------------------------------------------------------------------------
# fsdp: the same step on ('data', 'fsdp') meshes (8,1), (4,2), (2,4), (1,8).

MESHES = (1, 2, 4, 8)  # mesh.fsdp; data = 8 // fsdp


def run_fsdp(fsdp, params, batches, *, loss_fn=toy_loss, tx=None, min_shard_size=0):
  mesh = step_lib.make_mesh(fsdp=fsdp)
  tx = tx or optax.adam(1e-2)
  state = step_lib.place_state(step_lib.init_state(params, tx), mesh,
                               min_shard_size=min_shard_size)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  train_step = step_lib.make_train_step(loss_fn, tx, mesh, min_shard_size=min_shard_size)
  out = []
  for b in batches:
    state, metrics = train_step(state, step_lib.shard_batch(b, mesh), frozen,
                                jax.random.PRNGKey(0))
    out.append(jax.device_get(metrics))
  return state, out, train_step


def test_fsdp_meshes_train_to_the_same_params_in_the_sharded_layout():
  params, batches = toy_setup()
  ref, m_ref, _ = run_fsdp(1, params, batches)
  for fsdp in MESHES[1:]:
    state, m, train_step = run_fsdp(fsdp, params, batches)
    for a, b in zip(m_ref, m):
      np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
      np.testing.assert_allclose(a["mse"], b["mse"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(ref.params), jax.device_get(state.params))
    # The step's output keeps the layout: w [4, 4] split over fsdp (rows, or
    # columns when fsdp=8 divides neither), Adam's moments alike, counters replicated.
    spec = P("fsdp") if fsdp <= 4 else P()
    assert state.params["w"].sharding.spec == spec
    assert state.opt_state[0].mu["w"].sharding.spec == spec
    assert state.step.sharding.is_fully_replicated
    assert train_step.trace_count() == 1
  assert not np.allclose(jax.device_get(ref.params["w"]), params["w"])


def test_fsdp_gradient_is_the_global_gradient_and_reduce_scattered():
  params, batches = toy_setup()
  b = batches[0]

  expected = optax.tree.norm(jax.grad(_toy_global_loss, argnums=0)(params, b))
  _, m, train_step = run_fsdp(4, params, batches[:1], tx=optax.sgd(0.0))
  np.testing.assert_allclose(m[0]["grad_norm"], expected, rtol=1e-5)
  mesh = step_lib.make_mesh(fsdp=4)
  state = step_lib.place_state(step_lib.init_state(params, optax.sgd(0.0)), mesh,
                               min_shard_size=0)
  hlo = train_step.lower(state, step_lib.shard_batch(b, mesh),
                         step_lib.replicate({"scale": jnp.float32(2.0)}, mesh),
                         jax.random.PRNGKey(0)).as_text()
  assert "reduce_scatter" in hlo  # the sharded gradient is never all-reduced whole


def test_fsdp_non_finite_step_is_skipped_bit_identically():
  params, batches = toy_setup()
  state, _, train_step = run_fsdp(4, params, batches[:1])
  mesh = step_lib.make_mesh(fsdp=4)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  before = _state_bits(jax.device_get(state))
  bad = dict(batches[1], x=batches[1]["x"].copy())
  bad["x"][13, 1] = np.inf  # one sample, on one device (data 3, fsdp 1)
  state, m = train_step(state, step_lib.shard_batch(bad, mesh), frozen, jax.random.PRNGKey(0))
  assert int(m["skipped"]) == 1 and int(state.consecutive_skips) == 1
  assert _state_bits(jax.device_get(state)) == before
  assert state.params["w"].sharding.spec == P("fsdp")
  state, m = train_step(state, step_lib.shard_batch(batches[2], mesh), frozen,
                        jax.random.PRNGKey(0))
  assert int(m["skipped"]) == 0 and _state_bits(jax.device_get(state)) != before
  assert train_step.trace_count() == 1
