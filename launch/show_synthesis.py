"""PNG grids of what the model is trained on: the pixel tasks and the latent (VAE) tasks on real support images.

  python launch/show_synthesis.py --data ../shared/data/brainmri
  python launch/show_synthesis.py --data ../shared/data/busi --tasks pixel --paste-mode poisson --foreground-only
  python launch/show_synthesis.py --data ../shared/data/busi --tasks latent --vae ../shared/weights/taef2 --num 8

Reads the first normal training images of a dataset (data_pipelines: any layout it
accepts). Pixel grid (out/synthesis/<dataset>_pixel.png): one row per (task of mix.TASKS,
image), columns original | synthesised | mask in red over the synthesised image. Latent grid
(out/synthesis/<dataset>_latent.png): one row per sample, alternating latent deviation and
latent shuffle, columns original | VAE round trip | latent anomaly | two-stage mask (inside
the corrupted latent region, where the decoded anomaly differs from the decoded clean latent).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from launch.check_vae import load_support_images  # pylint: disable=wrong-import-position
from mediclip_jax.synthesis import mix  # pylint: disable=wrong-import-position

PIXEL_COLUMNS = ("original", "synthesised", "mask")
LATENT_COLUMNS = ("original", "VAE round trip", "latent anomaly", "two-stage mask")


def _rgb(gray01: np.ndarray) -> np.ndarray:
  return np.repeat((np.clip(gray01, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _overlay(gray01: np.ndarray, mask: np.ndarray) -> np.ndarray:
  rgb = np.repeat(np.clip(gray01, 0, 1)[..., None], 3, axis=-1)
  rgb = np.where(mask[..., None] > 0.5, 0.5 * rgb + 0.5 * np.array([1.0, 0.0, 0.0]), rgb)
  return (rgb * 255).round().astype(np.uint8)


def _grid(rows: list[list[np.ndarray]], labels: list[str], titles: tuple[str, ...], label_col: int,
          pad: int = 4) -> np.ndarray:
  """Stacks RGB uint8 tiles into a grid with a title bar; each row's label is written on column `label_col`."""
  h, w = rows[0][0].shape[:2]
  title_h = 16
  out = np.full((title_h + len(rows) * (h + pad), len(titles) * (w + pad), 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      y, x = title_h + r * (h + pad), c * (w + pad)
      out[y:y + h, x:x + w] = tile
  im = Image.fromarray(out)
  d = ImageDraw.Draw(im)
  for c, t in enumerate(titles):
    d.text((c * (w + pad) + 4, 2), t, fill=(0, 0, 0))
  for r, t in enumerate(labels):
    d.text((label_col * (w + pad) + 4, title_h + r * (h + pad) + 4), t, fill=(255, 255, 0))
  return np.asarray(im)


def _save(grid: np.ndarray, dest: Path) -> None:
  dest.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid).save(dest)


def pixel_grid(args: argparse.Namespace, dest: Path) -> None:
  """Runs every pixel task of mix.TASKS on the first images and writes the grid."""
  support, _ = load_support_images(args.data, args.size, args.support)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = args.paste_mode
  cfg.pixel.shapes.foreground_only = args.foreground_only
  mix.validate_config(cfg)
  n = min(args.images, len(support))
  key = jax.random.key(args.seed)
  rows, labels = [], []
  for t, name in enumerate(mix.TASKS):
    fn = jax.jit(jax.vmap(functools.partial(mix.apply_task, t, support=jnp.asarray(support), cfg=cfg)))
    keys = jax.vmap(lambda i, t=t: jax.random.fold_in(jax.random.fold_in(key, t), i))(jnp.arange(n))
    img, mask = jax.device_get(fn(keys, jnp.asarray(support[:n])))
    for i in range(n):
      rows.append([_rgb(support[i]), _rgb(img[i]), _overlay(img[i], mask[i])])
      labels.append(f"{name}  mask {100 * mask[i].mean():.1f}%")
    print(f"{name:16s} mask fraction {float(mask.mean()):.3f}")
  _save(_grid(rows, labels, PIXEL_COLUMNS, label_col=1), dest)
  print(f"wrote {dest} ({len(mix.TASKS)} tasks × {n} images; columns: {' | '.join(PIXEL_COLUMNS)})")


def latent_grid(args: argparse.Namespace, dest: Path) -> None:
  """Encodes the support set with the VAE, runs latent deviation / shuffle and writes the grid."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from mediclip_jax.models import vae as V  # pylint: disable=import-outside-toplevel
  from mediclip_jax.synthesis import latent as LT  # pylint: disable=import-outside-toplevel
  vcfg = V.default_config()
  vcfg.kind, vcfg.path = args.vae_kind, args.vae
  vae = V.load_vae(vcfg)
  if args.latent_image_size % vae.downscale:
    raise ValueError(f"--latent-image-size {args.latent_image_size}: must be a multiple of the VAE's "
                     f"downscale factor {vae.downscale}")
  latent_size = args.latent_image_size // vae.downscale
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
  LT.validate_config(cfg, latent_size)

  support, _ = load_support_images(args.data, args.latent_image_size, max(args.support, args.num))
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
  _save(_grid(rows, labels, LATENT_COLUMNS, label_col=2), dest)
  print(f"wrote {dest} ({len(images)} samples, patch sizes {tuple(cfg.patch_sizes)}, "
        f"standardise={cfg.standardise}, mean mask coverage {100 * out['mask'].mean():.1f}%)")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True, help="dataset root, e.g. ../shared/data/brainmri")
  ap.add_argument("--tasks", default="all", choices=("pixel", "latent", "all"))
  ap.add_argument("--out-dir", default=str(REPO / "out" / "synthesis"),
                  help="writes <dataset>_pixel.png and <dataset>_latent.png here")
  ap.add_argument("--support", type=int, default=16, help="support images (cut-paste sources / latent patch pool)")
  ap.add_argument("--seed", type=int, default=0)
  g = ap.add_argument_group("pixel tasks")
  g.add_argument("--images", type=int, default=3, help="images per pixel task")
  g.add_argument("--size", type=int, default=224, help="pixel-task image side")
  g.add_argument("--paste-mode", default="hard", choices=["hard", "poisson"])
  g.add_argument("--foreground-only", action="store_true", help="keep anomalies inside the body region")
  g = ap.add_argument_group("latent tasks")
  g.add_argument("--vae", default=str(REPO.parent / "shared" / "weights" / "taef2"), help="VAE weights folder")
  g.add_argument("--vae-kind", default="taef2", choices=("taef2", "autoencoder_kl"), help="mediclip_jax.models.vae kind")
  g.add_argument("--latent-image-size", type=int, default=256, help="image side fed to the VAE")
  g.add_argument("--num", type=int, default=8, help="rows (samples) in the latent grid")
  g.add_argument("--patch-sizes", default="", help="comma-separated latent patch sizes (default: the "
                 "config's if they divide the latent size, else its divisors)")
  g.add_argument("--severity", default="", help="lo,hi range of λ (default: the config's)")
  g.add_argument("--no-standardise", action="store_true")
  g.add_argument("--threshold", type=float, default=None, help="two-stage mask threshold (default: the config's)")
  args = ap.parse_args(argv)

  name = Path(args.data.rstrip("/")).resolve().name
  out_dir = Path(args.out_dir)
  try:
    if args.tasks in ("pixel", "all"):
      pixel_grid(args, out_dir / f"{name}_pixel.png")
    if args.tasks in ("latent", "all"):
      latent_grid(args, out_dir / f"{name}_latent.png")
  except (ValueError, FileNotFoundError) as e:
    print(e, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
