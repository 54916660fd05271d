"""What the SSIM loss buys: the study of issue 23 (fundus, MR, VAE stage; not in CI).

  taskset -c 1 python scripts/study.py run [--groups fundus mr vae] [--arms NAME ...]
  python scripts/study.py tables [--groups ...]     # Markdown tables from finished runs
  python scripts/study.py figure                    # docs/figures/study_ssim_gain.png

Every arm is a separate `python -m train` process in `ROOT/<group>_<arm>_seed<S>`
(default ROOT = runs/study): a finished run (results.json) is skipped, an
unfinished one resumes from its checkpoints. Each run's wall time is printed,
written to its workdir (time.json) and appended to the log (docs/study/log.md,
committed with the tables).

Design (docs/study.rst, "What the SSIM loss buys"):
- flow groups (`fundus`, `mr`): one shared base model trained from scratch with
  the velocity mse only (an early model the loss can still shape), then every
  arm fine-tunes it with the same steps, data order and training noise (the
  seed), changing only the flow loss. Every arm of a seed samples the same
  held-out crops from the same noise per crop, so arms are compared crop by
  crop against the control (`control`: velocity mse only, the same steps).
- `vae`: the autoencoder stage from scratch with L1 vs L1 + SSIM vs L1 +
  MS-SSIM, same steps; reconstructions compared crop by crop.

Intervals: the mean paired difference to the control over (seed, crop), with a
95 % two-level bootstrap interval (seeds resampled with replacement, then the
crops, the same crop indices for every seed, 4000 replicates); with one seed
it is over crops only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("psnr", "ssim", "ms_ssim")
NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


@dataclasses.dataclass(frozen=True)
class Arm:
  group: str
  name: str
  label: str
  config: str
  sets: tuple = ()  # ("field=value", ...)
  seeds: tuple = (0,)
  base: str = ""  # arm name (same group) whose export/dit this arm fine-tunes
  control: bool = False


def _flow_arms(group: str, config: str, *, main_seeds, extra: bool,
               own_vae: bool = False) -> list[Arm]:
  base = Arm(group, "base", "base model (velocity mse, from scratch)", config)
  ft = ("flow.steps=1000", "flow.learning_rate=5e-4", "flow.warmup_steps=50")
  if own_vae:  # the base run trained the VAE: the arms reuse it, frozen
    ft += ("vae.pretrained={base}/export/vae",)
  arm = lambda name, label, sets, seeds=main_seeds, control=False: Arm(
      group, name, label, config, ft + tuple(sets), tuple(seeds), "base", control)
  arms = [
      base,
      arm("control", "control: velocity mse only", (), control=True),
      arm("l1", "+ 1.0 L1", ("pixel_loss_weight=1.0",)),
      arm("ssim", "+ 1.0 SSIM", ("ssim_loss_weight=1.0",)),
      arm("msssim", "+ 1.0 MS-SSIM (2 scales)", ("ssim_loss_weight=1.0", "ssim_loss_levels=2")),
      arm("l1_ssim", "+ 0.5 L1 + 0.5 SSIM (the main job's former mix)",
          ("pixel_loss_weight=0.5", "ssim_loss_weight=0.5")),
  ]
  if extra:
    arms += [
        arm("ssim3", "+ 3 SSIM", ("ssim_loss_weight=3.0",), seeds=(0,)),
        arm("ssim10", "+ 10 SSIM", ("ssim_loss_weight=10.0",), seeds=(0, 1)),
        arm("ssim_t1", "+ 1.0 SSIM, ssim_loss_max_t = 1.0",
            ("ssim_loss_weight=1.0", "ssim_loss_max_t=1.0"), seeds=(0, 1)),
    ]
  return arms


def _vae_arms() -> list[Arm]:
  cfg = "configs/study_vae.py"
  return [
      Arm("vae", "l1", "L1", cfg, ("vae.ssim_weight=0.0",), (0, 1), control=True),
      Arm("vae", "l1_ssim", "L1 + 1.0 SSIM", cfg, ("vae.ssim_weight=1.0",), (0, 1)),
      Arm("vae", "l1_msssim", "L1 + 1.0 MS-SSIM (2 scales)", cfg,
          ("vae.ssim_weight=1.0", "vae.ssim_levels=2"), (0, 1)),
  ]


ARMS = (_flow_arms("fundus", "configs/study_fundus.py", main_seeds=(0, 1), extra=True)
        + _flow_arms("mr", "configs/mr_study.py", main_seeds=(0, 1), extra=False,
                     own_vae=True)
        + _vae_arms())
# Queue: the fundus arms first, seed 0 of every main arm before seed 1, then the rest.
GROUPS = ("fundus", "mr", "vae")


def workdir(root: str, arm: Arm, seed: int) -> str:
  return os.path.join(root, f"{arm.group}_{arm.name}_seed{seed}")


def queue(arms) -> list[tuple[Arm, int]]:
  """(arm, seed) in run order: bases, then each seed's arms in turn."""
  out = [(a, s) for a in arms if not a.base for s in a.seeds]
  seeds = sorted({s for a in arms for s in a.seeds})
  for s in seeds:
    out += [(a, s) for a in arms if a.base and s in a.seeds]
  return out


def log_line(path: str, text: str) -> None:
  print(text, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(text + "\n")


def run_one(arm: Arm, seed: int, root: str, log: str, extra: list[str]) -> None:
  wd = workdir(root, arm, seed)
  if os.path.exists(os.path.join(wd, "results.json")):
    return
  sets = list(arm.sets) + list(extra)
  if arm.base:
    base = next(a for a in ARMS if a.group == arm.group and a.name == arm.base)
    sets = [x.replace("{base}", workdir(root, base, 0)) for x in sets]
    sets.append(f"dit.pretrained={os.path.join(workdir(root, base, 0), 'export', 'dit')}")
  cmd = [sys.executable, "-m", "train", f"--config={arm.config}", f"--workdir={wd}",
         f"--config.seed={seed}", "--config.progress_bar=False"] + [f"--config.{s}" for s in sets]
  os.makedirs(wd, exist_ok=True)
  t = time.time()
  with open(os.path.join(wd, "train.log"), "a") as out:
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
  dt = time.time() - t
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
  shown = " ".join(c if not c.startswith(sys.executable) else "python" for c in cmd)
  if proc.returncode:
    log_line(log, f"- {stamp} FAILED (rc {proc.returncode}) after {dt:.0f} s: `{shown}` "
             f"(see {wd}/train.log)")
    return
  with open(os.path.join(wd, "time.json"), "w") as f:
    json.dump({"seconds": dt, "finished": stamp}, f)
  log_line(log, f"- {stamp} {arm.group}/{arm.name} seed {seed}: {dt:.0f} s: `{shown}`")


# ----------------------------------------------------------------------------
# Tables.


def load(root: str, arm: Arm, seed: int):
  path = os.path.join(workdir(root, arm, seed), "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    r = json.load(f)
  tpath = os.path.join(workdir(root, arm, seed), "time.json")
  r["seconds"] = json.load(open(tpath))["seconds"] if os.path.exists(tpath) else float("nan")
  return r


def _key(arm: Arm) -> str:
  return "vae reconstruction" if arm.group == "vae" else "model"


def per_crop(results: dict, key: str, metric: str) -> np.ndarray:
  return np.asarray(results["per_crop"][key][metric], np.float64)


def paired_interval(diffs: np.ndarray, *, reps: int = 4000, seed: int = 0):
  """Mean of `diffs [seeds, crops]` and its 95 % two-level bootstrap interval."""
  rng = np.random.default_rng(seed)
  s, n = diffs.shape
  si = rng.integers(0, s, size=(reps, s)) if s > 1 else np.zeros((reps, 1), int)
  ci = rng.integers(0, n, size=(reps, n))
  boot = diffs[si[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return float(diffs.mean()), float(lo), float(hi)


def _fmt(v: float, metric: str, sign: bool = False) -> str:
  d = 2 if metric == "psnr" else 4
  return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def tables(root: str, groups) -> str:
  out = []
  for g in groups:
    arms = [a for a in ARMS if a.group == g]
    control = next(a for a in arms if a.control)
    done = {(a.name, s): load(root, a, s) for a in arms for s in a.seeds}
    if not any(v is not None for v in done.values()):
      continue
    out.append(f"\n#### {g}\n")
    # Means over crops (and seeds).
    out.append("| arm | seeds | " + " | ".join(NAMES[m] for m in METRICS) + " | time / run |")
    out.append("|---|---:|" + "---:|" * len(METRICS) + "---:|")
    first = next(v for v in done.values() if v is not None)
    if g != "vae":
      for label, key in (("bicubic", "bicubic"),):
        out.append(f"| {label} | – | " + " | ".join(
            _fmt(per_crop(first, key, m).mean(), m) for m in METRICS) + " | – |")
    for a in arms:
      rs = [done[(a.name, s)] for s in a.seeds if done[(a.name, s)] is not None]
      if not rs:
        continue
      key = _key(a)
      cells = [_fmt(np.mean([per_crop(r, key, m).mean() for r in rs]), m) for m in METRICS]
      secs = np.mean([r["seconds"] for r in rs])
      out.append(f"| {a.label} | {len(rs)} | " + " | ".join(cells) + f" | {secs:.0f} s |")
    # Paired differences to the control.
    out.append(f"\nPaired differences to the control ({control.label}), mean over seeds x "
               f"{first['num_val']} held-out crops [95 % interval]; per seed for SSIM; "
               "crops where SSIM improved:\n")
    out.append("| arm | seeds | Δ PSNR (dB) | Δ SSIM | Δ MS-SSIM | Δ SSIM per seed | "
               "SSIM up on |")
    out.append("|---|---:|---:|---:|---:|---|---:|")
    for a in arms:
      if a.control or not a.base and g != "vae":
        continue
      seeds = [s for s in a.seeds
               if done[(a.name, s)] is not None and done.get((control.name, s)) is not None]
      if not seeds:
        continue
      cells, per_seed, up = [], "", ""
      for m in METRICS:
        d = np.stack([per_crop(done[(a.name, s)], _key(a), m)
                      - per_crop(done[(control.name, s)], _key(control), m) for s in seeds])
        mean, lo, hi = paired_interval(d)
        cells.append(f"{_fmt(mean, m, True)} [{_fmt(lo, m, True)}, {_fmt(hi, m, True)}]")
        if m == "ssim":
          per_seed = ", ".join(_fmt(x, m, True) for x in d.mean(axis=1))
          up = f"{100 * np.mean(d > 0):.0f} %"
      out.append(f"| {a.label} | {len(seeds)} | " + " | ".join(cells)
                 + f" | {per_seed} | {up} |")
    if g != "vae":
      rs = [done[("control", s)] for s in (0, 1) if done.get(("control", s)) is not None]
      if rs and "base" in rs[0]["per_crop"]:
        out.append("\nThe base model before fine-tuning (what the steps alone buy: control - "
                   "base): " + ", ".join(
                       f"{NAMES[m]} {_fmt(np.mean([per_crop(r, 'base', m).mean() for r in rs]), m)}"
                       f" ({_fmt(np.mean([per_crop(r, 'model', m).mean() - per_crop(r, 'base', m).mean() for r in rs]), m, True)})"
                       for m in METRICS))
      vae = first["per_crop"].get("vae reconstruction")
      if vae:
        out.append("VAE reconstruction of the same crops (the upper bound of any latent "
                   "model): " + ", ".join(f"{NAMES[m]} {_fmt(np.mean(vae[m]), m)}"
                                          for m in METRICS if m in vae))
  return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
# Figure.


def figure(root: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from train import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

  arms = {a.name: a for a in ARMS if a.group == "fundus"}
  ctl = load(root, arms["control"], 0)
  names = [n for n in ("l1", "ssim", "msssim", "l1_ssim", "ssim10", "ssim_t1")
           if load(root, arms[n], 0) is not None]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
  ax = axes[0]
  for n in names:
    d = per_crop(load(root, arms[n], 0), "model", "ssim") - per_crop(ctl, "model", "ssim")
    ax.plot(np.sort(d)[::-1], label=f"{arms[n].label} (mean {d.mean():+.4f})")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("held-out crop (sorted by gain)")
  ax.set_ylabel("SSIM - SSIM of the control")
  ax.set_title("fundus, seed 0: per-crop SSIM gain over the control")
  ax.legend(fontsize=7)
  # One crop: the SSIM-map difference of the strongest SSIM dose against the
  # control, on the crop where it changed SSIM most (either way).
  best = "ssim10" if "ssim10" in names else "ssim"
  a = np.load(os.path.join(workdir(root, arms[best], 0), "eval", "final.npz"))
  c = np.load(os.path.join(workdir(root, arms["control"], 0), "eval", "final.npz"))
  d = per_crop(load(root, arms[best], 0), "model", "ssim") - per_crop(ctl, "model", "ssim")
  i = int(np.argmax(np.abs(d)))  # chosen by the rule above, not by eye
  ma = eval_lib.ssim_map_image(a["pred"][i:i + 1], a["highres"][i:i + 1])[0, ..., 0]
  mc = eval_lib.ssim_map_image(c["pred"][i:i + 1], c["highres"][i:i + 1])[0, ..., 0]
  unit = lambda x: np.clip((x + 1) / 2, 0, 1)
  row = np.concatenate([unit(c["highres"][i]), unit(c["pred"][i]), unit(a["pred"][i])], axis=1)
  ax = axes[1]
  ax.axis("off")
  ax.set_title(f"crop {i} (largest |SSIM change|, {d[i]:+.4f}): target | control | "
               f"{arms[best].label}\nbelow: its SSIM map - the control's (red: better)",
               fontsize=8)
  lim = max(1e-3, float(np.abs(ma - mc).max()))
  diff = plt.get_cmap("RdBu_r")((ma - mc) / (2 * lim) + 0.5)[..., :3]
  h, w = mc.shape
  blank = np.ones((h, w, 3))
  ax.imshow(np.concatenate([row, np.concatenate([blank, blank, diff], axis=1)], axis=0))
  ax.text(2.2 * w, 2 * h + 4, f"±{lim:.3f}", fontsize=7, ha="center", va="top")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("what", choices=("run", "tables", "figure"))
  ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
  ap.add_argument("--arms", nargs="*", default=None, help="arm names (default: all)")
  ap.add_argument("--root", default=os.path.join(ROOT, "runs", "study"))
  ap.add_argument("--log", default=os.path.join(ROOT, "docs", "study", "log.md"))
  ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                  help="config overrides for every run (e.g. for a smoke test)")
  args = ap.parse_args()
  if args.what == "run":
    arms = [a for a in ARMS if a.group in args.groups
            and (args.arms is None or a.name in args.arms or not a.base and a.group != "vae")]
    t0 = time.time()
    for arm, seed in queue(arms):
      run_one(arm, seed, args.root, args.log, args.set)
    print(f"all runs: {time.time() - t0:.0f} s")
    print(tables(args.root, args.groups))
  elif args.what == "tables":
    print(tables(args.root, args.groups))
  else:
    figure(args.root, os.path.join(ROOT, "docs", "figures", "study_ssim_gain.png"))


if __name__ == "__main__":
  main()
