"""Scores new images with a trained run: anomaly score, decision at the stored threshold, a panel that explains it.

  python launch/predict.py --workdir runs/busi --input ../shared/data/busi/images/test/abnormal/benign_10.jpg
  python launch/predict.py --workdir runs/busi --input some/folder/ --out predictions/
  python launch/predict.py --workdir runs/busi --input batch.npy      # (N,H,W) or (H,W) grayscale in [0,1]
  python launch/predict.py --workdir runs/busi --input img.jpg --mask img_mask.jpg   # with ground truth
  python launch/predict.py --onnx runs/busi/export/model.onnx --input some/folder/   # no JAX: onnxruntime

Scores are normalised (mediclip_jax.evaluate.normalization): 0.5 is the decision threshold, typical
normal tissue of the support images reads 0; the raw score is kept beside it. Writes
<out>/<stem>_panel.png per image (mediclip_jax.evaluate.figures.anomaly_panel: image | ground truth |
normalised map on the fixed 0-1 scale with colour bar | map > 0.5 | overlay, at the file's own resolution,
with score and decision; inputs sharing a stem, a.png and a.jpg, keep their suffix: a_png_panel.png)
and <out>/predictions.json. Any method works: the run's stored config names it; no dataset is needed.
JAX is imported only to load the run (this module's top level needs numpy, PIL, matplotlib, absl, tqdm).
With --onnx FILE (written by launch/export.py) instead of --workdir, onnxruntime scores the images and
JAX is never imported: image size, colour, normalisation come from the file's metadata (a JAX-free
install: docs/export.md); the default --out is <dir of FILE>/predictions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable

import numpy as np
from absl import app, flags
from PIL import Image

from data_pipelines import datasets, preprocess
from mediclip_jax.evaluate import figures
from mediclip_jax.evaluate import onnx_model as onnx_file
from mediclip_jax.evaluate.normalization import Normalization
from mediclip_jax.train import writers

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory (or give --onnx).")
_ONNX = flags.DEFINE_string("onnx", None, "An ONNX model written by launch/export.py, run with onnxruntime "
                            "(no JAX); instead of --workdir.")
_INPUT = flags.DEFINE_string("input", None, "An image, a folder of images, or a .npy array.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/predictions, or "
                           "<dir of the --onnx file>/predictions).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Override the checkpoint's decision threshold (raw scale).")
_MASK = flags.DEFINE_string("mask", None, "Ground-truth mask of a single input image, shown in its panel.")

IMAGE_SUFFIXES = datasets.IMAGE_SUFFIXES  # what the dataset readers accept


def _inputs(path: str, size: int, color: str) -> tuple[list[str], list[str | None], np.ndarray]:
  """(names, source files (None for .npy rows), images at model resolution)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such image, folder or .npy file")
  if path.endswith(".npy"):
    arr = np.load(path, allow_pickle=False).astype(np.float32)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3:
      raise ValueError(f"{path}: expected a (N,H,W) or (H,W) grayscale array in [0,1], got shape {arr.shape}")
    if not np.isfinite(arr).all():
      raise ValueError(f"{path}: {int((~np.isfinite(arr)).sum())} values are NaN or infinite; expected finite "
                       "values in [0,1]")
    if arr.min() < 0 or arr.max() > 1:
      raise ValueError(f"{path}: values must lie in [0,1], got [{arr.min():.3g}, {arr.max():.3g}]")
    if arr.shape[1:] != (size, size):
      arr = np.stack([np.asarray(Image.fromarray((a * 255).round().astype(np.uint8)).resize(
          (size, size), Image.BILINEAR), np.float32) / 255 for a in arr])
    stem = os.path.splitext(os.path.basename(path))[0]
    return [f"{stem}_{i}" for i in range(len(arr))], [None] * len(arr), arr
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise FileNotFoundError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
  bad = [f for f in files if not f.lower().endswith(IMAGE_SUFFIXES)]
  if bad:
    raise ValueError(f"{bad[0]}: not an image file; expected one of {IMAGE_SUFFIXES} or a .npy array")
  return [os.path.basename(f) for f in files], files, np.stack(
      [preprocess.load_test_image(f, size, color) for f in files])


def _out_names(names: list[str]) -> list[str]:
  """Output stems that never collide: a stem shared by several inputs (a.png, a.jpg) keeps its suffix."""
  stems = [os.path.splitext(n)[0] for n in names]
  out = [s if stems.count(s) == 1 else n.replace(".", "_") for n, s in zip(names, stems)]
  taken: set[str] = set()
  for i, o in enumerate(out):  # still equal (a.png beside a_png.jpg): number the later ones
    c, k = o, 2
    while c in taken or (c != o and c in out):
      c, k = f"{o}_{k}", k + 1
    out[i] = c
    taken.add(c)
  return out


def _original(path: str | None, color: str) -> np.ndarray | None:
  """The file's own pixels (grey or RGB as the model reads it), for a panel at the original resolution."""
  return None if path is None else preprocess.load_original(path, color)


@dataclasses.dataclass
class Model:
  """What scoring needs of a trained detector, however it is run."""
  image_size: int
  color: str  # "grey" | "rgb": how images are read
  batch_size: int
  normalization: Normalization
  score: Callable[..., tuple[np.ndarray, np.ndarray]]  # (images, progress) -> raw (maps, scores)


def jax_model(workdir: str) -> Model:
  """The run's latest checkpoint, rebuilt with JAX on every local device."""
  # pylint: disable=import-outside-toplevel
  from mediclip_jax import parallel
  from mediclip_jax.evaluate import restore, scoring
  mesh = parallel.make_mesh()
  run = restore.load_run(workdir, mesh)
  for problem in run.problems:
    print(f"WARNING: {problem}; using step {run.step} instead", file=sys.stderr)
  cfg = run.config
  if not run.metadata.get("normalization"):
    raise ValueError(f"{workdir}: checkpoint step {run.step} has no decision threshold (it was written on SIGTERM, "
                     "before calibration, or by an older version): rerun launch/train.py on it to finish the run")
  scorer = run.trainable.scorer(run.state)
  return Model(int(cfg.data.image_size), cfg.data.color, int(cfg.eval.batch_size),
               Normalization.from_dict(run.metadata["normalization"], f"{workdir} step {run.step}"),
               lambda images, progress: scoring.score_share(scorer, images, int(cfg.eval.batch_size), mesh,
                                                            progress))


def onnx_model(path: str) -> Model:
  """An ONNX export (launch/export.py) run by onnxruntime on the CPU; no JAX. Metadata from the file."""
  session, meta = onnx_file.open_session(path)
  try:
    if meta.get("format") != "onnx" or meta.get("format_version") != onnx_file.FORMAT_VERSION:
      raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
    size, color = int(meta["image_size"]), str(meta["color"])
    if color not in ("grey", "rgb"):
      raise ValueError(f"color {color!r}")
    norm = Normalization.from_dict(meta["normalization"], f"{path} metadata")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not an ONNX export of launch/export.py (format 'onnx' version "
                     f"{onnx_file.FORMAT_VERSION} with image_size, color, normalization in its metadata): {e}") from e
  batch = session.get_inputs()[0].shape[0]
  fixed = batch if isinstance(batch, int) else None  # a symbolic batch (launch/export.py's) takes any size
  batch_size = fixed or max(1, int(meta.get("eval_batch_size", 32)))
  logging.getLogger(writers.LOGGER_NAME).info("%s: %s step %s, %dx%d %s, batch %s", path, meta.get("method"),
                                              meta.get("step"), size, size, color, fixed or "symbolic")

  def score(images: np.ndarray, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    if color == "rgb" and images.ndim == 3:  # grey rows (a .npy) for an RGB model: equal channels
      images = np.repeat(images[..., None], 3, axis=-1)
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      keep = len(chunk)
      if fixed and keep < fixed:  # a fixed-batch model: pad, drop the padded rows
        chunk = np.concatenate([chunk, np.zeros((fixed - keep,) + chunk.shape[1:], np.float32)])
      m, s = session.run(list(onnx_file.OUTPUT_NAMES), {onnx_file.INPUT_NAME: chunk})
      maps.append(m[:keep])
      scores.append(s[:keep])
      if progress:
        progress(keep)
    if not maps:
      return np.zeros((0, size, size), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(maps), np.concatenate(scores)

  return Model(size, color, batch_size, norm, score)


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  if bool(_WORKDIR.value) == bool(_ONNX.value):
    print("error: give either --workdir (a trained run, scored with JAX) or --onnx (an exported model, scored "
          "with onnxruntime)" + (", not both" if _WORKDIR.value else ""), file=sys.stderr)
    return 1
  try:
    model = onnx_model(_ONNX.value) if _ONNX.value else jax_model(_WORKDIR.value)
    norm = model.normalization
    if _THRESHOLD.value is not None:
      norm = Normalization(norm.low, _THRESHOLD.value)
    names, files, images = _inputs(_INPUT.value, model.image_size, model.color)
    if _MASK.value and len(names) != 1:
      raise ValueError(f"--mask goes with a single input image; {_INPUT.value} holds {len(names)}")
    mask = None
    if _MASK.value:  # any non-zero pixel is lesion (the reference's rule, as preprocess.load_mask)
      mask = preprocess.load_original_mask(_MASK.value)
      shape = images.shape[1:3] if files[0] is None else _original(files[0], "grey").shape
      if mask.shape != tuple(shape):
        raise ValueError(f"--mask {_MASK.value} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image "
                         f"{files[0] or _INPUT.value} is {shape[1]}x{shape[0]}; expected the same size")
    out = _OUT.value or os.path.join(_WORKDIR.value or os.path.dirname(os.path.abspath(_ONNX.value)), "predictions")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f"--out {out} is a file; expected a folder (created if missing)")
  except (FileNotFoundError, ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with writers.count_bar(len(images), "scoring") as bar:
    maps, scores = model.score(images, bar.update)
  bad = [n for n, s in zip(names, scores) if not np.isfinite(s)]
  if bad:
    print(f"error: the model gave non-finite scores for {len(bad)} images ({bad[:3]}); nothing written",
          file=sys.stderr)
    return 1
  os.makedirs(out, exist_ok=True)
  records = []
  with writers.count_bar(len(images), "panels") as bar:
    for name, stem, file, img, m, raw in zip(names, _out_names(names), files, images, maps, scores):
      png = os.path.join(out, f"{stem}_panel.png")
      s = float(norm(raw))
      abnormal = bool(raw > norm.threshold)
      figures.write_panel(png, img, norm(m), 0.5, s, raw_score=float(raw), mask=mask, name=name,
                          original=_original(file, model.color))
      records.append({"name": name, "file": file, "score": s, "raw_score": float(raw),
                      "threshold": norm.threshold, "abnormal": abnormal, "panel": png})
      bar.write(f"{name}: score {s:.3f} (raw {float(raw):.4f}) -> {'ABNORMAL' if abnormal else 'normal'}; "
                f"panel {png}", file=sys.stdout)
      bar.update(1)
  with open(os.path.join(out, "predictions.json"), "w") as f:
    json.dump({"normalization": norm.to_dict(), "predictions": records}, f, indent=2)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["input"])
  app.run(lambda argv: sys.exit(main(argv)))
