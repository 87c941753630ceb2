"""The method interface: what a method hands the generic training loop, evaluation and launchers.

A method is one module of `mediclip_jax.methods` with
  NAME: str
  default_config() -> ConfigDict           the method's sections of a run config
  validate(config) -> None                 raises ValueError naming the field, before anything is compiled
  build(config, dataset, workdir, mesh, *, train) -> Trainable
and is registered in `mediclip_jax/methods/__init__.py`. The loop sees only a `Trainable`:
it calls `local_batch(step)` and `train_step(state, batch)`, evaluates with `scorer`, sets
the decision threshold from `calibration_images`, and checkpoints `state` with `info`.

A method whose data is not an anomaly dataset (MIRAGE: image-text pairs) sets `ANOMALY_DATASET = False`
in its module: the loop then opens no dataset (`build` gets None) and the method evaluates itself
(`Trainable.evaluate`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, np.ndarray]
Metrics = dict[str, Any]


@dataclasses.dataclass
class Trainable:
  """A built method.

  state: one pytree, replicated on the mesh, of everything training changes and a checkpoint
    holds (step, parameters, optimizer states, EMA copies, memory banks).
  train_step: jitted (state, global batch) -> (state, metrics); donates `state`; None when built
    for evaluation only (`build(..., train=False)`). Metrics hold "loss" and "finite" (see `keep_finite`). Frozen parts
    (backbones, VAEs, support pools) are its closure's business, not the loop's.
  local_batch: step -> this process's rows of that step's global batch (numpy), asked for step after step.
    Either a pure function of (seed, step), or (with `data_iterator`) the next batch of a data stream
    whose position the checkpoints hold: a resumed run sees exactly the batches it would have seen.
  data_iterator: the stream `local_batch` draws from (`data_pipelines.grain_input`; get_state/set_state),
    saved with every checkpoint and restored on resume; None when batches are a function of the step.
  steps_per_epoch: what an "epoch" means for this method's data.
  scorer: state -> a function of one global image batch (B,H,W[,3]) in [0, 1], split over `data`,
    returning (maps (B,H,W), scores (B,)) split the same way. Per-evaluation work (MediCLIP's
    text features) happens once in the outer call; `mediclip_jax.evaluate.scoring` batches,
    pads and gathers.
  calibration_images: normal images whose scores set the decision threshold.
  threshold: calibration scores (all processes gathered) -> decision threshold.
  info: JSON-able facts stored with every checkpoint (preprocessing, support set, backbone).
  reconstructor: for reconstruction-based methods, state -> a function of one global image batch returning the
    pseudo-healthy reconstructions (B,H,W) split over `data` (the layer-wise segmentation compares them with the
    input); None for others.
  evaluate: for methods that are not anomaly detectors, state -> metrics (the same on every process), replacing
    the anomaly scoring; `scorer`, `calibration_images` and `threshold` are then None.
  select_key: the metric (higher is better) that picks the best evaluation; None: image or mean image/pixel AUROC.
  finish: state, workdir -> {artefact: path}; run once on process 0 after the last evaluation, to write what the
    method produces besides checkpoints (MIRAGE: the adapted CLIP towers); recorded in results.json "outputs".
  """
  state: Any
  train_step: Callable[[Any, dict], tuple[Any, Metrics]] | None
  local_batch: Callable[[int], Batch]
  steps_per_epoch: int
  scorer: Callable[[Any], Callable[[jax.Array], tuple[jax.Array, jax.Array]]] | None
  calibration_images: np.ndarray | None
  threshold: Callable[[np.ndarray], float] | None
  info: dict = dataclasses.field(default_factory=dict)
  data_iterator: Any = None
  reconstructor: Callable[[Any], Callable[[jax.Array], jax.Array]] | None = None
  evaluate: Callable[[Any], Metrics] | None = None
  select_key: str | None = None
  finish: Callable[[Any, str], dict] | None = None


def reads_anomaly_dataset(method) -> bool:
  """Whether a method module trains and evaluates on an anomaly dataset (the default; MIRAGE sets
  `ANOMALY_DATASET = False`: it reads image-text pairs and evaluates itself)."""
  return getattr(method, "ANOMALY_DATASET", True)


def quantile_threshold(q: float) -> Callable[[np.ndarray], float]:
  """The default calibration: the q-quantile of the normal calibration images' scores."""
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"eval.threshold_quantile must lie in [0, 1], got {q}")
  return lambda scores: float(np.quantile(np.asarray(scores, np.float64), q))


def keep_finite(step: Callable[..., tuple[Any, Metrics]]) -> Callable[..., tuple[Any, Metrics]]:
  """Guards a pure step `(state, *args) -> (state, metrics)`, to be traced inside the method's jit.

  When the loss or any floating-point leaf of the new state is not finite, the step returns the state
  it was given, unchanged, and `metrics["finite"]` is False: a NaN never enters the state, so it can
  never reach a checkpoint, and the loop stops at that step (it reads the flag one step behind, so the
  check costs no pipeline stall). One reduction over the state per step.
  """
  def guarded(state, *args):
    new, metrics = step(state, *args)
    ok = jnp.isfinite(metrics["loss"])
    for leaf in jax.tree.leaves(new):
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        ok &= jnp.isfinite(leaf).all()
    return jax.lax.cond(ok, lambda: new, lambda: state), {**metrics, "finite": ok}
  return guarded
