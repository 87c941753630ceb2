"""Pixel metrics of arbitrarily large test sets in bounded memory: a histogram over score bins.

`metrics.pixel_metrics` sorts every pixel of every map, so the maps must all be held (20,000
images at 224 px are 1e9 pixels). `PixelHistogram` instead takes maps batch by batch and keeps,
per bin of the score, the number of mask and mask-free pixels and the AUPRO weight (each pixel of
a connected mask region adds 1/area of its region), so its memory depends only on the number of
bins. From these it gives pixel AUROC, AP, F1-max and AUPRO together with a rigorous bound on
the distance to the exact values (what `metrics.pixel_metrics` gives on all pixels):

  |histogram value - exact value| <= *_error_bound   (in exact arithmetic)

Bins. A score is cast to float32 (as the exact metrics do) and mapped to its order key, the
uint32 whose unsigned order is the float order (`metrics._order_key`); the bin is the top
`bits` bits of the key. The bins are scale-free (relative width 2**-(bits - 9) within a binade:
2**-11 at the default 20 bits) and cover any finite score, negative logits included. Probability
maps saturating near 1 (1 - 1e-6 ...) need `probability=True`, which bins 1 - x above 0.5.

Every bin edge is a threshold the exact curves also pass through (`score >= lowest value of the
bin`), so the histogram curves are the exact curves sampled at the bin edges: what is unknown is
only the order of pixels inside one bin. A bin whose pixels all have one value is a true tie
group (nothing unknown); every bin keeps its smallest and largest score, so such bins add
nothing to the bounds. The bounds (sums over bins b holding more than one value; p_b, n_b mask /
mask-free pixels, P, N their totals, TP_b, FP_b the counts at or above b, A_b = TP_b - p_b,
F_b = FP_b - n_b those above b):

- AUROC (bins as tie groups): 0.5 * sum_b p_b n_b / (P N).
- AP (sum over distinct thresholds of recall step x precision, as scikit-learn): a bin's share
  of the exact AP lies in [lo_b, hi_b], hi_b = p_b TP_b / (TP_b + F_b) / P (all its mask
  pixels first, in one tie), lo_b = (p_b - FP_b ln(1 + p_b / (A_b + FP_b))) / P (the integral
  below sum_{k=1..p_b} (A_b + k) / (A_b + k + FP_b), the minimum: all its mask-free pixels first,
  each mask pixel its own value); bound = sum_b max(hi_b - h_b, h_b - lo_b) with h_b the
  histogram's share. That share takes the bin's mask and mask-free pixels as evenly interleaved
  (as the AUROC's tie rule and AUPRO's linear interpolation do): h_b = (p_b^2 / (p_b + n_b) +
  (A_b n_b - F_b p_b) p_b / (p_b + n_b)^2 ln(1 + (p_b + n_b) / (A_b + F_b))) / P, the integral of
  the precision along the bin; ~100x closer to the exact AP than one step per bin (which would
  be the AP of the scores rounded to the bin edges). Unlike the others, AP also depends on the
  order among mask pixels, so a bin holding only mask pixels of several values is not exact for AP.
- F1-max: the histogram maximum over bin edges is <= the exact one, and any threshold inside bin b
  gives F1 <= 2 TP_b / (P + TP_b + F_b); bound = max_b of that - the histogram value.
- AUPRO: the exact PRO curve runs between consecutive bin edges inside the box
  [FPR_(b+1), FPR_b] x [PRO_(b+1), PRO_b] and the histogram takes its diagonal: bound =
  (sum_b 0.5 dFPR_b dPRO_b  + at the bin cut by fpr_limit L, with a = L - FPR_(b+1):
  max(e, a dPRO_b - e), e = dPRO_b a^2 / (2 dFPR_b)) / L.

AUROC, F1 and AUPRO are exact (bound 0) when every bin holding both mask and mask-free pixels
holds one value; AP also needs every bin with several mask pixels to hold one value, unless no
mask-free pixel scores at or above it.
Results are computed in float64; the bounds do not include float rounding (~1e-12 here, ~1e-6 in
the float32 exact metrics).

The accumulator sees the maps as given: Gaussian smoothing (`metrics.gaussian_smooth`) is the
caller's, before `update`. Memory at `bits` = 20: 2**20 bins x (2 int64 counts + float64 weight
+ 2 uint32 extreme scores) = 32 MiB plus 6 MiB of work buffers, whatever the number of images
(halving per bit less; track_values=False drops the extremes). Only numpy computes (the mask
regions are labelled by `metrics.mask_regions`, 8-connectivity, per image as the exact AUPRO).

Several processes: each accumulates its own share, `to_array()` gives one uint32 array (bit-exact
through 32-bit transports such as `multihost_utils.process_allgather` without x64), and
`PixelHistogram.combine(rows)` sums the gathered rows (`merge` adds two accumulators).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mediclip_jax.evaluate.metrics import mask_regions

_SIGN = np.uint32(0x80000000)
_MOST_NEGATIVE_KEY = 0x00800000  # order key of -FLT_MAX; smaller keys are -inf and NaNs
_HALF_KEY = 0xBF000000  # order key of 0.5
_CHUNK = 1 << 18  # pixels per step of `update`
_MAGIC = 0x50485354  # "PHST", first word of `to_array`
_HEADER = 7  # magic, bits, connectivity, probability, track_values, regions (low, high word)


def _order_key_into(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
  """Writes the order keys of float32 `x` into uint32 `out` (may share memory with x), using uint32 `tmp`."""
  np.add(x, np.float32(0.0), out=out.view(np.float32))  # -0.0 + 0.0 = +0.0
  np.right_shift(out.view(np.int32), 31, out=tmp.view(np.int32))  # all ones if negative, else 0
  np.bitwise_or(tmp, _SIGN, out=tmp)
  np.bitwise_xor(out, tmp, out=out)  # negative: ~bits; positive: bits | sign bit
  return out


def order_key(x: np.ndarray) -> np.ndarray:
  """float32 -> uint32 whose unsigned order is the float order (as `metrics._order_key`; -0.0 as +0.0)."""
  x = np.asarray(x, np.float32)
  return _order_key_into(x, np.empty(x.shape, np.uint32), np.empty(x.shape, np.uint32))


def key_to_float(key: int) -> float:
  """The float32 value of an order key (inverse of `order_key`)."""
  key = np.uint32(key)
  bits = key & ~_SIGN if key >= _SIGN else ~key
  return float(np.array(bits, np.uint32).view(np.float32))


class PixelHistogram:
  """Pixel AUROC, AP, F1-max and AUPRO with error bounds, from maps given batch by batch.

  bits: the bins are the top `bits` bits of the float32 order key (8..24; 20 -> 2**20 bins,
    relative width 2**-11, 32 MiB + 6 MiB work buffers).
  connectivity: of the mask regions for AUPRO (8 as MVTec/anomalib).
  probability: the maps are probabilities in [0, 1] (else ValueError); above 0.5 the key is taken of
    1 - x (exact in float32 there) and mirrored, so the bins are relative in min(x, 1 - x): as fine
    near 1 as near 0 (saturated maps such as 1 - 1e-6 are resolved; with plain keys the bins near 1
    are 2**-12 wide, the float32 spacing there is 6e-8).
  track_values: keep each bin's smallest and largest score (8 bytes per bin, ~1/3 of the update
    time): bins holding one value then add nothing to the bounds, and the F1 threshold is a score
    of the data. Without, every non-empty bin counts as holding several values (bounds conservative).
  """

  def __init__(self, bits: int = 20, connectivity: int = 8, probability: bool = False,
               track_values: bool = True):
    if not 8 <= int(bits) <= 24:
      raise ValueError(f"bits must be in 8..24, got {bits}")
    if connectivity not in (4, 8):
      raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    self.bits = int(bits)
    self.connectivity = int(connectivity)
    self.probability = bool(probability)
    self.track_values = bool(track_values)
    self._shift = np.uint32(32 - self.bits)
    nb = 1 << self.bits
    self._counts = np.zeros((nb, 2), np.int64)  # [:, 0] mask-free, [:, 1] mask pixels
    self._weight = np.zeros(nb, np.float64)  # sum over mask pixels of 1/area of their region
    self._min = np.full(nb if track_values else 0, 0xFFFFFFFF, np.uint32)  # smallest key per bin
    self._max = np.zeros(nb if track_values else 0, np.uint32)  # largest key per bin
    self._regions = 0
    # Per-chunk work buffers: updates run over chunks of `_CHUNK` pixels with no new large arrays.
    self._buf_key = np.empty(_CHUNK, np.uint32)
    self._buf_tmp = np.empty(_CHUNK, np.uint32)
    self._buf_key2 = np.empty(_CHUNK if probability else 0, np.uint32)
    self._buf_bins = np.empty(_CHUNK, np.intp)
    self._buf_idx = np.empty(_CHUNK, np.intp)
    self._buf_mask = np.empty(_CHUNK, bool)

  # --------------------------------------------------------------------------- accumulate

  @property
  def num_bins(self) -> int:
    return 1 << self.bits

  @property
  def num_regions(self) -> int:
    return self._regions

  @property
  def num_positive(self) -> int:
    return int(self._counts[:, 1].sum())

  @property
  def num_negative(self) -> int:
    return int(self._counts[:, 0].sum())

  @property
  def nbytes(self) -> int:
    """Bytes held by the accumulator's arrays (constant: set by `bits` and `track_values`)."""
    return sum(a.nbytes for a in (self._counts, self._weight, self._min, self._max, self._buf_key,
                                  self._buf_tmp, self._buf_key2, self._buf_bins, self._buf_idx, self._buf_mask))

  def _keys(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Order keys of finite float32 scores x (1-D; mirrored above 0.5 for probabilities), into `out`
    (a view of the work buffers) or a new array."""
    n = x.shape[0]
    own = out is None
    out = np.empty(n, np.uint32) if own else out
    tmp = np.empty(n, np.uint32) if own else self._buf_tmp[:n]
    _order_key_into(x, out, tmp)
    if self.probability:
      d = np.empty(n, np.uint32) if own else self._buf_key2[:n]
      np.subtract(np.float32(1.0), x, out=d.view(np.float32))  # exact for x >= 0.5
      _order_key_into(d.view(np.float32), d, tmp)
      np.subtract(np.uint32(_HALF_KEY), d, out=d)  # wraps (unused) for x < 0.5
      np.add(d, np.uint32(_HALF_KEY), out=d)
      above = np.empty(n, bool) if own else self._buf_mask[:n]
      np.greater(x, np.float32(0.5), out=above)
      np.copyto(out, d, where=above)
    return out

  def update(self, maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Adds a batch: maps (b, H, W) float (as given: smooth them first if wanted; cast to float32
    as the exact metrics do), masks (b, H, W) 0/1 or bool; valid (b,) drops padded images. Raises
    ValueError on a non-finite map value, naming the offending indices within the batch."""
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.shape != masks.shape or maps.ndim != 3:
      raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (b, H, W)")
    if valid is not None:
      keep = np.asarray(valid, bool).reshape(-1)
      if keep.shape[0] != maps.shape[0]:
        raise ValueError(f"valid has {keep.shape[0]} entries for {maps.shape[0]} maps")
      maps, masks = maps[keep], masks[keep]
    if maps.size == 0:
      return
    x = np.ascontiguousarray(maps, np.float32)
    lo_x, hi_x = x.min(), x.max()  # NaN if any is
    if not (np.isfinite(lo_x) and np.isfinite(hi_x)):
      bad = np.flatnonzero(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
      raise ValueError(f"non-finite values in the maps at batch indices {bad.tolist()}")
    if self.probability and (lo_x < 0 or hi_x > 1):
      raise ValueError(f"probability maps must lie in [0, 1], got [{lo_x}, {hi_x}]")
    xf, mf = x.reshape(-1), masks.reshape(-1)
    counts = self._counts.reshape(-1)  # bin b, mask m at 2 b + m
    for i in range(0, xf.shape[0], _CHUNK):
      n = min(_CHUNK, xf.shape[0] - i)
      key = self._keys(xf[i:i + n], self._buf_key[:n])
      bins = self._buf_bins[:n]
      np.right_shift(key, self._shift, out=bins)
      if self.track_values:
        np.minimum.at(self._min, bins, key)
        np.maximum.at(self._max, bins, key)
      m = self._buf_mask[:n]
      np.not_equal(mf[i:i + n], 0, out=m)
      idx = self._buf_idx[:n]
      np.left_shift(bins, 1, out=idx)
      np.bitwise_or(idx, m, out=idx)
      np.add.at(counts, idx, 1)
    mb = masks != 0
    has = mb.any(axis=(1, 2))
    if has.any():
      # Regions per image, on the images with a mask cropped to the masks' bounding box.
      sub = mb[has]
      rows, cols = np.flatnonzero(sub.any(axis=(0, 2))), np.flatnonzero(sub.any(axis=(0, 1)))
      box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
      sub = sub[box]
      labels, r = mask_regions(sub, self.connectivity)
      lab = labels[sub]
      area = np.bincount(lab, minlength=r + 1)
      mask_bins = (self._keys(x[has][box][sub]) >> self._shift).astype(np.intp)
      np.add.at(self._weight, mask_bins, 1.0 / area[lab])
      self._regions += r

  def merge(self, other: PixelHistogram) -> PixelHistogram:
    """Adds `other` (same settings) into this accumulator; returns self."""
    mine = (self.bits, self.connectivity, self.probability, self.track_values)
    theirs = (other.bits, other.connectivity, other.probability, other.track_values)
    if mine != theirs:
      raise ValueError(f"cannot merge a histogram with bits/connectivity/probability/track_values {theirs} "
                       f"into one with {mine}")
    self._counts += other._counts
    self._weight += other._weight
    np.minimum(self._min, other._min, out=self._min)
    np.maximum(self._max, other._max, out=self._max)
    self._regions += other._regions
    return self

  # --------------------------------------------------------------------------- serialise

  def to_array(self) -> np.ndarray:
    """The whole state as one 1-D uint32 array (fixed length for given settings), bit-exact through
    transports that keep 32-bit integers, e.g. `parallel.gather_rows(acc.to_array()[None])`."""
    r = np.array([self._regions], np.int64).view(np.uint32)
    header = np.array([_MAGIC, self.bits, self.connectivity, self.probability, self.track_values,
                       r[0], r[1]], np.uint32)
    return np.concatenate([header, self._counts.ravel().view(np.uint32), self._weight.view(np.uint32),
                           self._min, self._max])

  @classmethod
  def from_array(cls, a: np.ndarray) -> PixelHistogram:
    """Inverse of `to_array`."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.dtype.itemsize == 4:
      a = a.view(np.uint32)  # e.g. gathered as int32
    a = np.ascontiguousarray(a, np.uint32).ravel()
    if a.size < _HEADER or a[0] != _MAGIC:
      raise ValueError("not an array made by PixelHistogram.to_array")
    h = cls(bits=int(a[1]), connectivity=int(a[2]), probability=bool(a[3]), track_values=bool(a[4]))
    nb = h.num_bins
    nv = nb if h.track_values else 0
    if a.size != _HEADER + 6 * nb + 2 * nv:
      raise ValueError(f"array of {a.size} words does not hold a {h.bits}-bit histogram")
    h._regions = int(a[5:7].copy().view(np.int64)[0])
    o = _HEADER
    h._counts[:] = a[o:o + 4 * nb].view(np.int64).reshape(nb, 2)
    o += 4 * nb
    h._weight[:] = a[o:o + 2 * nb].view(np.float64)
    o += 2 * nb
    h._min[:] = a[o:o + nv]
    h._max[:] = a[o + nv:]
    return h

  @classmethod
  def combine(cls, arrays: Iterable[np.ndarray] | np.ndarray) -> PixelHistogram:
    """The sum of several `to_array` states (an iterable, or a 2-D array with one per row)."""
    out = None
    for a in arrays:
      h = cls.from_array(a)
      out = h if out is None else out.merge(h)
    if out is None:
      raise ValueError("no arrays to combine")
    return out

  # --------------------------------------------------------------------------- results

  def _key_value(self, key: int) -> float:
    """The score of a key (inverse of `_keys`)."""
    if self.probability and key > _HALF_KEY:
      return float(np.float32(1.0) - np.float32(key_to_float(2 * _HALF_KEY - key)))
    return key_to_float(key)

  def _edge_value(self, b: int) -> float:
    """A threshold t with `score >= t` selecting exactly the bins >= b: the bin's smallest score
    when tracked, else the smallest float32 of the bin."""
    if self.track_values:
      return self._key_value(int(self._min[b]))
    edge = b << int(self._shift)
    if self.probability and edge > _HALF_KEY:
      # Scores x > 0.5 are in the bins >= b iff 1 - x <= d, d the largest float32 with key <= 2 K - edge.
      v = 1.0 - key_to_float(2 * _HALF_KEY - edge)  # exact in float64
      t = np.float32(v)
      return float(t if t >= v else np.nextafter(t, np.float32(2.0)))
    return key_to_float(max(edge, _MOST_NEGATIVE_KEY))

  def result(self, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pixel_f1_max, pixel_f1_threshold, pixel_aupro (up to `fpr_limit`),
    and each metric with `*_error_bound` (|value - exact| <= bound). NaN (value and bound) where the
    exact metric is undefined: AUROC without both classes, AP/F1 without mask pixels, AUPRO without
    regions or mask-free pixels. pixel_f1_threshold: `map >= t` selects exactly the pixels counted
    at the histogram's F1-max (the smallest score of the chosen bin; without track_values the
    smallest float32 of the bin). It has no bound: the exact F1-max may be reached elsewhere."""
    if not 0.0 < fpr_limit <= 1.0:
      raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    nan = float("nan")
    idx = np.flatnonzero(self._counts[:, 0] | self._counts[:, 1])[::-1]  # non-empty bins, highest first
    n = self._counts[idx, 0].astype(np.float64)
    p = self._counts[idx, 1].astype(np.float64)
    w = self._weight[idx]
    # Bins whose inner order is unknown: more than one value.
    mixed = self._min[idx] != self._max[idx] if self.track_values else np.ones(idx.size, bool)
    tp, fp = np.cumsum(p), np.cumsum(n)
    tpa, fpa = tp - p, fp - n  # counts above the bin
    big_p, big_n = (float(tp[-1]), float(fp[-1])) if idx.size else (0.0, 0.0)
    out = {}

    # AUROC: mask-free pixels of a bin beat the mask pixels above it and tie half with those in it.
    if big_p > 0 and big_n > 0:
      out["pixel_auroc"] = float(np.sum(n * (tpa + 0.5 * p)) / (big_p * big_n))
      out["pixel_auroc_error_bound"] = float(0.5 * np.sum(np.where(mixed, p * n, 0.0)) / (big_p * big_n))
    else:
      out["pixel_auroc"] = out["pixel_auroc_error_bound"] = nan

    if big_p > 0:
      # AP: a bin's share (recall step x precision) lies in [lo, hi]; a bin of one value is one step.
      tie = p * tp / (tp + fp) / big_p
      hi = p * tp / np.maximum(tp + fpa, 1.0) / big_p  # all its mask pixels first, in one tie
      # All its mask-free pixels first (fpa + n = fp), each mask pixel its own value.
      lo = np.where(fp > 0, p - fp * np.log1p(p / np.maximum(tpa + fp, 1.0)), p) / big_p
      # Several values: mask and mask-free pixels taken as evenly interleaved within the bin.
      above = tpa + fpa
      inner = p * p / (p + n) + np.where(
          above > 0, (tpa * n - fpa * p) * p / (p + n) ** 2 * np.log1p((p + n) / np.maximum(above, 1.0)), 0.0)
      h = np.where(mixed, inner / big_p, tie)
      slack = np.maximum(np.maximum(hi - h, h - lo), 0.0)
      out["pixel_ap"] = float(np.sum(h))
      out["pixel_ap_error_bound"] = float(np.sum(np.where(mixed, slack, 0.0)))
      # F1-max over bin edges; inside a bin at most all its mask and none of its mask-free pixels count.
      f1 = 2.0 * tp / (big_p + tp + fp)
      upper = np.where(mixed, 2.0 * tp / (big_p + tp + fpa), f1)
      i = int(np.argmax(f1))
      out["pixel_f1_max"] = float(f1[i])
      out["pixel_f1_max_error_bound"] = float(max(np.max(upper) - f1[i], 0.0))
      out["pixel_f1_threshold"] = self._edge_value(int(idx[i]))
    else:
      for k in ("pixel_ap", "pixel_ap_error_bound", "pixel_f1_max", "pixel_f1_max_error_bound",
                "pixel_f1_threshold"):
        out[k] = nan

    if self._regions > 0 and big_n > 0:
      # AUPRO: the PRO curve through the bin edges, linear in between, cut at the limit.
      lim = float(fpr_limit)
      f_lo, f_hi = fpa / big_n, fp / big_n
      dpro = w / self._regions
      step = f_hi - f_lo
      inside = f_hi <= lim
      cut = (f_lo < lim) & ~inside
      a = np.where(cut, lim - f_lo, 0.0)
      part = np.where(cut, a * a / (2.0 * np.where(cut, step, 1.0)), 0.0)  # cut bin: its area up to L / dPRO
      area = np.where(inside, (lim - f_hi) + 0.5 * step, part) * dpro
      box = np.where(inside, 0.5 * step, np.maximum(part, a - part)) * dpro
      out["pixel_aupro"] = float(np.sum(area) / lim)
      out["pixel_aupro_error_bound"] = float(np.sum(np.where(mixed, box, 0.0)) / lim)
    else:
      out["pixel_aupro"] = out["pixel_aupro_error_bound"] = nan
    return out
