"""Speed of ssim_jax against dm_pix and pytorch-msssim, side by side.

One run, same inputs for every implementation; forward (the loss) and
forward+backward (gradient w.r.t. the first image), timed after compilation,
median of `--repeats` runs. pytorch-msssim runs on ordinary NCHW tensors and
on channels_last tensors (oneDNN's depthwise convolution is fast there); the
faster layout is the one compared against. Also reports the jit compile time
of the ssim_jax loss + gradient and the temporary memory of the compiled
gradient (XLA memory analysis), in units of one f32 image-sized map.

  python benchmarks/bench_ssim.py            # full table (minutes)
  python benchmarks/bench_ssim.py --quick    # smoke run on tiny shapes
  python benchmarks/bench_ssim.py --methods auto,matmul,conv   # lowerings

Ratios are "other time / ssim_jax time" (> 1: ssim_jax is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

from timing import median_time  # benchmarks/timing.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssim_jax  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  shape: tuple[int, int, int, int]   # B, H, W, C
  kind: str                          # "ssim", "l1_ssim" or "ms_ssim"


FULL = (
    Case("ssim 16x256x256x3", (16, 256, 256, 3), "ssim"),
    Case("ssim 1x1024x1024x1", (1, 1024, 1024, 1), "ssim"),
    Case("ssim 64x64x64x3", (64, 64, 64, 3), "ssim"),
    Case("l1_ssim same 1x1080x1920x3", (1, 1080, 1920, 3), "l1_ssim"),
    Case("ms_ssim 8x256x256x3", (8, 256, 256, 3), "ms_ssim"),
)
QUICK = (
    Case("ssim 2x48x48x3", (2, 48, 48, 3), "ssim"),
    Case("l1_ssim same 1x40x56x3", (1, 40, 56, 3), "l1_ssim"),
    Case("ms_ssim 1x176x176x1", (1, 176, 176, 1), "ms_ssim"),
)



def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.random(shape, dtype=np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(shape, dtype=np.float32), 0, 1)
  return x, y.astype(np.float32)


# ---------------------------------------------------------------- ssim_jax
def _jax_loss(kind: str, method: str):
  if kind == "ssim":
    return lambda x, y: ssim_jax.ssim_loss(x, y, filter_method=method)
  if kind == "l1_ssim":
    return lambda x, y: ssim_jax.l1_ssim_loss(x, y, padding="same",
                                              filter_method=method)
  return lambda x, y: ssim_jax.ms_ssim_loss(x, y, filter_method=method)


def bench_ssim_jax(case: Case, x, y, repeats: int, method: str) -> dict:
  loss = _jax_loss(case.kind, method)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  fwd = jax.jit(loss)
  vg = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = vg.lower(xj, yj).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  out = {
      "fwd": median_time(lambda: fwd(xj, yj).block_until_ready(), repeats),
      "fwd+bwd": median_time(
          lambda: jax.block_until_ready(compiled(xj, yj)), repeats),
      "compile": compile_s,
      "temp_maps": None if temp is None else temp / (4 * np.prod(x.shape)),
  }
  return out


# ------------------------------------------------------------------ dm_pix
def bench_dm_pix(case: Case, x, y, repeats: int) -> dict | None:
  try:
    import dm_pix
  except ImportError:
    return None
  if case.kind == "ms_ssim":
    return None  # dm_pix has no MS-SSIM.

  def loss(a, b):
    s = 1.0 - jnp.mean(dm_pix.ssim(a, b, max_val=1.0))
    if case.kind == "l1_ssim":
      # dm_pix has only 'valid' SSIM: same cost, closest equivalent.
      s = 0.8 * jnp.mean(jnp.abs(a - b)) + 0.2 * s
    return s

  xj, yj = jnp.asarray(x), jnp.asarray(y)
  fwd = jax.jit(loss)
  vg = jax.jit(jax.value_and_grad(loss))
  return {
      "fwd": median_time(lambda: fwd(xj, yj).block_until_ready(), repeats),
      "fwd+bwd": median_time(
          lambda: jax.block_until_ready(vg(xj, yj)), repeats),
  }


# ---------------------------------------------------------- pytorch-msssim
def bench_torch(case: Case, x, y, repeats: int, layout: str) -> dict | None:
  try:
    import pytorch_msssim
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  fmt = (torch.channels_last if layout == "channels_last"
         else torch.contiguous_format)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  yt = torch.from_numpy(y).permute(0, 3, 1, 2).contiguous(memory_format=fmt)

  def loss(a, b):
    if case.kind == "ms_ssim":
      return 1 - pytorch_msssim.ms_ssim(a, b, data_range=1.0)
    s = 1 - pytorch_msssim.ssim(a, b, data_range=1.0)
    if case.kind == "l1_ssim":
      # pytorch-msssim has only 'valid' SSIM: closest equivalent.
      s = 0.8 * torch.mean(torch.abs(a - b)) + 0.2 * s
    return s

  def fwd():
    with torch.no_grad():
      loss(xt, yt).item()

  def fwd_bwd():
    a = xt.detach().requires_grad_(True)
    loss(a, yt).backward()
    a.grad.sum().item()

  return {"fwd": median_time(fwd, repeats),
          "fwd+bwd": median_time(fwd_bwd, repeats)}


def _fmt_ms(t):
  return "    n/a" if t is None else f"{1e3 * t:7.1f}"


def _ratio(other, mine):
  return "  n/a" if other is None else f"{other / mine:5.2f}"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes, 2 repeats: a smoke run")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed runs per measurement (default 10, quick 2)")
  p.add_argument("--methods", default="auto",
                 help="comma-separated ssim_jax filter_method values")
  p.add_argument("--only", default="",
                 help="substring filter on case names")
  p.add_argument("--no-peers", action="store_true",
                 help="time ssim_jax only")
  args = p.parse_args(argv)
  cases = QUICK if args.quick else FULL
  cases = [c for c in cases if args.only in c.name]
  repeats = args.repeats or (2 if args.quick else 10)
  methods = args.methods.split(",")

  print(f"# machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus; jax {jax.__version__} "
        f"backend {jax.default_backend()}; repeats {repeats}")
  print("# times in ms (median); ratio = peer time / ssim_jax time; "
        "temp = compiled grad temp memory / one f32 image")
  header = (f"{'case':28s} {'impl':22s} {'fwd':>7s} {'fwd+bwd':>7s} "
            f"{'x dm_pix':>8s} {'x torch':>7s} {'compile s':>9s} {'temp':>5s}")
  print(header)
  for case in cases:
    x, y = _inputs(case.shape)
    peers = {}
    if not args.no_peers:
      peers["dm_pix"] = bench_dm_pix(case, x, y, repeats)
      nchw = bench_torch(case, x, y, repeats, "nchw")
      cl = bench_torch(case, x, y, repeats, "channels_last")
      peers["torch nchw"] = nchw
      peers["torch channels_last"] = cl
      best = [r for r in (nchw, cl) if r is not None]
      peers["torch best"] = ({k: min(r[k] for r in best) for k in best[0]}
                             if best else None)
    for method in methods:
      r = bench_ssim_jax(case, x, y, repeats, method)
      dm, tb = peers.get("dm_pix"), peers.get("torch best")
      rd = _ratio(dm and dm["fwd+bwd"], r["fwd+bwd"])
      rt = _ratio(tb and tb["fwd+bwd"], r["fwd+bwd"])
      rdf = _ratio(dm and dm["fwd"], r["fwd"])
      rtf = _ratio(tb and tb["fwd"], r["fwd"])
      temp = "  n/a" if r["temp_maps"] is None else f"{r['temp_maps']:5.1f}"
      print(f"{case.name:28s} {'ssim_jax ' + method:22s} {_fmt_ms(r['fwd'])} "
            f"{_fmt_ms(r['fwd+bwd'])} {rd:>8s} {rt:>7s} "
            f"{r['compile']:9.2f} {temp}", flush=True)
      print(f"{'':28s} {'  (forward ratios)':22s} {'':7s} {'':7s} "
            f"{rdf:>8s} {rtf:>7s}", flush=True)
    for name in ("dm_pix", "torch nchw", "torch channels_last"):
      r = peers.get(name)
      if r is not None:
        print(f"{'':28s} {name:22s} {_fmt_ms(r['fwd'])} "
              f"{_fmt_ms(r['fwd+bwd'])}", flush=True)


if __name__ == "__main__":
  main()
