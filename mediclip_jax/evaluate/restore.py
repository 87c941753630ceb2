"""Rebuilds a trained detector from a run directory (config + latest checkpoint) for evaluation and inference."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from mediclip_jax import parallel
from mediclip_jax.train import checkpoints, step as step_lib


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  graphdef: object
  params: object
  frozen: object
  metadata: dict
  step: int


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """The detector of `workdir`'s checkpoint (latest unless `step`), placed replicated on all devices."""
  from mediclip_jax.train.loop import build_detector, resolve_config  # pylint: disable=import-outside-toplevel
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory; train with launch/train.py --workdir {workdir}")
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir}: holds no finished checkpoint")
  meta = ckpt.restore_metadata(step)
  config = resolve_config(ml_collections.ConfigDict(meta["config"]))
  model = build_detector(config)
  graphdef, params, frozen = step_lib.split_model(model)
  mesh = parallel.make_mesh()
  optimizer = step_lib.make_optimizer(config.train)
  like = parallel.replicate(step_lib.init_state(params, optimizer, config.seed), mesh)
  state, meta = ckpt.restore(step, like, mesh)
  ckpt.close()
  return Trained(config, graphdef, state["params"], parallel.replicate(frozen, mesh), meta, int(step))
