"""Metrics against scikit-learn, brute-force F1 and a slow obvious AUPRO loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from mediclip_jax.evaluate import metrics as M


def _cases():
  rng = np.random.default_rng(0)
  out = []
  for i in range(12):
    n = int(rng.integers(2, 3000))
    kind = i % 4
    if kind == 0:
      s = rng.normal(size=n)  # continuous, fast path
    elif kind == 1:
      s = rng.integers(0, 4, n).astype(float)  # heavy ties
    elif kind == 2:
      s = rng.normal(size=n) * 1e3  # wide signed range: exact two-operand sort path
    else:
      s = np.round(rng.random(n), 2)  # probabilities with ties
    y = rng.random(n) < rng.uniform(0.05, 0.7)
    y[0], y[1] = True, False
    out.append((s.astype(np.float32), y))
  return out


def _padded(s, y, size=3000):
  """Pads to one shape (so the jitted metrics compile once) with a validity mask."""
  pad = size - s.shape[0]
  rng = np.random.default_rng(pad)
  valid = np.arange(size) < s.shape[0]
  return (np.concatenate([s, rng.choice(s, pad)]).astype(np.float32),
          np.concatenate([y, rng.random(pad) < 0.5]), valid)


@pytest.mark.parametrize("case", range(12))
def test_auroc_ap_match_sklearn(case):
  s, y = _cases()[case]
  d = M.binary_metrics(*_padded(s, y))
  assert abs(float(d["auroc"]) - roc_auc_score(y, s)) < 1e-6
  assert abs(float(d["ap"]) - average_precision_score(y, s)) < 1e-6


@pytest.mark.parametrize("case", [1, 2])
def test_single_metric_functions_unpadded(case):
  s, y = _cases()[case]
  assert abs(float(M.auroc(s, y)) - roc_auc_score(y, s)) < 1e-6
  assert abs(float(M.average_precision(s, y)) - average_precision_score(y, s)) < 1e-6


def test_extreme_ties_and_degenerate_labels():
  y = np.array([0, 1, 0, 1, 1, 0])
  s = np.full(6, 0.3, np.float32)
  assert float(M.auroc(s, y)) == pytest.approx(0.5, abs=1e-7)
  assert float(M.average_precision(s, y)) == pytest.approx(average_precision_score(y, s), abs=1e-7)
  s = np.array([0.0, -0.0, 1, 1, 2, 2], np.float32)  # -0.0 and 0.0 are one tie
  assert float(M.auroc(s, y)) == pytest.approx(roc_auc_score(y, s), abs=1e-7)
  assert np.isnan(float(M.auroc(s, np.zeros(6))))
  assert np.isnan(float(M.average_precision(s, np.zeros(6))))
  assert np.isnan(float(M.auroc(s, np.ones(6))))


def test_realistic_pixel_maps_match_sklearn():
  rng = np.random.default_rng(1)
  n, h = 40, 64
  masks = np.zeros((n, h, h), bool)
  yy, xx = np.mgrid[:h, :h]
  for i in range(n // 2, n):
    cy, cx, r = rng.integers(10, 54, 2).tolist() + [int(rng.integers(3, 12))]
    masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
  maps = np.clip(0.3 * masks + rng.normal(0, 0.2, masks.shape), 0, 1).astype(np.float32)
  maps = np.round(maps * 255) / 255  # uint8-like maps: many ties
  d = M.pixel_metrics(maps, masks, with_aupro=False)
  assert abs(d["auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-6
  assert abs(d["ap"] - average_precision_score(masks.ravel(), maps.ravel())) < 1e-6
  img = M.image_metrics(maps.reshape(n, -1).max(1), np.arange(n) >= n // 2)
  assert abs(img["auroc"] - roc_auc_score(np.arange(n) >= n // 2, maps.reshape(n, -1).max(1))) < 1e-6


def test_valid_mask_equals_dropping_padding():
  rng = np.random.default_rng(2)
  s = rng.random(100).astype(np.float32)
  y = rng.random(100) < 0.4
  valid = np.arange(100) < 73
  s_pad = s.copy()
  s_pad[73:] = s[0]  # padding that ties with a real score must still not count
  d = M.binary_metrics(s_pad, y, valid)
  assert abs(float(d["auroc"]) - roc_auc_score(y[:73], s[:73])) < 1e-6
  assert abs(float(d["ap"]) - average_precision_score(y[:73], s[:73])) < 1e-6
  f1, _ = M.f1_max(s[:73], y[:73])
  assert abs(float(d["f1_max"]) - float(f1)) < 1e-6


def _f1_brute(s, y):
  best, thr = 0.0, None
  for t in np.unique(s):
    pred = s >= t
    tp = np.sum(pred & y)
    fp = np.sum(pred & ~y)
    fn = np.sum(~pred & y)
    f1 = 2 * tp / (2 * tp + fp + fn)
    if f1 > best:
      best, thr = f1, t
  return best, thr


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5])
def test_f1_max_brute_force(case):
  s, y = _cases()[case]
  f1, thr = M.f1_max(*_padded(s, y))
  ref, ref_thr = _f1_brute(s, y)
  assert abs(float(f1) - ref) < 1e-6
  pred = s >= float(thr)  # the returned threshold attains the maximum
  assert abs(2 * np.sum(pred & y) / (np.sum(pred) + np.sum(y)) - ref) < 1e-6


def _aupro_reference(maps, masks, limit):
  """Slow and obvious: every distinct threshold, scipy components, np.interp at the limit."""
  regions = []
  for i in range(masks.shape[0]):
    lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
    regions += [(i, lab == r) for r in range(1, n + 1)]
  neg = ~masks
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fprs.append(np.sum(pred & neg) / np.sum(neg))
    pros.append(np.mean([np.sum(pred[i] & r) / np.sum(r) for i, r in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= limit
  f = np.concatenate([fprs[keep], [limit]])
  p = np.concatenate([pros[keep], [np.interp(limit, fprs, pros)]])
  return np.trapezoid(p, f) / limit


@pytest.mark.parametrize("quantize,limit", [(False, 0.3), (True, 0.3), (True, 1.0), (False, 0.05)])
def test_aupro_matches_slow_reference(quantize, limit):
  rng = np.random.default_rng(3)
  n, h = 6, 24
  yy, xx = np.mgrid[:h, :h]
  masks = np.zeros((n, h, h), bool)
  for i in range(2, n):
    for _ in range(int(rng.integers(1, 3))):
      cy, cx, r = rng.integers(4, 20, 2).tolist() + [int(rng.integers(2, 6))]
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
  maps = (0.4 * masks + rng.random(masks.shape)).astype(np.float32)
  if quantize:
    maps = np.round(maps * 20) / 20
  got = float(M.aupro(maps, masks, fpr_limit=limit))
  assert abs(got - _aupro_reference(maps, masks, limit)) < 1e-5


def test_aupro_padding_and_perfect_maps():
  rng = np.random.default_rng(4)
  masks = rng.random((4, 16, 16)) < 0.2
  assert float(M.aupro(masks.astype(np.float32), masks)) == pytest.approx(1.0, abs=1e-6)
  maps = rng.random((4, 16, 16)).astype(np.float32)
  pad_maps = np.concatenate([maps, rng.random((2, 16, 16)).astype(np.float32)])
  pad_masks = np.concatenate([masks, np.ones((2, 16, 16), bool)])
  valid = np.array([1, 1, 1, 1, 0, 0])
  assert float(M.aupro(pad_maps, pad_masks, valid=valid)) == pytest.approx(float(M.aupro(maps, masks)), abs=1e-6)
  assert np.isnan(float(M.aupro(maps, np.zeros_like(masks))))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_mask_regions_match_scipy(connectivity):
  rng = np.random.default_rng(5)
  m = rng.random((4, 37, 41)) < 0.45
  lab, r = M.mask_regions(m, connectivity)
  struct = np.ones((3, 3)) if connectivity == 8 else None
  total = 0
  for i in range(m.shape[0]):
    ref, n = ndimage.label(m[i], structure=struct)
    total += n
    pairs = set(zip(lab[i][m[i]].tolist(), ref[m[i]].tolist()))
    assert len(pairs) == n == len(np.unique(lab[i][m[i]]))  # same partition
  assert r == total
  assert (lab > 0).sum() == m.sum() and lab.max() == r


@pytest.mark.parametrize("shape", [(3, 30, 20), (2, 12, 9)])
def test_gaussian_smooth_matches_scipy(shape):
  x = np.random.default_rng(6).random(shape).astype(np.float32)
  ref = np.stack([ndimage.gaussian_filter(a, 4.0) for a in x])
  np.testing.assert_allclose(np.asarray(M.gaussian_smooth(x, sigma=4.0)), ref, atol=1e-5)


def test_metrics_jit_and_no_recompile_on_padding():
  @jax.jit
  def eval_step(maps, labels, valid):
    return M.binary_metrics(jnp.max(maps, axis=(1, 2)), labels, valid)

  rng = np.random.default_rng(7)
  maps = rng.random((8, 16, 16)).astype(np.float32)
  labels = np.arange(8) % 2
  a = eval_step(maps, labels, np.ones(8, bool))
  b = eval_step(maps, labels, np.arange(8) < 5)
  assert eval_step._cache_size() == 1
  assert abs(float(a["auroc"]) - roc_auc_score(labels, maps.max((1, 2)))) < 1e-6
  assert abs(float(b["auroc"]) - roc_auc_score(labels[:5], maps[:5].max((1, 2)))) < 1e-6


def test_pixel_metrics_smoothing_and_shape_errors():
  rng = np.random.default_rng(8)
  masks = np.zeros((4, 32, 32), bool)
  masks[2:, 8:20, 10:22] = True
  maps = (0.2 * masks + rng.random(masks.shape)).astype(np.float32)
  raw = M.pixel_metrics(maps, masks)
  smooth = M.pixel_metrics(maps, masks, sigma=4.0)
  ref = np.stack([ndimage.gaussian_filter(a, 4.0) for a in maps])
  assert set(raw) == {"auroc", "ap", "f1_max", "f1_threshold", "aupro"}
  assert abs(smooth["auroc"] - roc_auc_score(masks.ravel(), ref.ravel())) < 1e-5
  assert smooth["auroc"] > raw["auroc"]  # smoothing averages the noise away
  with pytest.raises(ValueError, match="must both be"):
    M.pixel_metrics(maps, masks[:3])
