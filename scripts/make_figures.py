"""Regenerates the figures in docs/figures/ (shown by the docs pages) (deterministic).

  python scripts/make_figures.py                    # docs/figures/ssim_maps.png, ssim3d.png
  python scripts/make_figures.py --from-run WORKDIR # also docs/figures/sample_grid.png

`ssim_maps.png`: a crop of the retinal fundus image shipped with scikit-image
(`skimage.data.retina()`) under four distortions (Gaussian noise, Gaussian
blur, JPEG compression, brightness shift), each with its SSIM / MS-SSIM and
SSIM map from ssim_jax; bottom row: the constant-background failure of field
report 004 (a small foreground on a 0.5 background): the textbook
E[x^2] - E[x]^2 SSIM computed in bfloat16 (mixed precision) goes far above 1,
ssim_jax stays in [-1, 1], and `mask_mode="foreground"` scores only the
foreground.

`ssim3d.png`: three orthogonal slices through a CT-like phantom volume
(`tests/phantom.py`: ellipsoids in air, voxels 2.5 x 0.8 x 0.8 mm), a
"restoration" of it (blurred along W, noisy, and missing the small lesion),
and its 3-D SSIM map (`spatial_dims=3`, sigma 1.5 mm through `spacing`,
'same' padding so the map has the volume's size).

`--from-run WORKDIR` copies the last PNG grid the trainer wrote in
`WORKDIR/eval/` (lowres | bicubic | model | target | SSIM map) to
docs/figures/sample_grid.png, downscaled if needed to stay small.

Everything is computed on CPU with fixed seeds, so reruns give the same image.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys

# Deterministic and CPU-only: the figure must not depend on the machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data, filters, transform  # noqa: E402

import ssim_jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from phantom import distort, phantom  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "docs", "figures")


def retina_crop(size: int = 256) -> np.ndarray:
  """float32 `[size, size, 3]` in [0, 1]: optic disc and vessels of the retina."""
  img = data.retina()[380:892, 60:572].astype(np.float32) / 255.0
  return transform.resize(img, (size, size), order=3, anti_aliasing=True,
                          preserve_range=True).clip(0, 1).astype(np.float32)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip through Pillow (8x8 DCT quantisation)."""
  buf = io.BytesIO()
  Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf), np.float32) / 255.0


def distortions(img: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  """The four distortions shown in the figure, each in [0, 1]."""
  rng = np.random.default_rng(seed)
  return {
      "Gaussian noise (s=0.05)": np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1),
      "Gaussian blur (s=2 px)": filters.gaussian(img, sigma=2, channel_axis=-1),
      "JPEG, quality 10": jpeg(img, 10),
      "brightness +0.1": np.clip(img + 0.1, 0, 1),
  }


def naive_ssim_map(x, y, *, dtype, c1=0.01**2, c2=0.03**2):
  """Textbook single-pass SSIM, E[x^2] - E[x]^2, computed in `dtype` (2-D images)."""
  n, s = 11, 1.5
  g = np.exp(-((np.arange(n) - n // 2) ** 2) / (2 * s * s))
  g = jnp.asarray(g / g.sum(), dtype)
  rows = jax.vmap(lambda r: jnp.convolve(r, g, mode="valid"))
  f = lambda a: rows(rows(a.astype(dtype)).T).T
  mx, my = f(x), f(y)
  vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def constant_background_case(img: np.ndarray, seed: int = 1):
  """Field report 004: a small foreground pasted on a constant 0.5 background.

  Returns:
    `(x, y, mask)`: grey `[H, W]` reference and noisy prediction, foreground
    mask `[H, W]` (about 6% of the pixels).
  """
  rng = np.random.default_rng(seed)
  grey = img.mean(-1)
  h = grey.shape[0]
  lo, hi = int(0.38 * h), int(0.62 * h)
  x = np.full_like(grey, 0.5)
  y = x.copy()
  mask = np.zeros_like(grey)
  x[lo:hi, lo:hi] = grey[lo:hi, lo:hi]
  y[lo:hi, lo:hi] = np.clip(grey[lo:hi, lo:hi] + rng.normal(0, 0.05, (hi - lo, hi - lo)), 0, 1)
  mask[lo:hi, lo:hi] = 1.0
  return x.astype(np.float32), y.astype(np.float32), mask.astype(np.float32)


def _map_image(m):
  """Channel-mean of an SSIM map `[1, H, W, C]` -> `[H, W]` numpy."""
  return np.asarray(m)[0].mean(-1)


def _show(ax, image, title, *, cmap=None, vmin=None, vmax=None):
  im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  return im


def make_ssim_maps(path: str, *, size: int = 256) -> dict[str, float]:
  """Writes the SSIM-map figure to `path`; returns the numbers shown on it."""
  ref = retina_crop(size)
  dist = distortions(ref)
  numbers = {}
  fig, axes = plt.subplots(3, 5, figsize=(13, 8.4))
  _show(axes[0, 0], ref, "reference (skimage retina)")
  axes[1, 0].axis("off")
  axes[1, 0].text(0.02, 0.5,
                  "SSIM map of each\ndistortion:\nssim_jax.ssim_map,\n11x11 Gaussian,\n"
                  "valid padding,\nmean over RGB.\n\nDark = low local\nsimilarity.",
                  fontsize=9, va="center", transform=axes[1, 0].transAxes)
  cmap = "magma"
  x = jnp.asarray(ref)[None]
  for j, (name, img) in enumerate(dist.items(), start=1):
    y = jnp.asarray(img, jnp.float32)[None]
    s = float(ssim_jax.ssim(y, x)[0])
    ms = float(ssim_jax.ms_ssim(y, x)[0])
    numbers[name] = s
    _show(axes[0, j], img, f"{name}\nSSIM {s:.3f}  MS-SSIM {ms:.3f}")
    im = _show(axes[1, j], _map_image(ssim_jax.ssim_map(y, x)), f"SSIM map, mean {s:.3f}",
               cmap=cmap, vmin=0, vmax=1)
  fig.colorbar(im, ax=axes[1, 1:], fraction=0.02, pad=0.01)

  # Row 3: the constant-background failure (field report 004).
  cx, cy, mask = constant_background_case(ref)
  naive = np.asarray(naive_ssim_map(jnp.asarray(cx), jnp.asarray(cy), dtype=jnp.bfloat16),
                     np.float32)
  naive32 = np.asarray(naive_ssim_map(jnp.asarray(cx), jnp.asarray(cy), dtype=jnp.float32))
  X, Y, M = (jnp.asarray(a)[None, :, :, None] for a in (cx, cy, mask))
  lib_map = _map_image(ssim_jax.ssim_map(Y, X))
  fg_map = _map_image(ssim_jax.ssim_map(Y, X, mask=M, mask_mode="foreground"))
  s_all = float(ssim_jax.ssim(Y, X)[0])
  s_fg = float(ssim_jax.ssim(Y, X, mask=M, mask_mode="foreground")[0])
  numbers.update({"naive_bf16_max": float(naive.max()), "naive_f32_max": float(naive32.max()),
                  "ssim_jax_max": float(lib_map.max()), "ssim_all": s_all, "ssim_fg": s_fg})
  # Display the central half only (the foreground is 6% of the image); the
  # numbers are computed on the whole image.
  def zoom(a):
    h, w = a.shape[:2]
    return a[h // 4:h - h // 4, w // 4:w - w // 4]

  _show(axes[2, 0], zoom(cx), "6% foreground on a constant\n0.5 background (centre shown)",
        cmap="gray", vmin=0, vmax=1)
  _show(axes[2, 1], zoom(cy), "prediction: noisy foreground", cmap="gray", vmin=0, vmax=1)
  over = np.ma.masked_where(naive <= 1.0, np.ones_like(naive))
  _show(axes[2, 2], zoom(np.clip(naive, 0, 1)), f"naive E[x²]-E[x]² in bfloat16: max {naive.max():.2f}"
        f"\n(cyan: > 1; float32 max {naive32.max():.6f})", cmap=cmap, vmin=0, vmax=1)
  axes[2, 2].imshow(zoom(over), cmap="cool", vmin=0, vmax=1, interpolation="nearest")
  _show(axes[2, 3], zoom(lib_map), f"ssim_jax: max {lib_map.max():.4f}\n"
        f"SSIM {s_all:.3f} (background counts)", cmap=cmap, vmin=0, vmax=1)
  # Show only centres inside the foreground (the mask cropped to the valid map).
  r = (mask.shape[0] - fg_map.shape[0]) // 2
  inside = mask[r:mask.shape[0] - r, r:mask.shape[1] - r] > 0
  axes[2, 4].set_facecolor("0.5")
  _show(axes[2, 4], zoom(np.ma.masked_where(~inside, fg_map)),
        f'mask_mode="foreground"\nSSIM {s_fg:.3f} (foreground only)', cmap=cmap, vmin=0, vmax=1)
  fig.suptitle("ssim_jax: images, SSIM maps and the constant-background case "
               "(python scripts/make_figures.py)", fontsize=11)
  fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
  plt.close(fig)
  return numbers


def make_ssim3d(path: str, *, shape=(32, 96, 96), spacing=(2.5, 0.8, 0.8)) -> dict[str, float]:
  """Writes the 3-D SSIM figure to `path`; returns the numbers shown on it."""
  ref = phantom(shape)
  # The "restoration" loses the small lesion (painted back to the tissue
  # around it), is blurred along W and noisy.
  lesion = np.isclose(ref, 0.85)
  restored = ref.copy()
  restored[lesion] = 0.55
  restored = distort(restored, seed=0, noise=0.03)
  x = jnp.asarray(ref)[None, ..., None]
  y = jnp.asarray(restored)[None, ..., None]
  opts = dict(spatial_dims=3, spacing=spacing, sigma=1.5, padding="same")
  smap = np.asarray(ssim_jax.ssim_map(y, x, **opts))[0, ..., 0]
  s = float(ssim_jax.ssim(y, x, **opts)[0])
  window = ssim_jax.checks.check_window(None, 1.5, spatial_dims=3, spacing=spacing).sizes
  body = ref > 0
  s_body = float(ssim_jax.ssim(y, x, mask=jnp.asarray(body)[None, ..., None],
                               mask_mode="foreground", **opts)[0])
  zc, yc, xc = (int(round(v)) for v in np.argwhere(lesion).mean(axis=0))
  numbers = {"ssim": s, "ssim_body_foreground": s_body,
             "map_min": float(smap.min()), "map_at_lesion": float(smap[zc, yc, xc])}
  fig, axes = plt.subplots(3, 3, figsize=(10, 8.6))
  views = (("axial (z = %d)" % zc, lambda v: v[zc], 1.0),
           ("coronal (y = %d)" % yc, lambda v: v[:, yc], spacing[0] / spacing[2]),
           ("sagittal (x = %d)" % xc, lambda v: v[:, :, xc], spacing[0] / spacing[1]))
  rows = (("phantom", ref, "gray", 0, 1),
          ("restoration (lesion lost, blur, noise)", restored, "gray", 0, 1),
          ("3-D SSIM map", smap, "magma", 0, 1))
  for i, (label, vol, cmap, lo, hi) in enumerate(rows):
    for j, (view, cut, aspect) in enumerate(views):
      ax = axes[i, j]
      im = ax.imshow(cut(vol), cmap=cmap, vmin=lo, vmax=hi, aspect=aspect,
                     interpolation="nearest")
      ax.set_title(f"{label}\n{view}" if j == 0 else view, fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes[2, :], fraction=0.02, pad=0.01)
  fig.suptitle(f"ssim_jax 3-D SSIM, voxels {spacing[0]} x {spacing[1]} x {spacing[2]} mm, "
               f"sigma 1.5 mm -> window {window[0]}x{window[1]}x{window[2]} voxels: SSIM {s:.3f}, "
               f"body only (foreground mask) {s_body:.3f}\n(python scripts/make_figures.py)",
               fontsize=10)
  fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
  plt.close(fig)
  return numbers


def copy_run_grid(workdir: str, path: str, *, max_width: int = 1000) -> str:
  """Copies the final (else newest) eval grid of a run (`WORKDIR/eval/*.png`) to `path`.

  Grids wider than `max_width` are downscaled, narrow ones upscaled (nearest).
  Returns the source path.
  """
  pngs = sorted(glob.glob(os.path.join(workdir, "eval", "*.png")))
  if not pngs:
    raise FileNotFoundError(f"no PNG grid in {os.path.join(workdir, 'eval')}: run the trainer "
                            "first (python -m train --config=... --workdir=...)")
  final = [p for p in pngs if os.path.basename(p) == "final.png"]
  src = final[0] if final else pngs[-1]
  img = Image.open(src).convert("RGB")
  if img.width > max_width:
    img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
  elif img.width < max_width // 2:
    # Small crops: integer nearest-neighbour upscaling keeps the pixels honest.
    f = (max_width // 2) // img.width + 1
    img = img.resize((img.width * f, img.height * f), Image.NEAREST)
  img.save(path, optimize=True)
  return src


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out-dir", default=OUT_DIR)
  parser.add_argument("--from-run", default=None, metavar="WORKDIR",
                      help="also copy WORKDIR/eval/final.png to sample_grid.png")
  args = parser.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, "ssim_maps.png")
  numbers = make_ssim_maps(path)
  print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")
  for k, v in numbers.items():
    print(f"  {k}: {v:.6f}")
  path3d = os.path.join(args.out_dir, "ssim3d.png")
  for k, v in make_ssim3d(path3d).items():
    print(f"  3-D {k}: {v:.6f}")
  print(f"wrote {path3d} ({os.path.getsize(path3d) // 1024} KB)")
  if args.from_run:
    grid = os.path.join(args.out_dir, "sample_grid.png")
    src = copy_run_grid(args.from_run, grid)
    print(f"wrote {grid} from {src} ({os.path.getsize(grid) // 1024} KB)")


if __name__ == "__main__":
  main()
