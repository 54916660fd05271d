"""Checks `from_diffusers` / `save_diffusers` against diffusers' own AutoencoderKL (torch).

Not run in CI (it needs torch + diffusers). In a separate virtualenv:

  python3 -m venv /work/venv-torch && . /work/venv-torch/bin/activate
  pip install torch==2.13.0 diffusers safetensors && pip install -e ".[train]"
  python scripts/check_diffusers_vae.py            # small widths, 4 families
  python scripts/check_diffusers_vae.py --full     # + full-width FLUX/SD layouts

For each VAE family (SD1.5/SD2, SDXL, SD3/SD3.5, FLUX.1: the real configs'
fields, block_out_channels divided by --width_div unless --full) it

1. builds diffusers' `AutoencoderKL(**config)` with random weights (torch
   init, then every GroupNorm scale/bias perturbed so they are not 1/0),
   `save_pretrained(folder)`;
2. loads the folder with `train.models.vae.from_diffusers` and compares the
   encoder posterior mean and the decoder output (decoding torch's mean) with
   torch, float32; then the same in bfloat16 (`force_upcast=False`) against
   torch float32;
3. loads the folder through a pipeline layout (`pipe/vae/`);
4. writes our model back with `save_diffusers`, loads it with diffusers'
   `AutoencoderKL.from_pretrained` and compares the decoder output with the
   original torch model (the inverse direction).

It exits non-zero when a float32 error exceeds --tol (relative to the
largest |output|). Results of the last run are in scripts/check_diffusers_vae.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from train.models import vae as vae_lib  # noqa: E402

# The fields of the published config.json files (stabilityai/sd-vae-ft-mse,
# stabilityai/sdxl-vae, stabilityai/stable-diffusion-3-medium-diffusers vae/,
# black-forest-labs/FLUX.1-dev vae/) that define the architecture and latents.
_COMMON = dict(in_channels=3, out_channels=3, layers_per_block=2, norm_num_groups=32,
               act_fn="silu", block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
FAMILIES = {
    "sd15": dict(_COMMON, latent_channels=4, scaling_factor=0.18215, sample_size=512),
    "sdxl": dict(_COMMON, latent_channels=4, scaling_factor=0.13025, force_upcast=True,
                 sample_size=1024),
    "sd3": dict(_COMMON, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                sample_size=1024),
    "flux": dict(_COMMON, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                 sample_size=1024),
}


def torch_vae(cfg: dict, seed: int) -> AutoencoderKL:
  torch.manual_seed(seed)
  model = AutoencoderKL(**cfg).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.add_(0.2 * torch.randn_like(m.weight))
        m.bias.add_(0.2 * torch.randn_like(m.bias))
  return model


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> tuple[float, float, float]:
  """(max abs error, that / max |ref|, RMS error / RMS ref)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = np.abs(ours - ref).max()
  rms = np.sqrt(np.mean((ours - ref) ** 2) / max(np.mean(ref ** 2), 1e-30))
  return float(err), float(err / max(np.abs(ref).max(), 1e-30)), float(rms)


def check(name: str, cfg: dict, *, image: int, batch: int, tmp: str, seed: int) -> dict:
  model = torch_vae(cfg, seed)
  folder = os.path.join(tmp, name)
  model.save_pretrained(folder)
  gen = torch.Generator().manual_seed(seed + 1)
  x = torch.tanh(torch.randn(batch, 3, image, image, generator=gen))
  with torch.no_grad():
    mean_t = model.encode(x).latent_dist.mean
    dec_t = model.decode(mean_t).sample
  row = {"config": {k: cfg[k] for k in ("block_out_channels", "latent_channels",
                                          "scaling_factor") if k in cfg},
         "params": sum(p.numel() for p in model.parameters())}

  ours = vae_lib.from_diffusers(folder)
  assert ours.scaling_factor == model.config.scaling_factor
  assert ours.shift_factor == (model.config.shift_factor or 0.0)
  assert ours.use_quant_conv == model.config.use_quant_conv
  x_j = jnp.asarray(nhwc(x))
  mean_j, _ = ours.encode(x_j)
  dec_j = ours.decode(jnp.asarray(nhwc(mean_t)))
  row["f32_encode_mean"] = rel_err(mean_j, nhwc(mean_t))
  row["f32_decode"] = rel_err(dec_j, nhwc(dec_t))

  bf = vae_lib.from_diffusers(folder, dtype=jnp.bfloat16, force_upcast=False)
  assert bf.dtype == jnp.bfloat16
  up = vae_lib.from_diffusers(folder, dtype=jnp.bfloat16)  # follows force_upcast
  row["bf16_request_runs_in"] = up.dtype.name
  mean_b, _ = bf.encode(x_j)
  dec_b = bf.decode(jnp.asarray(nhwc(mean_t)))
  row["bf16_encode_mean"] = rel_err(mean_b.astype(jnp.float32), nhwc(mean_t))
  row["bf16_decode"] = rel_err(dec_b.astype(jnp.float32), nhwc(dec_t))

  # For scale: diffusers' own bf16 model against its float32 outputs.
  model_bf = torch_vae(cfg, seed).to(torch.bfloat16)
  with torch.no_grad():
    mean_tb = model_bf.encode(x.to(torch.bfloat16)).latent_dist.mean
    dec_tb = model_bf.decode(mean_t.to(torch.bfloat16)).sample
  row["torch_bf16_encode_mean"] = rel_err(nhwc(mean_tb), nhwc(mean_t))
  row["torch_bf16_decode"] = rel_err(nhwc(dec_tb), nhwc(dec_t))

  pipe = os.path.join(tmp, name + "_pipe")
  shutil.copytree(folder, os.path.join(pipe, "vae"))
  with open(os.path.join(pipe, "model_index.json"), "w") as fh:
    json.dump({"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"]}, fh)
  via_pipe = vae_lib.from_diffusers(pipe)
  row["pipeline_folder_decode"] = rel_err(via_pipe.decode(jnp.asarray(nhwc(mean_t))),
                                          nhwc(dec_t))

  back = os.path.join(tmp, name + "_ours")
  vae_lib.save_diffusers(ours, back, sample_size=cfg.get("sample_size", 32))
  reloaded = AutoencoderKL.from_pretrained(back).eval()
  with torch.no_grad():
    dec_r = reloaded.decode(mean_t).sample
  row["save_diffusers_then_torch_decode"] = rel_err(nhwc(dec_r), nhwc(dec_t))
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--width_div", type=int, default=4,
                  help="block_out_channels divided by this (norm groups stay 32)")
  ap.add_argument("--full", action="store_true", help="also the full-width flux and sd15")
  ap.add_argument("--image", type=int, default=64)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--tol", type=float, default=1e-4)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  import diffusers
  print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"image {args.image}x{args.image}, batch {args.batch}")
  runs = []
  for name, cfg in FAMILIES.items():
    small = dict(cfg, block_out_channels=[c // args.width_div for c in cfg["block_out_channels"]])
    runs.append((f"{name} (widths /{args.width_div})", small))
  if args.full:
    runs += [("flux (full width)", FAMILIES["flux"]), ("sd15 (full width)", FAMILIES["sd15"])]
  results, worst = {}, 0.0
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, cfg) in enumerate(runs):
      t0 = time.perf_counter()
      row = check(name.split()[0] + str(i), cfg, image=args.image, batch=args.batch, tmp=tmp,
                  seed=i)
      row["seconds"] = round(time.perf_counter() - t0, 1)
      results[name] = row
      worst = max(worst, row["f32_encode_mean"][1], row["f32_decode"][1],
                  row["pipeline_folder_decode"][1], row["save_diffusers_then_torch_decode"][1])
      print(f"\n{name}: {row['params']:,} params, {row['config']}")
      for k, v in row.items():
        if isinstance(v, tuple):
          print(f"  {k:34s} max abs err {v[0]:.3g}   / max |ref| {v[1]:.3g}   "
                f"RMS err / RMS ref {v[2]:.3g}")
      print(f"  bf16 requested -> runs in {row['bf16_request_runs_in']} (force_upcast)")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)
  print(f"\nworst float32 relative error {worst:.3g} (tol {args.tol}): "
        f"{'PASS' if worst <= args.tol else 'FAIL'}")
  sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
  main()
