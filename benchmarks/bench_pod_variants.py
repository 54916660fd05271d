"""Per-layer fsdp two ways, compiled for a TPU topology: shard_map + all_gather vs jit + sharding constraints.

  PYTHONPATH=. python benchmarks/bench_pod_variants.py --config=configs/pod.py \\
      --topology=v5p:2x2x2 --config.dit.depth=4 --variant=shard_map|jit

The DiT part of the flow step only (frozen VAE encoder -> latents, velocity
mse; no decoded loss, which needs shard_map's collectives), AdamW, the state
in its fsdp layout and donated, so the two variants differ only in how a
block's parameters are gathered:
  shard_map: train/step.py's step (the parameters enter shard_map sharded,
    each block is `all_gather`-ed inside the scan body; gradients come back
    reduce-scattered by the gathers' transposes);
  jit: no shard_map; the parameters stay sharded under jit and each block's
    slice is constrained to be replicated (`with_sharding_constraint`) inside
    the scan body, the gradient constrained back to the state layout, and
    XLA's SPMD partitioner places the collectives.
Prints one JSON line: per-chip memory (`memory_analysis()`), FLOPs
(`cost_analysis()`), compile time.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2", "TPU topology name.")
_VARIANT = flags.DEFINE_enum("variant", "shard_map", ["shard_map", "jit"], "How blocks gather.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ssim_jax import flow  # pylint: disable=g-import-not-at-top
  from train import loop, memory, sharding  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  devices = memory.topology_devices(_TOPOLOGY.value)
  mesh = sharding.make_mesh(fsdp=cfg.mesh.fsdp, devices=devices)
  progs = loop.build_programs(cfg, mesh, abstract=True)
  dit_def = progs.model[0]
  vae_def, _, vae_rest = progs.vae
  bf16 = jnp.bfloat16

  def velocity_mse(params, batch, frozen, prepare_block):
    vae = nnx.merge(vae_def, step_lib.cast_floating(frozen["vae"], bf16), vae_rest)
    z0 = step_lib.encode_latents(vae, batch["highres"], compute_dtype=bf16)
    x_t = flow.interpolate(z0, batch["noise"], batch["t"])
    dit = nnx.merge(dit_def, step_lib.cast_floating(params, bf16))
    v = dit(x_t.astype(bf16), batch["t"], batch["lowres"],
            prepare_block=(prepare_block or {}).get("blocks"))
    return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(z0, batch["noise"])))

  tx = progs.flow_tx
  state_sh = sharding.state_shardings(progs.flow_state0, mesh,
                                      min_shard_size=cfg.mesh.min_shard_size)
  if _VARIANT.value == "shard_map":
    def loss_fn(params, batch, frozen, gather_block=None):
      mse = velocity_mse(params, batch, frozen, gather_block)
      return mse, {"mse": jax.lax.pmean(mse, step_lib.AXIS)}
    train_step = step_lib.make_train_step(loss_fn, tx, mesh,
                                          min_shard_size=cfg.mesh.min_shard_size)
  else:
    rep = NamedSharding(mesh, P())

    def jit_step(state, batch, frozen, key):
      del key
      gather = lambda bp: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), bp)
      mse, grads = jax.value_and_grad(velocity_mse)(state.params, batch, frozen, gather)
      grads = jax.lax.with_sharding_constraint(grads, state_sh.params)
      updates, opt = tx.update(grads, state.opt_state, state.params)
      new = state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt)
      return jax.lax.with_sharding_constraint(new, state_sh), {"mse": mse}
    train_step = jax.jit(jit_step, donate_argnums=0)

  b, hr = cfg.batch_size, cfg.data.hr_size
  bsh = sharding.batch_sharding(mesh)
  h, w, c = progs.latent_shape
  batch = {"highres": jax.ShapeDtypeStruct((b, hr, hr, 3), np.float32, sharding=bsh),
           "lowres": jax.ShapeDtypeStruct((b, hr // cfg.data.scale, hr // cfg.data.scale, 3),
                                          np.float32, sharding=bsh),
           "noise": jax.ShapeDtypeStruct((b, h, w, c), np.float32, sharding=bsh),
           "t": jax.ShapeDtypeStruct((b,), np.float32, sharding=bsh)}
  abstract = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sh)
  state = abstract(progs.flow_state0, state_sh)
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                       sharding=sharding.replicated(mesh)),
                        {"vae": progs.vae[1], "model": progs.model_inputs})
  key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, frozen, key).compile()
  t1 = time.perf_counter()
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: round(int(n or 0) / 2**30, 5)
  hlo = compiled.as_text()
  print(json.dumps(dict(
      variant=_VARIANT.value, topology=_TOPOLOGY.value, depth=cfg.dit.depth,
      hidden=cfg.dit.hidden_size, remat=cfg.dit.remat, batch=b, fsdp=cfg.mesh.fsdp,
      args_gib=gib(ma.argument_size_in_bytes), temp_gib=gib(ma.temp_size_in_bytes),
      peak_gib=gib(ma.peak_memory_in_bytes), flops_per_chip=float((cost or {}).get("flops", 0)),
      all_gathers=hlo.count("all-gather-start") or hlo.count("all-gather("),
      compile_s=round(t1 - t0, 1), load=os.getloadavg()[0])), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  app.run(main)
