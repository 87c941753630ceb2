"""Rebuilds a trained run (its method, config and latest checkpoint) for evaluation and inference."""
from __future__ import annotations

import dataclasses
import os

import ml_collections
from jax.sharding import Mesh

from data_pipelines import datasets
from mediclip_jax import checkpoints, methods
from mediclip_jax.methods.base import Trainable, reads_anomaly_dataset


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  trainable: Trainable
  state: object
  metadata: dict
  step: int
  problems: list[str] = dataclasses.field(default_factory=list)  # damaged newer checkpoints that were skipped


def stored_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The config a run's checkpoint was written with, and the checkpoint's step (the newest whose metadata
  reads, unless `step`)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory; train with launch/train.py --workdir {workdir}")
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  try:
    if step is None:
      if not ckpt.steps():
        raise FileNotFoundError(f"{ckpt_dir}: holds no finished checkpoint")
      step, meta = ckpt.newest_metadata()
    else:
      meta = ckpt.restore_metadata(step)
  finally:
    ckpt.close()
  config = ml_collections.ConfigDict(meta["config"])
  if not reads_anomaly_dataset(methods.get(config.method)):
    raise ValueError(f"{workdir}: a {config.method} run adapts image-text towers and scores no images: its "
                     f"evaluation is in {os.path.join(workdir, 'results.json')}, its product the CLIP checkpoint "
                     f"{os.path.join(workdir, 'clip')} (train a detector on it: --config.model.clip.checkpoint=)")
  return config, int(step)


def load_run(workdir: str, mesh: Mesh, config: ml_collections.ConfigDict | None = None,
             dataset: datasets.Dataset | None = None, step: int | None = None, untrained: bool = False) -> Restored:
  """The method of `workdir` built for scoring (nothing written), its state restored replicated on `mesh`.

  `config` (default: the stored one) may change evaluation-side fields (data root, eval batch).
  Without `dataset` the method is built without data (enough to score new images). Without `step`,
  the newest intact checkpoint: damaged newer ones are listed in `problems` (refused instead when the
  run's `train.checkpoint_fallback` is False). With `untrained`, no checkpoint is read: the state is the
  method's initial one for the run's config and seed (step 0, no decision threshold), the untrained row.
  """
  stored, stored_step = stored_config(workdir, step)
  config = stored if config is None else config
  method = methods.get(config.method)
  try:
    trainable = method.build(config, dataset, workdir, mesh, train=False)
  except (AttributeError, KeyError) as e:
    if isinstance(e, AttributeError) and not isinstance(e.__context__, KeyError):
      raise  # not ConfigDict's missing-field error (it raises AttributeError from the KeyError): a bug, shown as is
    raise ValueError(f"{workdir}: its stored config lacks a field that {config.method} reads now ({e}); the run was "
                     f"written by an older version of the method: retrain it, or evaluate it with that version") from e
  if untrained:
    return Restored(config, trainable, trainable.state, {}, 0)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if step is not None:
      state, meta = ckpt.restore(step, trainable.state, mesh)
      problems = []
    else:
      step, state, meta, problems = ckpt.restore_intact(trainable.state, mesh,
                                                        fallback=config.train.get("checkpoint_fallback", True))
  finally:
    ckpt.close()
  if step != stored_step:
    config = ml_collections.ConfigDict(meta["config"]) if config is stored else config
  return Restored(config, trainable, state, meta, step, problems)
