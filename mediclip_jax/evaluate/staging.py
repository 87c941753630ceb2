"""Unsupervised anomaly staging: cluster anomaly maps, rank the clusters by anomaly score, and compare
the stages with known grades.

Method-agnostic and host-only (numpy, scikit-learn, scipy): any method's anomaly maps (SSL-AnoVAE's
residuals |x - x_hat|, MediCLIP's maps, ...) can be staged.

  features = stage_features(maps)                     # (N, size*size), rows of unit L2 norm
  stages = kmeans_stages(features, scores, k, seed)   # 0 = lowest mean score ("early") .. k-1
  staging_metrics(stages, grades, ("mild", "severe"))

K-means labels are arbitrary, so the clusters are renumbered by the mean anomaly score of their
members: the stage is then comparable across seeds and runs, and with grades given in order of
severity the ranked assignment (stage i <-> grade_order[i]) is a test of the ordering itself, while
the best one-to-one matching (Hungarian) only tests that the partition agrees with the grades.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of area averaging: output cell i covers [i, i+1) * n_in/n_out input pixels,
  each input pixel weighted by its overlap with the cell (fractional at the edges); rows sum to 1."""
  edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
  lo, hi = edges[:-1, None], edges[1:, None]
  px = np.arange(n_in, dtype=np.float64)[None, :]
  overlap = np.clip(np.minimum(hi, px + 1.0) - np.maximum(lo, px), 0.0, None)
  return overlap / overlap.sum(axis=1, keepdims=True)


def stage_features(maps: np.ndarray, size: int = 64) -> np.ndarray:
  """(N, H, W) anomaly maps -> (N, size*size) float32 features for clustering.

  Each map is resized to size x size by area averaging (every output cell is the mean of the input
  pixels it covers, partial pixels weighted by their overlap, as OpenCV's INTER_AREA; it neither
  aliases when shrinking nor needs H, W divisible by size), flattened and divided by its L2 norm, so
  the clusters group maps by where the anomaly lies and how it is shaped rather than by its overall
  strength (which the ranking by score uses). A zero map stays a zero row.
  """
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive integer, got {size!r}")
  m = np.asarray(maps, np.float32)
  if m.ndim != 3:
    raise ValueError(f"maps must have shape (N, H, W), got {m.shape}")
  if not np.all(np.isfinite(m)):
    raise ValueError("maps must be finite (found NaN or inf)")
  n, h, w = m.shape
  rows = _area_matrix(h, size).astype(np.float32)
  cols = _area_matrix(w, size).astype(np.float32)
  small = np.matmul(np.matmul(rows, m), cols.T).reshape(n, size * size)
  norm = np.linalg.norm(small.astype(np.float64), axis=1, keepdims=True)
  return np.where(norm > 0, small / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def kmeans_stages(features: np.ndarray, scores: np.ndarray, k: int, seed: int, restarts: int = 10) -> np.ndarray:
  """K-means stages of N images: (N,) int64 in 0..k-1, ranked by mean anomaly score.

  features: (N, D), e.g. from `stage_features`; scores: (N,) image anomaly scores (higher = more
  anomalous). K-means uses k-means++ seeding with `restarts` initialisations (the best inertia is
  kept), seeded by `seed`. The clusters are then renumbered by the mean score of their members,
  ascending: stage 0 is the least anomalous ("early"), k-1 the most ("advanced"); equal means keep
  K-means' order. Should K-means leave a cluster empty (fewer than k distinct feature rows), the
  stages used are 0..m-1 for the m non-empty clusters.
  """
  x = np.asarray(features)
  s = np.asarray(scores, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must have shape (N, D), got {x.shape}")
  if s.shape != (x.shape[0],):
    raise ValueError(f"scores must have shape (N,) = ({x.shape[0]},) like features, got {s.shape}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  if not isinstance(restarts, (int, np.integer)) or restarts < 1:
    raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
  if x.shape[0] < k:
    raise ValueError(f"kmeans_stages needs at least k = {k} images, got N = {x.shape[0]}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(s))):
    raise ValueError("features and scores must be finite (found NaN or inf)")
  km = KMeans(n_clusters=int(k), init="k-means++", n_init=int(restarts), random_state=int(seed))
  labels = km.fit_predict(x)
  counts = np.bincount(labels, minlength=k)
  sums = np.bincount(labels, weights=s, minlength=k)
  means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)  # empty clusters rank last
  order = np.argsort(means, kind="stable")
  rank = np.empty(k, np.int64)
  rank[order] = np.arange(k)
  return rank[labels]


def staging_metrics(stages: Sequence[int] | np.ndarray, grades: Sequence[str],
                    grade_order: Sequence[str] | None = None) -> dict:
  """Agreement of stages (N,) non-negative ints with known grades (N,) strings.

  Returns (prefix "staging_"):
    accuracy: fraction of images whose stage maps to their grade under the best one-to-one matching
      of stages to grades (Hungarian on the contingency table; with more stages than grades, or the
      reverse, images of unmatched stages or grades count as wrong);
    accuracy_ranked (only when grade_order is given): the same with stage i <-> grade_order[i], i.e.
      whether the score ranking puts the grades in their order of severity;
    nmi: normalised mutual information (arithmetic mean normalisation, scikit-learn's default);
    ari: adjusted Rand index (0 in expectation for random stages, 1 for identical partitions);
    n: number of images; k: number of distinct stages present;
    grades: the column names of the table (grade_order when given, else the sorted grades);
    contingency: nested list, row i = stage i (0..max stage), column j = grades[j], entries = counts.
  """
  st = np.asarray(stages)
  if st.ndim != 1 or (st.size and st.dtype.kind not in "iu"):
    raise ValueError(f"stages must be a 1-D integer array, got dtype {st.dtype} and shape {st.shape}")
  if st.size == 0:
    raise ValueError("stages must hold at least one image, got none")
  if st.min() < 0:
    raise ValueError(f"stages must be non-negative, got a minimum of {st.min()}")
  gr = [str(g) for g in grades]
  if len(gr) != st.size:
    raise ValueError(f"grades must have one entry per stage ({st.size}), got {len(gr)}")
  if grade_order is None:
    names = sorted(set(gr))
  else:
    names = [str(g) for g in grade_order]
    if len(set(names)) != len(names):
      raise ValueError(f"grade_order must not repeat a grade, got {names}")
    missing = sorted(set(gr) - set(names))
    if missing:
      raise ValueError(f"grade_order {names} lacks grades present in grades: {missing}")
  col = {g: j for j, g in enumerate(names)}
  g_idx = np.array([col[g] for g in gr], np.int64)
  table = np.zeros((int(st.max()) + 1, len(names)), np.int64)
  np.add.at(table, (st.astype(np.int64), g_idx), 1)
  r, c = linear_sum_assignment(table, maximize=True)
  n = st.size
  out = {
      "staging_accuracy": float(table[r, c].sum() / n),
      "staging_nmi": float(normalized_mutual_info_score(g_idx, st)),
      "staging_ari": float(adjusted_rand_score(g_idx, st)),
      "staging_n": int(n),
      "staging_k": int(np.unique(st).size),
      "staging_grades": names,
      "staging_contingency": table.tolist(),
  }
  if grade_order is not None:
    d = min(table.shape)
    out["staging_accuracy_ranked"] = float(np.trace(table[:d, :d]) / n)
  return out
