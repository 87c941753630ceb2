"""Which rows of a global batch, and which items of an evaluation set, this process handles.

Multi-host: each process loads only its contiguous slice of every global batch (the global
array is built with `jax.make_array_from_process_local_data`), and a padded, equal share of
every evaluation set, so each evaluation batch is one collective program.
"""
from __future__ import annotations

from collections.abc import Callable

import math

import jax
import numpy as np

from mediclip_jax import rngs


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


def steps_per_epoch(k: int, batch_size: int) -> int:
  """Steps that visit each of k in-memory training images once (the last batch wraps around)."""
  return math.ceil(k / batch_size)


def epoch_batch(step: int, k: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(image indices into the k in-memory training images, global sample indices) of a step's global batch.

  Each epoch visits a permutation of the k images drawn from the "data" stream and the epoch; a
  batch that runs past the end wraps to the start of the same permutation, so every batch has the
  same size (a last, smaller batch would recompile the step). A pure function of (seed, step).
  """
  epoch, j = divmod(step, steps_per_epoch(k, batch_size))
  perm = rngs.numpy_rng(seed, rngs.DATA, epoch).permutation(k)
  pos = (j * batch_size + np.arange(batch_size)) % k
  return perm[pos].astype(np.int32), (step * batch_size + np.arange(batch_size)).astype(np.int32)


def local_index_batches(k: int, batch_size: int, seed: int) -> Callable[[int], dict[str, np.ndarray]]:
  """step -> this process's rows of `epoch_batch`: {"image_index", "sample_index"}, for a method whose step
  gathers its images from the replicated in-memory training set (SSL-AnoVAE, latent diffusion)."""
  sl = process_slice(batch_size)

  def local_batch(step: int) -> dict[str, np.ndarray]:
    index, sample = epoch_batch(step, k, batch_size, seed)
    return {"image_index": index[sl], "sample_index": sample[sl]}

  return local_batch
