"""Exports a trained run to ONNX and to a serialized jax.export artefact, then checks both against JAX.

  python launch/export.py --workdir runs/busi                      # runs/busi/export/model.{onnx,jaxexport}
  python launch/export.py --workdir runs/busi --format onnx --out deploy/busi --check_images 16
  python launch/export.py --workdir runs/busi --input some/folder/ --overwrite   # check on your own images
  python launch/predict.py --onnx runs/busi/export/model.onnx --input img.jpg      # then score without JAX

Writes <out>/model.onnx (onnxruntime, no JAX needed; metadata in the file) and <out>/model.jaxexport
with its metadata sidecar <out>/model.jaxexport.json (mediclip_jax.export says what they hold;
docs/export.md how to run them). Both are the run's own scorer in float32 (a bfloat16 run is rebuilt
in float32) with a symbolic batch dimension. The check scores --check_images real images (spread over
the run's test set, or the first of --input) with the JAX model and with each artefact, at the full
batch and at batch 1, prints the max absolute differences of maps and scores, and exits 1 if one
exceeds mediclip_jax.export.MAPS_ATOL / SCORES_ATOL. Existing files are kept unless --overwrite.
ONNX export needs jax2onnx (docs/export.md: how to install it).
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from data_pipelines import datasets, preprocess, run_data
from mediclip_jax import export
from mediclip_jax.train import writers

FORMATS = ("onnx", "jax")

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/export).")
_FORMAT = flags.DEFINE_list("format", list(FORMATS), "Comma-separated subset of onnx,jax.")
_CHECK = flags.DEFINE_integer("check_images", 8, "Real images the artefacts are checked on (0: no check).")
_INPUT = flags.DEFINE_string("input", None, "An image or folder to check on instead of the run's test set.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Override the dataset root stored in the run's config.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_PLATFORMS = flags.DEFINE_list("platforms", list(export.DEFAULT_PLATFORMS),
                               "Platforms the jax.export artefact is lowered for (cpu, cuda, rocm, tpu).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing artefacts in --out.")


def _targets(out: str, formats: list[str]) -> dict[str, list[str]]:
  """Files each format writes (an ONNX model too large for one file also writes model.onnx.data)."""
  t = {}
  if "onnx" in formats:
    t["onnx"] = [os.path.join(out, export.ONNX_FILE), os.path.join(out, export.ONNX_FILE + ".data")]
  if "jax" in formats:
    p = os.path.join(out, export.JAX_FILE)
    t["jax"] = [p, p + export.METADATA_SUFFIX]
  return t


def check_images(run, n: int, input_path: str | None, data_root: str | None,
                 workdir: str) -> tuple[list[str], np.ndarray]:
  """(names, images at the run's resolution and colour): n spread over the test set, or the first n of
  `input_path`."""
  size, color = int(run.config.data.image_size), run.config.data.color
  if input_path:
    if not os.path.exists(input_path):
      raise FileNotFoundError(f"{input_path}: no such image or folder")
    files = [input_path] if os.path.isfile(input_path) else sorted(
        os.path.join(input_path, f) for f in os.listdir(input_path)
        if f.lower().endswith(datasets.IMAGE_SUFFIXES))[:n]
    if not files:
      raise FileNotFoundError(f"{input_path}: folder holds no images ({', '.join(datasets.IMAGE_SUFFIXES)})")
  else:
    root = data_root or run_data.dataset_root(run.config.data, workdir)
    if not root:
      raise ValueError(f"{workdir}: the stored config has no data.root; pass --data_root or --input")
    try:
      test = datasets.load_dataset(root).test
    except datasets.DatasetError as e:
      raise ValueError(f"{e}\n(checking needs real images: pass --data_root, --input, or --check_images 0)") from e
    idx = sorted(set(np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int).tolist()))
    files = [test[i].path for i in idx]
  return [os.path.basename(f) for f in files], np.stack([preprocess.load_test_image(f, size, color) for f in files])


def check(run, loaders: dict[str, str], images: np.ndarray) -> bool:
  """Scores `images` with the JAX model and every artefact, prints the differences; True when all are within
  tolerance."""
  ref = tuple(np.asarray(a) for a in export.scorer_fn(run)(jnp.asarray(images)))
  ok = True
  for fmt, path in loaders.items():
    score, _ = export.load_onnx(path) if fmt == "onnx" else export.load_jax_export(path)
    full = export.max_differences(ref, score(images))
    one = export.max_differences(tuple(r[:1] for r in ref), score(images[:1]))
    d = {k: max(full[k], one[k]) for k in full}
    good = d["maps"] <= export.MAPS_ATOL and d["scores"] <= export.SCORES_ATOL
    ok &= good
    print(f"check {fmt}: {len(images)} images (batch {len(images)} and 1): max |diff| maps {d['maps']:.3g}, "
          f"scores {d['scores']:.3g} (tolerance {export.MAPS_ATOL:g}, {export.SCORES_ATOL:g}) -> "
          f"{'ok' if good else 'FAILED'}")
  return ok


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  formats = [f.strip() for f in _FORMAT.value if f.strip()]
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    print(f"error: --format takes a comma-separated subset of {','.join(FORMATS)}, got {_FORMAT.value}",
          file=sys.stderr)
    return 1
  if _CHECK.value < 0:
    print(f"error: --check_images must be >= 0, got {_CHECK.value}", file=sys.stderr)
    return 1
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  targets = _targets(out, formats)
  existing = [p for paths in targets.values() for p in paths if os.path.exists(p)]
  if existing and not _OVERWRITE.value:
    print(f"error: {existing[0]} exists; pass --overwrite to replace it, or choose another --out", file=sys.stderr)
    return 1
  try:
    run, changed = export.load_for_export(_WORKDIR.value, _STEP.value)
    names, images = (check_images(run, _CHECK.value, _INPUT.value, _DATA_ROOT.value, _WORKDIR.value)
                     if _CHECK.value else ([], None))
  except (FileNotFoundError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{_WORKDIR.value}: {run.config.method} step {run.step}, input {['batch', *export.input_shape(run)]} "
        f"({run.config.data.color}), float32" + (f" (trained with {changed}, rebuilt in float32)" if changed else ""))
  os.makedirs(out, exist_ok=True)
  written = {}
  for fmt, paths in targets.items():
    for p in paths:
      if os.path.exists(p):  # --overwrite: a stale ONNX .data sidecar must not outlive its model
        os.remove(p)
    if fmt == "onnx":
      try:
        export.export_onnx(run, paths[0], trained_dtypes=changed)
      except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    else:
      export.export_jax(run, paths[0], platforms=tuple(_PLATFORMS.value), trained_dtypes=changed)
    written[fmt] = paths[0]
    files = [p for p in paths if os.path.exists(p)]
    print(f"wrote {fmt}: " + ", ".join(f"{p} ({os.path.getsize(p) / 2**20:.2f} MiB)" for p in files))
  if images is None:
    return 0
  print(f"checking on {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
  return 0 if check(run, written, images) else 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(lambda argv: sys.exit(main(argv)))
