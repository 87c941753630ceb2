"""Score normalisation: threshold -> 0.5, typical normal pixel -> 0, ranking (and so every metric) unchanged."""
import numpy as np
import pytest

from mediclip_jax.evaluate import normalization
from mediclip_jax.evaluate.metrics import image_metrics


def test_calibration_puts_threshold_at_half_and_the_median_normal_pixel_at_zero():
  rng = np.random.default_rng(0)
  maps = rng.uniform(0.2, 0.6, (4, 8, 8))
  norm = normalization.calibrate(maps, threshold=0.6)
  assert norm.low == pytest.approx(np.median(maps))
  np.testing.assert_allclose(norm([norm.low, 0.6, 0.6 + (0.6 - norm.low), 5.0, -5.0]), [0, 0.5, 1, 1, 0], atol=1e-6)
  assert norm(maps).shape == maps.shape and norm(maps).dtype == np.float32


def test_normalised_scores_rank_as_raw_ones_so_metrics_are_unchanged():
  rng = np.random.default_rng(1)
  labels = np.r_[np.zeros(30), np.ones(30)].astype(int)
  raw = rng.normal(0.4, 0.05, 60) + 0.03 * labels  # all inside the unclipped range
  norm = normalization.Normalization(low=0.2, threshold=0.45)
  a, b = image_metrics(raw, labels), image_metrics(norm(raw), labels)
  assert a["auroc"] == pytest.approx(b["auroc"]) and a["ap"] == pytest.approx(b["ap"])
  assert ((norm(raw) > 0.5) == (raw > 0.45)).all()


def test_non_finite_or_missing_values_are_refused():
  with pytest.raises(ValueError, match="finite"):
    normalization.Normalization(0.1, float("nan"))
  with pytest.raises(ValueError, match="'low' and 'threshold'"):
    normalization.Normalization.from_dict({"threshold": 0.5}, "run/ckpt")
  with pytest.raises(ValueError, match="at least one"):
    normalization.calibrate(np.zeros((0, 4, 4)), 0.5)
  flat = normalization.calibrate(np.full((2, 4, 4), 0.5), 0.5)  # constant maps: finite, thresholded at 0.5
  assert flat(0.5) == 0.5 and flat(0.51) == 1.0 and flat(0.49) == 0.0
