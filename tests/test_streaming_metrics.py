"""The streaming pixel histogram against the exact metrics (`metrics.pixel_metrics` on all pixels):
|histogram - exact| <= the reported bound on every metric, exact where the bins allow, and the
accumulator's state independent of how the pixels were batched."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from mediclip_jax.evaluate import metrics
from mediclip_jax.evaluate.streaming_metrics import PixelHistogram, key_to_float, order_key

METRICS = ("auroc", "ap", "f1_max", "aupro")
# The exact metrics sum in float32 (~1e-7 relative); the bounds are for exact arithmetic.
TOL = 3e-6
N, H, W = 40, 64, 64


def _blob_masks(seed: int) -> np.ndarray:
  """Several disc-shaped regions per image (some touching), a third of the images without lesions."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:H, :W]
  m = np.zeros((N, H, W), bool)
  for i in range(N):
    if i % 3 == 0:
      continue
    for _ in range(rng.integers(1, 5)):
      cy, cx, r = rng.integers(0, H), rng.integers(0, W), rng.uniform(1.5, 9)
      m[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
  return m


MASKS = _blob_masks(0)  # one mask set for all cases: the exact AUPRO compiles once


def _maps(case: str) -> np.ndarray:
  rng = np.random.default_rng(1)
  noise = rng.normal(0.0, 1.0, (N, H, W))
  if case == "smooth":  # scores in [0, 1], higher on the lesions
    x = np.clip(0.35 + 0.15 * noise + 0.3 * MASKS, 0, 1)
  elif case == "ties":  # 101 distinct values: every bin holds one value
    x = np.round(np.clip(0.35 + 0.15 * noise + 0.3 * MASKS, 0, 1), 2)
  elif case == "logits":  # negative logits over several binades
    x = -8.0 + 3.0 * noise + 2.0 * MASKS
  elif case == "near1":  # saturated probabilities 1 - 1e-7 .. 1 - 1e-5 (float32 spacing 6e-8)
    x = 1.0 - rng.uniform(1e-7, 1e-5, (N, H, W)) * (1.0 - 0.5 * MASKS)
  else:
    raise ValueError(case)
  return x.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _exact(case: str) -> dict[str, float]:
  return metrics.pixel_metrics(_maps(case), MASKS, fpr_limit=0.3)


def _hist(case: str, **kw) -> dict[str, float]:
  acc = PixelHistogram(**kw)
  acc.update(_maps(case), MASKS)
  return acc.result(fpr_limit=0.3)


def _check_within_bound(res: dict[str, float], exact: dict[str, float]) -> None:
  for k in METRICS:
    diff, bound = abs(res[f"pixel_{k}"] - exact[k]), res[f"pixel_{k}_error_bound"]
    assert bound >= 0.0, k
    assert diff <= bound + TOL, f"{k}: |{res[f'pixel_{k}']} - {exact[k]}| = {diff} > bound {bound}"


@pytest.mark.parametrize("case,probability", [("smooth", False), ("ties", False), ("logits", False), ("near1", False),
                                              ("smooth", True), ("ties", True), ("near1", True)])
@pytest.mark.parametrize("bits", [20, 12, 8])
def test_within_bound_of_exact(case, probability, bits):
  _check_within_bound(_hist(case, bits=bits, probability=probability), _exact(case))


def test_bounds_small_on_smooth_maps_at_20_bits():
  res = _hist("smooth")
  assert res["pixel_auroc_error_bound"] < 1e-3
  assert res["pixel_aupro_error_bound"] < 1e-3
  assert res["pixel_ap_error_bound"] < 2e-3
  assert res["pixel_f1_max_error_bound"] < 2e-3


def test_coarse_histogram_has_visible_but_valid_bounds():
  """At 8 bits (a bin spans two binades: [0.125, 0.5), [0.5, 2)) the histogram is visibly off; the
  bounds must still cover it."""
  res, exact = _hist("smooth", bits=8), _exact("smooth")
  _check_within_bound(res, exact)
  for k in METRICS:
    assert res[f"pixel_{k}_error_bound"] > 1e-2, k
  assert abs(res["pixel_auroc"] - exact["auroc"]) > 1e-3  # the test has teeth


@pytest.mark.parametrize("probability", [False, True])
def test_single_valued_bins_are_exact(probability):
  res, exact = _hist("ties", probability=probability), _exact("ties")
  for k in METRICS:
    assert res[f"pixel_{k}_error_bound"] == 0.0, k
    assert res[f"pixel_{k}"] == pytest.approx(exact[k], abs=TOL), k
  assert res["pixel_f1_threshold"] == exact["f1_threshold"]


def test_saturated_probabilities_need_the_probability_key():
  plain, mirrored = _hist("near1"), _hist("near1", probability=True)
  assert plain["pixel_auroc_error_bound"] > 0.1  # everything in one bin near 1: honest, useless
  for k in METRICS:
    assert mirrored[f"pixel_{k}_error_bound"] == 0.0, k  # each float32 near 1 gets its own bin


def test_without_tracked_values_bounds_are_conservative():
  exact = _exact("ties")
  res = _hist("ties", bits=12, track_values=False)
  _check_within_bound(res, exact)
  assert res["pixel_auroc_error_bound"] > 0.0
  assert PixelHistogram(track_values=False).nbytes < PixelHistogram().nbytes


def test_pure_bins_exact_except_ap():
  """Bins holding only mask or only mask-free pixels leave AUROC, F1 and AUPRO exact; AP depends on
  the order among mask pixels too and gets a bound."""
  rng = np.random.default_rng(2)
  # 8 bits, bins [0.125, 0.5), [0.5, 2), [2, 8): mask pixels in [0.5, 1), mask-free in [0.25, 0.5) and
  # [2, 4): no bin shared.
  x = np.where(MASKS, rng.uniform(0.5, 1.0, (N, H, W)),
               np.where(rng.random((N, H, W)) < 0.99, rng.uniform(0.25, 0.5, (N, H, W)), rng.uniform(2, 4, (N, H, W))))
  x = x.astype(np.float32)
  exact = metrics.pixel_metrics(x, MASKS)
  acc = PixelHistogram(bits=8)
  acc.update(x, MASKS)
  res = acc.result()
  _check_within_bound(res, exact)
  for k in ("auroc", "f1_max", "aupro"):
    assert res[f"pixel_{k}_error_bound"] == 0.0, k
  assert res["pixel_ap_error_bound"] > 0.0


def test_f1_threshold_reproduces_the_counts():
  for kw in ({}, {"track_values": False}, {"probability": True}, {"probability": True, "track_values": False}):
    for case in ("smooth", "near1"):
      x = _maps(case)
      res = _hist(case, bits=12, **kw)
      pred = x >= np.float32(res["pixel_f1_threshold"])
      f1 = 2 * np.sum(pred & MASKS) / (MASKS.sum() + pred.sum())
      assert f1 == pytest.approx(res["pixel_f1_max"], abs=1e-12), (case, kw)


def test_batching_does_not_change_the_state():
  x = _maps("smooth")
  whole = PixelHistogram(bits=16)
  whole.update(x, MASKS)
  pieces = PixelHistogram(bits=16)
  for a, b in ((0, 1), (1, 8), (8, 9), (9, 40)):
    pieces.update(x[a:b], MASKS[a:b])
  np.testing.assert_array_equal(pieces.to_array(), whole.to_array())
  assert pieces.result() == whole.result()


def test_merge_of_halves_equals_the_whole():
  x = _maps("logits")
  whole, first, second = PixelHistogram(bits=16), PixelHistogram(bits=16), PixelHistogram(bits=16)
  whole.update(x, MASKS)
  first.update(x[:17], MASKS[:17])
  second.update(x[17:], MASKS[17:])
  merged = PixelHistogram.combine(np.stack([first.to_array(), second.to_array()]))
  assert merged.num_regions == whole.num_regions
  np.testing.assert_array_equal(merged._counts, whole._counts)
  np.testing.assert_array_equal(merged._min, whole._min)
  np.testing.assert_array_equal(merged._max, whole._max)
  np.testing.assert_allclose(merged._weight, whole._weight, rtol=1e-12)
  a, b = merged.result(), whole.result()
  for k in a:
    assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15), k
  np.testing.assert_array_equal(first.merge(second).to_array(), merged.to_array())


def test_to_array_round_trip_is_bit_exact_in_32_bits():
  acc = PixelHistogram(bits=12, probability=True)
  acc.update(_maps("near1"), MASKS)
  a = acc.to_array()
  assert a.dtype == np.uint32 and a.ndim == 1
  back = PixelHistogram.from_array(a.view(np.int32))  # e.g. gathered as int32
  assert (back.bits, back.probability, back.track_values, back.num_regions) == (12, True, True, acc.num_regions)
  assert back.result() == acc.result()
  with pytest.raises(ValueError):
    PixelHistogram.from_array(a[:-1])


def test_memory_does_not_grow_with_updates():
  acc = PixelHistogram(bits=16)
  x = _maps("smooth")
  acc.update(x[:4], MASKS[:4])
  nbytes, size = acc.nbytes, acc.to_array().size
  for _ in range(5):
    acc.update(x, MASKS)
  assert acc.nbytes == nbytes and acc.to_array().size == size
  assert acc.num_positive == 5 * MASKS.sum() + MASKS[:4].sum()


def test_refuses_non_finite_maps_naming_them():
  acc = PixelHistogram(bits=12)
  x = _maps("smooth")[:5].copy()
  x[3, 2, 2] = np.nan
  with pytest.raises(ValueError, match=r"\[3\]"):
    acc.update(x, MASKS[:5])
  x[3, 2, 2] = np.inf
  x[1, 0, 0] = -np.inf
  with pytest.raises(ValueError, match=r"\[1, 3\]"):
    acc.update(x, MASKS[:5])
  assert acc.num_positive + acc.num_negative == 0  # nothing was counted
  with pytest.raises(ValueError, match="probability"):
    PixelHistogram(bits=12, probability=True).update(_maps("logits")[:2], MASKS[:2])


def test_valid_drops_padded_maps_and_undefined_metrics_are_nan():
  x = _maps("smooth")
  padded = PixelHistogram(bits=12)
  padded.update(np.concatenate([x[:5], np.full((3, H, W), np.nan, np.float32)]),
                np.concatenate([MASKS[:5], np.ones((3, H, W), bool)]), valid=[1] * 5 + [0] * 3)
  plain = PixelHistogram(bits=12)
  plain.update(x[:5], MASKS[:5])
  np.testing.assert_array_equal(padded.to_array(), plain.to_array())
  empty = PixelHistogram(bits=12)
  empty.update(x[:3], np.zeros((3, H, W), bool))
  res = empty.result()
  assert all(np.isnan(v) for v in res.values())


def test_order_key_matches_the_float_order():
  v = np.array([-np.finfo(np.float32).max, -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1 - 2**-24, 1.0, 7.0,
                np.finfo(np.float32).max], np.float32)
  k = order_key(v)
  assert np.all(np.diff(k.astype(np.int64)) >= 0) and k[3] == k[4]
  assert [key_to_float(int(a)) for a in k] == [float(a) for a in np.where(v == 0, np.float32(0), v)]
