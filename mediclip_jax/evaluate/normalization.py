"""Normalised anomaly scores: the decision threshold maps to 0.5, whatever the method's raw scale.

Calibrated on the normal calibration images only (the support set; no test image is seen):
  threshold  the decision threshold on raw scores (`eval.threshold_quantile` of their image scores)
  low        the median pixel of their anomaly maps: what typical normal tissue scores
  normalised(x) = clip(0.5 + 0.5 * (x - threshold) / (threshold - low), 0, 1)
so typical normal tissue reads 0, the threshold 0.5, and a value as far above the threshold as the
threshold is above normal tissue reads 1. The map is affine in the raw one (clipped), so it ranks
pixels and images exactly as the raw scores do: metrics are unchanged. Raw scores are kept
beside normalised ones wherever they are written. numpy only, so inference without JAX can use it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_MIN_SPAN = 1e-6  # a degenerate calibration (constant maps) still gives a finite scale


@dataclasses.dataclass(frozen=True)
class Normalization:
  low: float
  threshold: float

  def __post_init__(self):
    if not (np.isfinite(self.low) and np.isfinite(self.threshold)):
      raise ValueError(f"score normalisation needs finite values, got low={self.low}, threshold={self.threshold}")

  @property
  def span(self) -> float:
    return max(self.threshold - self.low, _MIN_SPAN)

  def __call__(self, raw):
    """Raw scores or maps -> the normalised 0-1 scale (threshold at 0.5); float32 arrays keep their shape."""
    x = np.asarray(raw, np.float64)
    return np.clip(0.5 + 0.5 * (x - self.threshold) / self.span, 0.0, 1.0).astype(np.float32)

  def to_dict(self) -> dict[str, float]:
    return {"low": float(self.low), "threshold": float(self.threshold)}

  @classmethod
  def from_dict(cls, d: dict, where: str = "checkpoint metadata") -> "Normalization":
    try:
      return cls(float(d["low"]), float(d["threshold"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"{where}: 'normalization' must hold numbers 'low' and 'threshold', got {d!r}") from e


def calibrate(maps: np.ndarray, threshold: float) -> Normalization:
  """The normalisation from normal calibration images' maps (n,H,W) and their decision `threshold`."""
  maps = np.asarray(maps, np.float64)
  if maps.size == 0:
    raise ValueError("score normalisation needs at least one calibration image")
  return Normalization(float(np.median(maps)), float(threshold))
