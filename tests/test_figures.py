"""Explanation pictures: the anomaly panel's layout and fixed colour scale, the curves PNG, predict's outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mediclip_jax.evaluate import figures
from tests.conftest import REPO


def _column(panel, lay, name):
  x = lay.columns[name]
  return panel[lay.header:, x:x + lay.width]


def test_panel_is_drawn_at_the_original_resolution_with_the_map_upsampled():
  image = np.random.default_rng(0).random((32, 32), np.float32)
  amap = np.zeros((32, 32), np.float32)
  amap[:, 16:] = 0.9  # right half hot
  original = np.full((90, 150, 3), 128, np.uint8)
  panel = figures.anomaly_panel(image, amap, 0.5, 0.9, mask=np.ones((90, 150), bool), name="x.jpg",
                                original=original)
  lay = figures.panel_layout(90, 150, with_mask=True)
  assert panel.shape == (lay.header + 90, lay.total_width, 3) and panel.dtype == np.uint8
  assert set(lay.columns) == {"image", "mask", "map", "colorbar", "pred", "overlay"}
  np.testing.assert_array_equal(_column(panel, lay, "image"), original)
  assert (_column(panel, lay, "mask") == 255).all()
  pred = _column(panel, lay, "pred")[..., 0] > 127
  assert pred[:, :70].sum() == 0 and pred[:, 80:].all()  # the hot half, upsampled 150/32 wide
  assert "mask" not in figures.panel_layout(90, 150, with_mask=False).columns


def test_map_is_on_a_fixed_scale_read_off_the_colour_bar():
  image = np.full((64, 64), 0.5, np.float32)
  lay = figures.panel_layout(64, 64, with_mask=False)
  colours = {}
  for v in (0.2, 0.8):
    panel = figures.anomaly_panel(image, np.full((64, 64), v, np.float32), 0.5, v)
    heat = _column(panel, lay, "map")
    assert (heat == heat[0, 0]).all()  # a constant map stays constant: no per-image min-max
    bar = panel[lay.colorbar_row(v), lay.columns["colorbar"] + lay.colorbar_width // 2]
    assert np.abs(heat[0, 0].astype(int) - bar.astype(int)).max() <= 12, (v, heat[0, 0], bar)
    np.testing.assert_array_equal(heat[0, 0], figures.colorize(v))
    colours[v] = heat[0, 0].astype(int)
  assert np.abs(colours[0.2] - colours[0.8]).max() > 100


def test_predicted_mask_column_is_map_above_threshold():
  rng = np.random.default_rng(1)
  amap = rng.random((48, 48)).astype(np.float32)
  thr = 0.6
  panel = figures.anomaly_panel(rng.random((48, 48)), amap, thr, float(amap.max()), mask=amap > 0.9)
  lay = figures.panel_layout(48, 48, with_mask=True)
  pred = _column(panel, lay, "pred")
  assert set(np.unique(pred)) <= {0, 255}
  np.testing.assert_array_equal(pred[..., 0] == 255, amap > thr)
  np.testing.assert_array_equal(_column(panel, lay, "mask")[..., 0] == 255, amap > 0.9)


def test_decision_text_colour_follows_the_score():
  image = np.zeros((64, 64), np.float32)
  hi = figures.anomaly_panel(image, np.zeros((64, 64)), 0.5, 0.7, name="a")
  lo = figures.anomaly_panel(image, np.zeros((64, 64)), 0.5, 0.3, name="a")

  def reds_greens(p):  # header text pixels that are clearly red / clearly green
    h = p[:p.shape[0] - 64].reshape(-1, 3).astype(int)
    return int(((h[:, 0] - h[:, 1]) > 80).sum()), int(((h[:, 1] - h[:, 0]) > 60).sum())
  (r_hi, g_hi), (r_lo, g_lo) = reds_greens(hi), reds_greens(lo)
  assert r_hi > 20 and g_hi == 0 and g_lo > 20 and r_lo == 0, (r_hi, g_hi, r_lo, g_lo)


def test_roc_pr_hist_writes_curves_with_sklearn_numbers(tmp_path):
  from sklearn.metrics import average_precision_score, roc_auc_score
  rng = np.random.default_rng(2)
  labels = np.r_[np.zeros(60), np.ones(40)].astype(int)
  scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounding makes ties
  path = tmp_path / "curves.png"
  got = figures.roc_pr_hist(scores, labels, 0.6, str(path))
  assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
  assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
  im = np.asarray(Image.open(path).convert("RGB"))
  assert im.shape[1] > 2 * im.shape[0] and path.stat().st_size > 20_000
  assert len(np.unique(im.reshape(-1, 3), axis=0)) > 50  # curves, bars and text, not a blank canvas
  with pytest.raises(ValueError, match="both normal"):
    figures.roc_pr_hist(scores, np.ones_like(labels), 0.6, str(tmp_path / "x.png"))


@pytest.mark.slow  # three launcher subprocesses, ~18 s on 2 busy cores
def test_predict_gives_one_panel_per_file_even_when_stems_collide(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(np.full((40, 60), 230, np.uint8)).save(src / "a.png")
  Image.fromarray(np.full((50, 70, 3), 20, np.uint8)).save(src / "a.jpg")
  Image.fromarray(np.full((30, 30), 20, np.uint8)).save(src / "b.png")
  Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "mask.png")
  script = REPO / "tests" / "fake_predict.py"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), "--input", str(src), "--out",
                         str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3 and "a.jpg: score" in lines[0] and "ABNORMAL" in lines[1] and "normal" in lines[2]
  recs = json.loads((out / "predictions.json").read_text())["predictions"]
  assert [r["raw_score"] > 0.5 for r in recs] == [False, True, False]
  assert [r["abnormal"] for r in recs] == [r["score"] > 0.5 for r in recs] == [False, True, False]
  panels = [r["panel"] for r in recs]
  assert len(set(panels)) == 3 and all(os.path.exists(p) for p in panels)
  assert [os.path.basename(p) for p in panels] == ["a_jpg_panel.png", "a_png_panel.png", "b_panel.png"]
  for rec, (h, w) in zip(recs, [(50, 70), (40, 60), (30, 30)]):  # each at its own file's resolution
    lay = figures.panel_layout(h, w, with_mask=False)
    assert Image.open(rec["panel"]).size == (lay.total_width, lay.header + h)
  proc = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), "--input", str(src / "b.png"),
                         "--mask", str(tmp_path / "mask.png"), "--out", str(out)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lay = figures.panel_layout(30, 30, with_mask=True)
  assert Image.open(out / "b_panel.png").size == (lay.total_width, lay.header + 30)
  proc = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), "--input", str(src),
                         "--mask", str(tmp_path / "mask.png"), "--out", str(out)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1 and "--mask goes with a single input image" in proc.stderr
