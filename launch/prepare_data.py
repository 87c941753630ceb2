"""Converts a data source into a TFDS dataset of ArrayRecord files (random access, no TensorFlow needed).

  python launch/prepare_data.py --data_root ../shared/data/brainmri --name brainmri --out data/tfds
  python launch/prepare_data.py --data_root ../shared/data/busi --out data/tfds --workers 4
  python launch/prepare_data.py --phantom 20000 --size 224 --out data/tfds
  python launch/prepare_data.py --pairs reports.jsonl --name reports --out data/tfds

Exactly one source:
  --data_root DIR   a dataset folder in any layout the readers accept (MediCLIP, plain folders, MVTec AD), with
                    all their checks; splits train and test (builder `anomaly_dataset`, name default: the folder's)
  --phantom N       N generated chest phantoms with ground-truth masks: N/2 train, N/4 normal and the rest
                    abnormal test images unless --phantom_train/--phantom_test_normal/--phantom_test_abnormal say
                    otherwise; --size pixels (64-224), --seed (builder `phantom_chest`)
  --pairs FILE      image-text pairs, JSON lines or CSV with "image" (relative to the file's folder), "text" and
                    optional "label" (builder `image_text_pairs`, split train)

The dataset goes to <out>/<builder>/<name>/1.0.0, the directory printed at the end: pass it to training and
evaluation as `--config.data.source=tfds --config.data.tfds_dir=<it>`. Also printed: examples per split,
bytes on disk and the build time. Images and masks are stored as PNG (lossless): a record holds exactly the
pixels `data_pipelines.preprocess.load_native` decodes from the file (docs/data.md, "TFDS / ArrayRecord
datasets").

A second run into the same directory reuses the build when it was made from the same inputs (file names,
labels, sizes and modification times; phantom parameters), and otherwise stops with an error naming both
sources; --overwrite deletes the old build and builds again. A failed or interrupted build leaves nothing
behind (TFDS writes into a temporary folder). `--workers N` decodes and encodes in N processes.
Errors are one line, `error: ...`, exit code 1 (`-v 1` adds the traceback).
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags

from data_pipelines import records
from mediclip_jax import config_utils
from mediclip_jax.train import writers

_DATA_ROOT = flags.DEFINE_string("data_root", None, "Dataset folder (MediCLIP, plain folders or MVTec layout).")
_PHANTOM = flags.DEFINE_integer("phantom", None, "Generate this many chest phantoms (with ground-truth masks).")
_PAIRS = flags.DEFINE_string("pairs", None, "Image-text pairs file (.jsonl/.json lines or .csv).")
_OUT = flags.DEFINE_string("out", None, "data_dir to build into: the dataset goes to <out>/<builder>/<name>/1.0.0.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (BuilderConfig; default: the folder's name, the pairs "
                            "file's stem, or phantom_<train>-<normal>-<abnormal>_<size>px_seed<seed>).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing build made from other inputs.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes decoding and encoding images (0: this process).")
_SIZE = flags.DEFINE_integer("size", 224, "--phantom: image size in pixels (64 to 224).")
_SEED = flags.DEFINE_integer("seed", 0, "--phantom: seed (each image has its own generator from it).")
_P_TRAIN = flags.DEFINE_integer("phantom_train", None, "--phantom: training images (default N/2).")
_P_NORMAL = flags.DEFINE_integer("phantom_test_normal", None, "--phantom: normal test images (default N/4).")
_P_ABNORMAL = flags.DEFINE_integer("phantom_test_abnormal", None, "--phantom: abnormal test images (default: "
                                   "the rest of N).")


def _phantom_counts(n: int) -> tuple[int, int, int]:
  if n < 3:
    raise ValueError(f"--phantom must be at least 3 (train, normal and abnormal test images), got {n}")
  train = _P_TRAIN.value if _P_TRAIN.value is not None else n // 2
  normal = _P_NORMAL.value if _P_NORMAL.value is not None else n // 4
  abnormal = _P_ABNORMAL.value if _P_ABNORMAL.value is not None else n - train - normal
  if train + normal + abnormal != n:
    raise ValueError(f"--phantom {n} but --phantom_train/--phantom_test_normal/--phantom_test_abnormal add up to "
                     f"{train + normal + abnormal}")
  return train, normal, abnormal


def _builders():
  """data_pipelines.tfds_builders, imported here so that a missing extra is one line, not a traceback."""
  try:
    from data_pipelines import tfds_builders  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"launch/prepare_data.py needs the tfds extra: pip install -e \".[tfds]\" ({e})") from e
  return tfds_builders


def make_builder():
  """The builder the flags ask for."""
  tfds_builders = _builders()
  given = [f for f, v in (("--data_root", _DATA_ROOT.value), ("--phantom", _PHANTOM.value), ("--pairs", _PAIRS.value))
           if v is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of --data_root, --phantom, --pairs (got {', '.join(given) or 'none'})")
  common = {"data_dir": _OUT.value, "name": _NAME.value, "workers": _WORKERS.value}
  if _DATA_ROOT.value is not None:
    return tfds_builders.AnomalyDataset(_DATA_ROOT.value, **common)
  if _PAIRS.value is not None:
    return tfds_builders.ImageTextPairs(_PAIRS.value, **common)
  n_train, n_normal, n_abnormal = _phantom_counts(_PHANTOM.value)
  return tfds_builders.PhantomChest(n_train, n_normal, n_abnormal, _SIZE.value, _SEED.value, **common)


def _size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n} B"


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  try:
    builder = make_builder()
    print(f"{builder.name}/{builder.builder_config.name}: {builder.info.description}; "
          f"{builder.channels} channel(s), into {builder.data_dir}", file=sys.stderr)
    result = _builders().build(builder, overwrite=_OVERWRITE.value)
    info = records.tfds_info(result.directory)
  except (OSError, ValueError) as e:  # DatasetError is a ValueError
    if flags.FLAGS.verbosity >= 1:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 1
  splits = ", ".join(f"{k} {v}" for k, v in result.splits.items())
  masks = f", masks: {', '.join(f'{k} {v}' for k, v in info['masks'].items())}" if info["kind"] == "anomaly" else ""
  if result.reused:
    print(f"reused the existing build of the same inputs (nothing written): {splits} examples, "
          f"{_size(result.bytes)} on disk{masks}")
  else:
    print(f"built in {result.seconds:.1f} s: {splits} examples, {_size(result.bytes)} on disk, "
          f"{info['channels']} channel(s){masks}")
  print(f"dataset: {os.path.abspath(result.directory)}")
  if info["kind"] == "anomaly":
    print(f"use it with: --config.data.source=tfds --config.data.tfds_dir={os.path.abspath(result.directory)}")
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_utils.parse_flags)
