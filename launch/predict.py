"""Scores new images with a trained run: anomaly score, decision at the stored threshold, heat-map overlay.

  python launch/predict.py --workdir runs/busi --input ../shared/data/busi/images/test/abnormal/benign_10.jpg
  python launch/predict.py --workdir runs/busi --input some/folder/ --out predictions/
  python launch/predict.py --workdir runs/busi --input batch.npy      # (N,H,W) or (H,W) grayscale in [0,1]

Writes <out>/<name>_overlay.png (image | map | overlay) and <out>/predictions.json. Any method
works: the run's stored config names it; no dataset is needed.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from data_pipelines import preprocess
from mediclip_jax import parallel
from mediclip_jax.evaluate import restore, scoring
from mediclip_jax.train import writers

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.")
_INPUT = flags.DEFINE_string("input", None, "An image, a folder of images, or a .npy array.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/predictions).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Override the checkpoint's decision threshold.")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _inputs(path: str, size: int, color: str) -> tuple[list[str], np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such image, folder or .npy file")
  if path.endswith(".npy"):
    arr = np.load(path, allow_pickle=False).astype(np.float32)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3:
      raise ValueError(f"{path}: expected a (N,H,W) or (H,W) grayscale array in [0,1], got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 1:
      raise ValueError(f"{path}: values must lie in [0,1], got [{arr.min():.3g}, {arr.max():.3g}]")
    if arr.shape[1:] != (size, size):
      arr = np.stack([np.asarray(Image.fromarray((a * 255).round().astype(np.uint8)).resize(
          (size, size), Image.BILINEAR), np.float32) / 255 for a in arr])
    stem = os.path.splitext(os.path.basename(path))[0]
    return [f"{stem}_{i}" for i in range(len(arr))], arr
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise FileNotFoundError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
  bad = [f for f in files if not f.lower().endswith(IMAGE_SUFFIXES)]
  if bad:
    raise ValueError(f"{bad[0]}: not an image file; expected one of {IMAGE_SUFFIXES} or a .npy array")
  return [os.path.splitext(os.path.basename(f))[0] for f in files], np.stack(
      [preprocess.load_test_image(f, size, color) for f in files])


def overlay_png(image: np.ndarray, amap: np.ndarray, path: str) -> None:
  """Writes image | map (jet) | overlay side by side as a PNG."""
  def jet(x):
    x = np.clip(x, 0, 1)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.stack([r, g, b], -1)
  lo, hi = float(amap.min()), float(amap.max())
  heat = jet((amap - lo) / (hi - lo + 1e-8))
  gray = np.repeat(image[..., None], 3, -1)
  over = 0.55 * gray + 0.45 * heat
  strip = np.concatenate([gray, heat, over], axis=1)
  Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8)).save(path)


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  mesh = parallel.make_mesh()
  try:
    run = restore.load_run(_WORKDIR.value, mesh)
    cfg = run.config
    names, images = _inputs(_INPUT.value, int(cfg.data.image_size), cfg.data.color)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  thr = float(run.metadata["threshold"]) if _THRESHOLD.value is None else _THRESHOLD.value
  maps, scores = scoring.score_share(run.trainable.scorer(run.state), images, int(cfg.eval.batch_size), mesh)
  out = _OUT.value or os.path.join(_WORKDIR.value, "predictions")
  os.makedirs(out, exist_ok=True)
  records = []
  for name, img, m, s in zip(names, images, maps, scores):
    png = os.path.join(out, f"{name}_overlay.png")
    overlay_png(img if img.ndim == 2 else img.mean(-1), m, png)
    rec = {"name": name, "score": float(s), "threshold": thr, "abnormal": bool(s > thr), "overlay": png}
    records.append(rec)
    print(f"{name}: score {s:.4f} -> {'ABNORMAL' if s > thr else 'normal'} (threshold {thr:.4f}); overlay {png}")
  with open(os.path.join(out, "predictions.json"), "w") as f:
    json.dump(records, f, indent=2)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "input"])
  app.run(lambda argv: sys.exit(main(argv)))
