"""Orbax checkpoints of the train state, plus JSON metadata, with automatic resume.

A checkpoint holds the trainable parameters (prompts, adapters), the optimizer state, the
step, the RNG key data and the data position (the step determines the batch order), and
metadata: the resolved config, preprocessing, the decision threshold and versions. The
frozen CLIP weights are referenced by the config, not copied. Saving is asynchronous;
all processes take part (the directory must be on a file system they share); restoring
works with any device or process count, because arrays are restored replicated onto the
current mesh (tests/test_multiprocess.py restores a 2-process checkpoint in one process).
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mediclip_jax.parallel import replicated


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds a finished checkpoint (orbax gives a step's folder its bare number only
  once the step is completely written), without opening a checkpoint manager."""
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items "state" and "metadata"."""

  def __init__(self, directory: str, max_to_keep: int = 2, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "metadata"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, metadata: dict, force: bool = False) -> bool:
    """Starts an asynchronous save of a private copy of `state`.

    The copy matters: the train step donates its state buffers, so without it the next step
    could overwrite arrays the background writer is still reading.
    """
    state = jax.tree.map(lambda x: x.copy(), state)
    return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           metadata=ocp.args.JsonSave(metadata)), force=force)

  def restore(self, step: int, like_state, mesh: Mesh):
    """Restores `state` (shaped like `like_state`, placed replicated on `mesh`) and metadata."""
    sharding = replicated(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like_state)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             metadata=ocp.args.JsonRestore()))
    return out.state, out.metadata

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
