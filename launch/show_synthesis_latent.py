"""PNG grid of latent-space anomalies on real support images: original, VAE round trip, anomaly, two-stage mask.

  python launch/show_synthesis_latent.py --data ../shared/data/brainmri
  python launch/show_synthesis_latent.py --data ../shared/data/busi --num 8 --seed 1 --severity 1.0,2.0

One row per sample (alternating latent deviation and latent shuffle); default output
out/synthesis/<dataset>_latent.png. The mask column overlays the two-stage mask in red on
the anomalous image: inside the corrupted latent region, where the decoded anomaly differs
from the decoded clean latent.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from launch.check_vae import load_support_images  # pylint: disable=wrong-import-position
from mediclip_jax.models import vae as V  # pylint: disable=wrong-import-position
from mediclip_jax.synthesis import latent as LT  # pylint: disable=wrong-import-position

COLUMNS = ("original", "VAE round trip", "latent anomaly", "two-stage mask")


def _grid(rows: list[list[np.ndarray]], labels: list[str], titles=COLUMNS, pad: int = 4) -> np.ndarray:
  """Stacks RGB uint8 tiles into a grid with a white title bar and per-row labels."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  h, w = rows[0][0].shape[:2]
  title_h, label_w = 16, 0
  out = np.full((title_h + len(rows) * (h + pad), label_w + len(titles) * (w + pad), 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      y, x = title_h + r * (h + pad), label_w + c * (w + pad)
      out[y:y + h, x:x + w] = tile
  im = Image.fromarray(out)
  d = ImageDraw.Draw(im)
  for c, t in enumerate(titles):
    d.text((label_w + c * (w + pad) + 4, 2), t, fill=(0, 0, 0))
  for r, t in enumerate(labels):
    d.text((label_w + 2 * (w + pad) + 4, title_h + r * (h + pad) + 4), t, fill=(255, 255, 0))
  return np.asarray(im)


def _rgb(gray01: np.ndarray) -> np.ndarray:
  return np.repeat((np.clip(gray01, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _overlay(gray01: np.ndarray, mask: np.ndarray) -> np.ndarray:
  rgb = np.repeat(np.clip(gray01, 0, 1)[..., None], 3, axis=-1)
  red = np.array([1.0, 0.0, 0.0])
  rgb = np.where(mask[..., None] > 0.5, 0.5 * rgb + 0.5 * red, rgb)
  return (rgb * 255).round().astype(np.uint8)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data", required=True, help="MediCLIP-layout dataset root")
  ap.add_argument("--vae_kind", default=V.KIND_TAEF2, choices=(V.KIND_TAEF2, V.KIND_KL))
  ap.add_argument("--vae_path", default=str(REPO.parent / "shared" / "weights" / "taef2"))
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--support", type=int, default=16, help="support images encoded into the patch pool")
  ap.add_argument("--num", type=int, default=8, help="rows (samples) in the grid")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--patch_sizes", default="", help="comma-separated latent patch sizes (default: the "
                  "config's if they divide the latent size, else its divisors)")
  ap.add_argument("--severity", default="", help="lo,hi range of λ (default: the config's)")
  ap.add_argument("--no_standardise", action="store_true")
  ap.add_argument("--threshold", type=float, default=None, help="two-stage mask threshold (default: the config's)")
  ap.add_argument("--out", default=None, help="PNG path (default out/synthesis/<dataset>_latent.png)")
  args = ap.parse_args(argv)

  vcfg = V.default_config()
  vcfg.kind, vcfg.path = args.vae_kind, args.vae_path
  vae = V.load_vae(vcfg)
  if args.size % vae.downscale:
    print(f"--size {args.size}: must be a multiple of the VAE's downscale factor {vae.downscale}", file=sys.stderr)
    return 2
  latent_size = args.size // vae.downscale

  cfg = LT.default_config()
  if args.patch_sizes:
    cfg.patch_sizes = tuple(int(p) for p in args.patch_sizes.split(","))
    cfg.patch_probs = (1.0,) * len(cfg.patch_sizes)
  elif any(latent_size % p for p in cfg.patch_sizes):
    cfg.patch_sizes = LT.patch_size_choices(latent_size)
    cfg.patch_probs = (1.0,) * len(cfg.patch_sizes)
  if args.severity:
    cfg.severity = tuple(float(v) for v in args.severity.split(","))
  if args.threshold is not None:
    cfg.two_stage_threshold = args.threshold
  cfg.standardise = not args.no_standardise
  try:
    LT.validate_config(cfg, latent_size)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2

  support, _ = load_support_images(args.data, args.size, max(args.support, args.num))
  images = support[:args.num]
  graphdef, state = nnx.split(vae)

  @jax.jit
  def encode(state, x):
    return V.encode_gray(nnx.merge(graphdef, state), x)

  @jax.jit
  def synth(state, keys, x, pool, tasks):
    m = nnx.merge(graphdef, state)
    return LT.latent_synthesize(keys, x, pool, (functools.partial(V.encode_gray, m),
                                                functools.partial(V.decode_gray, m)), cfg, tasks=tasks)

  pool = encode(state, jnp.asarray(support[:args.support]))
  keys = jax.random.split(jax.random.key(args.seed), len(images))
  tasks = jnp.asarray([LT.TASK_DEVIATION if i % 2 == 0 else LT.TASK_SHUFFLE for i in range(len(images))])
  out = jax.device_get(synth(state, keys, jnp.asarray(images), pool, tasks))

  rows, labels = [], []
  for i in range(len(images)):
    rows.append([_rgb(images[i]), _rgb(out["recon"][i]), _rgb(out["image"][i]), _overlay(out["image"][i], out["mask"][i])])
    labels.append(f"{'deviation' if int(out['task'][i]) == LT.TASK_DEVIATION else 'shuffle'}  "
                  f"mask {100 * out['mask'][i].mean():.1f}%")
  grid = _grid(rows, labels)
  name = Path(args.data.rstrip("/")).name
  dest = Path(args.out) if args.out else REPO / "out" / "synthesis" / f"{name}_latent.png"
  dest.parent.mkdir(parents=True, exist_ok=True)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(grid).save(dest)
  print(f"wrote {dest} ({len(images)} samples, patch sizes {tuple(cfg.patch_sizes)}, "
        f"standardise={cfg.standardise}, mean mask coverage {100 * out['mask'].mean():.1f}%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
