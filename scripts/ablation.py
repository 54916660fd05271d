"""What the SSIM loss buys: mse_only vs pixel_only vs ssim_only vs mixed, 3 seeds each (not in CI).

  python scripts/ablation.py [--seeds 0 1 2] [--workdir runs/ablation] [--set FIELD=VALUE ...]

Each run is the README's main job (`configs/default.py`: fine-tune the shipped
base model on the shipped VAE) with only the flow loss weights changed by
`configs/{mse_only,pixel_only,ssim_only,mixed}.py`: the same data, steps and
seeds (mse_only, no decoded loss, is the control: what the steps alone buy).
Runs are separate `python -m train` processes (resumed if their workdir
exists); each writes `results.json`, and this script prints PSNR / SSIM /
MS-SSIM on the held-out crops as mean +- std over seeds, plus the base model
and bicubic, and each arm's per-seed difference to the mse_only control, as
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("mse_only", "pixel_only", "ssim_only", "mixed")
METRICS = ("psnr", "ssim", "ms_ssim")


def run(name: str, seed: int, root: str, extra: list[str]) -> dict:
  workdir = os.path.abspath(os.path.join(root, f"{name}_seed{seed}"))
  results = os.path.join(workdir, "results.json")
  if not os.path.exists(results):
    cmd = [sys.executable, "-m", "train", f"--config=configs/{name}.py",
           f"--workdir={workdir}", f"--config.seed={seed}",
           "--config.progress_bar=False"] + [f"--config.{e}" for e in extra]
    t = time.time()
    # From the repository root: `train` and `configs/` run from the checkout.
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    print(f"{name} seed {seed}: {time.time() - t:.0f} s", flush=True)
  with open(results) as f:
    return json.load(f)["validation"]


def fmt(values, metric: str) -> str:
  a = np.asarray(values, np.float64)
  digits = 2 if metric == "psnr" else 4
  return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--workdir", default="runs/ablation")
  ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                  help="config overrides for every run, e.g. flow.steps=100")
  args = ap.parse_args()
  t0 = time.time()
  table = {name: [run(name, s, args.workdir, args.set) for s in args.seeds] for name in CONFIGS}
  first = table[CONFIGS[0]]
  # The sampler's noise depends on the seed, so each seed's base model and
  # bicubic rows come from that seed's runs, and arms are compared per seed.
  rows = {"bicubic": [r["bicubic"] for r in first]}
  if "base model (dit.pretrained)" in first[0]:
    rows["base model (before fine-tuning)"] = [r["base model (dit.pretrained)"] for r in first]
  model_key = "fine-tuned model" if "fine-tuned model" in first[0] else "model"
  for name in CONFIGS:
    rows[name] = [r[model_key] for r in table[name]]
  print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
        f"{time.time() - t0:.0f} s in all\n")
  print("| flow loss | PSNR (dB) | SSIM | MS-SSIM |")
  print("|---|---:|---:|---:|")
  for name, rs in rows.items():
    print(f"| {name} | " + " | ".join(fmt([r[m] for r in rs], m) for m in METRICS) + " |")
  control = CONFIGS[0]
  print(f"\nPaired by seed (same sampler noise), difference to {control}:\n")
  print("| flow loss | Δ PSNR (dB) | Δ SSIM | Δ MS-SSIM |")
  print("|---|---:|---:|---:|")
  for name in CONFIGS[1:]:
    print(f"| {name} | " + " | ".join(
        fmt([a[m] - b[m] for a, b in zip(rows[name], rows[control])], m)
        for m in METRICS) + " |")


if __name__ == "__main__":
  main()
