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
from train import memory as memory_lib
from train import pretrained as pretrained_lib
from train import sharding as sharding_lib
from train import step as step_lib
from train import writer as writer_lib
from train.models import dit as dit_lib
from train.models import vae as vae_lib

STAGES = ("vae", "flow")


class TooManySkipsError(RuntimeError):
  """The run stopped after `config.max_consecutive_skips` non-finite steps in a row."""


def _str_keys(tree):
  """Pure-dict params with str keys (orbax-friendly; nnx.merge accepts them)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def split_model(model: nnx.Module):
  """`(graphdef, params, rest)`: params = nnx.Param leaves, rest = other state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, _str_keys(params.to_pure_dict()), _str_keys(rest.to_pure_dict())


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


def _init_split(make_model, *, abstract: bool = False):
  """`(graphdef, params, rest)` of `make_model()`, initialised in ONE jitted call.

  Eager NNX initialisation dispatches (and on CPU compiles) every initialiser
  op separately, which costs tens of seconds on a busy 2-core machine; the
  graph structure comes from `nnx.eval_shape` (no FLOPs). `abstract`: params
  and rest as `jax.ShapeDtypeStruct`s (nothing allocated; memory planning).
  """
  graphdef, _, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)

  @jax.jit
  def init():
    _, params, rest = nnx.split(make_model(), nnx.Param, ...)
    return _str_keys(params.to_pure_dict()), _str_keys(rest.to_pure_dict())

  params, rest = jax.eval_shape(init) if abstract else init()
  return graphdef, params, rest


def _load_pretrained_vae(config, dtype):
  """`(graphdef, params, rest)` of `config.vae.pretrained` (None when it is '')."""
  if not config.vae.pretrained:
    return None
  return split_model(vae_lib.from_diffusers(config.vae.pretrained, dtype=dtype))


def build_models(config, *, vae_dtype=jnp.float32, abstract: bool = False):
  """`((vae graphdef, params, rest), (dit graphdef, params, rest))`, from config.seed.

  With `config.vae.pretrained` the VAE is loaded from that diffusers folder
  in `vae_dtype` (float32 if it asks for `force_upcast`) instead. `abstract`:
  initialised params as `jax.ShapeDtypeStruct`s (loaded ones stay arrays).
  """
  vae = _load_pretrained_vae(config, vae_dtype) or _init_split(lambda: vae_lib.VAE(
      channels=tuple(config.vae.channels), latent_channels=config.vae.latent_channels,
      layers_per_block=config.vae.layers_per_block, norm_groups=config.vae.norm_groups,
      mid_attention=config.vae.mid_attention, rngs=nnx.Rngs(config.seed)), abstract=abstract)
  dit = _init_split(lambda: dit_lib.DiT(
      latent_channels=config.vae.latent_channels, patch_size=config.dit.patch_size,
      hidden_size=config.dit.hidden_size, depth=config.dit.depth,
      num_heads=config.dit.num_heads, mlp_ratio=config.dit.mlp_ratio,
      remat=config.dit.remat, rngs=nnx.Rngs(config.seed + 1)), abstract=abstract)
  if config.dit.pretrained:  # fine-tuning: start from a base model's weights
    try:
      _, params = dit_lib.load_pretrained(config.dit.pretrained, like=dit[1])
    except ValueError as e:
      raise config_lib.ConfigError(f"config.{e}") from None
    dit = (dit[0], params, dit[2])
  return vae, dit


class Programs(NamedTuple):
  """Models, optimisers and jitted programs of one (config, mesh): built once per process."""
  vae: tuple  # (graphdef, initial params, rest)
  dit: tuple  # (graphdef, initial params, rest)
  latent_shape: tuple  # (h, w, c) of one image's latent
  vae_tx: Any
  vae_state0: Any  # TrainState at step 0
  flow_state0: Any
  vae_schedule: Any
  vae_step: Any
  flow_tx: Any
  flow_schedule: Any
  flow_step: Any
  sampler: Any
  recon: Any


_PROGRAMS: dict = {}


def build_programs(config, mesh, *, abstract: bool = False) -> Programs:
  """Builds (or returns the cached) models and jitted programs for `config` on `mesh`.

  The cache key is the config JSON and the mesh, so calling
  `train_and_evaluate` again in the same process (a notebook, a resume test)
  reuses the compiled steps instead of tracing and compiling them again.
  `abstract`: initial params and states are `jax.ShapeDtypeStruct`s, for
  lowering and compiling the steps without allocating them (`memory_plans`).
  """
  weights = (vae_lib.locate_diffusers(config.vae.pretrained).weights
             if config.vae.pretrained else None)
  cache_key = (config.to_json_best_effort(sort_keys=True), abstract, tuple(mesh.shape.items()),
               tuple(d.id for d in mesh.devices.flat),
               (os.stat(weights).st_mtime_ns, os.stat(weights).st_size) if weights else None)
  if cache_key in _PROGRAMS:
    return _PROGRAMS[cache_key]
  compute_dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  vae, dit = build_models(config, vae_dtype=compute_dtype, abstract=abstract)
  vae_graphdef, vae_params, vae_rest = vae
  # A trained VAE computes in compute_dtype; a pretrained one in its own dtype.
  vae_dtype = nnx.merge(vae_graphdef, vae_params, vae_rest).dtype or compute_dtype
  dit_graphdef = dit[0]
  hr_shape = (config.batch_size, config.data.hr_size, config.data.hr_size, 3)
  latent_shape = step_lib.vae_latent_shape(vae_graphdef, vae_params, vae_rest, hr_shape)[1:]
  vae_tx, vae_schedule = make_optimizer(config, config.vae, config.vae.steps)
  if config.vae.pretrained:
    vae_tx = optax.set_to_zero()  # frozen: no optimizer state (its stage has 0 steps)
  vae_step = step_lib.make_train_step(
      step_lib.make_vae_loss(config, vae_graphdef, vae_rest, compute_dtype=compute_dtype),
      vae_tx, mesh, make_inputs=step_lib.make_vae_inputs(latent_shape),
      lr_schedule=vae_schedule, min_shard_size=config.mesh.min_shard_size)
  flow_tx, flow_schedule = make_optimizer(config, config.flow, config.flow.steps)
  flow_step = step_lib.make_train_step(
      step_lib.make_flow_loss(config, dit_graphdef, vae_graphdef, vae_rest,
                              compute_dtype=compute_dtype, vae_dtype=vae_dtype),
      flow_tx, mesh, make_inputs=step_lib.make_flow_inputs(config, latent_shape),
      lr_schedule=flow_schedule, min_shard_size=config.mesh.min_shard_size)
  init_state = ((lambda p, tx: jax.eval_shape(lambda q: step_lib.init_state(q, tx), p))
                if abstract else step_lib.init_state)
  programs = Programs(
      vae=vae, dit=dit, latent_shape=latent_shape, vae_tx=vae_tx, vae_schedule=vae_schedule,
      vae_state0=init_state(vae_params, vae_tx), flow_state0=init_state(dit[1], flow_tx),
      vae_step=vae_step, flow_tx=flow_tx, flow_schedule=flow_schedule, flow_step=flow_step,
      sampler=make_sampler(config, dit_graphdef, vae_graphdef, vae_rest, latent_shape,
                           compute_dtype=compute_dtype, vae_dtype=vae_dtype),
      recon=make_recon(config, vae_graphdef, vae_rest, compute_dtype=vae_dtype))
  _PROGRAMS.clear()  # keep one: programs hold compiled executables
  _PROGRAMS[cache_key] = programs
  return programs


def _say(msg: str) -> None:
  """One console line (process 0), beside the progress bars; also logged."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def _abstract(tree):
  """ShapeDtypeStructs of placed arrays, with their shardings (orbax restores onto them)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _memory_plan(name: str, train_step, state, batch, frozen, key) -> None:
  """Compiles the step (the first call reuses it), logs the plan, checks the fit."""
  plan = memory_lib.plan(memory_lib.compile_step(train_step.lower(state, batch, frozen, key),
                                                name=f"stage {name}"), state)
  limit = memory_lib.device_limit()
  _say(plan.line(name=f"stage {name}", limit=limit))
  memory_lib.check_fit(plan, limit=limit, name=f"stage {name}",
                       note=memory_lib.limit_note(jax.local_devices()[0]))


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
  config_lib.validate(config, num_devices=len(devices))
  mesh = step_lib.make_mesh(devices, fsdp=config.mesh.fsdp)
  progs = build_programs(config, mesh, abstract=True)
  b, hr = config.batch_size, config.data.hr_size
  lr = hr // config.data.scale
  image = lambda size: jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32,
                                            sharding=sharding_lib.batch_sharding(mesh))
  rep = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=sharding_lib.replicated(mesh)), tree)
  key = rep(jax.random.PRNGKey(0))
  programs = {"vae": (progs.vae_step, progs.vae_state0, {"image": image(hr)}, {}),
              "flow": (progs.flow_step, progs.flow_state0,
                       {"lowres": image(lr), "highres": image(hr)}, rep(progs.vae[1]))}
  plans = {}
  for name in stages:
    train_step, state0, batch, frozen = programs[name]
    if name == "vae" and (config.vae.pretrained or not config.vae.steps):
      continue
    if name == "flow" and not config.flow.steps:
      continue
    shardings = sharding_lib.state_shardings(state0, mesh,
                                             min_shard_size=config.mesh.min_shard_size)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                         state0, shardings)
    traced = train_step.trace(state, batch, frozen, key)
    plans[name] = memory_lib.plan(
        memory_lib.compile_step(traced.lower(), name=f"stage {name}",
                                compiler_options=memory_lib.compiler_options(devices)),
        state, flops=memory_lib.step_flops(traced.jaxpr, num_devices=len(devices)))
  return plans


def _run_stage(name: str, config, *, state, train_step, make_batch, frozen, key,
               stop: int, total: int, checkpointer, writer, datasets, mesh,
               plan_memory: bool = True):
  """Trains one stage from `state.step` up to step `stop` (<= `total`).

  With `plan_memory` the step is compiled before the first step and its
  memory plan logged and checked (`_memory_plan`).

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
  t_last, n_last = time.perf_counter(), 0
  preempted = False
  try:
    for step in range(start, stop):
      batch = step_lib.shard_batch(make_batch(next(it)), mesh)
      if plan_memory and step == start:
        _memory_plan(name, raw_step, state, batch, frozen, key)
      if step == start and jax.process_index() == 0 and config.progress_bar:
        from tqdm import tqdm  # after the memory plan's line, so that it is not cut by the bar
        bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
      state, metrics = train_step(state, batch, frozen, key)
      done = step + 1
      n_last += 1
      consec = int(state.consecutive_skips)
      if consec >= config.max_consecutive_skips:
        raise TooManySkipsError(
            f"stage {name}: {consec} consecutive steps had a non-finite loss or gradient "
            f"(last at step {done}, {int(state.skipped)} skipped in total); stopping "
            f"(config.max_consecutive_skips={config.max_consecutive_skips}). Parameters "
            "were never updated with non-finite values; the last checkpoint is intact.")
      if bar is not None:
        bar.update(1)
      if done % config.log_every == 0 or done == total:
        now = time.perf_counter()
        scalars = {f"{name}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        scalars[f"{name}/steps_per_sec"] = n_last / max(now - t_last, 1e-9)
        scalars[f"{name}/skipped_total"] = float(state.skipped)
        t_last, n_last = now, 0
        writer.write_scalars(done, scalars)
        if bar is not None:
          bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in scalars.items()
                           if k.split("/")[1] in ("total", "mse", "ssim", "l1", "skipped_total")})
      checkpointer.save(done, state, force=(done == total), data_iterator=it)
      if checkpointer.preemption_requested(done):  # all-gathered over processes
        checkpointer.save(done, state, force=True, data_iterator=it)
        preempted = True
        logging.warning("stage %s: preemption requested; checkpoint saved at step %d",
                        name, done)
        break
  finally:
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


def _restore(checkpointer, state):
  restored, _ = checkpointer.restore_latest(_abstract(state))
  return state if restored is None else restored


def train_and_evaluate(config, workdir: str, *, devices=None,
                       stop_after: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Trains the `vae` then the `flow` stage and evaluates on the validation crops.

  Args:
    config: a config from `configs/*.py`.
    workdir: output directory; an existing run there is resumed.
    devices: devices of the data mesh (all by default; tests pass one device).
    stop_after: `{stage: step}`: stop (saving a checkpoint, as on preemption)
      when that stage reaches that step; for the resumption tests.

  Returns:
    dict with `'flow'`: metrics of the final model vs bicubic (from
    `evaluate.evaluate_sr`), `'vae'`: reconstruction PSNR/SSIM,
    `'preempted'`: whether the run stopped early, `'skipped'`: skipped steps
    per stage, `'params'`: final `{'vae', 'dit'}` params, `'grid'`: PNG path.
  """
  # 1. Validate before anything is built or compiled.
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices))
  mesh = step_lib.make_mesh(devices, fsdp=config.mesh.fsdp)
  place = lambda state0: step_lib.place_state(  # params and optimizer state over fsdp
      state0, mesh, min_shard_size=config.mesh.min_shard_size)
  ckpt_lib.check_workdir(workdir)
  is_main = jax.process_index() == 0
  # A pretrained VAE: provenance (path, sha256) checked against the workdir, recorded.
  pretrained_lib.check_and_record(
      workdir, pretrained_lib.describe(config.vae.pretrained) if config.vae.pretrained else None,
      write=is_main)
  stop_after = dict(stop_after or {})
  stop_at = lambda stage, total: min(total, stop_after.get(stage, total))

  # 2. Data: each process builds only its rows of the global batch.
  nproc = jax.process_count()
  datasets = input_pipeline.make_datasets(config.data,
                                          batch_size_per_process=config.batch_size // nproc,
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
                                         save_interval_steps=config.ckpt_every)
    state = _restore(checkpointer, place(progs.vae_state0))
    t_stage = time.perf_counter()
    if total:
      _say(f"stage vae: {total} steps" + (f", resuming at step {int(state.step)}"
                                          if int(state.step) else ""))
    state, preempted = _run_stage(
        "vae", config, state=state, train_step=progs.vae_step,
        make_batch=lambda b: {"image": b.highres}, frozen={}, key=jax.random.fold_in(key, 1),
        stop=stop_at("vae", total), total=total, checkpointer=checkpointer, writer=writer,
        datasets=datasets, mesh=mesh)
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
            -(-export_lib.LATENT_STAT_IMAGES // (config.batch_size // nproc)))]
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

    # 5. Stage flow: the DiT with the frozen VAE (its params are a jit argument).
    total = config.flow.steps
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "flow"),
                                         max_to_keep=config.ckpt_max_to_keep,
                                         save_interval_steps=config.ckpt_every)
    state = _restore(checkpointer, place(progs.flow_state0))
    t_stage = time.perf_counter()
    _say(f"stage flow: {total} steps, "
         + (f"fine-tuning {config.dit.pretrained}" if config.dit.pretrained else "from scratch")
         + (f", resuming at step {int(state.step)}" if int(state.step) else ""))
    frozen = vae_params
    val_lowres = step_lib.replicate(np.asarray(val.lowres), mesh)

    def evaluate(dit_params, step: int, name: str | None):
      """Metrics vs bicubic; logged and drawn to eval/<name> unless name is None."""
      pred = np.asarray(progs.sampler(dit_params, frozen, val_lowres, jax.random.fold_in(key, 3)))
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
    while int(state.step) < stop_at("flow", total):
      # Train up to the next evaluation point, evaluate, go on (a flat loop, no callbacks).
      nxt = min((int(state.step) // every + 1) * every, stop_at("flow", total))
      state, preempted = _run_stage(
          "flow", config, state=state, train_step=progs.flow_step,
          make_batch=lambda b: {"lowres": b.lowres, "highres": b.highres}, frozen=frozen,
          key=jax.random.fold_in(key, 2), stop=nxt, total=total, checkpointer=checkpointer,
          writer=writer, datasets=datasets, mesh=mesh, plan_memory=not planned)
      planned = True
      if preempted:
        break
      if int(state.step) < total and int(state.step) % every == 0:
        evaluate(step_lib.replicate(state.params, mesh), int(state.step),
                 f"step_{int(state.step):07d}.png")
    done = int(state.step)
    results["skipped"]["flow"] = int(state.skipped)
    if done < total:
      checkpointer.save(done, state, force=True)
      checkpointer.close()
      results["preempted"] = True
      return results
    checkpointer.close()
    _say(f"stage flow: done ({time.perf_counter() - t_stage:.0f} s)")
    dit_params = step_lib.replicate(state.params, mesh)  # gathered: evaluated, exported
    results["flow"] = evaluate(dit_params, done, "final.png")
    results["params"] = {"vae": vae_params, "dit": dit_params}
    rows = dict(results["flow"])
    if config.dit.pretrained:  # the base model, before this run's fine-tuning
      results["base"] = evaluate(progs.dit[1], 0, None)["model"]
      writer.write_scalars(done, {f"flow_eval/base_{k}": float(v)
                                  for k, v in results["base"].items()})
      rows = {"bicubic": rows["bicubic"], "base model (dit.pretrained)": results["base"],
              "fine-tuned model": rows["model"]}
    if is_main:
      export_lib.export_dit(dit_params, config, workdir)
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


def make_sampler(config, dit_graphdef, vae_graphdef, vae_rest, latent_shape, *,
                 compute_dtype, vae_dtype=None):
  """jitted `sample(dit_params, vae_params, lowres, key) -> images [-1,1]`: ODE from noise."""
  vae_dtype = compute_dtype if vae_dtype is None else vae_dtype

  def sample(dit_params, vae_params, lowres, key):
    dit = nnx.merge(dit_graphdef, step_lib.cast_floating(dit_params, compute_dtype))
    vae = nnx.merge(vae_graphdef, step_lib.cast_floating(vae_params, vae_dtype), vae_rest)
    # Crop i's noise depends on (key, i) only, not on how many crops are sampled.
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(latent_shape),
                                                 jnp.float32))(jnp.arange(lowres.shape[0]))

    def velocity_fn(x, t, cond):
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
      return dit(x.astype(compute_dtype), t, cond).astype(jnp.float32)

    z0 = eval_lib.ode_sample(velocity_fn, noise, lowres, num_steps=config.eval_ode_steps)
    return jnp.clip(step_lib.decode_latents(vae, z0, compute_dtype=vae_dtype), -1.0, 1.0)

  return jax.jit(sample)


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
