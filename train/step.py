"""Jitted data-parallel (and fully sharded) train steps with skip-on-non-finite.

One step is one jitted program over the `('data', 'fsdp')` mesh of
train/sharding.py (Auto axes); the batch is split over both axes (`AXIS`).
The train state lives in its fsdp layout (each large array split over
'fsdp', `sharding.state_spec`); fsdp = 1 is plain data parallelism.

1. The per-device loss and gradient run under `jax.shard_map`, and the
   parameters enter it in their fsdp layout (ZeRO-3: no device ever holds the
   whole float32 model). Inside, each sharded leaf is `all_gather`-ed over
   'fsdp' where it is used: the small non-stacked ones (embeddings, final
   layer) whole before the loss, the stacked layers (`sharding.STACKED`, the
   DiT's or FLUX's `[depth, ...]` blocks) one layer at a time inside the
   model's scan bodies (`gather_block`, one gatherer per stack, after the
   velocity model has cast them to the compute dtype),
   and again in the backward pass when the block is rematerialised.
2. The gradient comes out of shard_map already reduced, in the state's
   layout: the transpose of each `all_gather` is a `psum_scatter` (each
   device receives only its shard of the sum, as the gradient is produced,
   layer by layer), and a parameter invariant over 'data' gets its gradient
   summed over 'data' (shard_map's implicit `pvary` transposes to a `psum`).
   Dividing by the device count gives the global mean.
3. `ok = pmin(finite(local loss) and all finite(this device's gradient
   shards))` over every device: one flag on which all devices agree. A NaN or
   inf on one device reaches the summed shard of some device, so the flag
   sees it wherever it arose.
4. Outside shard_map (same jit), optax updates the sharded params and
   optimizer state shard by shard, and both become `where(ok, new, old)`: a
   skipped step leaves them bit-identical (so `optax.apply_if_finite`'s "apply
   after N errors" can never happen here). The new state is constrained to the
   fsdp layout, so a step's output is the next step's input layout. The state
   is donated to the step (its buffers are reused for the new state): do not
   use a state after passing it to the step.
5. `skipped` and `consecutive_skips` counters live in the state. With
   `max_consecutive_skips` set, a state whose `consecutive_skips` reached it
   is HALTED: later steps return it unchanged (step counter included), so the
   loop, which reads the counter only every `log_every` steps, sees exactly the
   state in which the limit was hit and stops there (`config.max_consecutive_skips`).
6. EMA (`ema_decay > 0`): `state.ema` (float32, the params' tree and fsdp
   layout) becomes `d * ema + (1 - d) * new_params` after each applied update,
   `d = min(ema_decay, (1 + n) / (10 + n))` with `ema_warmup` (n = updates
   applied before this one), else `d = ema_decay`. A skipped step leaves it
   bit-identical like the rest of the state.
7. Gradient accumulation (`grad_accum_steps = k > 1`): each device's batch
   is split into k equal micro-batches, and a `lax.scan` over them sums the
   gradients (each already reduced into the state's layout, as in 2.) before
   the one update; finiteness (3.) is decided on the sum. The loss is then
   called with `accumulation=Accumulation(k, context)`, where `context` is
   `loss_fn.prepare(batch, frozen)` of the device's WHOLE batch (None when the
   loss has no `prepare`; the flow loss computes its decoded-loss masses
   there), and returns each micro-batch's additive share: its grad_loss and
   metrics summed over the k micro-batches are the batch's. The step is then
   one step with the k-times-larger batch, to float rounding.

Loss functions follow one convention so that the mean of local gradients is
the gradient of the global loss: a loss function returns `(grad_loss, metrics)`
where `grad_loss` is the per-device objective whose local gradients average to
the global gradient, and `metrics` are already all-reduced (invariant) scalars.
Collectives in a loss use `AXIS` (both mesh axes).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ssim_jax
from train import config as config_lib
from train import faults as faults_lib
from train import lora as lora_lib
from train import sharding as sharding_lib
from train import velocity as velocity_lib
from jax.sharding import PartitionSpec as P

AXIS = sharding_lib.BATCH_AXES  # ('data', 'fsdp'): every device holds its own examples


class TrainState(NamedTuple):
  """Everything that a checkpoint must hold to resume a stage bit-identically."""
  step: jax.Array  # int32 [], steps attempted (applied + skipped); keys the RNG
  params: Any  # float32 pytree (nnx.State of nnx.Param leaves)
  opt_state: Any  # optax state, float32 / int32 leaves
  skipped: jax.Array  # int32 [], total skipped (non-finite) steps
  consecutive_skips: jax.Array  # int32 [], skipped steps since the last applied one
  # float32 pytree like params (their EMA), or None without EMA (no leaves: the
  # state and its checkpoints are then those of a run before EMA existed).
  ema: Any = None


class Accumulation(NamedTuple):
  """What a loss is told when the step accumulates micro-batches (module doc, 7.)."""
  steps: int  # k micro-batches per update (static)
  context: Any  # `loss_fn.prepare(batch, frozen)` of the device's whole batch, or None


def init_state(params, tx: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
  """A fresh state at step 0; with `ema`, the EMA starts as a copy of the params."""
  @jax.jit  # one compilation instead of one per optimizer-state leaf
  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      consecutive_skips=zero,
                      ema=jax.tree.map(jnp.copy, params) if ema else None)
  return init(params)


def ema_decay_at(decay: float, num_updates, *, warmup: bool) -> jax.Array:
  """The EMA decay of update number `num_updates` (0-based): `min(decay, (1+n)/(10+n))`
  with `warmup` (TensorFlow's ExponentialMovingAverage / diffusers' EMAModel rule: the
  EMA follows the first updates closely instead of averaging in the initial weights),
  else `decay`."""
  decay = jnp.float32(decay)
  if not warmup:
    return decay
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_mesh(devices=None, *, fsdp: int = 1) -> jax.sharding.Mesh:
  """The `('data', 'fsdp')` mesh over `devices` (all by default); see train/sharding.py."""
  return sharding_lib.make_mesh(fsdp=fsdp, devices=devices)


def all_finite(tree) -> jax.Array:
  """bool [] : every element of every floating leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


cast_floating = velocity_lib.cast_floating


def shard_batch(batch, mesh: jax.sharding.Mesh):
  """Per-process numpy batch pytree -> global arrays split over ('data', 'fsdp').

  Each process passes only its own rows; `make_array_from_process_local_data`
  stitches the global batch (this is the multi-host path; one process is the
  special case of it).
  """
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Puts a pytree (frozen params, validation data, gathered params) on every device."""
  return sharding_lib.put(tree, sharding_lib.replicated(mesh))


def place_state(state: TrainState, mesh: jax.sharding.Mesh, *,
                min_shard_size: int = sharding_lib.MIN_SHARD_SIZE) -> TrainState:
  """Puts a train state in its fsdp layout on `mesh` (`sharding.state_shardings`)."""
  return sharding_lib.put(state, sharding_lib.state_shardings(
      state, mesh, min_shard_size=min_shard_size))


def gather_leaf(x, spec: P):
  """Inside shard_map: this device's shard `x` of a leaf laid out as `spec` -> the whole leaf.

  A tiled `all_gather` over 'fsdp' along the split axis; its transpose (the
  gradient) is a `psum_scatter`. Leaves without an fsdp axis pass unchanged.
  """
  if sharding_lib.FSDP not in spec:
    return x
  return jax.lax.all_gather(x, sharding_lib.FSDP, axis=spec.index(sharding_lib.FSDP),
                            tiled=True)


def gather_params(params, specs):
  """Gathers every leaf of `params` except the stacked layers (`sharding.STACKED`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x, s: x if sharding_lib.is_stacked(path) else gather_leaf(x, s),
      params, specs, is_leaf=lambda x: isinstance(x, P))


def block_gatherer(stacked_specs):
  """`gather_block(params)`: one layer's shards -> the layer, for the model's scan body.

  `stacked_specs`: the specs of the stacked `[depth, ...]` leaves; one
  layer's leaf lacks the depth axis, so its split axis is one lower.
  """
  inner = jax.tree.map(lambda s: P(*s[1:]), stacked_specs,
                       is_leaf=lambda x: isinstance(x, P))
  return lambda params: jax.tree.map(gather_leaf, params, inner)


FROZEN_BASE = "base"  # frozen[...]: a LoRA run's frozen base model, in the state's fsdp layout


def frozen_specs(frozen, mesh: jax.sharding.Mesh, *,
                 min_shard_size: int = sharding_lib.MIN_SHARD_SIZE):
  """PartitionSpecs of a step's `frozen` inputs: replicated, but a LoRA base in the fsdp layout.

  `frozen[FROZEN_BASE]` (the frozen model under LoRA adapters, as large as the
  model) is split like a train state (`sharding.state_specs`) and gathered one
  block at a time with the adapters; everything else (VAE params, prompt
  embeddings) is replicated.
  """
  if not isinstance(frozen, dict):
    return jax.tree.map(lambda _: P(), frozen)
  return {k: (sharding_lib.state_specs(v, mesh, min_shard_size=min_shard_size)
              if k == FROZEN_BASE else jax.tree.map(lambda _: P(), v))
          for k, v in frozen.items()}


def model_params(params, frozen):
  """The velocity model's parameters: the trained ones, with a LoRA run's frozen base joined in."""
  if isinstance(frozen, dict) and FROZEN_BASE in frozen:
    return lora_lib.combine(frozen[FROZEN_BASE], params)
  return params


def gather_model(params, frozen, specs, fspecs):
  """Inside shard_map: `(model params, {stack: block gatherer})` from this device's shards.

  `params` (laid out as `specs`) are the trained params, joined with a LoRA
  run's frozen base (`frozen`, laid out as `fspecs`); every leaf but the
  stacked blocks is gathered whole here; each stack's blocks are gathered one
  at a time by its gatherer in the model's scan body ({} without stacks).
  """
  full_specs = model_params(specs, fspecs)
  stacks = [k for k in sharding_lib.STACKED if isinstance(full_specs, dict) and k in full_specs]
  return (gather_params(model_params(params, frozen), full_specs),
          {k: block_gatherer(full_specs[k]) for k in stacks})


LossFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *,
                    make_inputs: Callable | None = None,
                    lr_schedule: Callable | None = None,
                    min_shard_size: int = sharding_lib.MIN_SHARD_SIZE,
                    grad_accum_steps: int = 1,
                    ema_decay: float = 0.0,
                    ema_warmup: bool = True,
                    max_consecutive_skips: int | None = None):
  """Builds the jitted data-parallel / fsdp train step.

  Args:
    loss_fn: `loss_fn(params, batch, frozen) -> (grad_loss, metrics)` run per
      device under shard_map (axes `AXIS`); see the module docstring. When the
      params hold stacked layers (`sharding.STACKED` keys), those arrive as
      this device's shards and the call is `loss_fn(params, batch, frozen,
      gather_block={stack key: fn})`: the loss passes `gather_block` to the
      model, which applies each stack's fn to one layer's params inside that
      stack's scan body.
    tx: the optax optimiser.
    mesh: a `('data', 'fsdp')` mesh (`sharding.make_mesh`).
    make_inputs: optional `make_inputs(batch, key) -> batch` run under jit on the
      GLOBAL batch before shard_map, e.g. to draw noise and t: drawing them
      globally makes them independent of the device count (1 vs 8 devices give
      the same numbers with the partitionable threefry PRNG).
    lr_schedule: optional `schedule(count)` for the `lr` metric.
    min_shard_size: the state layout's threshold (`sharding.state_spec`); the
      state passed in must be placed with the same (`place_state`).
    grad_accum_steps: k micro-batches per update (module doc, 7.); each
      device's batch must divide by k.
    ema_decay: > 0 updates `state.ema` (module doc, 6.); the state must then
      have one (`init_state(..., ema=True)`).
    ema_warmup: the EMA decay warm-up (`ema_decay_at`).
    max_consecutive_skips: a state with that many consecutive skips is
      returned unchanged (halted, module doc 5.); None: never halts.

  Returns:
    `step(state, batch, frozen, key) -> (state, metrics)`, jitted, the state
    donated; `key` is the run's base key, folded with `state.step` so a
    resumed run draws the same numbers. `step.trace_count()` says how many
    times it was traced.
  """
  traces = [0]
  num_devices = mesh.size
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps!r}")
  prepare = getattr(loss_fn, "prepare", None)

  def local_grads(params, batch, frozen, specs, fspecs):
    # `params`: this device's shards, invariant over 'data'. Not pcast to
    # varying: the gradient comes back summed over devices in this layout.
    def loss(p, b, **kw):
      model, gathers = gather_model(p, frozen, specs, fspecs)
      extra = {"gather_block": gathers} if gathers else {}
      return loss_fn(model, b, frozen, **extra, **kw)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if k == 1:
      (grad_loss, metrics), grads = grad_fn(params, batch)
      loss_ok = jnp.isfinite(grad_loss)
    else:
      acc = Accumulation(k, None if prepare is None else prepare(batch, frozen))

      def micro_step(grads, micro_batch):
        (grad_loss, metrics), g = grad_fn(params, micro_batch, accumulation=acc)
        return jax.tree.map(jnp.add, grads, g), (grad_loss, metrics)

      # Micro-batch j: rows [j b/k, (j+1) b/k) of this device's b examples.
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
      grads, (grad_losses, metrics) = jax.lax.scan(
          micro_step, jax.tree.map(jnp.zeros_like, params), micro)
      metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
      loss_ok = jnp.all(jnp.isfinite(grad_losses))
    grads = jax.tree.map(lambda g: g / num_devices, grads)
    local_ok = loss_ok & all_finite(grads)
    ok = jax.lax.pmin(local_ok.astype(jnp.int32), AXIS) > 0
    return ok, grads, metrics

  def step(state: TrainState, batch, frozen, key):
    traces[0] += 1  # Python side effect: runs once per trace, not per call.
    if make_inputs is not None:
      batch = make_inputs(batch, jax.random.fold_in(key, state.step))
      batch = jax.lax.with_sharding_constraint(batch, sharding_lib.batch_sharding(mesh))
    grad_specs = sharding_lib.state_specs(state.params, mesh, min_shard_size=min_shard_size)
    fspecs = frozen_specs(frozen, mesh, min_shard_size=min_shard_size)
    ok, grads, metrics = jax.shard_map(
        lambda p, b, f: local_grads(p, b, f, grad_specs, fspecs), mesh=mesh,
        in_specs=(grad_specs, P(AXIS), fspecs), out_specs=(P(), grad_specs, P()))(
            state.params, batch, frozen)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state.ema
    if ema_decay > 0:
      d = ema_decay_at(ema_decay, state.step - state.skipped, warmup=ema_warmup)
      new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, new_params)
    keep = lambda cond, new, old: jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)
    skip = (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(ok, new_params, state.params),
        opt_state=keep(ok, new_opt, state.opt_state),
        skipped=state.skipped + skip,
        consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1),
        ema=keep(ok, new_ema, state.ema),
    )
    if max_consecutive_skips is not None:  # halted: nothing moves any more
      new_state = keep(state.consecutive_skips >= max_consecutive_skips, state, new_state)
    new_state = jax.lax.with_sharding_constraint(new_state, sharding_lib.state_shardings(
        new_state, mesh, min_shard_size=min_shard_size))
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = skip
    if lr_schedule is not None:
      # The schedule counts applied updates only (skipped steps keep the old count).
      metrics["lr"] = jnp.asarray(lr_schedule(new_state.step - new_state.skipped - 1),
                                  jnp.float32)
    return new_state, metrics

  jitted = jax.jit(step, donate_argnums=0)
  jitted.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
  return jitted


# ----------------------------------------------------------------------------
# Stage losses. Each returns (grad_loss, metrics) per device, see module doc.


def _pmean_metrics(metrics: dict) -> dict:
  return {k: jax.lax.pmean(jnp.asarray(v, jnp.float32), AXIS) for k, v in metrics.items()}


def _share(accumulation: Accumulation | None) -> float:
  """A micro-batch's share of a batch mean: 1/k (1 without accumulation)."""
  return 1.0 if accumulation is None else 1.0 / accumulation.steps


def vae_latent_shape(vae_graphdef, vae_params, vae_rest, image_shape) -> tuple[int, ...]:
  """Latent shape `[B, h, w, c]` of `encode(images)` (abstract evaluation, no FLOPs)."""
  def enc(p, x):
    return nnx.merge(vae_graphdef, p, vae_rest).encode(x)[0]
  out = jax.eval_shape(enc, vae_params, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return tuple(out.shape)


def make_vae_loss(config, vae_graphdef, vae_rest, *, compute_dtype):
  """Stage `vae`: L1 + SSIM (ssim_jax on [0,1]) + KL on the reconstructions.

  Batch: `{'image': [b,H,W,3] in [-1,1], 'eps': [b,h,w,c] N(0,1)}` per device.
  All terms are per-device means over equal-size shards, so pmean of the
  local gradients is the gradient of the global batch mean. A micro-batch
  (`accumulation`) returns them times 1/k: its share of the batch's mean.
  """
  vc = config.vae

  def loss_fn(params, batch, frozen, accumulation=None):
    del frozen
    model = nnx.merge(vae_graphdef, cast_floating(params, compute_dtype), vae_rest)
    x = batch["image"]
    mean, logvar = model.encode(x.astype(compute_dtype))
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * batch["eps"]
    rec = model.decode(z.astype(compute_dtype)).astype(jnp.float32)
    rec = faults_lib.model_fault(rec, batch)  # identity unless config.faults.nan_model_steps
    l1 = jnp.mean(jnp.abs(rec - x))
    if vc.get("ssim_levels", 1) > 1:
      from ssim_jax.ms_ssim import ms_ssim_loss  # pylint: disable=g-import-not-at-top
      ssim_l = ms_ssim_loss((rec + 1) / 2, (x + 1) / 2, data_range=1.0,
                            window_size=config.ssim_window_size, levels=vc.ssim_levels)
    else:
      ssim_l = ssim_jax.ssim_loss((rec + 1) / 2, (x + 1) / 2, data_range=1.0,
                                  window_size=config.ssim_window_size)
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                                axis=(1, 2, 3)))
    total = vc.l1_weight * l1 + vc.ssim_weight * ssim_l + vc.kl_weight * kl
    share = _share(accumulation)
    metrics = _pmean_metrics(dict(l1=l1, ssim=ssim_l, kl=kl, total=total,
                                  l1_weighted=vc.l1_weight * l1,
                                  ssim_weighted=vc.ssim_weight * ssim_l,
                                  kl_weighted=vc.kl_weight * kl))
    return share * total, {k: share * v for k, v in metrics.items()}

  return loss_fn


def make_vae_inputs(latent_shape_per_image):
  """`make_inputs` of the vae stage: the reparameterisation noise, drawn globally."""
  def make_inputs(batch, key):
    b = batch["image"].shape[0]
    eps = jax.random.normal(key, (b,) + tuple(latent_shape_per_image), jnp.float32)
    return dict(batch, eps=eps)
  return make_inputs




def time_shift(t: jax.Array, mu: float | None) -> jax.Array:
  """FLUX's resolution-dependent shift `t -> e^mu t / (e^mu t + 1 - t)` (identity for None).

  The same as diffusers' `time_shift(mu, 1.0, t) = e^mu / (e^mu + 1/t - 1)`,
  written without 1/t so that t = 0 maps to 0. mu > 0 moves times towards 1
  (more noise), as larger images need.
  """
  if mu is None:
    return t
  e = jnp.exp(jnp.asarray(mu, jnp.float32))
  return e * t / (e * t + (1.0 - t))


def shift_mu(config, image_tokens: int) -> float | None:
  """The shift of a run's flow times for images of `image_tokens` tokens (None: `t_shift='none'`).

  diffusers' `calculate_shift`: mu linear in the token count, from
  `base_shift` at `base_image_seq_len` tokens to `max_shift` at
  `max_image_seq_len` (`config.shift`, or the FLUX pipeline's scheduler config).
  """
  if config.get("t_shift", "none") == "none":
    return None
  s = velocity_lib.scheduler_shift(config)
  m = (s["max_shift"] - s["base_shift"]) / (s["max_image_seq_len"] - s["base_image_seq_len"])
  return float(image_tokens * m + s["base_shift"] - m * s["base_image_seq_len"])


def sample_t(key, n: int, *, mean: float = 0.0, std: float = 1.0,
             sampling: str = "logit_normal", mu: float | None = None) -> jax.Array:
  """Training flow times `[n]` in (0, 1).

  `sampling`: "logit_normal" (`sigmoid(N(mean, std))`) or "uniform"; then
  `time_shift(., mu)` (diffusers' FLUX fine-tuning scripts draw the same
  densities, `weighting_scheme` 'logit_normal' / 'none').
  """
  if sampling == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))
  elif sampling == "uniform":
    t = jax.random.uniform(key, (n,), jnp.float32)
  else:
    raise ValueError(f"t_sampling: must be one of {config_lib.T_SAMPLINGS}, got {sampling!r}")
  return time_shift(t, mu)


def sample_times(config, num_steps: int, image_tokens: int) -> np.ndarray:
  """The sampler's time grid `[num_steps + 1]` from 1 to 0: uniform, then `time_shift`.

  FLUX's pipelines: `sigmas = linspace(1, 1/n, n)` shifted by `mu`
  (`calculate_shift` of the image's token count), then 0.
  """
  grid = np.linspace(1.0, 0.0, num_steps + 1)
  mu = shift_mu(config, image_tokens)
  if mu is None:
    return grid.astype(np.float32)
  return (np.exp(mu) * grid / (np.exp(mu) * grid + (1.0 - grid))).astype(np.float32)


def make_flow_inputs(config, latent_shape_per_image, *, image_tokens: int):
  """`make_inputs` of the flow stage: noise `[B,h,w,c]` and t `[B]`, drawn globally.

  `image_tokens`: tokens of one image for the time shift (`VelocityModel.image_tokens`).
  """
  mu = shift_mu(config, image_tokens)

  def make_inputs(batch, key):
    b = batch["highres"].shape[0]
    kn, kt = jax.random.split(key)
    noise = jax.random.normal(kn, (b,) + tuple(latent_shape_per_image), jnp.float32)
    t = sample_t(kt, b, mean=config.t_logit_mean, std=config.t_logit_std,
                 sampling=config.get("t_sampling", "logit_normal"), mu=mu)
    return dict(batch, noise=noise, t=t)
  return make_inputs


def encode_latents(vae, images, *, compute_dtype):
  """Frozen-VAE latents of `images` [-1,1]: the posterior mean, scaled and shifted."""
  mean, _ = vae.encode(images.astype(compute_dtype))
  z = (mean.astype(jnp.float32) - vae.shift_factor) * vae.scaling_factor
  return jax.lax.stop_gradient(z)


def decode_latents(vae, z, *, compute_dtype):
  """Inverse of `encode_latents`'s scaling, then decode -> images [-1,1] float32."""
  z = z / vae.scaling_factor + vae.shift_factor
  return vae.decode(z.astype(compute_dtype)).astype(jnp.float32)


def make_flow_loss(config, model: velocity_lib.VelocityModel, model_graphdef, vae_graphdef,
                   vae_rest, *, compute_dtype, vae_dtype=None):
  """Stage `flow`: mse on the velocity + weighted pixel + SSIM via `decoded_losses`.

  Batch per device: `{'lowres', 'highres', 'noise', 't'}`; `frozen` =
  `{'vae': VAE params, 'model': the model's fixed inputs}` (jit ARGUMENTS,
  not closed-over constants). The velocity model (`train/velocity.py`: the
  DiT or FLUX) is called through its interface: condition, then velocity.
  The pixel and SSIM terms come out of `flow.decoded_losses(...,
  axis_name=AXIS)` normalised by the GLOBAL weight mass (psum over devices)
  and are device-invariant; adding them to the varying local mse inserts an
  implicit pvary whose transpose is a psum, so each device's local gradient
  carries n times its share and `pmean` of the local gradients is exactly the
  global gradient (checked numerically; the 1-vs-8-device test pins it).

  `vae_dtype` (default `compute_dtype`) is the frozen VAE's dtype: a pretrained
  VAE runs in the dtype it was loaded in (float32 when it asks for
  `force_upcast`), whatever the velocity model computes in.

  Micro-batches (`accumulation`, train_step's module doc 7.): `loss_fn.prepare`
  computes the decoded losses' masses of the device's whole batch (psum-ed
  over devices: the whole global batch), and each micro-batch divides by them
  (`decoded_losses(masses=)`), so its pixel and SSIM terms are its shares of
  the batch's, never normalised by its own weight mass; the mse is a mean,
  shared as 1/k.
  """
  from ssim_jax import flow  # pylint: disable=g-import-not-at-top
  mse_w = float(config.mse_loss_weight)
  pix_w = float(config.pixel_loss_weight)
  ssim_w = float(config.ssim_loss_weight)
  decode = pix_w > 0 or ssim_w > 0
  vae_dtype = compute_dtype if vae_dtype is None else vae_dtype

  def prepare(batch, frozen):
    """The decoded losses' masses of the device's whole batch, psum-ed over devices."""
    del frozen
    return flow.decoded_masses(
        batch["highres"], flow.timestep_weight(batch["t"], max_t=config.ssim_loss_max_t),
        axis_name=AXIS, window_size=config.ssim_window_size,
        ms_ssim_levels=config.get("ssim_loss_levels", 1))

  def loss_fn(params, batch, frozen, gather_block=None, accumulation=None):
    vae = nnx.merge(vae_graphdef, cast_floating(frozen["vae"], vae_dtype), vae_rest)
    encode = lambda x: encode_latents(vae, x, compute_dtype=vae_dtype)
    images = batch["highres"]
    z0 = encode(images)
    noise, t = batch["noise"], batch["t"]
    x_t = flow.interpolate(z0, noise, t)
    v = flow.velocity_target(z0, noise)
    cond = model.condition(frozen["model"], batch["lowres"], encode, images.shape[1:3])
    v_pred = model.velocity(model_graphdef, params, x_t, t, cond, compute_dtype=compute_dtype,
                            prepare_block=gather_block)
    v_pred = faults_lib.model_fault(v_pred, batch)  # identity unless config.faults.nan_model_steps
    share = _share(accumulation)
    mse = share * jnp.mean(jnp.square(v_pred - v))
    metrics = dict(mse=mse, mse_weighted=mse_w * mse)
    grad_loss = mse_w * mse
    if decode:
      z0_pred = flow.reconstruct_z0(x_t, v_pred, t)
      weights = flow.timestep_weight(t, max_t=config.ssim_loss_max_t)
      out = flow.decoded_losses(
          z0_pred, images, weights,
          lambda z: decode_latents(vae, z, compute_dtype=vae_dtype),
          chunk_size=config.chunk_size, pixel_loss=config.pixel_loss_type,
          axis_name=AXIS, window_size=config.ssim_window_size,
          ms_ssim_levels=config.get("ssim_loss_levels", 1),
          masses=None if accumulation is None else accumulation.context)
      # A micro-batch's share of 1 - S / M is 1/k - S_j / M (its ssim is 1 - S_j / M).
      ssim_l = out.ssim if accumulation is None else out.ssim - 1.0 + share
      pixel_l, mass = out.pixel, out.weight_mass
      grad_loss = grad_loss + pix_w * pixel_l + ssim_w * ssim_l
      glob = dict(pixel=pixel_l, pixel_weighted=pix_w * pixel_l, ssim=ssim_l,
                  ssim_weighted=ssim_w * ssim_l, weight_mass=mass)
    else:
      glob = {}
    metrics = _pmean_metrics(metrics)
    # Already global (psum-normalised) values: reported as they are.
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in glob.items()})
    metrics["total"] = (metrics["mse_weighted"] + metrics.get("pixel_weighted", 0.0)
                        + metrics.get("ssim_weighted", 0.0))
    return grad_loss, metrics

  if decode:
    loss_fn.prepare = prepare  # type: ignore[attr-defined]
  return loss_fn
