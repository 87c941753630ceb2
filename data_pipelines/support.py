"""Few-shot support sets: k normal training images drawn by seed, stored as JSON.

The reference draws its k images with unseeded `random.sample`, so every run sees
a different support set. Here the draw is a function of (sorted training names,
k, seed), and the chosen names are written to the run directory so a run can be
repeated, or another run can be given exactly the same images.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines.datasets import Dataset, DatasetError, Sample
from mediclip_jax import parallel

SUPPORT_FILE = "support_set.json"


def draw_support(dataset: Dataset, k: int = 16, seed: int = 100) -> list[Sample]:
  """k training samples chosen without replacement by `seed` (k = -1: all of them).

  Names are sorted first, so the draw does not depend on the line order of the list.
  """
  pool = sorted(dataset.train, key=lambda s: s.name)
  if k == -1:
    return pool
  if not 1 <= k <= len(pool):
    raise ValueError(f"k must be -1 or in [1, {len(pool)}] for {dataset.root} ({len(pool)} training images), got {k}")
  idx = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
  return [pool[i] for i in sorted(idx.tolist())]


def write_support(path: str | os.PathLike, samples: Sequence[Sample], seed: int | None,
                  dataset_root: str | os.PathLike) -> Path:
  """Writes {"files": [names], "k", "seed", "dataset_root"} to `path` (a directory
  gets support_set.json inside it). Returns the file written."""
  path = Path(path)
  if path.is_dir():
    path = path / SUPPORT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  rec = {"files": [s.name for s in samples], "k": len(samples), "seed": seed,
         "dataset_root": os.fspath(dataset_root)}
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
  os.replace(tmp, path)
  return path


def read_support(path: str | os.PathLike, dataset: Dataset) -> list[Sample]:
  """Reads a support-set file and resolves its names against `dataset.train`.

  Errors name the file and the offending entry: a name not among the training
  images, a duplicate, or a malformed file.
  """
  path = Path(path)
  if path.is_dir():
    path = path / SUPPORT_FILE
  try:
    rec = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError as e:
    raise DatasetError(f"support-set file {path} does not exist") from e
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from e
  if not isinstance(rec, dict) or not isinstance(rec.get("files"), list) or not rec["files"]:
    raise DatasetError(f"{path}: expected an object with a non-empty list 'files' of training image names")
  by_name = dataset.train_by_name()
  out, seen = [], set()
  for i, name in enumerate(rec["files"]):
    if not isinstance(name, str):
      raise DatasetError(f"{path}: files[{i}] must be a string, got {name!r}")
    if name in seen:
      raise DatasetError(f"{path}: files[{i}] {name!r} is listed twice")
    if name not in by_name:
      raise DatasetError(f"{path}: files[{i}] {name!r} is not a training image of {dataset.root}")
    seen.add(name)
    out.append(by_name[name])
  if "k" in rec and rec["k"] != len(out):
    raise DatasetError(f"{path}: 'k' is {rec['k']} but 'files' lists {len(out)} names")
  return out


def choose_support(data, seed: int, dataset: Dataset, workdir: str, train: bool) -> list[Sample]:
  """A run's training (support) images: `data.support_file`, else the set a previous run wrote into
  `workdir`, else (training only) `data.k_shot` drawn by `seed`, written to the workdir by process 0."""
  stored = os.path.join(workdir, SUPPORT_FILE)
  if data.support_file:
    chosen = read_support(data.support_file, dataset)
  elif os.path.isfile(stored):
    chosen = read_support(stored, dataset)
  elif train:
    chosen = draw_support(dataset, data.k_shot, seed)
  else:
    raise FileNotFoundError(f"{stored}: the run's support set is missing (pass --config.data.support_file)")
  if train:
    parallel.sync("support_read")  # nobody reads the file while process 0 rewrites it
    if parallel.is_main_process():
      write_support(stored, chosen, seed, dataset.root)
  return chosen
