"""A run's dataset and this process's share of its test set, as the config's `data` section describes them.

Used by training (evaluation during the run) and by `launch/evaluate.py`, so both read the
same images the same way.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from data_pipelines import batches, datasets, phantom, preprocess
from mediclip_jax import parallel

PIXEL_METRICS = ("auto", "on", "off")


@dataclasses.dataclass
class TestShare:
  """This process's padded share of the test set (all of it in a single process).

  images/masks/valid cover the share (n rows); labels and names the whole set (N), since they
  come from the listing, not from image files.
  """
  images: np.ndarray          # (n, H, W) grey or (n, H, W, 3) RGB, float32 in [0, 1]
  masks: np.ndarray | None    # (n, H, W) {0, 1}, or None without pixel metrics
  valid: np.ndarray           # (n,) bool: False on the padding rows
  labels: np.ndarray          # (N,) int32, 1 = abnormal
  names: list[str]            # (N,)


def dataset_root(data: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where a run's data lives: `workdir/phantom_data` for generated phantoms, else `data.root`."""
  return os.path.join(workdir, "phantom_data") if data.phantom else data.root


def open_dataset(data: ml_collections.ConfigDict, workdir: str, seed: int) -> datasets.Dataset:
  """Reads `data.root`, or generates the phantom dataset into `workdir/phantom_data` when `data.phantom`."""
  root = dataset_root(data, workdir)
  if data.phantom:
    marker = os.path.join(root, "samples", "test.json")
    for turn in ("main", "others"):  # process 0 writes; others write their own copy only without a shared disk
      if (turn == "main") == parallel.is_main_process() and not os.path.isfile(marker):
        phantom.make_phantom_dataset(root, n_train=max(data.k_shot, 16), n_test_normal=data.phantom_n_test,
                                     n_test_abnormal=data.phantom_n_test, size=data.phantom_size, seed=seed)
      parallel.sync(f"phantom_data_{turn}")
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


def load_test_share(dataset: datasets.Dataset, data: ml_collections.ConfigDict) -> TestShare:
  """Loads this process's share of the test set at `data.image_size` in `data.color`, masks per `data.pixel_metrics`.

  With masks, every abnormal test image must have one (checked over the whole listing, so every process
  agrees) and each mask must have its image's size (checked on the images of this share as they load)."""
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
  test = dataset.test
  size = int(data.image_size)
  share, valid = batches.process_eval_indices(len(test))  # padding repeats the last index
  loaded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
  for i in map(int, share):
    if i not in loaded:
      s = test[i]
      loaded[i] = (preprocess.load_test_pair(s.path, s.mask_path, size, data.color) if want
                   else (preprocess.load_test_image(s.path, size, data.color), None))
  images = np.stack([loaded[int(i)][0] for i in share]).astype(np.float32)
  masks = np.stack([loaded[int(i)][1] for i in share]).astype(np.float32) if want else None
  return TestShare(images=images, masks=masks, valid=valid,
                   labels=np.asarray([s.label for s in test], np.int32), names=[s.name for s in test])
