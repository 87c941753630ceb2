"""Unsupervised retinal layer labels of an OCT B-scan by graph search on its vertical gradient.

SSL-AnoVAE's layer-wise segmentation compares an input with its pseudo-healthy reconstruction within each
retinal layer. The paper labelled the layers with a trained, domain-adapted segmentation network (P-Net's
structure extraction U-Net), which we do not have; instead the boundaries are traced here without any
labels, by the classical OCT method (Chiu et al. 2010, "Automatic segmentation of seven retinal layers in
SDOCT images congruent with expert manual segmentation"): each boundary is a minimum-cost left-to-right
path through a cost image made from the signed vertical intensity gradient, found by dynamic programming
with the path moving at most `max_step` rows per column.

Chiu et al. confine each search to an anatomical region. Here the regions come from the image: a first
pass places all n boundaries in every column at once, in order and at least `min_gap` rows apart,
maximising their summed signed gradient (a 1-D dynamic programme per column, so no boundary can skip over
a weaker edge to a stronger one further down); the paths are then traced top to bottom, each below the
previous path and above the next boundary's first-pass position. Host-only numpy/scipy; applied to
phantom images (data_pipelines/oct_phantom.py) and to blurry VAE reconstructions alike.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_OUTSIDE = 1e3  # path cost per pixel outside a boundary's search region (a path always exists)


def _check(image: np.ndarray, n_boundaries: int, smoothing: float, signs, max_step: int,
           min_gap: int) -> tuple[np.ndarray, np.ndarray | None]:
  img = np.asarray(image, np.float64)
  if img.ndim != 2:
    raise ValueError(f"image must have shape (H, W), got {img.shape}")
  if not isinstance(n_boundaries, (int, np.integer)) or n_boundaries < 1:
    raise ValueError(f"n_boundaries must be a positive integer, got {n_boundaries!r}")
  if not isinstance(min_gap, (int, np.integer)) or min_gap < 1:
    raise ValueError(f"min_gap must be a positive integer (rows), got {min_gap!r}")
  if n_boundaries * min_gap >= img.shape[0]:
    raise ValueError(f"n_boundaries={n_boundaries} boundaries {min_gap} rows apart do not fit in "
                     f"{img.shape[0]} rows")
  if not isinstance(max_step, (int, np.integer)) or max_step < 1:
    raise ValueError(f"max_step must be a positive integer (rows per column), got {max_step!r}")
  if smoothing < 0:
    raise ValueError(f"smoothing must be >= 0 (Gaussian sigma in rows), got {smoothing}")
  if signs is None:
    return img, None
  s = np.asarray(signs)
  if s.shape != (n_boundaries,) or not np.isin(s, (-1, 1)).all():
    raise ValueError(f"signs must be None or {n_boundaries} values of +1 (dark above bright) or -1 "
                     f"(bright above dark), got {signs!r}")
  return img, s.astype(np.float64)


def _gradient(img: np.ndarray, smoothing: float) -> np.ndarray:
  """Row y minus row y - 1 of the smoothed image (0 in row 0), scaled to a maximum magnitude of 1: an
  edge peaks in the first row below it."""
  if smoothing > 0:
    img = ndimage.gaussian_filter(img, (smoothing, 3 * smoothing), mode="nearest")
  g = np.zeros_like(img)
  g[1:] = img[1:] - img[:-1]
  return g / max(float(np.abs(g).max()), 1e-12)


def _peaks(score: np.ndarray) -> np.ndarray:
  """score (..., H, W) kept only at its positive local maxima along H (first row of a plateau), else 0:
  an edge blurred over two rows counts once, so two boundaries cannot share it."""
  up = np.full_like(score, -np.inf)
  up[..., 1:, :] = score[..., :-1, :]
  down = np.full_like(score, -np.inf)
  down[..., :-1, :] = score[..., 1:, :]
  return np.where((score > up) & (score >= down) & (score > 0), score, 0.0)


def _ordered_columns(score: np.ndarray, min_gap: int) -> np.ndarray:
  """Rows (n, W) maximising sum_k score[k, row_k, x] per column x with row_0 >= 1 and
  row_k >= row_{k-1} + min_gap: the first pass."""
  n, h, w = score.shape
  rows_ix = np.arange(h)[:, None]
  value, back = score[0].copy(), []
  value[0] = -np.inf
  for k in range(1, n):
    best = np.maximum.accumulate(value, axis=0)
    arg = np.maximum.accumulate(np.where(value == best, rows_ix, 0), axis=0)
    shifted = np.full((h, w), -np.inf)
    shifted[min_gap:] = best[:-min_gap]
    from_row = np.zeros((h, w), np.int64)
    from_row[min_gap:] = arg[:-min_gap]
    value = score[k] + shifted
    back.append(from_row)
  out = np.empty((n, w), np.int64)
  out[-1] = np.argmax(value, axis=0)
  cols = np.arange(w)
  for k in range(n - 1, 0, -1):
    out[k - 1] = back[k - 1][out[k], cols]
  return out


def _path(cost: np.ndarray, max_step: int) -> np.ndarray:
  """The minimum-cost left-to-right path through cost (H, W), moving at most max_step rows per column:
  its row in every column."""
  h, w = cost.shape
  total = np.empty((h, w))
  came = np.empty((h, w), np.int64)
  total[:, 0] = cost[:, 0]
  padded = np.full(h + 2 * max_step, np.inf)
  window = np.lib.stride_tricks.sliding_window_view(padded, 2 * max_step + 1)  # (H, 2m + 1), a view of padded
  ix = np.arange(h)
  for x in range(1, w):
    padded[max_step:max_step + h] = total[:, x - 1]
    j = window.argmin(axis=1)
    total[:, x] = cost[:, x] + window[ix, j]
    came[:, x] = j - max_step
  rows = np.empty(w, np.int64)
  rows[-1] = int(np.argmin(total[:, -1]))
  for x in range(w - 1, 0, -1):
    rows[x - 1] = rows[x] + came[rows[x], x]
  return rows


def trace_boundaries(image: np.ndarray, n_boundaries: int, smoothing: float = 0.5,
                     signs: Sequence[int] | None = None, max_step: int = 2, min_gap: int = 1) -> np.ndarray:
  """Rows (n_boundaries, W) int64 of the boundaries, top to bottom: in each column the first row below
  the boundary. `signs[k]` is +1 when boundary k goes from dark (above) to bright, -1 for bright to dark;
  None detects them (the first pass then uses the gradient's magnitude). `smoothing` is the Gaussian sigma
  in rows (3x that across columns) applied before the gradient."""
  img, s = _check(image, n_boundaries, smoothing, signs, max_step, min_gap)
  h, w = img.shape
  g = _gradient(img, smoothing)
  broad = ndimage.gaussian_filter1d(g, max(3.0, 3 * smoothing), axis=1, mode="nearest")
  if s is None:  # either sign, each with its own peaks (a rise right above a fall keeps both)
    score = np.broadcast_to(np.maximum(_peaks(broad), _peaks(-broad)), (n_boundaries, h, w))
  else:
    score = _peaks(s[:, None, None] * broad[None])
  first = _ordered_columns(score, min_gap)
  first = ndimage.median_filter(first, size=(1, 7), mode="nearest")
  cols = np.arange(w)
  if s is None:
    s = np.where(g[first, cols].sum(axis=1) >= 0, 1.0, -1.0)
  rows_ix = np.arange(h)[:, None]
  out = np.empty((n_boundaries, w), np.int64)
  for k in range(n_boundaries):
    lo = out[k - 1] + min_gap if k else np.ones(w, np.int64)
    hi = first[k + 1] - min_gap if k + 1 < n_boundaries else np.full(w, h - 1)
    hi = np.maximum(hi, lo)
    cost = 1.0 - s[k] * g + _OUTSIDE * ((rows_ix < lo) | (rows_ix > hi))
    out[k] = _path(cost, max_step)
  return out


def boundaries_to_labels(rows: np.ndarray, height: int) -> np.ndarray:
  """(height, W) int32 labels from boundary rows (n, W): 0 above the first boundary, k between boundaries
  k - 1 and k, n below the last (rows[k] is the first row of label k + 1)."""
  rows = np.asarray(rows)
  return np.sum(np.arange(height)[None, :, None] >= rows[:, None, :], axis=0).astype(np.int32)


def extract_layers(image: np.ndarray, n_boundaries: int, smoothing: float = 0.5,
                   signs: Sequence[int] | None = None, max_step: int = 2, min_gap: int = 1) -> np.ndarray:
  """(H, W) int32 layer labels of an OCT B-scan (H, W) in [0, 1], as the phantom's `layers`: 0 above the
  first of `n_boundaries` traced boundaries, then the bands top to bottom, n_boundaries below the last.
  See `trace_boundaries` for the arguments (the phantom's are oct_phantom.N_BOUNDARIES, EDGE_SIGNS)."""
  rows = trace_boundaries(image, n_boundaries, smoothing, signs, max_step, min_gap)
  return boundaries_to_labels(rows, np.shape(image)[0])
