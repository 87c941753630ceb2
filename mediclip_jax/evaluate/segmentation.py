"""Binary anomaly segmentation from anomaly maps or reconstructions, and its Dice / IoU.

Two segmenters, both host-only numpy/scipy and method-agnostic:

- `threshold_segment`: any method's anomaly maps (e.g. SSL-AnoVAE's residuals |x - x_hat|) above a
  threshold calibrated on normal images (`pixel_threshold`, a quantile of their pixels), then
  `cleanup` (small components removed, holes filled).
- `layerwise_segment`: the layer-wise grey-level comparison for OCT fluid: within each retinal layer
  (labelled by the caller on the pseudo-healthy reconstruction x_hat), a pixel is fluid when the
  input is darker than its reconstruction by more than that layer's normal variation and by less
  than the layer's own brightness (`layer_bounds` calibrates both on normal images).

`SegmentationScores` accumulates per-image Dice / IoU (images with a ground-truth anomaly) and the
false-positive pixel fraction (normal images) as rows of integer pixel counts, gathered over processes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)  # 8-connectivity


def _check_fraction(name: str, q: float) -> float:
  q = float(q)
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"{name} must be a quantile in [0, 1], got {q}")
  return q


def _check_min_size(min_size: int) -> int:
  if not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"min_size must be a non-negative integer (pixels), got {min_size!r}")
  return int(min_size)


def cleanup(mask: np.ndarray, min_size: int, fill_holes: bool = True) -> np.ndarray:
  """(H, W) bool mask without its connected components (8-connectivity) of fewer than `min_size`
  pixels, then with holes (background not connected to the border) filled when `fill_holes`."""
  m = np.asarray(mask, bool)
  if m.ndim != 2:
    raise ValueError(f"mask must have shape (H, W), got {m.shape}")
  min_size = _check_min_size(min_size)
  if min_size > 1 and m.any():
    lab, _ = ndimage.label(m, structure=_EIGHT)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    m = keep[lab]
  if fill_holes and m.any():
    m = ndimage.binary_fill_holes(m)
  return m


def pixel_threshold(normal_maps: np.ndarray, quantile: float) -> float:
  """The `quantile` (e.g. 0.99) of all pixels of maps (N, H, W) of normal images: a pixel threshold
  that flags about 1 - quantile of normal pixels."""
  q = _check_fraction("quantile", quantile)
  m = np.asarray(normal_maps, np.float64)
  if m.ndim != 3 or m.size == 0:
    raise ValueError(f"normal_maps must have shape (N, H, W) with N, H, W > 0, got {m.shape}")
  return float(np.quantile(m, q))


def threshold_segment(maps: np.ndarray, threshold: float, min_size: int, fill_holes: bool = True) -> np.ndarray:
  """(N, H, W) bool masks: map > threshold (strictly, so a zero map with threshold >= 0 gives an empty
  mask), each image then `cleanup`-ed."""
  m = np.asarray(maps)
  if m.ndim != 3:
    raise ValueError(f"maps must have shape (N, H, W), got {m.shape}")
  raw = m > threshold
  return np.stack([cleanup(r, min_size, fill_holes) for r in raw]) if len(raw) else raw


def layer_bounds(x: np.ndarray, x_hat: np.ndarray, layers: np.ndarray, n_labels: int,
                 q_low: float, q_high: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer grey-level bounds (v_low, v_high), each (n_labels,) float64, from NORMAL images.

  x, x_hat, layers: (N, H, W) inputs, their pseudo-healthy reconstructions, and integer layer labels
  0..n_labels-1 (computed on x_hat). With d = x_hat - x (positive where the input is darker than its
  reconstruction, as hypo-reflective fluid is), for each label l over the pixels of layer l:
    v_low[l] = the q_low quantile of d (e.g. 0.99): a drop must exceed what normal images show;
    v_high[l] = the q_high quantile of x_hat (e.g. 0.99): the brightest the pseudo-healthy layer gets.
      A drop larger than that cannot come from the layer's own tissue turning dark (for inputs >= 0,
      d <= x_hat), so it is rejected as shadow or artefact.
  Labels absent from the normal images get v_low = v_high = +inf, so they are never flagged.
  This calibration is our choice: the paper compares grey levels layer by layer but does not give
  its bounds.
  """
  q_low = _check_fraction("q_low", q_low)
  q_high = _check_fraction("q_high", q_high)
  if not isinstance(n_labels, (int, np.integer)) or n_labels < 1:
    raise ValueError(f"n_labels must be a positive integer, got {n_labels!r}")
  xa, xh, lab = np.asarray(x, np.float64), np.asarray(x_hat, np.float64), np.asarray(layers)
  if xa.ndim != 3 or xa.shape != xh.shape or xa.shape != lab.shape:
    raise ValueError(f"x, x_hat and layers must share one (N, H, W) shape, got {xa.shape}, {xh.shape}, {lab.shape}")
  if lab.size and lab.dtype.kind not in "iu":
    raise ValueError(f"layers must hold integer labels, got dtype {lab.dtype}")
  lab = lab.ravel().astype(np.int64)
  if lab.size and (lab.min() < 0 or lab.max() >= n_labels):
    raise ValueError(f"layers must lie in 0..{n_labels - 1} (n_labels = {n_labels}), got {lab.min()}..{lab.max()}")
  d = (xh - xa).ravel()
  bright = xh.ravel()
  order = np.argsort(lab, kind="stable")
  counts = np.bincount(lab, minlength=n_labels)
  starts = np.concatenate([[0], np.cumsum(counts)])
  v_low = np.full(n_labels, np.inf)
  v_high = np.full(n_labels, np.inf)
  for l in np.nonzero(counts)[0]:
    idx = order[starts[l]:starts[l + 1]]
    v_low[l] = np.quantile(d[idx], q_low)
    v_high[l] = np.quantile(bright[idx], q_high)
  return v_low, v_high


def layerwise_segment(x: np.ndarray, x_hat: np.ndarray, layers: np.ndarray, v_low: np.ndarray,
                      v_high: np.ndarray, min_size: int, labels: Sequence[int] | None = None,
                      fill_holes: bool = True) -> np.ndarray:
  """(H, W) bool fluid mask by layer-wise grey-level comparison of an input with its reconstruction.

  x, x_hat: (H, W) input and pseudo-healthy reconstruction; layers: (H, W) int labels indexing
  v_low / v_high (from `layer_bounds`), computed by the caller on x_hat. With d = x_hat - x, a pixel
  of layer l is marked when max(v_low[l], 0) < d < v_high[l]: darker than its reconstruction (d > 0,
  so x_hat == x never marks anything) by more than normal variation and by less than the layer's
  brightness. `labels` restricts the marking to those layers (e.g. the retinal layers, not the
  vitreous or choroid); the mask is then `cleanup`-ed.
  """
  xa, xh, lab = np.asarray(x, np.float64), np.asarray(x_hat, np.float64), np.asarray(layers)
  if xa.ndim != 2 or xa.shape != xh.shape or xa.shape != lab.shape:
    raise ValueError(f"x, x_hat and layers must share one (H, W) shape, got {xa.shape}, {xh.shape}, {lab.shape}")
  lo, hi = np.asarray(v_low, np.float64), np.asarray(v_high, np.float64)
  if lo.ndim != 1 or lo.shape != hi.shape:
    raise ValueError(f"v_low and v_high must be 1-D of one length (n_labels,), got {lo.shape} and {hi.shape}")
  if lab.size and lab.dtype.kind not in "iu":
    raise ValueError(f"layers must hold integer labels, got dtype {lab.dtype}")
  lab = lab.astype(np.int64)
  if lab.size and (lab.min() < 0 or lab.max() >= lo.size):
    raise ValueError(f"layers must lie in 0..{lo.size - 1} (the length of v_low), got {lab.min()}..{lab.max()}")
  d = xh - xa
  marked = (d > np.maximum(lo[lab], 0.0)) & (d < hi[lab])
  if labels is not None:
    allowed = np.asarray(list(labels), np.int64)
    marked &= np.isin(lab, allowed)
  return cleanup(marked, min_size, fill_holes)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
  """(Dice, IoU) of two bool masks of one shape. Both empty counts as a perfect match, (1.0, 1.0):
  nothing to find and nothing found; a non-empty truth with an empty prediction (or the reverse)
  gives (0.0, 0.0)."""
  p, t = np.asarray(pred, bool), np.asarray(truth, bool)
  if p.shape != t.shape:
    raise ValueError(f"pred shape {p.shape} differs from truth shape {t.shape}")
  inter = int(np.count_nonzero(p & t))
  total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
  if total == 0:
    return 1.0, 1.0
  return 2.0 * inter / total, inter / (total - inter)


class SegmentationScores:
  """Per-image segmentation scores, accumulated image by image.

  Each image is kept as one row of integer pixel counts (pred, truth, intersection, pixels), exact
  through 32-bit transports. `result` averages the per-image Dice and IoU over images whose truth is
  non-empty and the false-positive fraction (predicted pixels / pixels, all outside the empty truth)
  over images whose truth is empty (normal images), so an empty-empty Dice of 1 never inflates the
  segmentation score. Several processes: pad `to_array()` to one length, gather (e.g.
  `parallel.gather_rows(rows, valid)`) and rebuild with `from_array`.
  """

  COLUMNS = ("pred", "truth", "intersection", "pixels")

  def __init__(self):
    self._rows: list[np.ndarray] = []

  def __len__(self) -> int:
    return int(sum(r.shape[0] for r in self._rows))

  def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
    """Adds one image (H, W) or a batch (N, H, W) of bool predictions and ground-truth masks."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape or p.ndim not in (2, 3):
      raise ValueError(f"pred and truth must share one (H, W) or (N, H, W) shape, got {p.shape} and {t.shape}")
    if p.ndim == 2:
      p, t = p[None], t[None]
    n = p.shape[0]
    rows = np.empty((n, len(self.COLUMNS)), np.int64)
    rows[:, 0] = np.count_nonzero(p.reshape(n, -1), axis=1)
    rows[:, 1] = np.count_nonzero(t.reshape(n, -1), axis=1)
    rows[:, 2] = np.count_nonzero((p & t).reshape(n, -1), axis=1)
    rows[:, 3] = p[0].size if n else 0
    self._rows.append(rows)

  def to_array(self) -> np.ndarray:
    """(n_images, 4) int64 rows of pixel counts in the order of `COLUMNS`."""
    if not self._rows:
      return np.zeros((0, len(self.COLUMNS)), np.int64)
    return np.concatenate(self._rows)

  @classmethod
  def from_array(cls, rows: np.ndarray) -> SegmentationScores:
    """Inverse of `to_array`; rows of several processes may be stacked (concatenated) first."""
    a = np.asarray(rows)
    if a.ndim != 2 or a.shape[1] != len(cls.COLUMNS) or (a.size and a.dtype.kind not in "iu"):
      raise ValueError(f"rows must be integer counts of shape (n, {len(cls.COLUMNS)}) as made by to_array, "
                       f"got dtype {a.dtype} and shape {a.shape}")
    out = cls()
    out._rows = [a.astype(np.int64)]
    return out

  def result(self, prefix: str = "seg_") -> dict[str, float | int]:
    """{prefix}dice, {prefix}iou: means of the per-image values over images with a non-empty truth
    ({prefix}n of them; NaN if none); {prefix}fp_fraction: mean fraction of predicted pixels over the
    {prefix}n_normal images with an empty truth (NaN if none)."""
    a = self.to_array().astype(np.float64)
    pred, truth, inter, pixels = a.T
    has = truth > 0
    nan = float("nan")
    dice = 2.0 * inter[has] / (pred[has] + truth[has])
    iou = inter[has] / (pred[has] + truth[has] - inter[has])
    fp = pred[~has] / np.maximum(pixels[~has], 1.0)
    return {
        f"{prefix}dice": float(dice.mean()) if has.any() else nan,
        f"{prefix}iou": float(iou.mean()) if has.any() else nan,
        f"{prefix}n": int(has.sum()),
        f"{prefix}fp_fraction": float(fp.mean()) if (~has).any() else nan,
        f"{prefix}n_normal": int((~has).sum()),
    }
