"""A run's dataset and its test set, as the config's `data` section describes them.

The images come from the files of a dataset folder (`data.source="files"`) or from a TFDS ArrayRecord
build of it (`data.source="tfds"`, `launch/prepare_data.py`); both give the same records
(`data_pipelines.records`), turned into model input by the same functions, so a run gives the same
numbers from either. Used by training (evaluation during the run) and by `launch/evaluate.py`.

The test set is a stream of fixed-size batches of this process's share. Held (`eval.streaming=False`,
the default, right for hundreds of images): the share is read once and kept in host memory. Streamed
(`eval.streaming=True`): read anew, batch by batch, at every evaluation, so host memory stays bounded
whatever the size of the test set.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from data_pipelines import datasets, grain_input, oct_phantom, phantom, preprocess, records
from mediclip_jax import parallel

PIXEL_METRICS = ("auto", "on", "off")
SOURCES = ("files", "tfds")


def dataset_root(data: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where a run's data lives: `workdir/phantom_data` for generated phantoms, `data.tfds_dir` for a TFDS
  build, else `data.root`."""
  if data.source == "tfds":
    return data.tfds_dir
  return os.path.join(workdir, "phantom_data") if data.phantom else data.root


def read_dataset(data: ml_collections.ConfigDict, workdir: str) -> datasets.Dataset:
  """The run's dataset as it is on disk (writes nothing): `data.root` in any layout `datasets` reads, the
  run's generated phantoms, or with `data.source="tfds"` the TFDS build at `data.tfds_dir`."""
  if data.source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES}, got {data.source!r}")
  if data.source == "tfds":
    if not data.tfds_dir or data.phantom:
      raise datasets.DatasetError("config.data.source='tfds' needs config.data.tfds_dir, a dataset built by "
                                  "launch/prepare_data.py (it prints the directory to pass), and no data.phantom")
    return records.tfds_dataset(data.tfds_dir)
  root = dataset_root(data, workdir)
  if not root:
    raise datasets.DatasetError(
        "config.data.root is not set: pass --config.data.root=/path/to/dataset (MediCLIP layout "
        "root/samples/{train,test}.json, or plain folders root/train/normal, root/test/{normal,abnormal}), "
        "or try the embedded phantom data: --config configs/chestxray.py:phantom,tiny")
  try:
    return datasets.load_dataset(root)
  except datasets.DatasetError as e:
    if os.path.exists(root):
      raise
    raise datasets.DatasetError(f"{e}\nPoint --config.data.root=/path/to/dataset at your copy, or try the "
                                f"embedded phantom data: --config configs/chestxray.py:phantom,tiny") from e


def open_dataset(data: ml_collections.ConfigDict, workdir: str, seed: int) -> datasets.Dataset:
  """`read_dataset`, generating the phantom dataset of `data.phantom_kind` into `workdir/phantom_data` first
  when `data.phantom`. The folder records what it was generated with (phantom.json); one generated with other
  settings is an error, not silently another dataset (a folder from before the record counts as chest)."""
  if data.phantom:
    makers = {"chest": phantom.make_phantom_dataset, "oct": oct_phantom.make_oct_phantom_dataset}
    kind = data.get("phantom_kind", "chest")  # runs stored before the field generated chest phantoms
    if kind not in makers:
      raise ValueError(f"config.data.phantom_kind must be one of {tuple(makers)}, got {kind!r}")
    root = dataset_root(data, workdir)
    k_shot = data.get("k_shot", 0) or 0  # -1 (every training image) asks for no particular number
    want = {"kind": kind, "size": int(data.phantom_size), "seed": int(seed), "n_test": int(data.phantom_n_test),
            "n_train": max(int(k_shot), 0, int(data.get("phantom_n_train", 16)))}
    marker, record = os.path.join(root, "samples", "test.json"), os.path.join(root, "phantom.json")
    for turn in ("main", "others"):  # process 0 writes; others write their own copy only without a shared disk
      if (turn == "main") == parallel.is_main_process() and not os.path.isfile(marker):
        os.makedirs(root, exist_ok=True)
        with open(record, "w", encoding="utf-8") as f:
          json.dump(want, f)
        makers[kind](root, n_train=want["n_train"], n_test_normal=want["n_test"], n_test_abnormal=want["n_test"],
                     size=want["size"], seed=want["seed"])
      parallel.sync(f"phantom_data_{turn}")
    have = {"kind": "chest"}
    if os.path.isfile(record):
      with open(record, encoding="utf-8") as f:
        have = json.load(f)
    if any(have[k] != want.get(k) for k in have):
      raise datasets.DatasetError(
          f"{root} holds phantoms generated with {have}, but the config asks for {want} (data.phantom_kind, "
          f"phantom_size, phantom_n_test, phantom_n_train / k_shot, seed); use another workdir or delete {root}")
  return read_dataset(data, workdir)


def _split_source(dataset: datasets.Dataset, split: str, masks: bool = True):
  """Random access to a split's records; without `masks`, mask files are not read (nor checked)."""
  samples = dataset.train if split == "train" else dataset.test
  if dataset.layout == records.TFDS:
    return records.open_tfds(dataset.root, split)
  return records.FileSource(samples if masks else [dataclasses.replace(s, mask_path=None) for s in samples])


def train_source(dataset: datasets.Dataset):
  """Random access to the records of `dataset`'s training images (files or TFDS), for streamed training."""
  return _split_source(dataset, "train")


def load_train_images(dataset: datasets.Dataset, samples, size: int) -> np.ndarray:
  """(k, size, size) float32 training input of `samples` (training samples of `dataset`, from files or records)."""
  if not samples:
    return np.zeros((0, size, size), np.float32)
  if dataset.layout != records.TFDS:
    return np.stack([preprocess.load_train_image(s.path, size) for s in samples]).astype(np.float32)
  source, where = records.open_tfds(dataset.root, "train"), {id(s): i for i, s in enumerate(dataset.train)}
  return np.stack([preprocess.train_array(source[where[id(s)]]["image"], size) for s in samples]).astype(np.float32)


@dataclasses.dataclass
class TestSet:
  """A run's test set: labels and names of all of it, and batches of this process's padded share.

  `batches(n)` yields (images (n,H,W[,3]) float32, masks (n,H,W) uint8 or None, valid (n,) bool, index (n,))
  in share order; every process yields the same number of batches (scoring is one collective program
  per batch). `example(i)` reads test image i at its own resolution for pictures: (pixels, mask, name).
  """
  labels: np.ndarray          # (N,) int32, 1 = abnormal
  names: list[str]            # (N,)
  class_names: list[str]      # (N,) the listing's class names: grades where the data has them (BUSI's benign/malignant)
  has_masks: bool             # pixel metrics apply
  streaming: bool
  color: str
  source: object              # random access to the records (data_pipelines.records)
  transform: grain_input.EvalImage
  workers: int = 0
  held: dict | None = None    # the loaded share when not streaming

  def __len__(self) -> int:
    return len(self.labels)

  def _stream(self, n: int) -> Iterator[tuple]:
    for b in grain_input.eval_batches(self.source, batch_size_per_process=n, transform=self.transform,
                                      worker_count=self.workers):
      yield b["image"], b.get("mask"), b["valid"], b["index"]

  def batches(self, n: int) -> Iterator[tuple]:
    if self.streaming:
      yield from self._stream(n)
      return
    if self.held is None or self.held["n"] != n:  # read once, kept for every later evaluation
      parts = list(self._stream(n))
      self.held = {"n": n, "parts": parts}
    yield from self.held["parts"]

  def arrays(self, n: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """This process's share at once, padding dropped: (images, masks or None) (small sets, tests)."""
    parts = list(self.batches(n))
    valid = np.concatenate([p[2] for p in parts])
    images = np.concatenate([p[0] for p in parts])[valid]
    return images, np.concatenate([p[1] for p in parts])[valid] if self.has_masks else None

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    rec = self.source[i]
    mask = rec["mask"][..., 0] != 0 if rec["has_mask"] else None
    return preprocess.original_array(rec["image"], self.color), mask, self.names[i]


def test_set(dataset: datasets.Dataset, data: ml_collections.ConfigDict, streaming: bool = False) -> TestSet:
  """The test set of `dataset` at `data.image_size` in `data.color`, masks per `data.pixel_metrics`.

  With masks, every abnormal test image must have one (checked over the whole listing, so every process
  agrees) and each mask must have its image's size (checked as the images are read)."""
  if data.pixel_metrics not in PIXEL_METRICS:
    raise ValueError(f"config.data.pixel_metrics must be one of {PIXEL_METRICS}, got {data.pixel_metrics!r}")
  classes = {s.label for s in dataset.test}
  if classes != {0, 1}:
    have = "only abnormal" if classes == {1} else "only normal" if classes == {0} else "no"
    raise datasets.DatasetError(f"{dataset.root}: the test set holds {have} images; AUROC, AP and F1 need both "
                                "normal and abnormal test images")
  want = {"auto": dataset.has_masks, "on": True, "off": False}[data.pixel_metrics]
  if want and not dataset.has_masks:
    raise ValueError(f"config.data.pixel_metrics='on' but the test set of {dataset.root} has no masks")
  if want:
    datasets.check_masks_complete(dataset)
  if data.workers < 0:
    raise ValueError(f"config.data.workers must be >= 0 (0 = read in the main process), got {data.workers}")
  test = dataset.test
  return TestSet(labels=np.asarray([s.label for s in test], np.int32), names=[s.name for s in test],
                 class_names=[s.clsname for s in test],
                 has_masks=want, streaming=streaming, color=data.color, source=_split_source(dataset, "test", want),
                 transform=grain_input.EvalImage(int(data.image_size), data.color, want), workers=int(data.workers))
