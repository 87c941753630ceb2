"""Named random streams split once from the run's seed.

stream(seed, name) = fold_in(key(seed), crc32(name)): every consumer of randomness draws from
its own stream, so model initialisation, anomaly synthesis and the batch order never share a
key, and adding a stream later changes none of the existing ones.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

INIT = "init"            # parameter initialisation (e.g. MediCLIP's prompt contexts and adapters)
SYNTHESIS = "synthesis"  # per-sample anomaly synthesis: fold_in(fold_in(stream, step), sample index)
DATA = "data"            # batch order (host side, numpy)


def stream(seed: int, name: str) -> jax.Array:
  """The typed PRNG key of stream `name` for `seed`."""
  return jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def numpy_seed(seed: int, name: str) -> list[int]:
  """Seed material for a numpy Generator of stream `name` (host-side randomness, e.g. batch order)."""
  return [int(seed), zlib.crc32(name.encode())]


def numpy_rng(seed: int, name: str, *more: int) -> np.random.Generator:
  """numpy Generator of stream `name`, optionally refined by integers (e.g. the epoch)."""
  return np.random.default_rng(numpy_seed(seed, name) + [int(m) for m in more])
