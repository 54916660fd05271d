"""Memory and step time of `ssim_jax.flow.decoded_losses` (loss + gradient).

1. Peak memory: XLA's compiled `memory_analysis()` of `value_and_grad` of the
   SSIM + pixel loss w.r.t. the predicted latents (the gradient a velocity
   model would receive), for N = 8 / 32 / 128 images, with chunks of 2 under
   `jax.checkpoint` (the default) vs. one chunk of N without remat, and
   chunks of 2 without remat.
2. Skipping: step time of the same loss+grad with t ~ U(0, 1) and max_t = 0.3
   (most images have weight 0, their chunks are not decoded) vs. all weights
   > 0 (every chunk decoded).

The decoder is the project's VAE decoder (train/models/vae.py), its params
passed as jit arguments like the trainer does.

  python benchmarks/bench_flow.py                 # default sizes
  python benchmarks/bench_flow.py --image 128 --channels 64,128,128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ssim_jax import flow  # noqa: E402
from train.models.vae import VAE  # noqa: E402


def build(args):
  channels = tuple(int(c) for c in args.channels.split(","))
  vae = VAE(channels=channels, latent_channels=4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(vae)
  f = vae.downsample_factor
  return graphdef, params, args.image // f


def make_step(graphdef, *, chunk_size, remat):
  def loss(z, images, weights, params):
    vae = nnx.merge(graphdef, params)
    out = flow.decoded_losses(z, images, weights, vae.decode, chunk_size=chunk_size,
                              remat=remat)
    return out.ssim + out.pixel
  return jax.jit(jax.value_and_grad(loss))


def inputs(n, latent, image, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  z = jax.random.normal(k1, (n, latent, latent, 4))
  images = jnp.tanh(jax.random.normal(k2, (n, image, image, 3)))
  return z, images


def peak_bytes(step, *args) -> int | None:
  ma = step.lower(*args).compile().memory_analysis()
  if ma is None:
    return None
  # Peak live memory of the executable: arguments + outputs + temporaries
  # (outputs aliasing arguments are not counted twice).
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes
             - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def time_step(step, *args, repeats):
  jax.block_until_ready(step(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--image", type=int, default=64)
  ap.add_argument("--channels", default="32,64,64")
  ap.add_argument("--sizes", default="8,32,128")
  ap.add_argument("--time_n", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  graphdef, params, latent = build(args)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"image {args.image}x{args.image}, latent {latent}x{latent}x4, "
        f"VAE channels {args.channels}")
  results = dict(device=dev.device_kind, backend=jax.default_backend(),
                 image=args.image, channels=args.channels, memory={}, timing={})
  configs = [("chunk2+remat", 2, True), ("chunk2, no remat", 2, False),
             ("one chunk, no remat", None, False)]
  print("\npeak memory of loss+grad (MiB, compiled memory_analysis)")
  print(f"{'N':>5} " + " ".join(f"{name:>20}" for name, _, _ in configs))
  for n in (int(s) for s in args.sizes.split(",")):
    z, images = inputs(n, latent, args.image)
    w = jnp.ones((n,))
    row = {}
    for name, chunk, remat in configs:
      step = make_step(graphdef, chunk_size=chunk or n, remat=remat)
      b = peak_bytes(step, z, images, w, params)
      row[name] = b
    results["memory"][n] = row
    print(f"{n:>5} " + " ".join(
        f"{(row[k] / 2**20 if row[k] is not None else float('nan')):>20.1f}"
        for k, _, _ in configs))

  n = args.time_n
  z, images = inputs(n, latent, args.image)
  t = jax.random.uniform(jax.random.PRNGKey(1), (n,))
  w_skip = flow.timestep_weight(t, max_t=0.3)
  w_all = jnp.full((n,), 0.5)
  step = make_step(graphdef, chunk_size=2, remat=True)
  t_skip = time_step(step, z, images, w_skip, params, repeats=args.repeats)
  t_all = time_step(step, z, images, w_all, params, repeats=args.repeats)
  frac = float(jnp.mean(w_skip > 0))
  results["timing"] = dict(n=n, weighted_fraction=frac, skip_s=t_skip, all_s=t_all,
                           ratio=t_skip / t_all)
  print(f"\nstep time, N={n}, chunk 2 + remat: max_t=0.3 & t~U(0,1) "
        f"({frac:.0%} of images weighted): {t_skip * 1e3:.1f} ms; all weights > 0: "
        f"{t_all * 1e3:.1f} ms; ratio {t_skip / t_all:.2f}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
