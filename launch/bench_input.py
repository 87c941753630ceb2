"""Input-pipeline throughput per host: decode + resize + batch through data_pipelines/grain_input.py.

  python launch/bench_input.py --data_root ../shared/data/brainmri --split test          # files (PNG/JPEG)
  python launch/bench_input.py --tfds_dir ~/tensorflow_datasets/brainmri/1.0.0           # a TFDS build
  python launch/bench_input.py --phantom 256                                             # in memory, no disk
  python launch/bench_input.py --data_root ../shared/data/brainmri --bench_json bench_reference.json
  python launch/bench_input.py --phantom 256 --step_images_per_s 900 --workers 0,2,4,8

For each worker count (--workers) it builds `grain_input.train_batches` (seed-pure shuffle, repeated
epochs) with --transform train (`preprocess.train_array`) or test (`test_array` + `mask_array`), and
reports the first-batch latency (worker start included) and the steady rate over --batches batches
after --warmup more (which drain what the workers buffered while the first was awaited), in images/s
and batches/s of this host (--batch_size rows per batch; a host's
share of a global batch). Worker processes run beside this one: on a machine with few cores they
compete with it (and with a train step running there), so more workers can be slower.

Given the train step's rate (--step_images_per_s, or --bench_json: the JSON launch/benchmark.py writes,
whose `modes.<mode>.images_per_s` is the global images/s of the step, divided here by its
`device.process_count`; a suite JSON's `entries.reference`), it prints the pipeline/step ratio per
worker count: at least 1 means the pipeline keeps up with the step.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from grain import sharding

from data_pipelines import datasets, grain_input, phantom, records

_DATA_ROOT = flags.DEFINE_string("data_root", None, "Dataset folder (any accepted layout): records.FileSource.")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "A TFDS build (version directory or data_dir): records.open_tfds.")
_PHANTOM = flags.DEFINE_integer("phantom", 0, "Generate this many phantom records in memory instead.")
_PHANTOM_SIZE = flags.DEFINE_integer("phantom_size", 224, "Native size of the phantom images (64..224).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "test"], "Split of --data_root / --tfds_dir.")
_TRANSFORM = flags.DEFINE_enum("transform", "train", ["train", "test"], "train: preprocess.train_array; test: "
                               "test_array + mask_array.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input size.")
_COLOR = flags.DEFINE_enum("color", "grey", ["grey", "rgb"], "Test images' colour (--transform test).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per batch on this host.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed batches after the first (they drain what the workers "
                               "buffered while starting; at least the workers' total buffer).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed after the warm-up.")
_WORKERS = flags.DEFINE_string("workers", "0,2,4", "Comma-separated worker process counts.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "Threads building batches in each reading process.")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "Batches buffered per reading process.")
_STEP_IPS = flags.DEFINE_float("step_images_per_s", None, "The train step's images/s per host.")
_BENCH_JSON = flags.DEFINE_string("bench_json", None, "launch/benchmark.py's JSON: the step's images/s from it.")
_BENCH_MODE = flags.DEFINE_string("bench_mode", "fused", "Which mode of --bench_json is the train step.")


def _phantom_records(n: int, size: int) -> list[dict]:
  """n phantom chest images (every fourth with an anomaly) as records at native `size`."""
  out = []
  for i in range(n):
    anomaly = phantom.ANOMALIES[i // 4 % len(phantom.ANOMALIES)] if i % 4 == 3 else None
    image, mask = phantom.phantom(size, seed=i, anomaly=anomaly)
    out.append({"image": np.round(image * 255).astype(np.uint8)[..., None],
                "mask": (mask > 0).astype(np.uint8)[..., None], "has_mask": anomaly is not None,
                "label": int(anomaly is not None), "class_name": anomaly or "normal", "name": f"phantom/{i}"})
  return out


def open_source():
  """(source, description) from the flags: exactly one of --data_root, --tfds_dir, --phantom."""
  given = [name for name, v in (("--data_root", _DATA_ROOT.value), ("--tfds_dir", _TFDS_DIR.value),
                                ("--phantom", _PHANTOM.value)) if v]
  if len(given) != 1:
    raise app.UsageError(f"give exactly one of --data_root, --tfds_dir, --phantom (got {given or 'none'})")
  if _PHANTOM.value:
    return (grain_input.MemorySource(_phantom_records(_PHANTOM.value, _PHANTOM_SIZE.value)),
            f"{_PHANTOM.value} phantom images at {_PHANTOM_SIZE.value} px, in memory")
  if _TFDS_DIR.value:
    return records.open_tfds(_TFDS_DIR.value, _SPLIT.value), f"TFDS {_TFDS_DIR.value} [{_SPLIT.value}]"
  ds = datasets.load_dataset(_DATA_ROOT.value)
  samples = ds.train if _SPLIT.value == "train" else ds.test
  return records.FileSource(samples), f"{_DATA_ROOT.value} {_SPLIT.value} files ({len(samples)})"


def step_images_per_s() -> tuple[float | None, str]:
  """(the train step's images/s per host, where it came from), (None, "") when not given."""
  if _STEP_IPS.value is not None:
    if _STEP_IPS.value <= 0:
      raise app.UsageError(f"--step_images_per_s must be positive, got {_STEP_IPS.value}")
    return _STEP_IPS.value, "--step_images_per_s"
  if not _BENCH_JSON.value:
    return None, ""
  with open(_BENCH_JSON.value, encoding="utf-8") as f:
    result = json.load(f)
  where = _BENCH_JSON.value
  if "modes" not in result and "reference" in result.get("entries", {}):  # a suite: its reference-size step
    result, where = result["entries"]["reference"], f"{where} entries.reference"
  mode = (result.get("modes") or {}).get(_BENCH_MODE.value)
  if not mode:
    raise app.UsageError(f"{where}: no mode {_BENCH_MODE.value!r} (modes: {sorted(result.get('modes') or {})}); "
                         "pass --bench_mode")
  processes = int((result.get("device") or {}).get("process_count", 1))
  return (float(mode["images_per_s"]) / processes,
          f"{where} modes.{_BENCH_MODE.value}.images_per_s / {processes} process(es)")


def measure(source, workers: int, transform) -> dict:
  """First-batch latency and the steady rate over the next --batches batches, with `workers` workers."""
  t0 = time.perf_counter()
  with grain_input.train_batches(source, global_batch_size=_BATCH_SIZE.value, seed=0, transform=transform,
                                 worker_count=workers, read_threads=_READ_THREADS.value,
                                 prefetch=_PREFETCH.value, shard_options=sharding.ShardOptions(0, 1)) as it:
    next(it)
    first = time.perf_counter() - t0
    for _ in range(_WARMUP.value):
      next(it)
    t1 = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    wall = time.perf_counter() - t1
  return {"workers": workers, "first_batch_s": first, "images_per_s": _BATCHES.value * _BATCH_SIZE.value / wall,
          "batches_per_s": _BATCHES.value / wall}


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    workers = [int(w) for w in _WORKERS.value.split(",") if w.strip()]
  except ValueError:
    raise app.UsageError(f"--workers: comma-separated integers, got {_WORKERS.value!r}") from None
  if not workers or min(workers) < 0 or _BATCHES.value < 1 or _BATCH_SIZE.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--workers >= 0 each, --batches and --batch_size positive, --warmup >= 0")
  step, step_from = step_images_per_s()
  source, what = open_source()
  transform = (grain_input.TrainImage(_IMAGE_SIZE.value) if _TRANSFORM.value == "train"
               else grain_input.EvalImage(_IMAGE_SIZE.value, _COLOR.value))
  print(f"input pipeline: {what}; {_TRANSFORM.value} transform at {_IMAGE_SIZE.value} px, batch {_BATCH_SIZE.value} "
        f"per host, {_BATCHES.value} batches timed after {1 + _WARMUP.value}; {os.cpu_count()} CPUs")
  rows = [measure(source, w, transform) for w in workers]
  header = f"{'workers':>7s} {'images/s':>10s} {'batches/s':>10s} {'first batch s':>14s}"
  if step:
    header += f" {'pipeline/step ratio':>20s}"
  print(header)
  for r in rows:
    line = f"{r['workers']:7d} {r['images_per_s']:10.1f} {r['batches_per_s']:10.2f} {r['first_batch_s']:14.2f}"
    if step:
      line += f" {r['images_per_s'] / step:20.2f}"
    print(line)
  if step:
    best = max(rows, key=lambda r: r["images_per_s"])
    verdict = "keeps up with" if best["images_per_s"] >= step else "is slower than"
    print(f"train step: {step:.1f} images/s per host ({step_from}); pipeline/step ratio {best['images_per_s'] / step:.2f} "
          f"at {best['workers']} workers: the pipeline {verdict} the step")
  return 0


if __name__ == "__main__":
  try:
    app.run(main)
  except (OSError, ValueError, KeyError, datasets.DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
