"""Exact anomaly-detection metrics in jax.numpy: AUROC, AP, F1-max and AUPRO.

All curve metrics rest on one sort of the scores. XLA's CPU sort is fast only for
a single array of plain integers (a float sort or a sort with a payload uses a
generic comparator and is 5-10x slower), so scores are mapped to order-preserving
uint32 keys, shifted to start near zero and the label is stored in the lowest
bit: one uint32 sort then orders the scores and carries the labels. When the
score range is too wide for that (keys spanning >= 2**31, e.g. logits of both
signs beyond +-2), an exact two-operand sort is used instead (`lax.cond`, so the
function stays jittable with fixed shapes).

Ties are handled as scikit-learn does: the curves are evaluated only at the
last index of each group of equal scores, so equal scores form one ROC/PR step.
Sums are pairwise (log-depth) in float32 over integer counts, so results agree
with scikit-learn's float64 results to ~1e-7 even on 37.5 M pixels.

AUPRO follows the MVTec/anomalib convention: per-region overlap averaged over the
connected components of all ground-truth masks, against the false-positive rate
over all mask-free pixels, integrated up to `fpr_limit` (linear interpolation at
the limit) and divided by it. The components are labelled once on the host
(`mask_regions`, numpy only; masks are fixed data).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mediclip_jax.filters import gaussian_smooth

_SIGN = np.uint32(0x80000000)
_FAST_SPAN = np.uint32(2**31 - 2)  # key - kmin + 1 must fit in 31 bits


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 whose unsigned order equals the float order (finite values)."""
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0.0), x)  # -0.0 -> +0.0 (XLA folds x + 0.0 away)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _key_to_float(key: jax.Array) -> jax.Array:
  """Inverse of `_order_key`."""
  bits = jnp.where(key >= _SIGN, key & ~_SIGN, ~key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _pairwise_sum(x: jax.Array) -> jax.Array:
  """Sum of a 1-D float32 array by halving (error grows with log n, not n)."""
  n = x.shape[0]
  if n == 0:
    return jnp.float32(0.0)
  size = 1 << max(0, math.ceil(math.log2(n)))
  x = jnp.pad(x, (0, size - n))
  while x.shape[0] > 1:
    h = x.shape[0] // 2
    x = x[:h] + x[h:]
  return x[0]


def _shift_right(x: jax.Array) -> jax.Array:
  return jnp.concatenate([jnp.zeros((1,), x.dtype), x[:-1]])


def _sorted_descending(scores: jax.Array, labels: jax.Array, valid: jax.Array | None):
  """Sorts by score, descending, positives first within a tie.

  Returns (gk, code, offset): equal gk means equal score and gk + offset is the
  order key of the score; code is 1 (positive), 0 (negative) or 2 (invalid).
  """
  key = _order_key(jnp.ravel(scores))
  y = jnp.ravel(labels) > 0
  v = jnp.ones_like(y) if valid is None else jnp.ravel(jnp.broadcast_to(valid, jnp.shape(labels))) > 0
  if key.shape[0] == 0:
    return jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), jnp.uint8), jnp.uint32(0)
  kmin = jnp.min(jnp.where(v, key, jnp.uint32(0xFFFFFFFF)))
  kmax = jnp.max(jnp.where(v, key, jnp.uint32(0)))
  fits = (kmax - kmin) <= _FAST_SPAN  # kmax >= kmin whenever any entry is valid

  def fast(_):
    comp = jnp.where(v, ((key - kmin + 1) << 1) | y.astype(jnp.uint32), jnp.uint32(0))
    comp = ~lax.sort(~comp)  # descending; invalid entries (0) go last
    gk = comp >> 1
    code = jnp.where(gk > 0, (comp & 1).astype(jnp.uint8), jnp.uint8(2))
    return gk, code, kmin - 1

  def slow(_):
    order = jnp.where(v, jnp.where(y, 0, 1), 2).astype(jnp.uint8)  # positives first in a tie
    nkey, order = lax.sort((~key, order), num_keys=2)
    code = jnp.where(order == 0, jnp.uint8(1), jnp.where(order == 1, jnp.uint8(0), jnp.uint8(2)))
    return ~nkey, code, jnp.uint32(0)

  return lax.cond(fits, fast, slow, None)


def _curve_stats(scores, labels, valid):
  """Cumulative counts along the descending order, tie-group ends, and the number
  of positives above each element's tie group (what its ROC/PR step starts from)."""
  gk, code, offset = _sorted_descending(scores, labels, valid)
  pos = (code == 1).astype(jnp.int32)
  neg = (code == 0).astype(jnp.int32)
  tp = jnp.cumsum(pos)
  fp = jnp.cumsum(neg)
  is_start = jnp.concatenate([jnp.ones((1,), bool), gk[1:] != gk[:-1]])
  is_end = jnp.concatenate([gk[:-1] != gk[1:], jnp.ones((1,), bool)])
  tp_before = lax.cummax(jnp.where(is_start, tp - pos, 0))  # tp is non-decreasing
  return gk + offset, neg, tp, fp, tp_before, is_end


def _auroc_from(neg, tp, fp, tp_before):
  p = tp[-1]
  n = fp[-1]
  pf = jnp.maximum(p, 1).astype(jnp.float32)
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  # Positives come first in a tie, so at a negative tp counts positives scoring >= it
  # and tp_before those scoring > it: (pairs won + half the ties) per negative.
  term = (tp + tp_before).astype(jnp.float32) / (2.0 * pf)
  auc = _pairwise_sum(jnp.where(neg > 0, term, 0.0)) / nf
  return jnp.where((p > 0) & (n > 0), auc, jnp.nan)


def _ap_from(tp, fp, tp_before, is_end):
  p = tp[-1]
  pf = jnp.maximum(p, 1).astype(jnp.float32)
  prec = tp.astype(jnp.float32) / jnp.maximum(tp + fp, 1).astype(jnp.float32)
  term = ((tp - tp_before).astype(jnp.float32) / pf) * prec
  ap = _pairwise_sum(jnp.where(is_end, term, 0.0))
  return jnp.where(p > 0, ap, jnp.nan)


def _f1_from(key, tp, fp, is_end):
  p = tp[-1]
  f1 = 2.0 * tp.astype(jnp.float32) / jnp.maximum(tp + fp + p, 1).astype(jnp.float32)
  f1 = jnp.where(is_end & (tp + fp > 0), f1, -1.0)
  i = jnp.argmax(f1)
  best = jnp.where(p > 0, jnp.maximum(f1[i], 0.0), jnp.nan)
  return best, _key_to_float(key[i])


@jax.jit
def auroc(scores: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Area under the ROC curve; equals sklearn's roc_auc_score, ties included.
  `valid` (0/1, same shape) drops padded entries. NaN if a class is absent."""
  _, neg, tp, fp, tpb, _ = _curve_stats(scores, labels, valid)
  return _auroc_from(neg, tp, fp, tpb)


@jax.jit
def average_precision(scores: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Step-wise average precision; equals sklearn's average_precision_score."""
  _, _, tp, fp, tpb, end = _curve_stats(scores, labels, valid)
  return _ap_from(tp, fp, tpb, end)


@jax.jit
def f1_max(scores: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(max F1 over all thresholds `score >= t`, the threshold t attaining it)."""
  key, _, tp, fp, _, end = _curve_stats(scores, labels, valid)
  return _f1_from(key, tp, fp, end)


@jax.jit
def binary_metrics(scores: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """AUROC, AP and F1-max (with its threshold) from a single sort."""
  key, neg, tp, fp, tpb, end = _curve_stats(scores, labels, valid)
  f1, thr = _f1_from(key, tp, fp, end)
  return {
      "auroc": _auroc_from(neg, tp, fp, tpb),
      "ap": _ap_from(tp, fp, tpb, end),
      "f1_max": f1,
      "f1_threshold": thr,
  }


# ----------------------------------------------------------------------------- AUPRO


def mask_regions(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
  """Connected components of binary masks (..., H, W), each image separately.

  Returns (labels int32 with the same shape, 0 = background and 1..R the regions
  numbered over the whole stack, R). Runs of foreground pixels are found per row,
  runs touching in adjacent rows are joined by a vectorised union-find, so the
  cost is linear in the number of runs. `connectivity` is 8 (MVTec, anomalib) or 4.
  """
  if connectivity not in (4, 8):
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
  m = np.asarray(masks) != 0
  if m.ndim < 2:
    raise ValueError(f"masks must have shape (..., H, W), got {m.shape}")
  shape = m.shape
  h, w = shape[-2:]
  rows = m.reshape(-1, w)
  nrows = rows.shape[0]
  padded = np.zeros((nrows, w + 2), np.int8)
  padded[:, 1:-1] = rows
  d = np.diff(padded, axis=1)
  sr, sc = np.nonzero(d == 1)  # run starts (row-major order)
  er, ec = np.nonzero(d == -1)  # run ends, exclusive
  nruns = sr.size
  if nruns == 0:
    return np.zeros(shape, np.int32), 0
  parent = np.arange(nruns, dtype=np.int64)
  # Pairs of runs in row r (a) and row r+1 (b) of the same image that touch.
  extra = 1 if connectivity == 8 else 0
  stride = w + 2
  row_key_start = sr.astype(np.int64) * stride + sc
  row_key_end = er.astype(np.int64) * stride + ec
  has_above = (sr % h) != 0
  b_idx = np.nonzero(has_above)[0]
  above = sr[b_idx].astype(np.int64) - 1
  lo = np.searchsorted(row_key_end, above * stride + sc[b_idx] - extra, side="right")
  hi = np.searchsorted(row_key_start, above * stride + ec[b_idx] + extra, side="left")
  cnt = np.maximum(hi - lo, 0)
  a = np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
  b = np.repeat(b_idx, cnt)
  while a.size:
    pa, pb = parent[a], parent[b]
    if np.array_equal(pa, pb):
      break
    lo_p = np.minimum(pa, pb)
    np.minimum.at(parent, pa, lo_p)
    np.minimum.at(parent, pb, lo_p)
    while True:  # pointer jumping to the roots
      nxt = parent[parent]
      if np.array_equal(nxt, parent):
        break
      parent = nxt
  roots, run_label = np.unique(parent, return_inverse=True)
  lengths = ec - sc
  out = np.zeros(nrows * w, np.int32)
  flat_pos = np.flatnonzero(rows)
  out[flat_pos] = np.repeat(run_label.astype(np.int32) + 1, lengths)
  return out.reshape(shape), int(roots.size)


def region_weights(region_labels: np.ndarray, num_regions: int) -> np.ndarray:
  """Per-pixel weight 1/(R*|region|) (0 off the masks): the PRO curve is the cumulative
  sum of these weights over pixels above a threshold."""
  flat = np.asarray(region_labels).ravel()
  if num_regions == 0:
    return np.zeros(flat.shape, np.float32)
  sizes = np.bincount(flat, minlength=num_regions + 1).astype(np.float64)
  wr = np.zeros(num_regions + 1)
  wr[1:] = 1.0 / (num_regions * sizes[1:])
  return wr[flat].astype(np.float32)


@functools.partial(jax.jit, static_argnames=("fpr_limit",))
def aupro_from_regions(scores: jax.Array, positive_index: jax.Array, positive_weight: jax.Array,
                       negative: jax.Array, fpr_limit: float = 0.3) -> jax.Array:
  """Jittable AUPRO core. scores: any shape (flattened); positive_index: flat indices
  of mask pixels; positive_weight: their 1/(R*|region|); negative: 0/1 array marking
  the pixels that count for the false-positive rate (mask-free, valid pixels).

  Each mask pixel p adds weight w_p to the PRO curve once the threshold reaches its
  score; between the false-positive rates just before and at its tie group
  (fpr_lo, fpr_hi) the curve rises linearly, so p's share of the area up to the
  limit L is w_p * [(L - fpr_hi) + (fpr_hi - fpr_lo)/2] when fpr_hi <= L,
  w_p * (L - fpr_lo)^2 / (2 (fpr_hi - fpr_lo)) when the limit cuts the step, else 0.
  """
  key = _order_key(jnp.ravel(scores))
  neg = jnp.ravel(negative) > 0
  n_neg = jnp.sum(neg.astype(jnp.int32))
  neg_sorted = lax.sort(jnp.where(neg, key, jnp.uint32(0xFFFFFFFF)))
  q = key[positive_index]
  left = jnp.searchsorted(neg_sorted, q, side="left").astype(jnp.int32)
  right = jnp.searchsorted(neg_sorted, q, side="right").astype(jnp.int32)
  nf = jnp.maximum(n_neg, 1).astype(jnp.float32)
  fpr_hi = (n_neg - left).astype(jnp.float32) / nf
  fpr_lo = (n_neg - right).astype(jnp.float32) / nf
  lim = jnp.float32(fpr_limit)
  step = fpr_hi - fpr_lo
  full = (lim - fpr_hi) + 0.5 * step
  cut = jnp.square(lim - fpr_lo) / (2.0 * jnp.where(step > 0, step, 1.0))
  area = jnp.where(fpr_hi <= lim, full, jnp.where(fpr_lo < lim, cut, 0.0))
  total = _pairwise_sum(area * positive_weight) / lim
  ok = (n_neg > 0) & (positive_index.shape[0] > 0)
  return jnp.where(ok, total, jnp.nan)


def aupro(maps: jax.Array | np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3,
          valid: np.ndarray | None = None, connectivity: int = 8) -> jax.Array:
  """AUPRO up to `fpr_limit`, normalised by it. maps, masks: (N, H, W); valid: (N,)
  0/1 per image (padding). Components are labelled on the host; the rest is jitted."""
  masks = np.asarray(masks)
  if np.shape(maps) != masks.shape:
    raise ValueError(f"maps shape {np.shape(maps)} differs from masks shape {masks.shape}")
  keep = np.ones(masks.shape, bool)
  if valid is not None:
    keep = np.broadcast_to(np.asarray(valid, bool).reshape((-1,) + (1,) * (masks.ndim - 1)), masks.shape)
  m = (masks != 0) & keep
  regions, r = mask_regions(m, connectivity)
  weights = region_weights(regions, r)
  pos_index = np.flatnonzero(m).astype(np.int32)
  negative = (~m & keep).astype(np.int8)
  return aupro_from_regions(maps, pos_index, weights.ravel()[pos_index], negative, fpr_limit=float(fpr_limit))


# ----------------------------------------------------------------------------- maps


def _to_floats(d: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(d).items()}


def image_metrics(scores: jax.Array | np.ndarray, labels: jax.Array | np.ndarray,
                  valid: jax.Array | np.ndarray | None = None) -> dict[str, float]:
  """Image-level AUROC, AP, F1-max (and its threshold) as Python floats."""
  if np.shape(scores) != np.shape(labels):
    raise ValueError(f"scores shape {np.shape(scores)} differs from labels shape {np.shape(labels)}")
  return _to_floats(binary_metrics(scores, labels, valid))


def pixel_metrics(maps: jax.Array | np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None,
                  sigma: float | None = None, with_aupro: bool = True, fpr_limit: float = 0.3) -> dict[str, float]:
  """Pixel-level AUROC, AP, F1-max pooled over all pixels of all maps (N, H, W), and
  AUPRO up to `fpr_limit`. `sigma` smooths the maps first (None: raw maps, as the
  reference); `valid` (N,) drops padded images."""
  masks = np.asarray(masks)
  if np.shape(maps) != masks.shape or masks.ndim != 3:
    raise ValueError(f"maps {np.shape(maps)} and masks {masks.shape} must both be (N, H, W)")
  if sigma:
    maps = gaussian_smooth(maps, sigma=float(sigma))
  pix_valid = None
  if valid is not None:
    pix_valid = np.broadcast_to(np.asarray(valid, np.int8).reshape(-1, 1, 1), masks.shape)
  out = _to_floats(binary_metrics(maps, (masks != 0).astype(np.int8), pix_valid))
  if with_aupro:
    out["aupro"] = float(aupro(maps, masks, fpr_limit=fpr_limit, valid=valid))
  return out
