"""Per-process slices of global batches and fixed-size, padded evaluation batches.

Multi-host: each process loads only its contiguous slice of every global batch and
the global array is built with `jax.make_array_from_process_local_data`. Eval
batches always have the same shape (the last one padded, with a validity mask),
so the jitted eval step compiles once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from data_pipelines.datasets import Sample
from data_pipelines.preprocess import load_mask, load_test_image


def process_slice(global_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
  """The contiguous slice of a global batch of `global_size` that process p of P loads."""
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if n < 1 or not 0 <= p < n:
    raise ValueError(f"process_index {p} must lie in [0, process_count={n})")
  if global_size % n:
    raise ValueError(f"global batch size {global_size} is not divisible by process_count {n}; "
                     f"choose a multiple of {n}")
  per = global_size // n
  return slice(p * per, (p + 1) * per)


def shard_for_process(batch, process_index: int | None = None, process_count: int | None = None):
  """This process's slice (leading axis) of every array in a pytree global batch."""
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    return batch
  size = np.shape(leaves[0])[0]
  for x in leaves:
    if np.shape(x)[0] != size:
      raise ValueError(f"all arrays of a batch need the same leading size, got {np.shape(x)[0]} and {size}")
  sl = process_slice(size, process_index, process_count)
  return jax.tree_util.tree_map(lambda x: x[sl], batch)


def process_eval_indices(n: int, process_index: int | None = None,
                         process_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's contiguous share of an eval set of n items, padded so every
  process gets ceil(n / P) entries: (indices, valid), padding repeats index n-1."""
  p = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= p < count:
    raise ValueError(f"process_index {p} must lie in [0, process_count={count})")
  per = -(-n // count)
  idx = np.arange(p * per, (p + 1) * per)
  return np.minimum(idx, max(n - 1, 0)).astype(np.int64), idx < n


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (indices, valid) of shape (batch_size,) covering 0..n-1 in order; the
  last batch repeats index n-1 as padding, marked invalid."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    yield np.minimum(idx, n - 1).astype(np.int64), valid


def batch_arrays(arrays: Mapping[str, np.ndarray], batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches of in-memory arrays (same leading size), padded entries
  zeroed, plus "valid" (bool) and "index"; each process gets its slice."""
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"arrays need the same leading size, got {sizes}")
  n = next(iter(sizes.values()), 0)
  sl = process_slice(batch_size, process_index, process_count)
  for idx, valid in padded_batches(n, batch_size):
    idx, valid = idx[sl], valid[sl]
    out = {}
    for k, v in arrays.items():
      x = np.asarray(v)[idx]
      out[k] = np.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, np.zeros((), x.dtype))
    out["valid"] = valid
    out["index"] = idx
    yield out


def eval_batches(samples: Sequence[Sample], batch_size: int, size: int = 224,
                 process_index: int | None = None, process_count: int | None = None,
                 load_image: Callable[[str | os.PathLike, int], np.ndarray] = load_test_image,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size eval batches read from disk: "image" (b, size, size) in [0, 1],
  "mask" (b, size, size) {0, 1}, "label" (b,), "valid" (b,), "index" (b,) into
  `samples`, with b = batch_size / process_count. Each process reads only its slice."""
  sl = process_slice(batch_size, process_index, process_count)
  for idx, valid in padded_batches(len(samples), batch_size):
    idx, valid = idx[sl], valid[sl]
    b = idx.shape[0]
    images = np.zeros((b, size, size), np.float32)
    masks = np.zeros((b, size, size), np.float32)
    labels = np.zeros((b,), np.int32)
    for j in np.nonzero(valid)[0]:
      s = samples[idx[j]]
      images[j] = load_image(s.path, size)
      masks[j] = load_mask(s.mask_path, size)
      labels[j] = s.label
    yield {"image": images, "mask": masks, "label": labels, "valid": valid, "index": idx}
