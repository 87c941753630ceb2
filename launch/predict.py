"""Scores new images with a trained run: anomaly score, decision at the stored threshold, panels that explain them.

  python launch/predict.py --workdir runs/busi --input ../shared/data/busi/images/test/abnormal/benign_10.jpg
  python launch/predict.py --workdir runs/busi --input some/folder/ --out predictions/
  python launch/predict.py --workdir runs/busi --input studies.txt --rows csv --panels 50   # a file list
  python launch/predict.py --workdir runs/chest --input data/tfds/anomaly_dataset/chest/1.0.0 --split test
  python launch/predict.py --workdir runs/busi --input archive.txt --shard 0/4   # one of 4 processes
  python launch/predict.py --workdir runs/busi --input batch.npy      # (N,H,W) or (H,W) grayscale in [0,1]
  python launch/predict.py --workdir runs/busi --input img.jpg --mask img_mask.jpg   # with ground truth
  python launch/predict.py --onnx runs/busi/export/model.onnx --input some/folder/   # no JAX: onnxruntime

--input is an image, a folder of images, a text file listing one image path per line (relative paths
from the list's folder), a TFDS build (launch/prepare_data.py; --split picks the split) or a .npy
array. Images stream: they are read in batches (--workers threads decode ahead), scored, and each one
becomes a row of <out>/predictions.jsonl (or .csv with --rows csv: name, file, score, raw_score,
threshold, abnormal) as soon as its batch is scored, so host memory stays bounded whatever the size of
the archive; progress goes to the console with the rate and an ETA. Only the --panels highest-scoring
images keep their maps, and get a panel <out>/<stem>_panel.png (figures.anomaly_panel: image | ground
truth | normalised map on the fixed 0-1 scale | map > 0.5 | overlay, at the file's own resolution; inputs
sharing a stem, a.png and a.jpg, keep their suffix: a_png_panel.png); <out>/predictions.json lists
those images' rows with their panel, in input order, and the counts. A reconstruction method's run (SSL-AnoVAE,
latent diffusion) also draws <out>/<stem>_reconstruction.png for them: image | pseudo-healthy reconstruction |
residual |x - x_hat|. With --shard i/n, this process
takes the i-th of n contiguous parts of the (sorted) input and writes predictions-<i>-of-<n>.* and its
panels under panels-<i>-of-<n>/: n processes, on one machine or many, split an archive with no
coordination. An unreadable image stops the run naming the file, unless --skip_unreadable, which writes
its row with an "error" and counts it in predictions.json.

Scores are normalised (mediclip_jax.evaluate.normalization): 0.5 is the decision threshold, typical
normal tissue of the support images reads 0; the raw score is kept beside it. Any method works: the
run's stored config names it; no dataset is needed. JAX is imported only to load the run (this module's
top level needs numpy, PIL, matplotlib, absl, tqdm). With --onnx FILE (written by launch/export.py)
instead of --workdir, onnxruntime scores the images and JAX is never imported: image size, colour,
normalisation come from the file's metadata (a JAX-free install: docs/export.md); the default --out is
<dir of FILE>/predictions. Reading TFDS builds needs the `tfds` extra.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import heapq
import json
import logging
import os
import sys
from collections.abc import Callable

import numpy as np
from absl import app, flags
from PIL import Image

from data_pipelines import datasets, preprocess, records
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
_SPLIT = flags.DEFINE_string("split", "test", "With a TFDS build as --input: the split to score.")
_ROWS = flags.DEFINE_enum("rows", "jsonl", ["jsonl", "csv"], "Format of the per-image rows file.")
_PANELS = flags.DEFINE_integer("panels", 16, "Panels for this many highest-scoring images (-1: every image, "
                               "keeping every map in memory; 0: none).")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: score the i-th of n contiguous parts of the input.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Threads decoding images ahead of the model.")
_SKIP = flags.DEFINE_bool("skip_unreadable", False, "Write an error row for an unreadable image and go on, "
                          "instead of stopping.")

IMAGE_SUFFIXES = datasets.IMAGE_SUFFIXES  # what the dataset readers accept


@dataclasses.dataclass
class Inputs:
  """What --input names, readable one image at a time: `names[i]`, `files[i]` (a path, a TFDS record
  reference, or None for .npy rows), `read(i)` -> model input, `original(i)` -> the pixels panels draw on."""
  names: list[str]
  files: list[str | None]
  read: Callable[[int], np.ndarray]
  original: Callable[[int], np.ndarray | None]

  def part(self, shard: int, count: int) -> "Inputs":
    """The shard-th of `count` contiguous parts."""
    n = len(self.names)
    lo, hi = n * shard // count, n * (shard + 1) // count
    return Inputs(self.names[lo:hi], self.files[lo:hi], lambda i: self.read(lo + i),
                  lambda i: self.original(lo + i))


def _listed(path: str) -> list[str]:
  """The image paths of a file list (one per line, relative to the list's folder; blank lines ignored)."""
  out, base = [], os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      full = line if os.path.isabs(line) else os.path.join(base, line)
      if not line.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{path}:{lineno}: {line!r} is not an image file; expected one of {IMAGE_SUFFIXES}")
      if not os.path.isfile(full):
        raise FileNotFoundError(f"{path}:{lineno}: {full} does not exist")
      out.append(full)
  if not out:
    raise ValueError(f"{path}: the file list names no image")
  return out


def _inputs(path: str, size: int, color: str, split: str) -> Inputs:
  """The images --input names (nothing is decoded here but a .npy array, which is loaded)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such image, folder, file list, TFDS build or .npy file")
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

    def row(i: int) -> np.ndarray:
      a = arr[i]
      if a.shape != (size, size):
        a = np.asarray(Image.fromarray((a * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR),
                       np.float32) / 255
      return a
    stem = os.path.splitext(os.path.basename(path))[0]
    return Inputs([f"{stem}_{i}" for i in range(len(arr))], [None] * len(arr), row, lambda i: None)
  if os.path.isdir(path) and records.is_tfds_dir(path):
    source = records.open_tfds(path, split)
    version_dir = records.resolve_tfds_dir(path)
    names = list(source.scalars()["name"])
    return Inputs(names, [records.record_ref(version_dir, split, i) for i in range(len(names))],
                  lambda i: preprocess.test_array(source[i]["image"], size, color),
                  lambda i: preprocess.original_array(source[i]["image"], color))
  if os.path.isfile(path) and path.lower().endswith(".txt"):
    files = _listed(path)
  else:
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise FileNotFoundError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    bad = [f for f in files if not f.lower().endswith(IMAGE_SUFFIXES)]
    if bad:
      raise ValueError(f"{bad[0]}: not an image file; expected one of {IMAGE_SUFFIXES}, a .txt file list, a TFDS "
                       "build or a .npy array")
  return Inputs([os.path.basename(f) for f in files], files,
                lambda i: preprocess.load_test_image(files[i], size, color),
                lambda i: preprocess.load_original(files[i], color))


def _stream(inputs: Inputs, batch: int, workers: int, skip: bool):
  """(start, images, errors) per batch of `inputs`, decoded by `workers` threads one batch ahead; an
  unreadable image raises, or with `skip` becomes a zero image and an entry of `errors` (position -> text)."""
  def read(i: int):
    try:
      return inputs.read(i), None
    except ValueError as e:
      if not skip:
        raise
      return None, str(e)

  starts = list(range(0, len(inputs.names), batch))
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    for k, start in enumerate(starts):
      while len(pending) < 2 and k + len(pending) < len(starts):
        s0 = starts[k + len(pending)]
        pending.append([pool.submit(read, i) for i in range(s0, min(s0 + batch, len(inputs.names)))])
      results = [f.result() for f in pending.popleft()]
      shape = next((r[0].shape for r in results if r[0] is not None), None)
      if shape is None:  # every image of the batch unreadable
        shape = (1, 1)
      images = np.stack([r[0] if r[0] is not None else np.zeros(shape, np.float32) for r in results])
      yield start, images, {start + j: r[1] for j, r in enumerate(results) if r[1] is not None}


class _TopK:
  """The k highest raw scores seen, with their maps (k < 0: all of them)."""

  def __init__(self, k: int):
    self.k, self.heap, self.count = k, [], 0

  def add(self, raw: float, i: int, m: np.ndarray) -> None:
    if self.k == 0:
      return
    item = (raw, -i, i, m)
    if self.k < 0 or len(self.heap) < self.k:
      heapq.heappush(self.heap, item)
    elif item[:2] > self.heap[0][:2]:
      heapq.heapreplace(self.heap, item)

  def items(self) -> list[tuple[int, float, np.ndarray]]:
    """(input position, raw score, map), in input order."""
    return sorted(((i, raw, m) for raw, _, i, m in self.heap), key=lambda t: t[0])


class _Rows:
  """Per-image rows, appended as batches are scored: JSON lines or CSV."""
  FIELDS = ("name", "file", "score", "raw_score", "threshold", "abnormal", "error")

  def __init__(self, path: str, fmt: str):
    self.path, self.fmt = path, fmt
    self.f = open(path, "w", encoding="utf-8", newline="")
    self.csv = csv.DictWriter(self.f, fieldnames=self.FIELDS) if fmt == "csv" else None
    if self.csv:
      self.csv.writeheader()

  def write(self, row: dict) -> None:
    if self.csv:
      self.csv.writerow({k: row.get(k, "") for k in self.FIELDS})
    else:
      self.f.write(json.dumps(row) + "\n")

  def close(self) -> None:
    self.f.close()


def _shard(text: str) -> tuple[int, int]:
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"--shard {text}: expected 0 <= i < n")
  return i, n


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


@dataclasses.dataclass
class Model:
  """What scoring needs of a trained detector, however it is run."""
  image_size: int
  color: str  # "grey" | "rgb": how images are read
  batch_size: int
  normalization: Normalization
  score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> raw (maps, scores)
  # reconstruction methods: images -> pseudo-healthy images (n,H,W), drawn beside the panels; else None
  reconstruct: Callable[[np.ndarray], np.ndarray] | None = None


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
  reconstruct = None
  if run.trainable.reconstructor:
    recon = run.trainable.reconstructor(run.state)

    def as_pair(x):  # score_share pads and gathers (maps, scores); the reconstruction rides in the maps' place
      r = recon(x)
      return r, r[:, 0, 0]

    reconstruct = lambda images: scoring.score_share(as_pair, images, int(cfg.eval.batch_size), mesh)[0]
  return Model(int(cfg.data.image_size), cfg.data.color, int(cfg.eval.batch_size),
               Normalization.from_dict(run.metadata["normalization"], f"{workdir} step {run.step}"),
               lambda images: scoring.score_share(scorer, images, int(cfg.eval.batch_size), mesh), reconstruct)


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

  def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    shard, shards = _shard(_SHARD.value)
    if _WORKERS.value < 1:
      raise ValueError(f"--workers must be >= 1, got {_WORKERS.value}")
    model = onnx_model(_ONNX.value) if _ONNX.value else jax_model(_WORKDIR.value)
    norm = model.normalization
    if _THRESHOLD.value is not None:
      norm = Normalization(norm.low, _THRESHOLD.value)
    inputs = _inputs(_INPUT.value, model.image_size, model.color, _SPLIT.value)
    if _MASK.value and len(inputs.names) != 1:
      raise ValueError(f"--mask goes with a single input image; {_INPUT.value} holds {len(inputs.names)}")
    mask = None
    if _MASK.value:  # any non-zero pixel is lesion (the reference's rule, as preprocess.load_mask)
      mask = preprocess.load_original_mask(_MASK.value)
      original = inputs.original(0)
      shape = inputs.read(0).shape[:2] if original is None else original.shape[:2]
      if mask.shape != tuple(shape):
        raise ValueError(f"--mask {_MASK.value} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image "
                         f"{inputs.files[0] or _INPUT.value} is {shape[1]}x{shape[0]}; expected the same size")
    if shards > 1:
      inputs = inputs.part(shard, shards)
    out = _OUT.value or os.path.join(_WORKDIR.value or os.path.dirname(os.path.abspath(_ONNX.value)), "predictions")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f"--out {out} is a file; expected a folder (created if missing)")
  except (FileNotFoundError, ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  suffix = f"-{shard:05d}-of-{shards:05d}" if shards > 1 else ""
  panel_dir = os.path.join(out, f"panels{suffix}") if shards > 1 else out
  os.makedirs(panel_dir, exist_ok=True)
  rows = _Rows(os.path.join(out, f"predictions{suffix}.{_ROWS.value}"), _ROWS.value)
  top, n_abnormal, errors = _TopK(_PANELS.value), 0, {}
  progress = writers.Progress(len(inputs.names), unit="img")
  try:
    for start, images, bad in _stream(inputs, model.batch_size, _WORKERS.value, _SKIP.value):
      maps, scores = model.score(images)
      for j, (m, raw) in enumerate(zip(maps, scores)):
        i = start + j
        name, file = inputs.names[i], inputs.files[i]
        if i in bad:
          errors[i] = bad[i]
          rows.write({"name": name, "file": file, "error": bad[i]})
          progress.write(f"{name}: UNREADABLE ({bad[i]})")
          continue
        if not np.isfinite(raw):
          raise FloatingPointError(f"{file or name}: the model gave a non-finite score")
        s, abnormal = float(norm(raw)), bool(raw > norm.threshold)
        n_abnormal += abnormal
        rows.write({"name": name, "file": file, "score": s, "raw_score": float(raw), "threshold": norm.threshold,
                    "abnormal": abnormal})
        top.add(float(raw), i, m)
        print(f"{name}: score {s:.3f} (raw {float(raw):.4f}) -> {'ABNORMAL' if abnormal else 'normal'}", flush=True)
      rows.f.flush()
      progress.update(start + len(images))
  except (ValueError, OSError, FloatingPointError) as e:
    progress.close()
    rows.close()
    print(f"error: {e}; the rows scored so far are in {rows.path}", file=sys.stderr)
    return 1
  progress.close()
  rows.close()
  chosen = top.items()
  stems = _out_names([os.path.basename(inputs.names[i]) for i, _, _ in chosen])  # record names may hold folders
  panels = []
  recons = model.reconstruct(np.stack([inputs.read(i) for i, _, _ in chosen])) if model.reconstruct and chosen else None
  with writers.count_bar(len(chosen), "panels") as bar:
    for (i, raw, m), stem in zip(chosen, stems):
      png = os.path.join(panel_dir, f"{stem}_panel.png")
      s = float(norm(raw))
      figures.write_panel(png, None if inputs.files[i] else inputs.read(i), norm(m), 0.5, s, raw_score=raw,
                          mask=mask, name=inputs.names[i], original=inputs.original(i))
      panels.append({"name": inputs.names[i], "file": inputs.files[i], "score": s, "raw_score": raw,
                     "threshold": norm.threshold, "abnormal": bool(raw > norm.threshold), "panel": png})
      if recons is not None:
        panels[-1]["reconstruction"] = os.path.join(panel_dir, f"{stem}_reconstruction.png")
        figures.write_reconstruction(panels[-1]["reconstruction"], inputs.read(i), recons[len(panels) - 1],
                                     name=inputs.names[i])
      bar.update(1)
  summary = {"normalization": norm.to_dict(), "n_images": len(inputs.names), "n_abnormal": int(n_abnormal),
             "n_unreadable": len(errors), "rows": rows.path,
             "panels": f"the {len(panels)} highest raw scores (--panels {_PANELS.value})", "predictions": panels}
  with open(os.path.join(out, f"predictions{suffix}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"{len(inputs.names)} images: {n_abnormal} abnormal, {len(errors)} unreadable; rows {rows.path}; "
        f"{len(panels)} panels in {panel_dir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["input"])
  app.run(lambda argv: sys.exit(main(argv)))
