"""Host-RAM peak of loading a FLUX transformer: `flux.from_diffusers` against a whole-file load.

  python benchmarks/bench_flux_load.py [--layers=2 --single_layers=4] [--dtype=float32]

Writes a diffusers FluxTransformer2DModel folder of FLUX.1's width (hidden
3072, 24 heads, T5 width 4096) with fewer blocks, random bf16 weights, as the
hub ships them (numpy only: the tensors named and shaped by
`train.models.flux.tensor_shapes`). Then, each in a fresh process with 8 fake
CPU devices (whose "device" memory is this host's RAM), it loads the folder:

- `from_diffusers`: tensor by tensor into the trainer's fsdp=8 layout;
- `naive`: `safetensors.numpy.load_file` of the whole file, then every tensor
  converted and `device_put` (the usual approach),

and prints each process's peak resident memory (`ru_maxrss`) above the
process's baseline, against the model's bytes in the requested dtype. The
device arrays themselves live in host RAM here, so the floor is 1x the model.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LAYERS = flags.DEFINE_integer("layers", 2, "Double-stream blocks.")
_SINGLE = flags.DEFINE_integer("single_layers", 4, "Single-stream blocks.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Load dtype: float32 | bfloat16.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one load mode in this process.")
_FOLDER = flags.DEFINE_string("folder", "", "Internal: the folder to load.")


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_folder(folder: str, cfg) -> int:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from train.models import flux  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tensors = {name: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
             for name, shape in flux.tensor_shapes(cfg).items()}
  save_file(tensors, os.path.join(folder, flux.WEIGHTS_NAME))
  with open(os.path.join(folder, flux.CONFIG_NAME), "w") as fh:
    json.dump(cfg.to_dict(), fh)
  return sum(v.size for v in tensors.values())


def _child(mode: str, folder: str, dtype: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train.models import flux  # pylint: disable=g-import-not-at-top
  jnp.zeros(1).block_until_ready()
  base = _rss_mib()
  cfg = flux.read_config(folder)
  mesh = sharding.make_mesh(fsdp=8)
  graphdef, abstract = nnx.split(flux._abstract_model(cfg, param_dtype=jnp.dtype(dtype)),
                                 nnx.Param)
  shardings = sharding.state_shardings(nnx.to_pure_dict(abstract), mesh, min_shard_size=0)
  if mode == "from_diffusers":
    model = flux.from_diffusers(folder, dtype=dtype, shardings=shardings)
    leaves = jax.tree.leaves(nnx.state(model))
  else:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    raw = load_file(os.path.join(folder, flux.WEIGHTS_NAME))
    leaves = []
    for path, leaf, _, names in flux._param_table(cfg):
      blocks = [np.asarray(raw[n], np.float32) for n in names]
      blocks = [b.T if leaf == "kernel" else b for b in blocks]
      value = np.stack(blocks) if str(path[0]) in flux.STACKS else blocks[0]
      node = shardings
      for p in path:
        node = node[str(p)]
      leaves.append(jax.device_put(value.astype(dtype), node))
  for x in leaves:
    x.block_until_ready()
  model_bytes = sum(x.nbytes for x in leaves)
  print(json.dumps({"mode": mode, "baseline_mib": round(base), "peak_above_mib":
                    round(_rss_mib() - base), "model_mib": round(model_bytes / 2**20)}),
        flush=True)


def main(argv):
  del argv
  if _CHILD.value:
    _child(_CHILD.value, _FOLDER.value, _DTYPE.value)
    return
  from train.models import flux  # pylint: disable=g-import-not-at-top
  cfg = flux.FluxConfig(num_layers=_LAYERS.value, num_single_layers=_SINGLE.value,
                        guidance_embeds=True)
  with tempfile.TemporaryDirectory() as folder:
    n = _write_folder(folder, cfg)
    size = os.path.getsize(os.path.join(folder, flux.WEIGHTS_NAME))
    print(f"FLUX width 3072, {_LAYERS.value} double + {_SINGLE.value} single blocks: "
          f"{n / 1e9:.2f} B parameters, bf16 file {size / 2**20:.0f} MiB; loading as "
          f"{_DTYPE.value} into fsdp=8 over 8 CPU devices", flush=True)
    for mode in ("from_diffusers", "naive"):
      out = subprocess.run([sys.executable, __file__, f"--child={mode}", f"--folder={folder}",
                            f"--dtype={_DTYPE.value}"], capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
      print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  app.run(main)
