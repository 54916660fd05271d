"""3-D SSIM loss + gradient: ssim_jax against MONAI, pytorch-msssim, dm_pix.

Every implementation runs in its own subprocess (so that its peak resident
memory is its own, and an out-of-memory peer cannot take the others down),
on the same phantom volumes (`tests/phantom.py`: ellipsoids in air, plus a
blurred, noisy copy), and is timed after a warm-up call, median of
`--repeats` runs:

- ssim_jax: `ssim_loss(x, y, spatial_dims=3)` (11^3 Gaussian window,
  sigma 1.5, 'valid'), `jax.value_and_grad` w.r.t. x; also its compile
  time and the compiled gradient's temp memory (XLA memory analysis);
- MONAI `SSIMLoss(spatial_dims=3, data_range=1.0)` (same window, a full 3-D
  kernel conv3d), NCDHW, and channels_last_3d;
- pytorch-msssim `ssim(..., win_size=11)` on 5-D tensors (separable conv3d
  passes), NCDHW and channels_last_3d; the faster layout is the one quoted;
- dm_pix `ssim` applied slice by slice (a 2-D SSIM of every D slice; a
  baseline, not the same metric), JAX.

Peers get an address-space cap (`--mem-cap-gb`, default 16) so that "out of
memory" is a clean failure, not the kernel's OOM killer; ssim_jax and dm_pix
are not capped (XLA reserves virtual address space up front) and their peak
resident memory is reported instead.

  python benchmarks/bench_ssim3d.py            # 128^3 and 300x512x512
  python benchmarks/bench_ssim3d.py --quick    # a smoke run on 16x24x24
  python benchmarks/bench_ssim3d.py --shapes 1x300x512x512x1 \
      --only ssim_jax,monai               # one shape, some implementations

Run it from a virtualenv with torch, monai, pytorch-msssim and dm-pix (see
benchmarks/README.md); missing peers are reported as "not installed".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from timing import median_time  # benchmarks/timing.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {"full": ((1, 128, 128, 128, 1), (1, 300, 512, 512, 1)),
         "quick": ((1, 16, 24, 24, 1),)}
IMPLS = ("ssim_jax", "dm_pix_slices", "monai", "monai_cl",
         "pytorch_msssim", "pytorch_msssim_cl")


def _volumes(shape):
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import numpy as np
  from phantom import distort
  from phantom import phantom
  b, d, h, w, c = shape
  x = phantom((d, h, w))
  y = distort(x, seed=1)
  x = np.broadcast_to(x[None, ..., None], shape).astype(np.float32)
  y = np.broadcast_to(y[None, ..., None], shape).astype(np.float32)
  return np.ascontiguousarray(x), np.ascontiguousarray(y)



def _child_jax(impl, shape, repeats):
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  x, y = _volumes(shape)
  if impl == "ssim_jax":
    import ssim_jax

    def loss(a, b):
      return ssim_jax.ssim_loss(a, b, spatial_dims=3)
  else:
    import dm_pix

    def loss(a, b):
      n = shape[0] * shape[1]
      planes = lambda v: v.reshape((n,) + v.shape[2:])  # noqa: E731
      return 1.0 - jnp.mean(dm_pix.ssim(planes(a), planes(b), max_val=1.0))
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  vg = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = vg.lower(xj, yj).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out = {
      "fwd+bwd": median_time(
          lambda: jax.block_until_ready(compiled(xj, yj)), repeats),
      "compile": compile_s,
      "temp_gb": mem.temp_size_in_bytes / 1e9,
      "loss": float(compiled(xj, yj)[0]),
  }
  fwd = jax.jit(loss)
  out["fwd"] = median_time(lambda: fwd(xj, yj).block_until_ready(), repeats)
  return out


def _child_torch(impl, shape, repeats):
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  x, y = _volumes(shape)
  fmt = (torch.channels_last_3d if impl.endswith("_cl")
         else torch.contiguous_format)
  xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous(
      memory_format=fmt)
  yt = torch.from_numpy(y).permute(0, 4, 1, 2, 3).contiguous(
      memory_format=fmt)
  if impl.startswith("monai"):
    from monai.losses import SSIMLoss
    monai_loss = SSIMLoss(spatial_dims=3, data_range=1.0)
    loss = monai_loss
  else:
    import pytorch_msssim

    def loss(a, b):
      return 1 - pytorch_msssim.ssim(a, b, data_range=1.0, win_size=11)

  def fwd():
    with torch.no_grad():
      return loss(xt, yt).item()

  def fwd_bwd():
    a = xt.detach().requires_grad_(True)
    loss(a, yt).backward()
    a.grad.sum().item()

  return {"fwd+bwd": median_time(fwd_bwd, repeats),
          "fwd": median_time(fwd, repeats), "loss": fwd()}


def child(impl, shape, repeats, mem_cap_gb):
  if impl.startswith(("monai", "pytorch_msssim")) and mem_cap_gb > 0:
    cap = int(mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  try:
    if impl in ("ssim_jax", "dm_pix_slices"):
      out = _child_jax(impl, shape, repeats)
    else:
      out = _child_torch(impl, shape, repeats)
  except ImportError as e:
    out = {"error": f"not installed ({e.name})"}
  except (MemoryError, RuntimeError) as e:
    text = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    out = {"error": f"out of memory (cap {mem_cap_gb:g} GB): {text}"
           if "memory" in text.lower() or isinstance(e, MemoryError)
           else f"failed: {text}"}
  out["peak_rss_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        / 2**20)
  print("RESULT " + json.dumps(out))


def _run_child(impl, shape, repeats, mem_cap_gb, timeout_s):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", impl,
         "--shape", "x".join(map(str, shape)), "--repeats", str(repeats),
         "--mem-cap-gb", str(mem_cap_gb)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout (> {timeout_s} s for warm-up + "
                     f"{repeats} runs)"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
  return {"error": f"exit {proc.returncode}: {tail}"}


def _machine():
  info = {}
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      key, _, value = line.partition(":")
      info[key.strip()] = value.strip()
  except OSError:
    pass
  flags = info.get("Flags", "").split()
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
  return (f"{info.get('Model name', platform.processor())} (family "
          f"{info.get('CPU family', '?')}, model {info.get('Model', '?')}, "
          f"{isa}), {os.cpu_count()} cpus")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed runs (default: 5 at 128^3, 2 above, quick 2)")
  p.add_argument("--only", default="", help="comma-separated impls")
  p.add_argument("--shapes", default="",
                 help="comma-separated BxDxHxWxC (default: the full pair)")
  p.add_argument("--mem-cap-gb", type=float, default=16.0)
  p.add_argument("--timeout-s", type=int, default=420,
                 help="per implementation and shape")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    shape = tuple(int(v) for v in args.shape.split("x"))
    child(args.child, shape, args.repeats, args.mem_cap_gb)
    return
  impls = args.only.split(",") if args.only else IMPLS
  print(f"# {_machine()}; python {platform.python_version()}")
  print("# fwd+bwd / fwd: median seconds after a warm-up; rss: peak "
        "resident GB of the process; temp: XLA compiled-gradient temp GB")
  print(f"{'shape':18s} {'impl':18s} {'fwd+bwd s':>9s} {'fwd s':>7s} "
        f"{'rss GB':>6s} {'temp GB':>7s} {'compile s':>9s} {'loss':>7s}")
  shapes = CASES["quick" if args.quick else "full"]
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x"))
              for s in args.shapes.split(",")]
  for shape in shapes:
    voxels = shape[1] * shape[2] * shape[3]
    repeats = args.repeats or (2 if args.quick or voxels > 1 << 22 else 5)
    for impl in impls:
      r = _run_child(impl, shape, repeats, args.mem_cap_gb, args.timeout_s)
      name = "x".join(map(str, shape))
      if "error" in r:
        print(f"{name:18s} {impl:18s} {r['error']}", flush=True)
        continue
      temp = f"{r['temp_gb']:7.2f}" if "temp_gb" in r else "      -"
      comp = f"{r['compile']:9.1f}" if "compile" in r else "        -"
      print(f"{name:18s} {impl:18s} {r['fwd+bwd']:9.4g} {r['fwd']:7.4g} "
            f"{r['peak_rss_gb']:6.2f} {temp} {comp} {r['loss']:7.4f}",
            flush=True)


if __name__ == "__main__":
  main()
