"""Scores an image set with a method's scorer in fixed-size, sharded batches, and computes the metrics.

Batches are padded to a fixed size so scoring compiles once; padded rows are dropped. Each
batch is split over the `data` axis of a mesh that may span several processes, each feeding
and getting back only its own rows; `parallel.gather_rows` then gives every process all of them.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from data_pipelines import batches
from mediclip_jax import parallel
from mediclip_jax.evaluate import metrics as metrics_lib
from mediclip_jax.evaluate import normalization

BatchScorer = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def score_share(score_batch: BatchScorer, local_images: np.ndarray, batch_size: int, mesh: Mesh,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's (maps (n,H,W), scores (n,)) for its share `local_images` (n,H,W[,3]) of an image set.

  Every process must pass the same n (pad its share; see `data_pipelines.batches.process_eval_indices`).
  The global batch is `batch_size` rounded up to a multiple of the device count. `progress(k)`
  is called with the number of rows scored after each batch.
  """
  _, local_bs = parallel.eval_batch_sizes(batch_size, mesh)
  n = local_images.shape[0]
  maps, scores = [], []
  for start in range(0, n, local_bs):
    chunk = local_images[start:start + local_bs]
    keep = chunk.shape[0]
    if keep < local_bs:
      chunk = np.concatenate([chunk, np.zeros((local_bs - keep,) + chunk.shape[1:], chunk.dtype)])
    m, s = score_batch(parallel.global_array(chunk, mesh))
    maps.append(parallel.local_rows(m)[:keep])
    scores.append(parallel.local_rows(s)[:keep])
    if progress:
      progress(keep)
  if not maps:
    return np.zeros((0,) + local_images.shape[1:3], np.float32), np.zeros((0,), np.float32)
  return np.concatenate(maps), np.concatenate(scores)


def compute_metrics(maps: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                    smoothing_sigma: float = 0.0, aupro_max_fpr: float = 0.3) -> dict[str, float]:
  """Image AUROC/AP/F1-max from scores (max of the map, raw or smoothed), pixel metrics when masks exist;
  with masks also their mean, the reference's model-selection key."""
  if smoothing_sigma:
    maps = np.asarray(metrics_lib.gaussian_smooth(jnp.asarray(maps), sigma=smoothing_sigma))
    scores = maps.reshape(maps.shape[0], -1).max(1)
  out = {f"image_{k}": v for k, v in metrics_lib.image_metrics(scores, labels).items()}
  if masks is not None:
    px = metrics_lib.pixel_metrics(maps, masks, fpr_limit=aupro_max_fpr)
    out.update({f"pixel_{k}": v for k, v in px.items()})
    out["mean_image_pixel_auroc"] = 0.5 * (out["image_auroc"] + out["pixel_auroc"])
  return out


def decision_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
  """Sensitivity and specificity of the stored decision (score > threshold, the threshold fixed on the
  normal support images before any test image is seen), unlike the F1-max thresholds chosen on the test set."""
  scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
  abnormal = scores > threshold
  return {"image_sensitivity": float(abnormal[labels].mean()) if labels.any() else float("nan"),
          "image_specificity": float((~abnormal[~labels]).mean()) if (~labels).any() else float("nan")}


def evaluate_share(score_batch: BatchScorer, test, all_masks: np.ndarray | None, eval_cfg, mesh: Mesh,
                   threshold: float | None = None, progress: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Metrics of a test set from this process's share `test` (a `data_pipelines.run_data.TestShare`), and
  every process's raw (unsmoothed) maps and scores; `all_masks` are every process's masks gathered once.
  With `threshold`, also the decision's sensitivity and specificity. Every process gets the same results."""
  maps, scores = score_share(score_batch, test.images, eval_cfg.batch_size, mesh, progress)
  maps, scores = parallel.gather_rows(maps, test.valid), parallel.gather_rows(scores, test.valid)
  res = compute_metrics(maps, scores, test.labels, all_masks, eval_cfg.smoothing_sigma, eval_cfg.aupro_max_fpr)
  if threshold is not None:
    res.update(decision_metrics(scores, test.labels, threshold))
  return res, maps, scores


def calibrate(score_batch: BatchScorer, images: np.ndarray, batch_size: int, mesh: Mesh,
              threshold: Callable[[np.ndarray], float], progress: Callable[[int], None] | None = None
              ) -> normalization.Normalization:
  """The decision threshold and score normalisation from normal calibration images (split over processes)."""
  share, valid = batches.process_eval_indices(images.shape[0])
  m, s = score_share(score_batch, images[share], batch_size, mesh, progress)
  m, s = parallel.gather_rows(m, valid), parallel.gather_rows(s, valid)
  return normalization.calibrate(m, threshold(s))
