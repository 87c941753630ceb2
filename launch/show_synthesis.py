"""PNG grids of what the model is trained on: the pixel tasks and the latent (VAE) tasks on real support images.

  python launch/show_synthesis.py --data ../shared/data/brainmri
  python launch/show_synthesis.py --data ../shared/data/busi --tasks pixel --paste_mode poisson --foreground_only
  python launch/show_synthesis.py --data ../shared/data/busi --tasks latent --vae ../shared/weights/taef2 --num 8

Reads the first normal training images of a dataset (any layout data_pipelines accepts) and
runs the training synthesis itself (`mix.build_synthesis`, jitted, with the run's "synthesis"
key stream for --seed at step 0), one task at a time (the task table set to that task alone).

Pixel grid: one row per (pixel task, image), columns original | synthesised | mask in red over
the synthesised image. Latent grid: one row per sample, alternating latent deviation and latent
shuffle, columns original | VAE round trip (with its PSNR/SSIM) | latent anomaly | two-stage mask
(inside the corrupted latent region, where the decoded anomaly differs from the decoded clean
latent).

Files go to --out_dir as <dataset>_pixel_<paste mode>[_fg][_<option><value>...].png and
<dataset>_latent_<vae kind>[_<option><value>...].png: every option that changes the picture and
differs from its default is in the name, so runs with different options never overwrite each
other (the same options give the same picture).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from data_pipelines import normal_images
from mediclip_jax import rngs
from mediclip_jax.evaluate import image_quality
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.synthesis import latent as latent_lib
from mediclip_jax.synthesis import mix

REPO = Path(__file__).resolve().parents[1]

_DATA = flags.DEFINE_string("data", None, "Dataset root, e.g. ../shared/data/brainmri.")
_TASKS = flags.DEFINE_enum("tasks", "all", ["pixel", "latent", "all"], "Which grids to write.")
_OUT_DIR = flags.DEFINE_string("out_dir", str(REPO / "out" / "synthesis"), "Where the PNGs go.")
_SUPPORT = flags.DEFINE_integer("support", 16, "Support images (cut-paste sources / latent patch pool).")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed whose synthesis key stream draws the anomalies.")
# Pixel tasks.
_IMAGES = flags.DEFINE_integer("images", 3, "Images per pixel task.")
_SIZE = flags.DEFINE_integer("size", 224, "Pixel-task image side.")
_PASTE_MODE = flags.DEFINE_enum("paste_mode", "hard", ["hard", "poisson"], "Cut-paste blending.")
_FOREGROUND_ONLY = flags.DEFINE_bool("foreground_only", False, "Keep anomalies inside the body region.")
# Latent tasks.
_VAE = flags.DEFINE_string("vae", str(REPO.parent / "shared" / "weights" / "taef2"), "VAE weights folder or file.")
_VAE_KIND = flags.DEFINE_enum("vae_kind", vae_lib.KIND_TAEF2, [vae_lib.KIND_TAEF2, vae_lib.KIND_KL],
                              "mediclip_jax.models.vae kind.")
_LATENT_IMAGE_SIZE = flags.DEFINE_integer("latent_image_size", 256, "Image side fed to the VAE.")
_NUM = flags.DEFINE_integer("num", 8, "Rows (samples) in the latent grid.")
_PATCH_SIZES = flags.DEFINE_list("patch_sizes", [], "Latent patch sizes (default: the config's if they "
                                 "divide the latent size, else its divisors).")
_SEVERITY = flags.DEFINE_list("severity", [], "lo,hi range of the severity λ (default: the config's).")
_STANDARDISE = flags.DEFINE_bool("standardise", True, "Standardise latents per channel with support statistics.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Two-stage mask threshold (default: the config's).")

flags.mark_flag_as_required("data")

PIXEL_COLUMNS = ("original", "synthesised", "mask")
LATENT_COLUMNS = ("original", "VAE round trip", "latent anomaly", "two-stage mask")
# Options in the file names (when not at their default): flag name -> short name.
PIXEL_NAME_FLAGS = {"size": "size", "images": "n", "support": "support", "seed": "seed"}
LATENT_NAME_FLAGS = {"vae": "vae", "latent_image_size": "size", "num": "n", "support": "support",
                     "patch_sizes": "patch", "severity": "sev", "standardise": "std", "threshold": "thr",
                     "seed": "seed"}


def _token(value) -> str:
  if isinstance(value, bool):
    return "1" if value else "0"
  if isinstance(value, (list, tuple)):
    return "-".join(str(v) for v in value)
  if isinstance(value, str) and ("/" in value or "\\" in value):
    return Path(value.rstrip("/")).name
  return str(value)


def output_name(dataset: str, kind: str, fixed: list[str], named: dict[str, str]) -> str:
  """<dataset>_<kind>_<fixed...>_<short><value>... for every flag of `named` that is not at its default."""
  parts = [dataset, kind, *fixed]
  for flag, short in named.items():
    f = flags.FLAGS[flag]
    if f.value != f.default:
      parts.append(short + _token(f.value))
  return "_".join(parts) + ".png"


def _rgb(gray01: np.ndarray) -> np.ndarray:
  return np.repeat((np.clip(gray01, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _overlay(gray01: np.ndarray, mask: np.ndarray) -> np.ndarray:
  rgb = np.repeat(np.clip(gray01, 0, 1)[..., None], 3, axis=-1)
  rgb = np.where(mask[..., None] > 0.5, 0.5 * rgb + 0.5 * np.array([1.0, 0.0, 0.0]), rgb)
  return (rgb * 255).round().astype(np.uint8)


def _grid(rows: list[list[np.ndarray]], labels: list[dict[int, str]], titles: tuple[str, ...],
          pad: int = 4) -> np.ndarray:
  """Stacks RGB uint8 tiles into a grid with a title bar; labels[r] maps a column to the text written on it."""
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
  for r, row_labels in enumerate(labels):
    for c, t in row_labels.items():
      d.text((c * (w + pad) + 4, title_h + r * (h + pad) + 4), t, fill=(255, 255, 0))
  return np.asarray(im)


def _save(grid: np.ndarray, dest: Path) -> None:
  dest.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid).save(dest)


def _one_task(cfg: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose task table draws `task` for every sample."""
  cfg = cfg.copy_and_resolve_references()
  for t in mix.TASKS:
    cfg.probs[t] = 1.0 if t == task else 0.0
  return cfg


def _run(cfg: ml_collections.ConfigDict, codec: mix.Codec | None, images: np.ndarray, index: np.ndarray,
         support: np.ndarray, pools: dict | None) -> tuple[dict, dict]:
  """The entry point for `cfg`, jitted, on `images` with global sample indices `index` at step 0.

  Returns (outputs as numpy, pools); pools depend only on the codec and the support set, so a
  later call with the same ones passes them back in instead of encoding the support set again.
  """
  synthesize, make_pools = mix.build_synthesis(cfg, codec)
  pools = make_pools(support) if pools is None else pools
  out = jax.jit(synthesize)(rngs.stream(_SEED.value, rngs.SYNTHESIS), 0, jnp.asarray(images),
                            jnp.asarray(index, jnp.int32), pools)
  return jax.device_get(out), pools


def pixel_grid(dataset: str, out_dir: Path) -> None:
  """Runs each pixel task of mix.PIXEL_TASKS through the entry point on the first images and writes the grid."""
  support, _ = normal_images.load_normal_images(_DATA.value, _SIZE.value, _SUPPORT.value)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = _PASTE_MODE.value
  cfg.pixel.shapes.foreground_only = _FOREGROUND_ONLY.value
  mix.validate_config(cfg)
  images = support[:_IMAGES.value]
  rows, labels, pools = [], [], None
  for name in mix.PIXEL_TASKS:
    out, pools = _run(_one_task(cfg, name), None, images, np.arange(len(images)), support, pools)
    assert np.all(out["task"] == mix.TASKS.index(name)), out["task"]
    for i in range(len(images)):
      rows.append([_rgb(images[i]), _rgb(out["image"][i]), _overlay(out["image"][i], out["mask"][i])])
      labels.append({1: f"{name}  mask {100 * out['mask'][i].mean():.1f}%"})
    print(f"{name:16s} mask fraction {float(out['mask'].mean()):.3f}")
  fixed = [_PASTE_MODE.value] + (["fg"] if _FOREGROUND_ONLY.value else [])
  dest = out_dir / output_name(dataset, "pixel", fixed, PIXEL_NAME_FLAGS)
  _save(_grid(rows, labels, PIXEL_COLUMNS), dest)
  print(f"wrote {dest} ({len(mix.PIXEL_TASKS)} tasks × {len(images)} images; columns: {' | '.join(PIXEL_COLUMNS)})")


def _latent_config(downscale: int) -> ml_collections.ConfigDict:
  """The synthesis config of the latent flags, validated at the VAE's latent size."""
  if _LATENT_IMAGE_SIZE.value % downscale:
    raise ValueError(f"--latent_image_size {_LATENT_IMAGE_SIZE.value}: must be a multiple of the VAE's "
                     f"downscale factor {downscale}")
  latent_size = _LATENT_IMAGE_SIZE.value // downscale
  cfg = mix.default_config()
  lc = cfg.latent
  if _PATCH_SIZES.value:
    lc.patch_sizes = tuple(int(p) for p in _PATCH_SIZES.value)
    lc.patch_probs = (1.0,) * len(lc.patch_sizes)
  elif any(latent_size % p for p in lc.patch_sizes):
    lc.patch_sizes = latent_lib.patch_size_choices(latent_size)
    lc.patch_probs = (1.0,) * len(lc.patch_sizes)
  if _SEVERITY.value:
    lc.severity = tuple(float(v) for v in _SEVERITY.value)
  if _THRESHOLD.value is not None:
    lc.two_stage_threshold = _THRESHOLD.value
  lc.standardise = _STANDARDISE.value
  latent_lib.validate_config(lc, latent_size)
  return cfg


def latent_grid(dataset: str, out_dir: Path) -> None:
  """Encodes the support set with the VAE, runs latent deviation / shuffle through the entry point, writes the grid."""
  vcfg = vae_lib.default_config()
  vcfg.kind, vcfg.path = _VAE_KIND.value, _VAE.value
  vae = vae_lib.load_vae(vcfg)
  cfg = _latent_config(vae.downscale)
  codec = vae_lib.codec(vae)
  support, _ = normal_images.load_normal_images(_DATA.value, _LATENT_IMAGE_SIZE.value,
                                                max(_SUPPORT.value, _NUM.value))
  images = support[:_NUM.value]
  support = support[:_SUPPORT.value]
  recon = jax.jit(lambda s, x: codec.decode(s, codec.encode(s, x)))(codec.state, jnp.asarray(images))
  rt_psnr, rt_ssim = jax.device_get((image_quality.psnr(recon, images), image_quality.ssim(recon, images)))
  recon = np.asarray(recon)
  # Even rows: latent deviation, odd rows: latent shuffle; each sample keeps its row as sample index.
  image, mask, pools = np.zeros_like(images), np.zeros_like(images), None
  for parity, name in enumerate(mix.LATENT_TASKS):
    rows = np.arange(parity, len(images), 2)
    if not len(rows):
      continue
    out, pools = _run(_one_task(cfg, name), codec, images[rows], rows, support, pools)
    assert np.all(out["task"] == mix.TASKS.index(name)), out["task"]
    image[rows], mask[rows] = out["image"], out["mask"]
  grid_rows, labels = [], []
  for i in range(len(images)):
    grid_rows.append([_rgb(images[i]), _rgb(recon[i]), _rgb(image[i]), _overlay(image[i], mask[i])])
    labels.append({1: f"PSNR {rt_psnr[i]:.1f} SSIM {rt_ssim[i]:.3f}",
                   2: f"{'deviation' if i % 2 == 0 else 'shuffle'}  mask {100 * mask[i].mean():.1f}%"})
  dest = out_dir / output_name(dataset, "latent", [_VAE_KIND.value], LATENT_NAME_FLAGS)
  _save(_grid(grid_rows, labels, LATENT_COLUMNS), dest)
  lc = cfg.latent
  print(f"wrote {dest} ({len(images)} samples, patch sizes {tuple(lc.patch_sizes)}, standardise={lc.standardise}, "
        f"round trip PSNR {rt_psnr.mean():.2f} dB SSIM {rt_ssim.mean():.4f}, "
        f"mean mask coverage {100 * mask.mean():.1f}%)")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  dataset = Path(_DATA.value.rstrip("/")).resolve().name
  out_dir = Path(_OUT_DIR.value)
  try:
    if _TASKS.value in ("pixel", "all"):
      pixel_grid(dataset, out_dir)
    if _TASKS.value in ("latent", "all"):
      latent_grid(dataset, out_dir)
  except (ValueError, FileNotFoundError) as e:  # ValueError includes DatasetError and CheckpointError
    print(e, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
