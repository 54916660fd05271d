"""The training loop: validate -> workdir -> data -> models -> restore -> train -> evaluate.

`train_and_evaluate(config, workdir)` runs both stages and returns the final
validation results; it is what `python -m train` calls and what a notebook
imports. It resumes automatically from `workdir`: a finished `vae` stage is
restored and skipped, an interrupted stage continues from its last intact
checkpoint with the same data and random numbers (bit-identical on CPU).

Workdir layout:
  vae/   flow/   orbax checkpoints of each stage (TrainState)
  logs/          TensorBoard event files (process 0 only)
  eval/          PNG grids lowres | bicubic | model | target | SSIM map; NAME.npz: every
                 held-out prediction (pred, lowres, highres)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import evaluate as eval_lib
from train import export as export_lib
from train import faults as faults_lib
from train import input_pipeline
from train import lora as lora_lib
from train import memory as memory_lib
from train import pretrained as pretrained_lib
from train import sharding as sharding_lib
from train import step as step_lib
from train import throughput as throughput_lib
from train import velocity as velocity_lib
from train import writer as writer_lib
from train.models import vae as vae_lib

STAGES = ("vae", "flow")


class TooManySkipsError(RuntimeError):
  """The run stopped after `config.max_consecutive_skips` non-finite steps in a row."""


split_model = velocity_lib.split_model

# The device-to-host transfer guard of the steps between the loop's sync points
# (`_run_stage`): None leaves JAX's setting alone; "disallow" makes any read of a
# device value there an error ("log": a log line), which checks that the host
# never waits for the device between logging steps (tests/train/test_loop.py).
STEP_TRANSFER_GUARD: str | None = None


def global_batch_size(config) -> int:
  """Images per optimizer step over all processes: `batch_size * grad_accum_steps`."""
  return config.batch_size * config.grad_accum_steps




def make_optimizer(config, stage_config, num_steps: int):
  """AdamW with linear warmup then cosine|constant, global-norm clipping."""
  lr, warmup = float(stage_config.learning_rate), int(stage_config.warmup_steps)
  if config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1), end_value=0.1 * lr)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
        [warmup])
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
  return optax.chain(*parts), schedule


def _load_pretrained_vae(config, dtype):
  """`(graphdef, params, rest)` of `config.vae.pretrained` (None when it is '')."""
  if not config.vae.pretrained:
    return None
  return split_model(vae_lib.from_diffusers(config.vae.pretrained, dtype=dtype))


def build_models(config, *, vae_dtype=jnp.float32, abstract: bool = False, mesh=None,
                 velocity: velocity_lib.VelocityModel | None = None):
  """`((vae graphdef, params, rest), (model graphdef, params, rest))`, from config.seed.

  With `config.vae.pretrained` the VAE is loaded from that diffusers folder
  in `vae_dtype` (float32 if it asks for `force_upcast`) instead. The
  velocity model is `config.model`'s (train/velocity.py), initialised or
  loaded pretrained (into `mesh`'s fsdp layout, when given). `abstract`:
  initialised params as `jax.ShapeDtypeStruct`s (loaded ones stay arrays).
  `velocity`: `config`'s velocity model, when the caller has it already.
  """
  vae = _load_pretrained_vae(config, vae_dtype) or velocity_lib.init_split(lambda: vae_lib.VAE(
      channels=tuple(config.vae.channels), latent_channels=config.vae.latent_channels,
      layers_per_block=config.vae.layers_per_block, norm_groups=config.vae.norm_groups,
      mid_attention=config.vae.mid_attention, rngs=nnx.Rngs(config.seed)), abstract=abstract)
  velocity = velocity_lib.for_config(config) if velocity is None else velocity
  model = velocity.build(mesh=mesh, abstract=abstract)
  return vae, model


class Programs(NamedTuple):
  """Models, optimisers and jitted programs of one (config, mesh): built once per process."""
  vae: tuple  # (graphdef, initial params, rest)
  model: tuple  # the velocity model's (graphdef, initial trained params, rest)
  velocity: velocity_lib.VelocityModel  # config.model's interface
  model_inputs: dict  # its fixed inputs (`VelocityModel.frozen_inputs`), host arrays
  # LoRA (lora.rank > 0): the frozen base model in the compute dtype and the
  # state's fsdp layout (`model[1]` is then the adapters only); None otherwise.
  base: Any
  latent_shape: tuple  # (h, w, c) of one image's latent
  vae_tx: Any
  # The step-0 TrainStates' shapes (ShapeDtypeStructs): `initial_state` makes
  # one when a stage starts, so a run does not keep a second copy of the
  # trained params and their optimizer state beside the ones it trains.
  vae_state0: Any
  flow_state0: Any
  vae_schedule: Any
  vae_step: Any
  flow_tx: Any
  flow_schedule: Any
  flow_step: Any
  sampler: Any
  recon: Any

  def initial_state(self, stage: str):
    """A fresh step-0 TrainState of `stage` ('vae' or 'flow'), where its params are."""
    if stage == "vae":
      return step_lib.init_state(self.vae[1], self.vae_tx)
    return step_lib.init_state(self.model[1], self.flow_tx, ema=self.flow_state0.ema is not None)


_PROGRAMS: dict = {}


def _split_lora(model, velocity, mesh, *, compute_dtype, min_shard_size):
  """`((graphdef, trained params, rest), frozen base or None)` of the built model.

  With LoRA the trained params are the adapters; the base is cast to the
  compute dtype and placed in the fsdp layout (a loaded FLUX is already there:
  not copied). Abstract (ShapeDtypeStruct) trees get those dtypes and shardings.
  """
  if not velocity.lora_rank:
    return model, None
  graphdef, full, rest = model
  base, adapters = lora_lib.split(full)
  shardings = sharding_lib.state_shardings(base, mesh, min_shard_size=min_shard_size)

  def place(x, s):
    dtype = compute_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=s)
    x = x.astype(dtype) if x.dtype != dtype else x
    return x if getattr(x, "sharding", None) == s else jax.device_put(x, s)

  return (graphdef, adapters, rest), jax.tree.map(place, base, shardings)


def frozen_inputs(progs: "Programs", vae_params, mesh, *, min_shard_size: int,
                  abstract: bool = False) -> dict:
  """The flow step's and sampler's `frozen`: VAE params, the model's fixed inputs, a LoRA base.

  Laid out as `step.frozen_specs` says (the base in the fsdp layout, the rest
  replicated); `abstract`: as `jax.ShapeDtypeStruct`s with those shardings.
  """
  tree = {"vae": vae_params, "model": progs.model_inputs}
  if progs.base is not None:
    tree[step_lib.FROZEN_BASE] = progs.base
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                           step_lib.frozen_specs(tree, mesh, min_shard_size=min_shard_size),
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  if abstract:
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh),
                        tree, shardings)
  # The base is placed already (`_split_lora`): never copied.
  return {k: v if k == step_lib.FROZEN_BASE else sharding_lib.put(v, shardings[k])
          for k, v in tree.items()}


def build_programs(config, mesh, *, abstract: bool = False) -> Programs:
  """Builds (or returns the cached) models and jitted programs for `config` on `mesh`.

  The cache key is the config JSON and the mesh, so calling
  `train_and_evaluate` again in the same process (a notebook, a resume test)
  reuses the compiled steps instead of tracing and compiling them again.
  `abstract`: initial params and states are `jax.ShapeDtypeStruct`s, for
  lowering and compiling the steps without allocating them (`memory_plans`).
  """
  velocity = velocity_lib.for_config(config)
  weights = [vae_lib.locate_diffusers(config.vae.pretrained).weights] if config.vae.pretrained else []
  weights += velocity.pretrained_files()
  cache_key = (config.to_json_best_effort(sort_keys=True), abstract, tuple(mesh.shape.items()),
               tuple(d.id for d in mesh.devices.flat),
               tuple((os.stat(w).st_mtime_ns, os.stat(w).st_size) for w in weights))
  if cache_key in _PROGRAMS:
    return _PROGRAMS[cache_key]
  compute_dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  vae, model = build_models(config, vae_dtype=compute_dtype, abstract=abstract, mesh=mesh,
                            velocity=velocity)
  model, base = _split_lora(model, velocity, mesh, compute_dtype=compute_dtype,
                            min_shard_size=config.mesh.min_shard_size)
  vae_graphdef, vae_params, vae_rest = vae
  # A trained VAE computes in compute_dtype; a pretrained one in its own dtype.
  vae_dtype = nnx.merge(vae_graphdef, vae_params, vae_rest).dtype or compute_dtype
  hr_shape = (config.batch_size, config.data.hr_size, config.data.hr_size, 3)
  latent_shape = step_lib.vae_latent_shape(vae_graphdef, vae_params, vae_rest, hr_shape)[1:]
  vae_tx, vae_schedule = make_optimizer(config, config.vae, config.vae.steps)
  if config.vae.pretrained:
    vae_tx = optax.set_to_zero()  # frozen: no optimizer state (its stage has 0 steps)
  common = dict(min_shard_size=config.mesh.min_shard_size,
                grad_accum_steps=config.grad_accum_steps,
                max_consecutive_skips=config.max_consecutive_skips)
  vae_step = step_lib.make_train_step(
      step_lib.make_vae_loss(config, vae_graphdef, vae_rest, compute_dtype=compute_dtype),
      vae_tx, mesh, make_inputs=step_lib.make_vae_inputs(latent_shape),
      lr_schedule=vae_schedule, **common)
  flow_tx, flow_schedule = make_optimizer(config, config.flow, config.flow.steps)
  # The EMA is of the flow stage's trainable params (the velocity model) only.
  flow_step = step_lib.make_train_step(
      step_lib.make_flow_loss(config, velocity, model[0], vae_graphdef, vae_rest,
                              compute_dtype=compute_dtype, vae_dtype=vae_dtype),
      flow_tx, mesh, make_inputs=step_lib.make_flow_inputs(
          config, latent_shape, image_tokens=velocity.image_tokens(latent_shape)),
      lr_schedule=flow_schedule, ema_decay=config.ema.decay, ema_warmup=config.ema.warmup,
      **common)
  init_state = lambda p, tx, **kw: jax.eval_shape(lambda q: step_lib.init_state(q, tx, **kw), p)
  programs = Programs(
      vae=vae, model=model, velocity=velocity, model_inputs=velocity.frozen_inputs(), base=base,
      latent_shape=latent_shape, vae_tx=vae_tx, vae_schedule=vae_schedule,
      vae_state0=init_state(vae_params, vae_tx),
      flow_state0=init_state(model[1], flow_tx, ema=config.ema.decay > 0),
      vae_step=vae_step, flow_tx=flow_tx, flow_schedule=flow_schedule, flow_step=flow_step,
      sampler=make_sampler(config, velocity, model[0], vae_graphdef, vae_rest, latent_shape,
                           compute_dtype=compute_dtype, vae_dtype=vae_dtype, mesh=mesh),
      recon=make_recon(config, vae_graphdef, vae_rest, compute_dtype=vae_dtype))
  _PROGRAMS.clear()  # keep one: programs hold compiled executables
  _PROGRAMS[cache_key] = programs
  return programs


def _say(msg: str) -> None:
  """One console line (process 0), beside the progress bars; also logged."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def _placed_shapes(state, mesh, *, min_shard_size: int):
  """ShapeDtypeStructs of `state` (arrays or shapes) with the shardings `place_state` gives it."""
  shardings = sharding_lib.state_shardings(state, mesh, min_shard_size=min_shard_size)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      state, shardings)


def _memory_plan(name: str, train_step, state, batch, frozen, key, *,
                 flops: bool = False) -> float | None:
  """Compiles the step (the first call reuses it), logs the plan, checks the fit.

  Returns one device's FLOPs of the step (`memory.step_flops`) when `flops`.
  """
  plan = _plan_step(name, train_step, state, batch, frozen, key,
                    num_devices=jax.device_count() if flops else 0)
  limit = memory_lib.device_limit()
  _say(plan.line(name=f"stage {name}", limit=limit))
  memory_lib.check_fit(plan, limit=limit, name=f"stage {name}",
                       note=memory_lib.limit_note(jax.local_devices()[0]))
  return plan.flops if flops else None


def _plan_step(name: str, train_step, state, batch, frozen, key, *, num_devices: int,
               compiler_options: dict | None = None) -> memory_lib.MemoryPlan:
  """Traces and compiles `train_step` for its arguments (arrays or ShapeDtypeStructs): its plan.

  The FLOPs per device are counted over `num_devices` (0: not counted); a LoRA
  base in `frozen` is counted as the frozen parameters.
  """
  traced = train_step.trace(state, batch, frozen, key)
  return memory_lib.plan(
      memory_lib.compile_step(traced.lower(), name=f"stage {name}",
                              compiler_options=compiler_options),
      state, flops=(memory_lib.step_flops(traced.jaxpr, num_devices=num_devices)
                    if num_devices else 0.0),
      frozen=frozen.get(step_lib.FROZEN_BASE) if isinstance(frozen, dict) else None)


def memory_plans(config, devices=None, *,
                 stages=STAGES) -> dict[str, memory_lib.MemoryPlan]:
  """`{stage: MemoryPlan}` of `config`'s train steps, from shapes only (nothing trained).

  Lowers and compiles the step of each of `stages` on abstract state, batch
  and frozen params laid out as a run lays them out (`scripts/memory_plan.py`);
  a pretrained VAE is still read. Stages that a run would skip are left out.
  `devices` may be a compile-only topology's (`memory.topology_devices`:
  TPU slices, H100 hosts; `scripts/memory_plan.py --topology`): the steps
  are compiled for those chips without them. Each plan carries the step's
  matmul FLOPs per device (`memory.step_flops`).

  Raises:
    memory.MemoryPlanError: the compiler ran out of the devices' memory.
  """
  devices = jax.devices() if devices is None else list(devices)
  config = config_lib.resolve(config)
  config_lib.validate(config, num_devices=len(devices))
  mesh = step_lib.make_mesh(devices, fsdp=config.mesh.fsdp)
  progs = build_programs(config, mesh, abstract=True)
  b, hr = global_batch_size(config), config.data.hr_size
  lr = hr // config.data.scale
  image = lambda size: jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32,
                                            sharding=sharding_lib.batch_sharding(mesh))
  rep = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=sharding_lib.replicated(mesh)), tree)
  key = rep(jax.random.PRNGKey(0))
  programs = {"vae": (progs.vae_step, progs.vae_state0, {"image": image(hr)}, {}),
              "flow": (progs.flow_step, progs.flow_state0,
                       {"lowres": image(lr), "highres": image(hr)},
                       frozen_inputs(progs, progs.vae[1], mesh, abstract=True,
                                     min_shard_size=config.mesh.min_shard_size))}
  plans = {}
  for name in stages:
    train_step, state0, batch, frozen = programs[name]
    if name == "vae" and (config.vae.pretrained or not config.vae.steps):
      continue
    if name == "flow" and not config.flow.steps:
      continue
    state = _placed_shapes(state0, mesh, min_shard_size=config.mesh.min_shard_size)
    plans[name] = _plan_step(name, train_step, state, batch, frozen, key,
                             num_devices=len(devices),
                             compiler_options=memory_lib.compiler_options(devices))
  return plans


def _run_stage(name: str, config, *, state, train_step, make_batch, frozen, key,
               stop: int, total: int, checkpointer, writer, datasets, mesh,
               meter: throughput_lib.Meter, plan_memory: bool = True,
               profiler: throughput_lib.Profiler | None = None):
  """Trains one stage from `state.step` up to step `stop` (<= `total`).

  The host never waits for the device between its sync points: it dispatches
  step N+1 while step N runs, and reads device values only at the first step
  (compiled, timed from there), logging steps (every `config.log_every`, and
  `total`), checkpoint steps, preemption agreement steps (several processes,
  `config.preemption_check_every`) and `stop`. There it reads the skip
  counters: the step halts a state that hit `config.max_consecutive_skips`
  (train/step.py), so the limit is exact, the error names the step that hit it
  and no checkpoint is written past it.

  With `plan_memory` the step is compiled before the first step and its
  memory plan logged and checked (`_memory_plan`); `meter` gets its FLOPs
  there and times the logging intervals.

  Returns `(state, preempted)`; on preemption (SIGTERM on any process) the
  state is checkpointed before returning. Raises `TooManySkipsError` after
  `config.max_consecutive_skips` skipped steps in a row.
  """
  start = int(state.step)
  if start >= stop:
    return state, False
  bar = None
  it = _train_iter(datasets, checkpointer, start)
  raw_step = train_step
  train_step = faults_lib.wrap_train_step(  # the identity unless config.faults is set
      train_step, config, stage=name, workdir=os.path.dirname(checkpointer.directory))
  guard = lambda sync: (jax.transfer_guard_device_to_host(STEP_TRANSFER_GUARD)
                        if STEP_TRANSFER_GUARD and not sync else contextlib.nullcontext())
  timed_from = start + 1
  preempted = False
  try:
    for step in range(start, stop):
      done = step + 1
      logs = done % config.log_every == 0 or done == total
      sync = (done == start + 1 or logs or done == stop or checkpointer.saves_at(done)
              or checkpointer.agrees_at(done))
      with guard(sync):
        batch = step_lib.shard_batch(make_batch(next(it)), mesh)
        if plan_memory and step == start:
          meter.flops = _memory_plan(name, raw_step, state, batch, frozen, key,
                                     flops=meter.peak is not None) or meter.flops
        if step == start and jax.process_index() == 0 and config.progress_bar:
          from tqdm import tqdm  # after the memory plan's line, so that it is not cut by the bar
          bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        if profiler is not None:
          profiler.before(done)
        state, metrics = train_step(state, batch, frozen, key)
        if profiler is not None:
          profiler.after(done, state)
        if bar is not None:
          bar.update(1)
        preempted = checkpointer.preemption_requested(done)  # a host sync only if sync
      if not (sync or preempted):
        continue
      # -- a sync point: the host waits for the step here -----------------------------
      if done == start + 1:  # compiled and run: time the steps from here
        jax.block_until_ready(state)
        meter.start()
        timed_from = done
      consec = int(state.consecutive_skips)
      if consec >= config.max_consecutive_skips:
        raise TooManySkipsError(
            f"stage {name}: {consec} consecutive steps had a non-finite loss or gradient "
            f"(last at step {int(state.step)}, {int(state.skipped)} skipped in total); "
            f"stopping (config.max_consecutive_skips={config.max_consecutive_skips}). "
            "Parameters were never updated with non-finite values; the last checkpoint "
            "is intact.")
      if logs:
        scalars = {f"{name}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        scalars[f"{name}/skipped_total"] = float(state.skipped)
        scalars.update({f"{name}/{k}": v
                        for k, v in meter.interval(done - timed_from).items()})
        timed_from = done
        writer.write_scalars(done, scalars)
        if bar is not None:
          bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in scalars.items()
                           if k.split("/")[1] in ("total", "mse", "ssim", "l1", "skipped_total")})
      checkpointer.save(done, state, force=(done == total or preempted), data_iterator=it)
      if preempted:
        logging.warning("stage %s: preemption requested; checkpoint saved at step %d",
                        name, done)
        break
  finally:
    if profiler is not None:
      profiler.close()
    checkpointer.wait()
    if bar is not None:
      bar.close()
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return state, preempted


def _train_iter(datasets, checkpointer, step: int):
  """The input iterator at `step`: with the state saved in checkpoint `step`, if it has one.

  Without one (a checkpoint of an older version, another process count) the
  iterator is positioned by step, which gives the same batches.
  """
  it = datasets.train_iter(step)
  try:
    if not checkpointer.restore_data(step, it):
      return it
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("checkpoint step %d: input iterator state not restored (%s: %s); "
                    "positioned by step instead", step, type(e).__name__, e)
    it.close()
    return datasets.train_iter(step)
  if it.step != step:
    raise RuntimeError(f"checkpoint step {step} in {checkpointer.directory}: its input "
                       f"iterator state is at step {it.step}")
  return it


def _restore(checkpointer, shapes, init):
  """The newest intact checkpoint of `checkpointer` as a state like `shapes`, else `init()`.

  `shapes`: the placed state's ShapeDtypeStructs (`_placed_shapes`), which
  orbax restores onto; `init()` makes a fresh placed state, only when there
  is no checkpoint (a resume never builds one to throw away). A state with an
  EMA restores a checkpoint written without one (EMA off then, or a version
  before it): its EMA starts from the restored params, with a warning. The
  reverse (EMA turned off) is a changed state: an error.
  """
  try:
    restored, _ = checkpointer.restore_latest(shapes)
  except ckpt_lib.StructureMismatchError:
    if shapes.ema is None:
      raise
    restored, step = checkpointer.restore_latest(shapes._replace(ema=None))
    if restored is None:
      raise
    logging.warning("%s: checkpoint step %d has no EMA (config.ema.decay was 0 when it was "
                    "written); the EMA starts from its params", checkpointer.directory, step)
    restored = restored._replace(ema=sharding_lib.put(
        restored.params, jax.tree.map(lambda x: x.sharding, restored.params)))
  return init() if restored is None else restored


def train_and_evaluate(config, workdir: str, *, devices=None,
                       stop_after: Mapping[str, int] | None = None,
                       profile_steps: tuple[int, int] | None = None) -> dict[str, Any]:
  """Trains the `vae` then the `flow` stage and evaluates on the validation crops.

  Args:
    config: a config from `configs/*.py`.
    workdir: output directory; an existing run there is resumed.
    devices: devices of the data mesh (all by default; tests pass one device).
    stop_after: `{stage: step}`: stop (saving a checkpoint, as on preemption)
      when that stage reaches that step; for the resumption tests.
    profile_steps: `(first, last)`: a `jax.profiler` trace of those steps
      (1-based, inclusive) of the flow stage (of the vae stage when
      `flow.steps` is 0) in `WORKDIR/profile` (`python -m train --profile_steps`).

  Returns:
    dict with `'flow'`: metrics of the final model vs bicubic (from
    `evaluate.evaluate_sr`), `'vae'`: reconstruction PSNR/SSIM,
    `'preempted'`: whether the run stopped early, `'skipped'`: skipped steps
    per stage, `'params'`: final `{'vae', 'model'}` params (`'model'`: the
    velocity model's, `config.model`; its EMA with `config.ema.use_for_eval`:
    what was evaluated and exported), `'grid'`: PNG path.
  """
  # 1. Decide and validate before anything is built or compiled.
  devices = jax.devices() if devices is None else list(devices)
  config = config_lib.resolve(config)
  config_lib.validate(config, num_devices=len(devices))
  mesh = step_lib.make_mesh(devices, fsdp=config.mesh.fsdp)
  def restore_or_init(checkpointer, stage: str):
    """The stage's newest checkpoint, else a fresh state; params and optimizer state over fsdp."""
    return _restore(checkpointer, _placed_shapes(getattr(progs, f"{stage}_state0"), mesh,
                                                 min_shard_size=config.mesh.min_shard_size),
                    lambda: step_lib.place_state(progs.initial_state(stage), mesh,
                                                 min_shard_size=config.mesh.min_shard_size))
  ckpt_lib.check_workdir(workdir)
  is_main = jax.process_index() == 0
  # Pretrained VAE and velocity model: provenance (paths, sha256) checked
  # against the workdir's record (a resume on other weights fails), recorded.
  pretrained_lib.check_and_record(
      workdir, pretrained_lib.describe(config.vae.pretrained) if config.vae.pretrained else None,
      write=is_main)
  pretrained_lib.check_and_record(
      workdir, velocity_lib.for_config(config).describe_pretrained(), write=is_main,
      kind="model")
  stop_after = dict(stop_after or {})
  stop_at = lambda stage, total: min(total, stop_after.get(stage, total))
  profiler = None
  if profile_steps is not None:
    profiler = throughput_lib.Profiler(*profile_steps, os.path.join(workdir, "profile"))
  profiled = "flow" if config.flow.steps else "vae"
  peak = memory_lib.peak_flops_per_second(devices[0])

  # 2. Data: each process builds only its rows of the global batch.
  nproc = jax.process_count()
  datasets = input_pipeline.make_datasets(config.data,
                                          batch_size_per_process=global_batch_size(config) // nproc,
                                          seed=config.seed, process_index=jax.process_index(),
                                          process_count=nproc)
  val = datasets.val
  writer = writer_lib.MetricWriter(os.path.join(workdir, "logs"), enabled=is_main)
  key = jax.random.PRNGKey(config.seed)
  results: dict[str, Any] = {"preempted": False, "skipped": {}}

  # 3. Models and jitted programs (deterministic from the seed; cached per config).
  progs = build_programs(config, mesh)
  vae_graphdef, vae_params, vae_rest = progs.vae

  try:
    # 4. Stage vae: restore (a finished stage is restored and skipped), train.
    #    A pretrained VAE has no vae stage (0 steps): its loaded params go on frozen.
    total = 0 if config.vae.pretrained else config.vae.steps
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "vae"),
                                         max_to_keep=config.ckpt_max_to_keep,
                                         save_interval_steps=config.ckpt_every,
                                         preemption_check_every=config.preemption_check_every)
    state = restore_or_init(checkpointer, "vae")
    t_stage = time.perf_counter()
    if total:
      _say(f"stage vae: {total} steps" + (f", resuming at step {int(state.step)}"
                                          if int(state.step) else ""))
    state, preempted = _run_stage(
        "vae", config, state=state, train_step=progs.vae_step,
        make_batch=lambda b: {"image": b.highres}, frozen={}, key=jax.random.fold_in(key, 1),
        stop=stop_at("vae", total), total=total, checkpointer=checkpointer, writer=writer,
        datasets=datasets, mesh=mesh,
        meter=throughput_lib.Meter(images_per_step=global_batch_size(config), peak=peak),
        profiler=profiler if profiled == "vae" else None)
    if int(state.step) < total:
      checkpointer.save(int(state.step), state, force=True)
      preempted = True
    checkpointer.close()
    results["skipped"]["vae"] = int(state.skipped)
    vae_params = step_lib.replicate(state.params, mesh)  # gathered: frozen, exported
    if preempted:
      results["preempted"] = True
      return results
    recon = np.asarray(progs.recon(vae_params, step_lib.replicate(np.asarray(val.highres), mesh)))
    per_crop = {"vae reconstruction": eval_lib.image_metrics(recon, val.highres)}
    psnr, ssim = (float(np.mean(per_crop["vae reconstruction"][m])) for m in ("psnr", "ssim"))
    results["vae"] = {"psnr": psnr, "ssim": ssim}
    writer.write_scalars(total, {f"vae_eval/{k}": v for k, v in results["vae"].items()})
    _say(f"stage vae: {'pretrained ' + config.vae.pretrained if config.vae.pretrained else 'done'}"
         f", held-out reconstruction PSNR {psnr:.2f} dB, SSIM {ssim:.4f} "
         f"({time.perf_counter() - t_stage:.0f} s)")
    if is_main and not config.vae.pretrained:
      with datasets.train_iter(0) as it:
        crops = [next(it).highres for _ in range(
            -(-export_lib.LATENT_STAT_IMAGES // (global_batch_size(config) // nproc)))]
      try:
        folder = export_lib.export_vae(
            nnx.merge(vae_graphdef, jax.device_get(vae_params), vae_rest), crops, workdir)
        _say(f"stage vae: exported to {folder}")
      except ValueError as e:  # an architecture diffusers cannot express: keep training
        logging.warning("stage vae: not exported as a diffusers folder: %s", e)
    if config.flow.steps == 0:  # an autoencoder-only run (configs/vae_retina.py)
      results["params"] = {"vae": vae_params}
      if is_main:
        _write_results(workdir, {"vae reconstruction": {
            **results["vae"], "ms_ssim": float(np.mean(per_crop["vae reconstruction"]["ms_ssim"]))}},
            per_crop, len(val.highres), results["skipped"])
      return results

    # 5. Stage flow: the velocity model with the frozen VAE and the model's
    #    fixed inputs (jit arguments, never closed-over constants).
    total = config.flow.steps
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "flow"),
                                         max_to_keep=config.ckpt_max_to_keep,
                                         save_interval_steps=config.ckpt_every,
                                         preemption_check_every=config.preemption_check_every)
    state = restore_or_init(checkpointer, "flow")
    t_stage = time.perf_counter()
    base = _pretrained_model(config)
    _say(f"stage flow: {total} steps, {progs.velocity.name} "
         + (f"fine-tuning {base}" if base else "from scratch")
         + (f", resuming at step {int(state.step)}" if int(state.step) else ""))
    frozen = frozen_inputs(progs, vae_params, mesh, min_shard_size=config.mesh.min_shard_size)
    val_lowres = step_lib.replicate(np.asarray(val.lowres), mesh)

    def evaluate(model_params, step: int, name: str | None):
      """Metrics vs bicubic; logged and drawn to eval/<name> unless name is None."""
      pred = np.asarray(progs.sampler(model_params, frozen, val_lowres,
                                      jax.random.fold_in(key, 3)))
      per_image = eval_lib.evaluate_sr_per_image(pred, val.lowres, val.highres,
                                                 scale=config.data.scale)
      metrics = eval_lib.mean_metrics(per_image)
      if name is None:
        per_crop["base"] = per_image["model"]
      else:
        per_crop.update(per_image)
      # metrics = {"bicubic": {"psnr", "ssim", "ms_ssim"}, "model": {...}}
      if name is None:
        return metrics
      writer.write_scalars(step, {f"flow_eval/{method}_{k}": float(v)
                                  for method, row in metrics.items() for k, v in row.items()})
      if is_main:
        n = config.eval_num_images
        bicubic = np.asarray(eval_lib.bicubic_upsample(val.lowres[:n], config.data.scale))
        results["grid"] = os.path.join(workdir, "eval", name)
        eval_lib.save_grid(results["grid"], val.lowres[:n], bicubic, pred[:n], val.highres[:n],
                           eval_lib.ssim_map_image(pred[:n], val.highres[:n]))
        # Every held-out prediction (float32 in [-1, 1]), for figures comparing runs.
        np.savez_compressed(results["grid"][:-len(".png")] + ".npz", pred=pred,
                            lowres=val.lowres, highres=val.highres)
      return metrics

    every = config.eval_every or total
    planned = False
    meter = throughput_lib.Meter(  # one for the stage: its FLOPs are counted once
        images_per_step=global_batch_size(config), peak=peak,
        tokens_per_image=progs.velocity.sequence_length(progs.latent_shape))
    # The EMA (config.ema.use_for_eval) or the params: what is evaluated and
    # exported, in their fsdp layout (never whole on a device).
    eval_params = lambda st: (st.ema if st.ema is not None and config.ema.use_for_eval
                              else st.params)
    while int(state.step) < stop_at("flow", total):
      # Train up to the next evaluation point, evaluate, go on (a flat loop, no callbacks).
      nxt = min((int(state.step) // every + 1) * every, stop_at("flow", total))
      state, preempted = _run_stage(
          "flow", config, state=state, train_step=progs.flow_step,
          make_batch=lambda b: {"lowres": b.lowres, "highres": b.highres}, frozen=frozen,
          key=jax.random.fold_in(key, 2), stop=nxt, total=total, checkpointer=checkpointer,
          writer=writer, datasets=datasets, mesh=mesh, plan_memory=not planned, meter=meter,
          profiler=profiler if profiled == "flow" else None)
      planned = True
      if preempted:
        break
      if int(state.step) < total and int(state.step) % every == 0:
        evaluate(eval_params(state), int(state.step), f"step_{int(state.step):07d}.png")
    done = int(state.step)
    results["skipped"]["flow"] = int(state.skipped)
    if done < total:
      checkpointer.save(done, state, force=True)
      checkpointer.close()
      results["preempted"] = True
      return results
    checkpointer.close()
    _say(f"stage flow: done ({time.perf_counter() - t_stage:.0f} s)")
    model_params = eval_params(state)
    results["flow"] = evaluate(model_params, done, "final.png")
    results["params"] = {"vae": vae_params, "model": model_params}
    rows = dict(results["flow"])
    if base:  # the base model, before this run's fine-tuning
      results["base"] = evaluate(progs.model[1], 0, None)["model"]
      writer.write_scalars(done, {f"flow_eval/base_{k}": float(v)
                                  for k, v in results["base"].items()})
      rows = {"bicubic": rows["bicubic"], f"base model ({base_field(config)})": results["base"],
              "fine-tuned model": rows["model"]}
    # Every process (sharded params are gathered); process 0 writes.
    folder = progs.velocity.export(step_lib.model_params(model_params, frozen), workdir)
    _say(f"stage flow: exported to {folder}")
    if is_main:
      _write_results(workdir, {**rows, "vae reconstruction": results["vae"]}, per_crop,
                     len(val.highres), results["skipped"])
      print(f"\nValidation, {len(val.highres)} held-out crops, x{config.data.scale} "
            f"super-resolution ({config.data.hr_size}px):")
      print(eval_lib.format_table({**rows,
                                   "vae reconstruction (upper bound)": results["vae"]}))
      print(f"\nFiles in {workdir}: eval/final.png (lowres | bicubic | model | target | "
            "SSIM map), results.json, logs/ (TensorBoard), export/ (models to reuse), "
            "vae/ flow/ (checkpoints)")
    return results
  finally:
    writer.close()


def base_field(config) -> str:
  """The config field naming the velocity model's pretrained weights."""
  return f"{config.get('model', 'dit')}.pretrained"


def _pretrained_model(config) -> str:
  """The velocity model's pretrained folder ('' when trained from scratch)."""
  return config.get(config.get("model", "dit")).pretrained


def _write_results(workdir: str, validation: dict, per_crop: dict, num_val: int,
                   skipped: dict) -> None:
  """WORKDIR/results.json: mean metrics, and per held-out crop (for paired comparisons).

  `per_crop` maps "bicubic" / "model" / "base" (the pretrained DiT before
  fine-tuning) / "vae reconstruction" to `{metric: [num_val]}`, crop i being
  the same held-out crop (and the same sampler noise) in every run.
  """
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"validation": validation, "num_val": num_val, "skipped": skipped,
               "per_crop": {k: {m: [float(x) for x in v] for m, v in row.items()}
                            for k, row in per_crop.items()}}, f, indent=2)


def make_sampler(config, velocity: velocity_lib.VelocityModel, model_graphdef, vae_graphdef,
                 vae_rest, latent_shape, *, compute_dtype, vae_dtype=None, mesh=None):
  """jitted `sample(model_params, frozen, lowres, key) -> images [-1,1]`: ODE from noise.

  `frozen` = `{'vae': VAE params, 'model': the model's fixed inputs}`, as
  the flow step takes it. The time grid is `step.sample_times` (uniform, or
  FLUX's shifted schedule with `t_shift='resolution'`); the condition is
  computed once per call.

  It runs as the train step does, so that evaluating a model that only fits
  sharded (a 12 B FLUX) needs no whole copy of it on a device: the crops are
  split over `mesh`'s devices (padded to a multiple of their count), the
  model's parameters stay in their fsdp layout and each block is gathered in
  the compute dtype only while it runs. `mesh`: the run's (None: one device).
  """
  vae_dtype = compute_dtype if vae_dtype is None else vae_dtype
  mesh = step_lib.make_mesh(jax.devices()[:1]) if mesh is None else mesh
  image_hw = (config.data.hr_size, config.data.hr_size)
  times = step_lib.sample_times(config, config.eval_ode_steps,
                                velocity.image_tokens(latent_shape))
  min_shard_size = config.mesh.min_shard_size
  P = jax.sharding.PartitionSpec

  def local(model_params, frozen, lowres, noise, specs, fspecs):
    """One device's crops; its shards of the model's parameters (and of a LoRA base)."""
    params, gathers = step_lib.gather_model(model_params, frozen, specs, fspecs)
    vae = nnx.merge(vae_graphdef, step_lib.cast_floating(frozen["vae"], vae_dtype), vae_rest)
    encode = lambda x: step_lib.encode_latents(vae, x, compute_dtype=vae_dtype)
    cond = velocity.condition(frozen["model"], lowres, encode, image_hw)

    def velocity_fn(x, t, cond):
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
      return velocity.velocity(model_graphdef, params, x, t, cond, compute_dtype=compute_dtype,
                               prepare_block=gathers)

    z0 = eval_lib.ode_sample(velocity_fn, noise, cond, num_steps=config.eval_ode_steps,
                             times=times)
    return jnp.clip(step_lib.decode_latents(vae, z0, compute_dtype=vae_dtype), -1.0, 1.0)

  def sample(model_params, frozen, lowres, key):
    n = lowres.shape[0]
    padded = -(-n // mesh.size) * mesh.size
    # Crop i's noise depends on (key, i) only, not on how many crops are sampled.
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(latent_shape),
                                                 jnp.float32))(jnp.arange(padded))
    lowres = jnp.pad(lowres, ((0, padded - n),) + ((0, 0),) * (lowres.ndim - 1))
    specs = sharding_lib.state_specs(model_params, mesh, min_shard_size=min_shard_size)
    fspecs = step_lib.frozen_specs(frozen, mesh, min_shard_size=min_shard_size)
    out = jax.shard_map(
        lambda p, f, l, z: local(p, f, l, z, specs, fspecs), mesh=mesh,
        in_specs=(specs, fspecs, P(step_lib.AXIS), P(step_lib.AXIS)),
        out_specs=P(step_lib.AXIS))(model_params, frozen, lowres, noise)
    return out[:n]

  # The images come back whole on every device (and process): they are small, and the
  # loop's metrics and grid read them on the host.
  return jax.jit(sample, out_shardings=jax.sharding.NamedSharding(mesh, P()))


def make_recon(config, vae_graphdef, vae_rest, *, compute_dtype):
  """jitted `recon(vae_params, images) -> reconstructions [-1, 1]` (posterior mean, clipped).

  Metrics: `evaluate.image_metrics(recon, images)` (the SR metrics, per crop).
  """
  del config

  @jax.jit
  def recon(params, x):
    vae = nnx.merge(vae_graphdef, step_lib.cast_floating(params, compute_dtype), vae_rest)
    mean, _ = vae.encode(x.astype(compute_dtype))
    return jnp.clip(vae.decode(mean).astype(jnp.float32), -1, 1)

  return recon
