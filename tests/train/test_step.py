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


# ----------------------------------------------------------------------------
# Gradient accumulation, EMA, the halt after max_consecutive_skips.


def toy_accum_loss(params, batch, frozen, accumulation=None):
  """`toy_loss` written for micro-batches: the weighted term divides by the mass of
  the device's whole batch (psum-ed: the global batch's), from `prepare`."""
  if accumulation is None:
    return toy_loss(params, batch, frozen)
  pred = jnp.tanh(batch["x"] @ params["w"] + params["b"]) * frozen["scale"]
  mse = jnp.mean(jnp.square(pred - batch["y"])) / accumulation.steps
  weighted = jax.lax.psum(jnp.sum(batch["wt"] * jnp.abs(pred - batch["y"]).mean(-1)),
                          AXIS) / accumulation.context
  return mse + 0.5 * weighted, {"mse": jax.lax.pmean(mse, AXIS), "weighted": weighted}


toy_accum_loss.prepare = lambda batch, frozen: jax.lax.psum(jnp.sum(batch["wt"]), AXIS)


def test_accumulated_micro_batches_equal_one_larger_batch_on_every_mesh():
  # k=4 micro-batches of the toy with very different weight masses: the same
  # metrics and params as k=1 on the same global batch, on each fsdp mesh.
  params, batches = toy_setup(batch_size=32)
  for b in batches:
    b["wt"] = b["wt"] * np.where(np.arange(32) % 4 < 2, 10.0, 0.01).astype(np.float32)
  for fsdp in (1, 4):
    mesh = step_lib.make_mesh(fsdp=fsdp)
    tx = optax.adam(1e-2)
    frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
    out = {}
    for k in (1, 4):
      state = step_lib.place_state(step_lib.init_state(params, tx), mesh, min_shard_size=0)
      train_step = step_lib.make_train_step(toy_accum_loss, tx, mesh, min_shard_size=0,
                                            grad_accum_steps=k)
      metrics = []
      for b in batches:
        state, m = train_step(state, step_lib.shard_batch(b, mesh), frozen, jax.random.PRNGKey(0))
        metrics.append(jax.device_get(m))
      assert train_step.trace_count() == 1
      out[k] = jax.device_get(state), metrics
    for a, b in zip(out[1][1], out[4][1]):
      for name in ("mse", "weighted", "grad_norm"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out[1][0].params, out[4][0].params)
    if fsdp == 4:
      assert state.params["w"].sharding.spec == P("fsdp")


def test_non_finite_micro_batch_skips_the_accumulated_step_bit_identically():
  params, batches = toy_setup(batch_size=32)
  mesh = step_lib.make_mesh(fsdp=2)
  tx = optax.adam(1e-2)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  state = step_lib.place_state(step_lib.init_state(params, tx, ema=True), mesh, min_shard_size=0)
  train_step = step_lib.make_train_step(toy_accum_loss, tx, mesh, min_shard_size=0,
                                        grad_accum_steps=2, ema_decay=0.9)
  key = jax.random.PRNGKey(0)
  state, _ = train_step(state, step_lib.shard_batch(batches[0], mesh), frozen, key)
  before = _state_bits(jax.device_get(state)) + [
      np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state.ema))]
  bad = dict(batches[1], x=batches[1]["x"].copy())
  bad["x"][7, 0] = np.nan  # device 1's second micro-batch only
  state, m = train_step(state, step_lib.shard_batch(bad, mesh), frozen, key)
  assert int(m["skipped"]) == 1 and int(state.consecutive_skips) == 1
  after = _state_bits(jax.device_get(state)) + [
      np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state.ema))]
  assert after == before


def test_ema_follows_the_applied_updates_with_warmup_in_the_params_layout():
  params, batches = toy_setup()
  mesh = step_lib.make_mesh(fsdp=4)
  tx = optax.adam(1e-2)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  decay = 0.95
  state = step_lib.place_state(step_lib.init_state(params, tx, ema=True), mesh, min_shard_size=0)
  train_step = step_lib.make_train_step(toy_loss, tx, mesh, min_shard_size=0, ema_decay=decay)
  key = jax.random.PRNGKey(0)
  ema = jax.tree.map(np.asarray, params)
  n = 0
  for i, b in enumerate(batches):
    if i == 2:  # a skipped step: the EMA does not move, and it is not counted
      b = dict(b, x=np.full_like(b["x"], np.nan))
    state, m = train_step(state, step_lib.shard_batch(b, mesh), frozen, key)
    if int(m["skipped"]):
      continue
    d = min(decay, (1 + n) / (10 + n))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema,
                       jax.device_get(state.params))
    n += 1
  assert n == 3 and int(state.skipped) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ema, jax.device_get(state.ema))
  assert not np.allclose(ema["w"], jax.device_get(state.params["w"]))  # an average, not a copy
  assert state.ema["w"].sharding.spec == state.params["w"].sharding.spec == P("fsdp")
  assert train_step.trace_count() == 1


def test_ema_decay_warmup_rule():
  assert float(step_lib.ema_decay_at(0.999, 0, warmup=True)) == np.float32(0.1)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.999, 90, warmup=True), 91 / 100)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.999, 10**6, warmup=True), 0.999)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.999, 0, warmup=False), 0.999)


def test_state_that_hit_max_consecutive_skips_is_halted():
  # The loop reads the counter only at logging steps: the steps it runs past
  # the limit must leave the state exactly as it was when the limit was hit.
  params, batches = toy_setup()
  mesh = step_lib.make_mesh()
  tx = optax.adam(1e-2)
  frozen = step_lib.replicate({"scale": jnp.float32(2.0)}, mesh)
  state = step_lib.replicate(step_lib.init_state(params, tx), mesh)
  train_step = step_lib.make_train_step(toy_loss, tx, mesh, max_consecutive_skips=2)
  key = jax.random.PRNGKey(0)
  nan = dict(batches[1], x=np.full_like(batches[1]["x"], np.nan))
  state, _ = train_step(state, step_lib.shard_batch(batches[0], mesh), frozen, key)
  for _ in range(2):
    state, _ = train_step(state, step_lib.shard_batch(nan, mesh), frozen, key)
  assert int(state.consecutive_skips) == 2 and int(state.step) == 3
  hit = jax.device_get(state)
  for b in (batches[2], nan, batches[3]):  # finite and non-finite steps alike
    state, _ = train_step(state, step_lib.shard_batch(b, mesh), frozen, key)
  assert [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state))] == [
      np.asarray(x).tobytes() for x in jax.tree.leaves(hit)]
  assert int(state.step) == 3 and int(state.skipped) == 2


def _rel_l2(a, b):
  num = sum(float(np.sum(np.square(np.float64(x) - y))) for x, y in zip(a, b))
  return (num / sum(float(np.sum(np.square(np.float64(x)))) for x in a)) ** 0.5


def test_flow_step_accumulation_equals_the_larger_batch_decoded_losses_included():
  """The tiny flow stage (velocity mse + decoded pixel + SSIM) on a (4, 2) fsdp mesh
  with EMA: 2 micro-batches of 8 images == one batch of 16, to float rounding, when
  the micro-batches' w(t) masses differ 14-fold. Normalising each micro-batch's
  decoded terms by its own mass (the loss without `prepare`) is caught."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config()
  cfg.mse_loss_weight = 0.05  # the decoded terms' gradients are not swamped by the mse's
  mesh = step_lib.make_mesh(fsdp=2)
  progs = loop.build_programs(cfg, mesh)
  vae_graphdef, vae_params, vae_rest = progs.vae
  loss_fn = step_lib.make_flow_loss(cfg, progs.velocity, progs.model[0], vae_graphdef,
                                    vae_rest, compute_dtype=jnp.float32)
  draw = step_lib.make_flow_inputs(cfg, progs.latent_shape,
                                   image_tokens=progs.velocity.image_tokens(progs.latent_shape))

  def make_inputs(batch, key):
    # Each device holds 2 rows: micro-batch 0 (even rows) w = 0.93, micro-batch 1 w = 0.067.
    out = draw(batch, key)
    return dict(out, t=jnp.where(jnp.arange(out["t"].shape[0]) % 2 == 0, 0.02, 0.28))

  rng = np.random.default_rng(0)
  hr, lr = cfg.data.hr_size, cfg.data.hr_size // cfg.data.scale
  batches = [{"highres": rng.uniform(-1, 1, (16, hr, hr, 3)).astype(np.float32),
              "lowres": rng.uniform(-1, 1, (16, lr, lr, 3)).astype(np.float32)}
             for _ in range(2)]
  frozen = step_lib.replicate({"vae": vae_params, "model": {}}, mesh)
  without_prepare = lambda *a, **kw: loss_fn(*a, **kw)  # the per-micro-batch mistake
  runs = {}
  for name, fn, k in (("batch", loss_fn, 1), ("micro", loss_fn, 2),
                      ("mistake", without_prepare, 2)):
    train_step = step_lib.make_train_step(
        fn, progs.flow_tx, mesh, make_inputs=make_inputs, min_shard_size=cfg.mesh.min_shard_size,
        grad_accum_steps=k, ema_decay=0.9)
    state = step_lib.place_state(step_lib.init_state(progs.model[1], progs.flow_tx, ema=True),
                                 mesh, min_shard_size=cfg.mesh.min_shard_size)
    metrics = []
    for b in batches:
      state, m = train_step(state, step_lib.shard_batch(b, mesh), frozen, jax.random.PRNGKey(0))
      metrics.append(jax.device_get(m))
    runs[name] = (metrics, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
        (state.params, state.ema)))])
  names = ("mse", "pixel", "ssim", "total", "weight_mass", "grad_norm")
  for a, b in zip(runs["batch"][0], runs["micro"][0]):
    assert int(b["skipped"]) == 0
    for n in names:
      np.testing.assert_allclose(b[n], a[n], rtol=2e-5, err_msg=n)
  assert _rel_l2(runs["batch"][1], runs["micro"][1]) < 1e-5
  for x, y in zip(runs["batch"][1], runs["micro"][1]):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
  first, mistake = runs["batch"][0][0], runs["mistake"][0][0]
  for n in ("pixel", "ssim", "grad_norm"):  # 50x the tolerance above, at least
    assert not np.isclose(mistake[n], first[n], rtol=1e-3), (n, mistake[n], first[n])
