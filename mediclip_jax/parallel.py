"""The device mesh (one `data` axis over all devices of all processes), shardings and multi-host helpers.

Every process runs the same program on the same global arrays; a process only ever holds its
own rows of a `data`-sharded array. Host data enters as per-process slices
(`global_array`), leaves as this process's rows (`local_rows`), and per-process results are
gathered in process order (`gather_rows`) when every process needs all of them (metrics).
"""
from __future__ import annotations

import logging
import os

import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until something listens at `address` (host:port), or raises ValueError naming it after
  `timeout_s`: JAX's own timeout aborts the process with a C++ check failure instead."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address {address!r}: expected host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ValueError(f"no coordinator answers at {address} after {timeout_s:g} s ({e}); start process 0 "
                         "(it hosts the coordinator) or check the address and port") from None
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, from_environment: bool = False,
               cpu_collectives: str = "gloo", timeout_s: int = 300) -> bool:
  """Joins a multi-process run; returns whether `jax.distributed.initialize` was called.

  Must run before anything touches a JAX backend (so no `jax.devices()` or
  `jax.default_backend()` here). CPU collectives are chosen through the config flag,
  which only affects the CPU client: harmless on GPU and TPU, required for CPU runs.
  A process other than 0 first waits at most `timeout_s` for the coordinator to listen.
  """
  if not coordinator_address and not from_environment:
    return False
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id "
                     f"(got num_processes={num_processes}, process_id={process_id})")
  if coordinator_address and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator_address:
    if process_id != 0:
      wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout_s))
  else:
    jax.distributed.initialize()
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process).

  Devices are ordered by (process, id) so each process's devices form one contiguous block of
  the `data` axis: process p then owns rows [p*b/P, (p+1)*b/P) of every global batch.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, support set)."""
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    raise ValueError(f"train.batch_size={global_batch} must be divisible by the device count ({n_dev}) "
                     f"and the process count ({n_proc})")


def eval_batch_sizes(batch_size: int, mesh: Mesh) -> tuple[int, int]:
  """(global, per-process) eval batch: `batch_size` rounded up to a multiple of the device count."""
  n_dev = mesh.devices.size
  global_bs = -(-max(1, batch_size) // n_dev) * n_dev
  return global_bs, global_bs // jax.process_count()


def global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Builds a `data`-sharded global array from this process's slice (rows in process order)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def replicate(tree, mesh: Mesh):
  """Places a pytree of host arrays on every device of the mesh (all processes hold the same values)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a `data`-sharded array, in order (the inverse of `global_array`)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def gather_rows(local: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """Concatenates every process's `local` rows in process order, keeping rows where `valid`.

  All processes must call it with arrays of the same shape (pad, and mark padding invalid);
  every process gets the full result.
  """
  local = np.asarray(local)
  if jax.process_count() > 1:
    local = np.asarray(multihost_utils.process_allgather(local, tiled=False)).reshape((-1,) + local.shape[1:])
    if valid is not None:
      valid = np.asarray(multihost_utils.process_allgather(np.asarray(valid), tiled=False)).reshape(-1)
  return local if valid is None else local[np.asarray(valid, bool)]


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (e.g. a SIGTERM that reached only some)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_main(msg: str, *args) -> None:
  """Logs from process 0 only."""
  if is_main_process():
    logging.info(msg, *args)


def quiet_other_processes() -> None:
  """Processes other than 0 log warnings and errors only (their INFO lines would repeat process 0's)."""
  if not is_main_process() and not os.environ.get("MEDICLIP_LOG_ALL_PROCESSES"):
    logging.getLogger().setLevel(logging.WARNING)


def sync(name: str) -> None:
  """A barrier across processes (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
