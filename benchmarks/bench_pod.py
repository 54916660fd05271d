"""Compiles a config's flow step for a TPU topology and prints one JSON line of figures.

  PYTHONPATH=. python benchmarks/bench_pod.py --config=configs/pod.py \\
      --topology=v5p:2x2x2 --config.dit.depth=4

Uses libtpu's compile-only client (no TPU): per-chip memory from
`memory_analysis()` (argument / output / temporary / peak bytes), the model
FLOPs of one step from `cost_analysis()`, and the wall time of lower +
compile. It needs only `train.loop.build_programs` and `train.sharding`, so
the same script measures an older checkout (`PYTHONPATH=<old tree>`), e.g.
the whole-model gather of main before per-layer fsdp.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2", "TPU topology name.")
_LABEL = flags.DEFINE_string("label", "", "Free text copied into the output line.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
               ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(k, v)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from train import loop, sharding  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  devices = list(topologies.get_topology_desc(topology_name=_TOPOLOGY.value,
                                              platform="tpu").devices)
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(fsdp=cfg.mesh.fsdp, devices=devices)
  progs = loop.build_programs(cfg, mesh, abstract=True)
  b, hr = cfg.batch_size, cfg.data.hr_size
  image = lambda s: jax.ShapeDtypeStruct((b, s, s, 3), np.float32,
                                         sharding=sharding.batch_sharding(mesh))
  rep = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=sharding.replicated(mesh)), tree)
  state0 = progs.flow_state0
  shardings = sharding.state_shardings(state0, mesh, min_shard_size=cfg.mesh.min_shard_size)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                       state0, shardings)
  lowered = progs.flow_step.lower(state, {"lowres": image(hr // cfg.data.scale),
                                          "highres": image(hr)},
                                  rep({"vae": progs.vae[1], "model": progs.model_inputs}),
                                  rep(jax.random.PRNGKey(0)))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: round(int(n or 0) / 2**30, 5)
  out = dict(
      label=_LABEL.value, topology=_TOPOLOGY.value, chips=len(devices),
      kind=devices[0].device_kind, depth=cfg.dit.depth, hidden=cfg.dit.hidden_size,
      remat=cfg.dit.get("remat", "(none: no such field)"), batch=b, fsdp=cfg.mesh.fsdp,
      params_b=round(sum(math.prod(x.shape) for x in jax.tree.leaves(state0.params)) / 1e9, 4),
      args_gib=gib(ma.argument_size_in_bytes), out_gib=gib(ma.output_size_in_bytes),
      alias_gib=gib(ma.alias_size_in_bytes), temp_gib=gib(ma.temp_size_in_bytes),
      peak_gib=gib(getattr(ma, "peak_memory_in_bytes", 0)),
      flops_per_chip=float((cost or {}).get("flops", 0.0)),
      lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
      load=os.getloadavg()[0])
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  app.run(main)
