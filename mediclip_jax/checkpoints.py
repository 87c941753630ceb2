"""Orbax checkpoints of the train state, plus JSON metadata, with automatic resume.

A checkpoint holds the trainable parameters (prompts, adapters), the optimizer state, the
step, the RNG key data and the data position (the step determines the batch order), and
metadata: the resolved config, preprocessing, the decision threshold and versions. The
frozen CLIP weights are referenced by the config, not copied. Optionally a third item, "data",
holds the input pipeline's iterator state, one file per process (`process_<i>-of-<n>.json`, grain's
orbax handler), so a resumed run continues with the exact next batch (`restore_data`); checkpoints
without it restore as before. Saving is asynchronous;
all processes take part (the directory must be on a file system they share); restoring
works with any device or process count, because arrays are restored replicated onto the
current mesh (tests/test_multiprocess.py restores a 2-process checkpoint in one process).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mediclip_jax.parallel import replicated


class DamagedCheckpoint(ValueError):
  """No intact checkpoint could be restored (or a damaged one was met where falling back is not allowed)."""


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds a finished checkpoint (orbax gives a step's folder its bare number only
  once the step is completely written), without opening a checkpoint manager."""
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


DATA = "data"  # the item holding the data iterator's state


def _grain_checkpoint():
  """grain's orbax handler arguments, imported only where a data iterator is saved or restored (grain is
  needed for streamed data only; checkpoints of state and metadata work without it)."""
  from grain import checkpoint as grain_checkpoint  # pylint: disable=import-outside-toplevel
  return grain_checkpoint


class _StateSnapshot:
  """A data iterator's state taken when `save` is called (the asynchronous write must not see later
  batches); what grain's handler asks of an iterator."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items "state", "metadata" and optionally "data"."""

  def __init__(self, directory: str, max_to_keep: int = 2, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "metadata", DATA))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, metadata: dict, force: bool = False, data_iterator=None) -> bool:
    """Starts an asynchronous save of a private copy of `state`, and of `data_iterator`'s state if given.

    The copy matters: the train step donates its state buffers, so without it the next step
    could overwrite arrays the background writer is still reading. The iterator (anything with
    `get_state() -> bytes`, e.g. `grain_input.TrainBatches`) is read now, each process writing its own.
    """
    state = jax.tree.map(lambda x: x.copy(), state)
    items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
    if data_iterator is not None:
      snapshot = data_iterator.get_state()
      items[DATA] = _grain_checkpoint().CheckpointSave(_StateSnapshot(
          snapshot.encode() if isinstance(snapshot, str) else snapshot))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def has_data(self, step: int) -> bool:
    """Whether checkpoint `step` holds a data iterator state."""
    return os.path.isdir(os.path.join(self.directory, str(step), DATA))

  def restore_data(self, step: int, data_iterator) -> None:
    """Sets `data_iterator` (with `set_state`, e.g. `grain_input.TrainBatches`) to the state this process
    saved at `step`. Refuses, naming the checkpoint, one without a data item or written by another
    process count."""
    where = os.path.join(self.directory, str(step))
    folder = os.path.join(where, DATA)
    if not os.path.isdir(where):
      raise FileNotFoundError(f"{where}: no such checkpoint (steps {self.steps()})")
    if not os.path.isdir(folder):
      raise ValueError(f"{where}: the checkpoint has no data iterator state (saved without data_iterator=); "
                       f"continue by position instead (the batch index is the step)")
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isfile(os.path.join(folder, name)):
      saved = sorted(f for f in os.listdir(folder) if f.startswith("process_"))
      raise ValueError(f"{where}: no data iterator state for process {jax.process_index()} of "
                       f"{jax.process_count()} ({name}); the checkpoint holds {saved or 'none'}, written by "
                       "another process count")
    try:
      self.manager.restore(step, args=ocp.args.Composite(**{DATA: _grain_checkpoint().CheckpointRestore(data_iterator)}))
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{folder}/{name}: cannot restore the data iterator: {e}") from e

  def restore(self, step: int, like_state, mesh: Mesh):
    """Restores `state` (shaped like `like_state`, placed replicated on `mesh`) and metadata."""
    sharding = replicated(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like_state)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             metadata=ocp.args.JsonRestore()))
    return out.state, out.metadata

  def steps(self) -> list[int]:
    """Finished checkpoint steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def restore_intact(self, like_state, mesh: Mesh, fallback: bool = True, set_aside: bool = False
                     ) -> tuple[int, object, dict, list[str]]:
    """(step, state, metadata, problems) of the newest checkpoint that restores whole: readable state and
    metadata, every floating-point value finite. A damaged newer one is reported in `problems` and skipped
    (with `fallback`, else DamagedCheckpoint), never deleted: with `set_aside` (a resuming trainer) its
    folder is renamed `<step>.damaged-<unix time>` once an intact one is found, so the run can write that
    step again. When none restores, nothing is renamed."""
    damaged = []
    for step in self.steps():
      try:
        state, meta = self.restore(step, like_state, mesh)
        if not isinstance(meta, dict) or "config" not in meta:
          raise ValueError("metadata without the run's config")
        bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
               if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(np.asarray(x.addressable_data(0))).all()]
        if bad:
          raise ValueError(f"non-finite values in {bad[:3]}")
      except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many types)
        problem = f"{os.path.join(self.directory, str(step))}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        if not fallback:
          raise DamagedCheckpoint(problem + "; remove or repair it, or allow falling back to an older step") from e
        damaged.append((step, problem))
        continue
      problems = []
      for bad_step, problem in damaged:
        if set_aside:
          aside = os.path.join(self.directory, f"{bad_step}.damaged-{math.floor(time.time())}")
          os.rename(os.path.join(self.directory, str(bad_step)), aside)
          problem += f"; moved to {aside}"
        problems.append(problem)
      if set_aside and damaged:
        self.manager.reload()
      return step, state, meta, problems
    raise DamagedCheckpoint(f"{self.directory}: no intact checkpoint" +
                            (": " + "; ".join(p for _, p in damaged) if damaged else ""))

  def newest_metadata(self) -> tuple[int, dict]:
    """(step, metadata) of the newest checkpoint whose metadata reads (a damaged newer one is skipped here;
    `restore_intact` reports it)."""
    for step in self.steps():
      try:
        meta = self.restore_metadata(step)
      except Exception:  # pylint: disable=broad-except
        continue
      if isinstance(meta, dict) and "config" in meta:
        return step, meta
    raise DamagedCheckpoint(f"{self.directory}: no checkpoint with readable metadata (steps {self.steps()})")

  def restore_metadata(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint found")
    return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
