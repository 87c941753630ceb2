"""The first normal training images of a dataset as one array, read as training reads them.

For the tools that look at or measure real support images outside a run (synthesis grids,
the VAE quality gate, the synthesis benchmark) and for the tests: any layout `datasets`
accepts, bilinear resize then grey (`preprocess.load_train_image`), in listing order.
"""
from __future__ import annotations

import os

import numpy as np

from data_pipelines import datasets, preprocess


def load_normal_images(root: str | os.PathLike, size: int, limit: int = 0) -> tuple[np.ndarray, list[str]]:
  """(N, size, size) float32 in [0, 1] and the sample names: the first `limit` normal training
  images (0 = all). Raises ValueError when the dataset has none."""
  samples = [s for s in datasets.load_dataset(root).train if s.label == 0]
  if limit:
    samples = samples[:limit]
  if not samples:
    raise ValueError(f"{root}: no normal training images")
  return np.stack([preprocess.load_train_image(s.path, size) for s in samples]), [s.name for s in samples]
