"""Anomaly staging (K-means ranked by score, agreement with grades) and segmentation (thresholding,
layer-wise grey-level comparison, cleanup, Dice / IoU) on small hand-made arrays."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from mediclip_jax.evaluate import segmentation as S
from mediclip_jax.evaluate import staging as T

# ----------------------------------------------------------------------------- staging


def test_stage_features_shape_norm_and_area_average():
  rng = np.random.default_rng(0)
  maps = rng.random((3, 20, 30)).astype(np.float32)
  maps[1] = 0.0
  maps[2] = 7.0
  f = T.stage_features(maps, size=8)
  assert f.shape == (3, 64) and f.dtype == np.float32
  assert abs(np.linalg.norm(f[0]) - 1.0) < 1e-6
  assert np.all(f[1] == 0) and np.all(np.isfinite(f))
  np.testing.assert_allclose(f[2], 1.0 / 8, rtol=1e-6)  # a constant map stays constant
  # Divisible: 4x4 -> 2x2 block means. Not divisible: 3 rows -> 2 cells cover rows [0, 1.5) and [1.5, 3).
  m = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
  blocks = m[0].reshape(2, 2, 2, 2).mean(axis=(1, 3)).ravel()
  np.testing.assert_allclose(T.stage_features(m, size=2)[0], blocks / np.linalg.norm(blocks), rtol=1e-6)
  r = np.array([1.0, 2.0, 4.0], np.float32)
  m = np.repeat(r[:, None], 5, axis=1)[None]
  cells = np.array([(r[0] + 0.5 * r[1]) / 1.5, (0.5 * r[1] + r[2]) / 1.5])
  expect = np.repeat(cells[:, None], 2, axis=1).ravel()
  np.testing.assert_allclose(T.stage_features(m, size=2)[0], expect / np.linalg.norm(expect), rtol=1e-6)
  with pytest.raises(ValueError, match="maps"):
    T.stage_features(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="size"):
    T.stage_features(maps, size=0)


def _two_groups(rng, n=20):
  a = rng.normal(0.0, 0.1, (n, 5)) + np.array([5.0, 0, 0, 0, 0])
  b = rng.normal(0.0, 0.1, (n, 5)) + np.array([0, 0, 0, 0, 5.0])
  x = np.concatenate([a, b])
  scores = np.concatenate([rng.uniform(0.0, 1.0, n), rng.uniform(2.0, 3.0, n)])  # group b is more anomalous
  high = np.arange(2 * n) >= n
  return x, scores, high


def test_kmeans_stages_ranked_by_mean_score_whatever_the_internal_labels():
  rng = np.random.default_rng(1)
  x, scores, high = _two_groups(rng)
  internal = set()
  for seed in range(8):
    perm = rng.permutation(len(x))
    xp, sp, hp = x[perm], scores[perm], high[perm]
    raw = KMeans(n_clusters=2, init="k-means++", n_init=1, random_state=seed).fit_predict(xp)
    internal.add(int(raw[hp][0]))
    st = T.kmeans_stages(xp, sp, k=2, seed=seed, restarts=1)
    assert st.dtype.kind == "i"
    np.testing.assert_array_equal(st, hp.astype(int))
  assert internal == {0, 1}, "the seeds/permutations should exercise both internal K-means orders"


def test_kmeans_stages_three_ranks_and_errors():
  rng = np.random.default_rng(2)
  centers = np.eye(3) * 10
  x = np.concatenate([rng.normal(0, 0.1, (10, 3)) + c for c in centers])
  scores = np.concatenate([np.full(10, 3.0), np.full(10, 1.0), np.full(10, 2.0)])
  np.testing.assert_array_equal(T.kmeans_stages(x, scores, k=3, seed=0), np.repeat([2, 0, 1], 10))
  with pytest.raises(ValueError, match="at least k = 5"):
    T.kmeans_stages(x[:4], scores[:4], k=5, seed=0)
  with pytest.raises(ValueError, match="scores"):
    T.kmeans_stages(x, scores[:5], k=2, seed=0)


def test_staging_metrics_perfect_swapped_random():
  grades = ["mild"] * 30 + ["severe"] * 20
  perfect = np.array([0] * 30 + [1] * 20)
  d = T.staging_metrics(perfect, grades, ("mild", "severe"))
  assert d["staging_accuracy"] == 1.0 and d["staging_accuracy_ranked"] == 1.0
  assert abs(d["staging_nmi"] - 1.0) < 1e-12 and abs(d["staging_ari"] - 1.0) < 1e-12
  assert d["staging_n"] == 50 and d["staging_k"] == 2
  assert d["staging_contingency"] == [[30, 0], [0, 20]] and d["staging_grades"] == ["mild", "severe"]
  d = T.staging_metrics(1 - perfect, grades, ("mild", "severe"))
  assert d["staging_accuracy"] == 1.0 and d["staging_accuracy_ranked"] == 0.0
  assert abs(d["staging_ari"] - 1.0) < 1e-12
  assert "staging_accuracy_ranked" not in T.staging_metrics(perfect, grades)
  rng = np.random.default_rng(3)
  g = rng.choice(["a", "b", "c"], 3000).tolist()
  d = T.staging_metrics(rng.integers(0, 3, 3000), g)
  assert abs(d["staging_ari"]) < 0.01 and d["staging_nmi"] < 0.01
  assert d["staging_accuracy"] < 0.4


def test_staging_metrics_hand_example():
  # Contingency [[2, 1], [1, 3]] (rows stages 0, 1; columns grades a, b).
  stages = [0, 0, 0, 1, 1, 1, 1]
  grades = ["a", "a", "b", "b", "b", "b", "a"]
  d = T.staging_metrics(stages, grades, ("a", "b"))
  assert d["staging_contingency"] == [[2, 1], [1, 3]]
  assert abs(d["staging_accuracy"] - 5 / 7) < 1e-12
  assert abs(d["staging_accuracy_ranked"] - 5 / 7) < 1e-12
  # ARI: sum C(n_ij, 2) = 4, rows and columns sum C(., 2) = 9 each, C(7, 2) = 21:
  # (4 - 81/21) / (9 - 81/21) = 1/36.
  assert abs(d["staging_ari"] - 1 / 36) < 1e-12
  # A table where greedy matching (largest cell first) gets 3 + 0 + 1 but the best one-to-one gets 2 + 2 + 1.
  table = np.array([[3, 2, 0], [2, 0, 0], [0, 0, 1]])
  st, gr = [], []
  for i in range(3):
    for j, name in enumerate("xyz"):
      st += [i] * table[i, j]
      gr += [name] * table[i, j]
  d = T.staging_metrics(st, gr, ("x", "y", "z"))
  assert d["staging_contingency"] == table.tolist()
  assert abs(d["staging_accuracy"] - 5 / 8) < 1e-12
  assert abs(d["staging_accuracy_ranked"] - 4 / 8) < 1e-12
  with pytest.raises(ValueError, match="lacks grades"):
    T.staging_metrics(stages, grades, ("a",))
  with pytest.raises(ValueError, match="one entry per stage"):
    T.staging_metrics(stages, grades[:3])


# ----------------------------------------------------------------------------- segmentation


def test_cleanup_removes_small_keeps_large_fills_holes():
  m = np.zeros((40, 40), bool)
  m[1, 1:4] = True  # 3-pixel blob
  m[10:20, 10:20] = True  # 100-pixel blob
  m[25:35, 25:35] = True  # ring with a 4x4 hole
  m[28:32, 28:32] = False
  for i in range(5):  # diagonal: one component only with 8-connectivity
    m[30 + i, 2 + i] = True
  out = S.cleanup(m, min_size=5)
  assert not out[1, 1:4].any()
  assert out[10:20, 10:20].all()
  assert out[25:35, 25:35].all()
  assert all(out[30 + i, 2 + i] for i in range(5))
  assert out.sum() == 100 + 100 + 5
  assert not S.cleanup(m, min_size=5, fill_holes=False)[28:32, 28:32].any()
  np.testing.assert_array_equal(S.cleanup(m, min_size=0, fill_holes=False), m)


def test_pixel_threshold_and_threshold_segment():
  rng = np.random.default_rng(4)
  normal = rng.random((3, 16, 16))
  assert S.pixel_threshold(normal, 0.95) == np.quantile(normal, 0.95)
  with pytest.raises(ValueError, match="quantile"):
    S.pixel_threshold(normal, 1.5)
  assert not S.threshold_segment(np.zeros((2, 16, 16)), 0.0, min_size=0).any()
  maps = np.zeros((2, 16, 16))
  maps[1, 4:8, 4:8] = 1.0
  maps[1, 12, 12] = 1.0
  seg = S.threshold_segment(maps, 0.5, min_size=4)
  assert seg.shape == (2, 16, 16) and seg[1, 4:8, 4:8].all() and seg.sum() == 16


def _layered(h=40, w=40):
  """Pseudo-healthy image with horizontal layers 0, 1, 2 of intensities 0.2, 0.8, 0.5."""
  layers = np.repeat(np.repeat(np.arange(3), [12, 14, 14])[:, None], w, axis=1)
  return np.array([0.2, 0.8, 0.5])[layers], layers


def test_layer_bounds_and_layerwise_segment():
  rng = np.random.default_rng(5)
  x_hat, layers = _layered()
  n = 6
  xs_hat = np.repeat(x_hat[None], n, axis=0)
  xs = xs_hat + rng.normal(0.0, 0.01, xs_hat.shape)
  v_low, v_high = S.layer_bounds(xs, xs_hat, np.repeat(layers[None], n, axis=0), 4, 0.99, 0.99)
  assert np.all(v_low[:3] > 0.01) and np.all(v_low[:3] < 0.05)
  np.testing.assert_allclose(v_high[:3], [0.2, 0.8, 0.5])
  assert v_low[3] == np.inf  # label 3 absent from the normal images
  d = (xs_hat - xs)[0][layers == 1]
  assert S.layer_bounds(xs[:1], xs_hat[:1], layers[None], 3, 0.5, 1.0)[0][1] == np.quantile(d, 0.5)

  assert not S.layerwise_segment(x_hat, x_hat, layers, v_low, v_high, min_size=0).any()
  # Only pixels darker than their reconstruction count, even with bounds below zero.
  assert not S.layerwise_segment(x_hat, x_hat, layers, np.full(3, -1.0), np.full(3, 2.0), min_size=0).any()
  x = x_hat.copy()
  x[16:22, 10:16] = 0.3  # dark pocket in layer 1: d = 0.5, above v_low, below v_high = 0.8
  x[30, 30] = 0.5 - v_low[2] / 2  # slightly darker noise pixel in layer 2: d below v_low
  x[2:6, 20:26] = 0.05  # layer 0: d = 0.15 < v_high[0] = 0.2, marked
  xh = x_hat.copy()
  xh[2:6, 2:8] = 0.9  # layer 0 reconstructed bright, input black: d = 0.9 > v_high[0], rejected as artefact
  x[2:6, 2:8] = 0.0
  seg = S.layerwise_segment(x, xh, layers, v_low, v_high, min_size=0)
  assert seg[16:22, 10:16].all() and seg[2:6, 20:26].all()
  assert not seg[30, 30] and not seg[2:6, 2:8].any()
  assert seg.sum() == 36 + 24
  only = S.layerwise_segment(x, xh, layers, v_low, v_high, min_size=0, labels=[0, 2])
  assert not only[16:22, 10:16].any() and only[2:6, 20:26].all()
  with pytest.raises(ValueError, match="layers must lie"):
    S.layerwise_segment(x, xh, layers + 3, v_low, v_high, min_size=0)


def test_dice_iou_and_scores():
  a = np.zeros((10, 10), bool)
  b = np.zeros((10, 10), bool)
  a[0:4, 0:4] = True
  b[2:6, 2:6] = True  # overlap 2x2 = 4, sizes 16 + 16, union 28
  dice, iou = S.dice_iou(a, b)
  assert abs(dice - 8 / 32) < 1e-12 and abs(iou - 4 / 28) < 1e-12
  assert S.dice_iou(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)
  assert S.dice_iou(np.zeros_like(a), b) == (0.0, 0.0)
  assert S.dice_iou(a, a) == (1.0, 1.0)

  acc = S.SegmentationScores()
  acc.add(a, b)
  acc.add(a, a)
  other = S.SegmentationScores()
  other.add(np.stack([a, np.zeros_like(a)]), np.zeros((2, 10, 10), bool))  # normal images: 16 and 0 FP pixels
  rows = np.concatenate([acc.to_array(), other.to_array()]).astype(np.int32)  # as gathered over processes
  r = S.SegmentationScores.from_array(rows).result("seg_")
  assert abs(r["seg_dice"] - (0.25 + 1.0) / 2) < 1e-12
  assert abs(r["seg_iou"] - (1 / 7 + 1.0) / 2) < 1e-12
  assert r["seg_n"] == 2 and r["seg_n_normal"] == 2
  assert abs(r["seg_fp_fraction"] - (0.16 + 0.0) / 2) < 1e-12
  assert np.isnan(S.SegmentationScores().result()["seg_dice"])
