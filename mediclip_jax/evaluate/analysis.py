"""Staging and segmentation of a method's anomaly maps during an evaluation (`eval.staging`, `eval.segmentation`).

Method-agnostic: any method's maps are staged (K-means on the abnormal test images' downsampled maps,
clusters ranked by mean score, against the grades in the test listing's class names) and segmented by a
threshold calibrated on the normal calibration images. Reconstruction methods (a `Trainable.reconstructor`)
also get the layer-wise grey-level comparison of input and pseudo-healthy reconstruction, inside layers an
unsupervised extractor traces on the reconstruction. The accumulator sees each batch once, beside the
metrics' own pass, and keeps only per-image counts and small staging features, so it also runs on streamed
test sets (memory: N x staging.size^2 floats for staging).
"""
from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import batches
from mediclip_jax import parallel
from mediclip_jax.evaluate import oct_layers, segmentation, staging


def validate(eval_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for staging/segmentation settings that cannot work."""
  st, sg = eval_cfg.staging, eval_cfg.segmentation
  for name, value, low in (("staging.k", st.k, 0), ("staging.restarts", st.restarts, 1), ("staging.size", st.size, 1),
                           ("segmentation.min_size", sg.min_size, 0), ("segmentation.boundaries", sg.boundaries, 2)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"config.eval.{name} must be an integer >= {low}, got {value!r}")
  if st.k == 1:
    raise ValueError("config.eval.staging.k must be 0 (off) or >= 2 clusters, got 1")
  for name in ("quantile", "q_low", "q_high"):
    if not 0.0 <= sg[name] <= 1.0:
      raise ValueError(f"config.eval.segmentation.{name} must lie in [0, 1], got {sg[name]}")


def _grey(images: np.ndarray) -> np.ndarray:
  return images.mean(-1) if images.ndim == 4 else images


class Analysis:
  """Per-evaluation accumulator: `update` with each batch of this process's share, then `result()`."""

  def __init__(self, eval_cfg, test, calibration: dict, reconstruct: Callable | None, mesh: Mesh):
    self.cfg, self.test, self.cal, self.reconstruct, self.mesh = eval_cfg, test, calibration, reconstruct, mesh
    self.features, self.scores, self.valid, self.index = [], [], [], []
    self.threshold_rows, self.layer_rows = [], []

  def update(self, images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None, scores: np.ndarray,
             valid: np.ndarray, index: np.ndarray, global_images=None) -> None:
    """One batch: images (n,H,W[,3]), maps (n,H,W), masks (n,H,W) or None, scores (n,), valid, test index."""
    st = self.cfg.staging
    self.valid.append(np.asarray(valid, bool))
    self.index.append(np.asarray(index))
    if st.k:
      self.features.append(staging.stage_features(maps, int(st.size)))
      self.scores.append(np.asarray(scores, np.float32))
    if masks is None:
      return
    truth = np.asarray(masks) != 0
    x_hat = parallel.local_rows(self.reconstruct(global_images)) if self.reconstruct is not None else None
    for name, pred in self.segment(images, maps, x_hat).items():
      rows = segmentation.SegmentationScores()
      rows.add(pred, truth)
      (self.threshold_rows if name == "threshold" else self.layer_rows).append(rows.to_array())

  def segment(self, images: np.ndarray, maps: np.ndarray, x_hat: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The enabled segmentations of a batch: {"threshold": (n,H,W) bool, "layers": (n,H,W) bool (with x_hat)}."""
    sg, out = self.cfg.segmentation, {}
    if sg.threshold and "pixel_threshold" in self.cal:  # calibrated when the test set has masks
      out["threshold"] = segmentation.threshold_segment(maps, self.cal["pixel_threshold"], int(sg.min_size))
    if self.reconstruct is not None and x_hat is not None:
      x, retina = _grey(np.asarray(images, np.float32)), _retina(int(sg.boundaries))
      out["layers"] = np.stack([
          segmentation.layerwise_segment(xi, hi, oct_layers.extract_layers(hi, int(sg.boundaries)), self.cal["v_low"],
                                         self.cal["v_high"], int(sg.min_size), labels=retina)
          for xi, hi in zip(x, x_hat)])
    return out

  def result(self) -> dict:
    """The staging and segmentation metrics over the whole test set (every process gets the same)."""
    out = {}
    valid = np.concatenate(self.valid) if self.valid else np.zeros((0,), bool)
    index = parallel.gather_rows(np.concatenate(self.index), valid) if self.index else np.zeros((0,), int)
    st = self.cfg.staging
    if st.k:
      feats = parallel.gather_rows(np.concatenate(self.features), valid)
      scores = parallel.gather_rows(np.concatenate(self.scores), valid)
      abnormal = self.test.labels[index] == 1
      grades = [self.test.class_names[i] for i in index[abnormal]]
      if abnormal.sum() >= st.k and len(set(grades)) >= 2:
        stages = staging.kmeans_stages(feats[abnormal], scores[abnormal], int(st.k), seed=0,
                                       restarts=int(st.restarts))
        order = tuple(st.grade_order) if st.grade_order and set(grades) <= set(st.grade_order) else None
        res = staging.staging_metrics(stages, grades, order)
        out.update({k: v for k, v in res.items() if np.isscalar(v) and not isinstance(v, str)})
    for prefix, rows in (("seg_threshold_", self.threshold_rows), ("seg_layers_", self.layer_rows)):
      if rows:
        gathered = parallel.gather_rows(np.concatenate(rows), valid)
        out.update(segmentation.SegmentationScores.from_array(gathered).result(prefix))
    return out


def _retina(boundaries: int) -> list[int]:
  """Labels between the first and the last traced boundary: the retinal layers (not vitreous or choroid)."""
  return list(range(1, boundaries))


def start(eval_cfg, test, score_batch, reconstruct: Callable | None, calibration_images: np.ndarray | None,
          mesh: Mesh, share: Callable) -> Analysis | None:
  """An accumulator for this evaluation, calibrated on the normal calibration images; None when nothing is on.

  `share(batch_fn, local_images)` scores this process's share in padded batches (`scoring.score_share`).
  Segmentation needs test masks and calibration images; the layer-wise comparison also a reconstructor.
  Configs written before these sections existed analyse nothing."""
  if "staging" not in eval_cfg or "segmentation" not in eval_cfg:
    return None
  st, sg = eval_cfg.staging, eval_cfg.segmentation
  segment = test.has_masks and calibration_images is not None and len(calibration_images) > 0
  layers = bool(sg.layers) and segment and reconstruct is not None
  if not (st.k or (segment and (sg.threshold or layers))):
    return None
  cal = {}
  if segment:
    rows, valid = batches.process_eval_indices(calibration_images.shape[0])
    images = calibration_images[rows]
    maps, _ = share(score_batch, images)
    cal["pixel_threshold"] = segmentation.pixel_threshold(parallel.gather_rows(maps, valid), float(sg.quantile))
    if layers:
      def recon_batch(g):
        r = reconstruct(g)
        return r, r[:, 0, 0]
      x_hat = parallel.gather_rows(share(recon_batch, images)[0], valid)
      x = parallel.gather_rows(_grey(images), valid)
      lab = np.stack([oct_layers.extract_layers(h, int(sg.boundaries)) for h in x_hat])
      cal["v_low"], cal["v_high"] = segmentation.layer_bounds(x, x_hat, lab, int(sg.boundaries) + 1,
                                                              float(sg.q_low), float(sg.q_high))
  return Analysis(eval_cfg, test, cal, reconstruct if layers else None, mesh)
