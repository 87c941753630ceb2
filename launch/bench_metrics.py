"""Times pixel AUROC/AP/F1-max (one sort) and AUPRO on BUSI-size inputs.

BUSI's test set is 748 maps of 224x224 = 37.5 M pixels; the reference spends ~34 s
per pixel AUROC with scikit-learn. Random maps and masks; each timing is of a second call
(the first, with compilation, is printed beside it).

  python launch/bench_metrics.py --aupro --sklearn
  python launch/bench_metrics.py --n_maps 200 --size 128
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from mediclip_jax.evaluate import metrics

_N_MAPS = flags.DEFINE_integer("n_maps", 748, "Number of anomaly maps.")
_SIZE = flags.DEFINE_integer("size", 224, "Map side.")
_POSITIVE_FRACTION = flags.DEFINE_float("positive_fraction", 0.1, "Fraction of positive pixels in the random masks.")
_SKLEARN = flags.DEFINE_bool("sklearn", False, "Also time scikit-learn (slow).")
_AUPRO = flags.DEFINE_bool("aupro", False, "Also time AUPRO (random disc masks).")


def _time(fn, *args, **kw):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kw))
  return out, time.perf_counter() - t


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  n_maps, size = _N_MAPS.value, _SIZE.value
  rng = np.random.default_rng(0)
  shape = (n_maps, size, size)
  maps = rng.random(shape, dtype=np.float32)
  masks = (rng.random(shape) < _POSITIVE_FRACTION.value).astype(np.int8)
  n = maps.size
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {n / 1e6:.1f} M pixels")

  dev_maps, dev_masks = jax.device_put(maps), jax.device_put(masks)
  _, t_first = _time(metrics.binary_metrics, dev_maps, dev_masks)
  res, t = _time(metrics.binary_metrics, dev_maps, dev_masks)
  res = {k: float(v) for k, v in res.items()}
  print(f"pixel AUROC+AP+F1max (one sort): {t:.2f} s (first call incl. compile {t_first:.2f} s) {res}")

  _, t_first = _time(metrics.gaussian_smooth, dev_maps, sigma=4.0)
  _, t = _time(metrics.gaussian_smooth, dev_maps, sigma=4.0)
  print(f"Gaussian smoothing (sigma 4) of all maps: {t:.2f} s (first call {t_first:.2f} s)")

  if _AUPRO.value:
    # Blob masks: random discs so regions are realistic, not single pixels.
    yy, xx = np.mgrid[:size, :size]
    blob = np.zeros(shape, bool)
    for i in range(n_maps):
      cy, cx, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(5, 30))]
      blob[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    t0 = time.perf_counter()
    regions, nreg = metrics.mask_regions(blob)
    t_cc = time.perf_counter() - t0
    _, t_first = _time(metrics.aupro, dev_maps, blob)
    val, t = _time(metrics.aupro, dev_maps, blob)
    print(f"AUPRO: {t:.2f} s incl. host components ({t_cc:.2f} s for {nreg} regions); "
          f"first call {t_first:.2f} s; value {float(val):.4f}")

  if _SKLEARN.value:
    from sklearn.metrics import average_precision_score, roc_auc_score  # pylint: disable=import-outside-toplevel
    y, s = masks.ravel(), maps.ravel()
    ref, t = _time(roc_auc_score, y, s)
    print(f"sklearn roc_auc_score: {t:.2f} s, |diff| {abs(ref - res['auroc']):.2e}")
    ref, t = _time(average_precision_score, y, s)
    print(f"sklearn average_precision_score: {t:.2f} s, |diff| {abs(ref - res['ap']):.2e}")


if __name__ == "__main__":
  app.run(main)
