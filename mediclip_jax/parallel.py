"""The device mesh (one `data` axis over all devices of all processes) and sharding helpers."""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    raise ValueError(f"train.batch_size={global_batch} must be divisible by the device count ({n_dev}) "
                     f"and the process count ({n_proc})")


def global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Builds a `data`-sharded global array from this process's slice (rows in process order)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def replicate(tree, mesh: Mesh):
  """Places a pytree of host arrays on every device of the mesh (all processes hold the same values)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_main(msg: str, *args) -> None:
  """Logs from process 0 only."""
  if is_main_process():
    logging.info(msg, *args)


def sync(name: str) -> None:
  """A barrier across processes (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
