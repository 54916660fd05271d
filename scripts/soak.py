"""Soak test of the trainer (not in CI): random NaN faults, random kill -9, restarts.

Runs the real CLI (`python -m train`) twice over:

1. a reference run, uninterrupted, with randomly drawn `faults.nan_batch_steps`
   and `faults.nan_model_steps`;
2. the same run killed with SIGKILL at `--kills` random steps (each restart is
   the same command with the next `faults.kill_at_step`), then run to the end;

and reports steps done, skipped steps, restarts, and whether the final
parameters and optimizer state of both stages are bit-identical (on CPU).

  python scripts/soak.py --vae_steps=20 --flow_steps=20 --kills=3 --seed=1
  python scripts/soak.py --config=configs/tiny.py --nan_rate=0.1 --devices=2

Exit status 0 when everything matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `train` runs from the checkout (it is not installed)


def _load(workdir: str, stage: str, step: int):
  """A checkpointed TrainState as a dict of numpy arrays (any device topology)."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_numpy(os.path.join(workdir, stage), step)


def _equal(a, b) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--vae_steps", type=int, default=20)
  p.add_argument("--flow_steps", type=int, default=20)
  p.add_argument("--kills", type=int, default=3)
  p.add_argument("--nan_rate", type=float, default=0.1,
                 help="probability of a fault per step (half NaN batch, half NaN in model)")
  p.add_argument("--ckpt_every", type=int, default=3)
  p.add_argument("--devices", type=int, default=1, help="CPU devices per process")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--workdir", default=None, help="kept when given; a temp dir otherwise")
  p.add_argument("--extra", action="append", default=[], help="extra --config.x=y flags")
  args = p.parse_args(argv)

  seed = args.seed if args.seed is not None else random.randrange(1 << 30)
  rng = random.Random(seed)
  total = args.vae_steps + args.flow_steps
  faults = [n for n in range(1, total + 1) if rng.random() < args.nan_rate]
  nan_batch = sorted(n for n in faults if rng.random() < 0.5)
  nan_model = sorted(set(faults) - set(nan_batch))
  kills = sorted(rng.sample(range(1, total), min(args.kills, total - 1)))
  root = args.workdir or tempfile.mkdtemp(prefix="ssim_jax_soak_")
  os.makedirs(root, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.devices),
             JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
  tup = lambda xs: "(" + "".join(f"{x}," for x in xs) + ")"
  common = [f"--config={args.config}", f"--config.vae.steps={args.vae_steps}",
            f"--config.flow.steps={args.flow_steps}", f"--config.ckpt_every={args.ckpt_every}",
            f"--config.faults.nan_batch_steps={tup(nan_batch)}",
            f"--config.faults.nan_model_steps={tup(nan_model)}", *args.extra]
  print(f"soak: seed={seed} steps={total} (vae {args.vae_steps} + flow {args.flow_steps}) "
        f"nan_batch={nan_batch} nan_model={nan_model} kills={kills} workdir={root}", flush=True)

  def run(workdir, kill):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "train", f"--workdir={workdir}", *common,
                           f"--config.faults.kill_at_step={kill}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"  run kill_at_step={kill}: rc={proc.returncode} ({time.time() - t0:.0f}s)",
          flush=True)
    if proc.returncode not in (0, -9):
      print(proc.stderr[-4000:], file=sys.stderr)
    return proc

  t_start = time.time()
  ref_dir, soak_dir = os.path.join(root, "reference"), os.path.join(root, "soak")
  ref = run(ref_dir, 0)
  restarts, unexpected = 0, []
  for k in kills:
    proc = run(soak_dir, k)
    if proc.returncode != -9:
      unexpected.append((k, proc.returncode))
    restarts += 1
  final = run(soak_dir, 0)

  ok = ref.returncode == 0 and final.returncode == 0 and not unexpected
  rows = []
  if ok:
    for stage, steps in (("vae", args.vae_steps), ("flow", args.flow_steps)):
      a, b = _load(ref_dir, stage, steps), _load(soak_dir, stage, steps)
      same = _equal(a["params"], b["params"]) and _equal(a["opt_state"], b["opt_state"])
      rows.append((stage, int(b["step"]), int(a["skipped"]), int(b["skipped"]), same))
      ok = ok and same and int(a["skipped"]) == int(b["skipped"])
  expected_skips = len(faults)
  ok = ok and sum(r[3] for r in rows) == expected_skips
  print("\nsoak summary")
  print(f"  seed                 {seed}")
  print(f"  steps done           {sum(r[1] for r in rows)} of {total}")
  print(f"  faults injected      {expected_skips} (nan batch {len(nan_batch)}, "
        f"nan in model {len(nan_model)})")
  print(f"  skipped (ref/soak)   {sum(r[2] for r in rows)} / {sum(r[3] for r in rows)}")
  print(f"  kills -> restarts    {len(kills)} -> {restarts} (unexpected exits: {unexpected})")
  for stage, _, _, _, same in rows:
    print(f"  {stage:5s} params+opt   {'bit-identical' if same else 'DIFFER'} to the reference")
  print(f"  wall time            {time.time() - t_start:.0f}s")
  print(f"  RESULT               {'PASS' if ok else 'FAIL'}")
  if args.workdir is None and ok:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
