"""Scores an image set with a method's scorer in fixed-size, sharded batches, and computes the metrics.

Batches are padded to a fixed size so scoring compiles once; padded rows are dropped. Each
batch is split over the `data` axis of a mesh that may span several processes, each feeding
and getting back only its own rows; `parallel.gather_rows` then gives every process all of them.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from data_pipelines import batches
from mediclip_jax import parallel
from mediclip_jax.evaluate import metrics as metrics_lib
from mediclip_jax.evaluate import analysis, figures, normalization, streaming_metrics

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


class _Examples:
  """The maps of the highest- and lowest-scoring abnormal and normal images seen so far (ties broken as
  `figures.pick_examples` does), so a streamed evaluation can draw its example panels without keeping every map."""

  def __init__(self):
    self.best: dict[str, tuple[float, int, np.ndarray]] = {}

  def update(self, maps: np.ndarray, scores: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
    for role, (label, end) in figures.EXAMPLES.items():
      highest = end == -1  # pick_examples: a stable sort, then the last (highest) or first (lowest)
      for m, s, i in zip(maps[labels == label], scores[labels == label], index[labels == label]):
        old = self.best.get(role)
        if old is None or (s > old[0] if highest else s < old[0]) or (s == old[0] and (i > old[1]) == highest):
          self.best[role] = (float(s), int(i), np.array(m))

  def gathered(self) -> dict[str, tuple[int, np.ndarray]]:
    """Role -> (test index, raw map), chosen over every process's candidates."""
    if jax.process_count() > 1:
      merged = _Examples()
      for role in figures.EXAMPLES:
        have = role in self.best
        s, i, m = self.best.get(role, (0.0, -1, None))
        shape = next(iter(self.best.values()))[2].shape if self.best else (0, 0)
        flag = parallel.gather_rows(np.asarray([have]))
        ss, ii = parallel.gather_rows(np.asarray([s])), parallel.gather_rows(np.asarray([i]))
        mm = parallel.gather_rows((m if have else np.zeros(shape, np.float32))[None])
        for f, s2, i2, m2 in zip(flag, ss, ii, mm):
          if f:
            merged.update(m2[None], np.asarray([s2]), np.asarray([figures.EXAMPLES[role][0]]), np.asarray([i2]))
      return {r: (i, m) for r, (_, i, m) in merged.best.items()}
    return {r: (i, m) for r, (_, i, m) in self.best.items()}


def evaluate(score_batch: BatchScorer, test, eval_cfg, mesh: Mesh, threshold: float | None = None,
             progress: Callable[[int], None] | None = None, calibration_images: np.ndarray | None = None,
             reconstruct: Callable[[jax.Array], jax.Array] | None = None
             ) -> tuple[dict[str, float], np.ndarray, dict[str, tuple[int, np.ndarray]]]:
  """Metrics of a test set (a `data_pipelines.run_data.TestSet`), every image's raw score, and the raw maps of
  the example images (role -> (index, map), see `figures.pick_examples`). Every process gets the same results.

  Held test sets: all maps are gathered and the pixel metrics are exact. Streamed ones: each batch's maps go
  into a fixed-size histogram (`streaming_metrics.PixelHistogram`) and are dropped, so host memory does not
  grow with the test set; pixel metrics then carry `*_error_bound` entries. Image metrics are exact either way.
  With `threshold`, also the decision's sensitivity and specificity. With `eval.staging` / `eval.segmentation`
  on, also the staging and segmentation metrics of the raw maps (`analysis`; segmentation thresholds are
  calibrated on `calibration_images`, the layer-wise comparison uses `reconstruct`).
  """
  _, local_bs = parallel.eval_batch_sizes(eval_cfg.batch_size, mesh)
  sigma = float(eval_cfg.smoothing_sigma)
  streaming, pixel = test.streaming, test.has_masks
  histogram = streaming_metrics.PixelHistogram(bits=int(eval_cfg.histogram_bits)) if streaming and pixel else None
  examples = _Examples()
  share = functools.partial(score_share, batch_size=eval_cfg.batch_size, mesh=mesh)
  extra = analysis.start(eval_cfg, test, score_batch, reconstruct, calibration_images, mesh, share)
  maps, masks, raw, scored, valids = [], [], [], [], []
  for images, batch_masks, valid, index in test.batches(local_bs):
    batch = parallel.global_array(images, mesh)
    m, s = score_batch(batch)
    m_local, s_local = parallel.local_rows(m), parallel.local_rows(s)
    if extra is not None:
      extra.update(images, m_local, batch_masks if pixel else None, s_local, valid, index, batch)
    raw.append(s_local)
    valids.append(valid)
    if not streaming:
      maps.append(m_local)
      if pixel:
        masks.append(batch_masks)
    else:
      keep = np.asarray(valid, bool)
      examples.update(m_local[keep], s_local[keep], test.labels[index[keep]], index[keep])
      if sigma:
        m_local = parallel.local_rows(_smooth(m, sigma))
      scored.append(m_local.reshape(m_local.shape[0], -1).max(1) if sigma else s_local)
      if pixel:
        histogram.update(m_local[keep], batch_masks[keep])
    if progress:
      progress(int(np.sum(valid)))
  valid = np.concatenate(valids) if valids else np.zeros((0,), bool)
  scores = parallel.gather_rows(np.concatenate(raw) if raw else np.zeros((0,), np.float32), valid)
  if not streaming:
    all_maps = parallel.gather_rows(np.concatenate(maps), valid)
    all_masks = parallel.gather_rows(np.concatenate(masks), valid) if pixel else None
    res = compute_metrics(all_maps, scores, test.labels, all_masks, sigma, eval_cfg.aupro_max_fpr)
    chosen = {role: (i, all_maps[i]) for role, i in figures.pick_examples(scores, test.labels).items()}
  else:
    image_scores = parallel.gather_rows(np.concatenate(scored), valid)
    res = {f"image_{k}": v for k, v in metrics_lib.image_metrics(image_scores, test.labels).items()}
    if pixel:
      histogram = streaming_metrics.PixelHistogram.combine(parallel.gather_rows(histogram.to_array()[None]))
      res.update(histogram.result(fpr_limit=eval_cfg.aupro_max_fpr))
      res["mean_image_pixel_auroc"] = 0.5 * (res["image_auroc"] + res["pixel_auroc"])
    chosen = examples.gathered()
  if threshold is not None:
    res.update(decision_metrics(scores, test.labels, threshold))
  if extra is not None:
    res.update(extra.result())
  return res, scores, chosen


@functools.partial(jax.jit, static_argnums=1)
def _smooth(maps: jax.Array, sigma: float) -> jax.Array:
  return metrics_lib.gaussian_smooth(maps, sigma=sigma)


def calibrate(score_batch: BatchScorer, images: np.ndarray, batch_size: int, mesh: Mesh,
              threshold: Callable[[np.ndarray], float], progress: Callable[[int], None] | None = None
              ) -> normalization.Normalization:
  """The decision threshold and score normalisation from normal calibration images (split over processes)."""
  share, valid = batches.process_eval_indices(images.shape[0])
  m, s = score_share(score_batch, images[share], batch_size, mesh, progress)
  m, s = parallel.gather_rows(m, valid), parallel.gather_rows(s, valid)
  return normalization.calibrate(m, threshold(s))
