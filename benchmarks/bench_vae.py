"""bf16 vs float32 decoding, and decode-loss memory, of a full-size FLUX-layout VAE.

1. Decode error: a random-weight VAE with FLUX.1's VAE layout (block_out_channels
   128,256,512,512, layers_per_block 2, 16 latent channels, no quant convs,
   mid attention, norm groups 32; 83.8 M parameters, the decoder 49.5 M) decodes
   the same N(0, 1) diffusion latents (unscaled with FLUX's 0.3611 / 0.1159) at
   --image x --image in float32 and with the same weights cast to bfloat16
   (`VAE(dtype=bfloat16, param_dtype=bfloat16)`: bf16 parameters and compute,
   float32 GroupNorm statistics and attention softmax). Reports max |bf16 - f32|,
   RMS(bf16 - f32) / RMS(f32) and the wall time of one jitted decode.
2. Memory: XLA's compiled `memory_analysis()` (CPU; nothing is executed) of
   `jax.value_and_grad` of `ssim_jax.flow.decoded_losses` (SSIM + L1, one
   decode) w.r.t. the predicted latents, N=--mem_n images at --mem_image,
   chunk_size 1/2/4 under `jax.checkpoint` (remat), in float32 and bf16; plus
   one chunk of N without remat for scale. The VAE parameters are jit
   arguments, as in the trainer.

  python benchmarks/bench_vae.py                       # the figures of benchmarks/README.md
  python benchmarks/bench_vae.py --image 64 --mem_image 128 --mem_n 2   # smoke run
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

FLUX = dict(channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
            norm_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)


def build(dtype):
  """(graphdef, params) of the FLUX-layout VAE in `dtype`, initialised in one jit."""
  make = lambda: VAE(**FLUX, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  params = jax.jit(lambda: nnx.split(make())[1])()
  return graphdef, params


def mib(b) -> float:
  return b / 2**20


def decode_error(graphdef32, params32, graphdef16, params16, *, image, batch):
  lat = image // 8
  latents = jax.random.normal(jax.random.PRNGKey(1), (batch, lat, lat, 16), jnp.float32)

  def dec(graphdef):
    def f(params, x):
      vae = nnx.merge(graphdef, params)
      return vae.decode(vae.unscale_latents(x)).astype(jnp.float32)
    return jax.jit(f)

  out, times = {}, {}
  for name, g, p in (("float32", graphdef32, params32), ("bfloat16", graphdef16, params16)):
    f = dec(g)
    t0 = time.perf_counter()
    jax.block_until_ready(f(p, latents))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out[name] = np.asarray(jax.block_until_ready(f(p, latents)), np.float64)
    times[name] = dict(compile_and_first_s=first, decode_s=time.perf_counter() - t0)
  ref, bf = out["float32"], out["bfloat16"]
  err = np.abs(bf - ref)
  return dict(image=image, batch=batch, max_abs_ref=float(np.abs(ref).max()),
              rms_ref=float(np.sqrt(np.mean(ref ** 2))), max_abs_err=float(err.max()),
              rel_rms_err=float(np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2))),
              times=times)


def memory(graphdef, params, *, image, n, chunk_size, remat, dtype):
  lat = image // 8
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  z = jax.ShapeDtypeStruct((n, lat, lat, 16), jnp.float32)
  images = jax.ShapeDtypeStruct((n, image, image, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((n,), jnp.float32)
  del k1, k2

  def loss(z, images, w, params):
    vae = nnx.merge(graphdef, params)
    decode = lambda x: vae.decode(vae.unscale_latents(x)).astype(jnp.float32)
    out = flow.decoded_losses(z, images, w, decode, chunk_size=chunk_size, remat=remat)
    return out.ssim + out.pixel

  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(z, images, w, abstract_params).compile()
  ma = compiled.memory_analysis()
  secs = time.perf_counter() - t0
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  return dict(dtype=dtype, chunk_size=chunk_size, remat=remat, n=n, image=image,
              peak_mib=mib(peak), temp_mib=mib(ma.temp_size_in_bytes),
              argument_mib=mib(ma.argument_size_in_bytes), compile_s=secs)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--image", type=int, default=256, help="decode-error image size")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--mem_image", type=int, default=512)
  ap.add_argument("--mem_n", type=int, default=4)
  ap.add_argument("--chunks", default="1,2,4")
  ap.add_argument("--skip_error", action="store_true")
  ap.add_argument("--skip_memory", action="store_true")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs; FLUX-layout VAE {FLUX['channels']}, random weights")
  g32, p32 = build(jnp.float32)
  g16, _ = nnx.split(nnx.eval_shape(
      lambda: VAE(**FLUX, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)  # the same weights, rounded
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p32))
  print(f"parameters: {n_params / 1e6:.1f} M")
  results = dict(device=dev.device_kind, params=n_params)
  if not args.skip_error:
    e = decode_error(g32, p32, g16, p16, image=args.image, batch=args.batch)
    results["decode_error"] = e
    print(f"\ndecode {args.batch}x{args.image}x{args.image} from {args.image // 8}^2 x 16 "
          f"latents: bf16 vs float32 max abs err {e['max_abs_err']:.3g} (max |f32| "
          f"{e['max_abs_ref']:.3g}), RMS err / RMS f32 {e['rel_rms_err']:.3g}; decode "
          f"f32 {e['times']['float32']['decode_s']:.1f} s, bf16 "
          f"{e['times']['bfloat16']['decode_s']:.1f} s")
  if not args.skip_memory:
    rows = []
    print(f"\nvalue_and_grad(decoded_losses), N={args.mem_n} x {args.mem_image}^2, MiB "
          "(compiled memory_analysis: args + out - alias + temp)")
    print(f"{'dtype':>9} {'chunk':>5} {'remat':>5} {'peak':>9} {'temp':>9} {'args':>8} "
          f"{'compile s':>9}")
    plan = [(d, int(c), True) for d in ("float32", "bfloat16") for c in args.chunks.split(",")]
    plan.append(("float32", args.mem_n, False))
    for dtype, chunk, remat in plan:
      g, p = (g32, p32) if dtype == "float32" else (g16, p16)
      r = memory(g, p, image=args.mem_image, n=args.mem_n, chunk_size=chunk, remat=remat,
                 dtype=dtype)
      rows.append(r)
      print(f"{dtype:>9} {chunk:>5} {str(remat):>5} {r['peak_mib']:>9.1f} {r['temp_mib']:>9.1f} "
            f"{r['argument_mib']:>8.1f} {r['compile_s']:>9.1f}", flush=True)
    results["memory"] = rows
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
