"""SSL-AnoVAE through the generic loop and the launchers on generated OCT phantoms: 1 vs 8 devices (same
steps, one compilation, same maps), a run that trains, evaluates (staging, segmentation) and checkpoints,
SIGTERM then resume to the same parameters, predict and evaluate on the trained run.

Every launcher runs as a subprocess (their absl flags collide in one process); tests/method_multidevice.py
takes the training run's config flags. The subprocesses put every executable in the session's persistent
compilation cache (`tests/conftest.py`; minimum compile time 0): network initialisation compiles ~100 small
ones (~20 s), which the runs after the first then load. (An 8-device process's cache keys differ from a
1-device process's, so the multi-device script shares nothing with the launchers.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.processes import (assert_one_vs_eight, checkpoint_steps, launcher_env, one_vs_eight, read_params,
                             resume_to_the_uninterrupted_run, run_to_completion, sigterm_after_first_train_row)

pytestmark = pytest.mark.slow

CONFIG = ["--config", f"{REPO / 'configs' / 'ssl_anovae.py'}:oct_phantom,tiny,views=photometric,adv=0.1"]
# 16 training phantoms read at 32 px, batch 8: 2 steps per epoch, 8 steps; evaluations at steps 0, 4, 8; train
# rows every 2 steps; periodic checkpoints only at the end (a checkpoint before it can only come from SIGTERM).
# lr 1e-4 (the full config's): with the tiny config's 1e-3, Adam turns the summation-order rounding of
# gradients that cancel to ~0 into parameter differences of ~1e-5 between 1 and 8 devices (~lr * |dg| / eps).
OVERRIDES = ["--config.data.phantom_n_train=16", "--config.data.phantom_n_test=8", "--config.data.image_size=32",
             "--config.model.image_size=32", "--config.train.batch_size=8", "--config.train.epochs=4",
             "--config.train.lr=1e-4", "--config.train.disc_lr=1e-4", "--config.eval.every_epochs=2",
             "--config.train.checkpoint_every_steps=8", "--config.train.log_every_steps=2"]
STEPS = 8
FIGURES = ["abnormal_highest.png", "abnormal_lowest.png", "normal_highest.png", "normal_lowest.png", "roc_pr_hist.png"]
TRAIN_KEYS = ("loss", "rec", "kl_image", "kl_ssl", "ssl", "adv", "disc", "tau", "grad_norm", "param_norm")
RESULT_KEYS = ("image_auroc", "pixel_auroc", "staging_accuracy", "staging_accuracy_ranked", "staging_nmi",
               "staging_ari", "seg_threshold_dice", "seg_threshold_iou", "seg_layers_dice", "seg_layers_iou")


def _train_cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), *CONFIG, "--workdir", str(workdir), *OVERRIDES,
          "--dump_params", *extra]



def test_one_vs_eight_devices_same_states_losses_maps_and_one_compilation():
  """3 steps on 1 and on 8 devices agree in params, disc and target; 6 steps compile the step once per mesh."""
  res = one_vs_eight([*CONFIG, *OVERRIDES])
  c = res["config"]
  assert res["n_devices"] == 8 and c["train"]["batch_size"] == 8 and c["data"]["image_size"] == 32
  assert c["loss"]["adv"] > 0 and c["ssl"]["views"]["preset"] == "photometric"  # discriminator on, both view kinds
  # The steps did change each part (the EMA target the least: tau ~ 0.996), far beyond the 1-vs-8 difference.
  assert_one_vs_eight(res, ("params", "disc", "target"))
  assert res["max_metric_diff"]["disc"] <= 1e-5, res
  assert res["loss_8"][-1] < res["loss_8"][0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("ssl_run") / "a"
  return run_to_completion(_train_cmd(wd), wd, launcher_env())


def test_run_writes_results_with_staging_and_segmentation_metrics_checkpoints_and_figures(uninterrupted):
  wd = uninterrupted
  results = json.loads((wd / "results.json").read_text())
  assert results["steps"] == STEPS and results["backbone"]["architecture"] == "SSL-AnoVAE"
  untrained, last = results["untrained"], results["last_epoch"]
  for row in (untrained, last):
    for key in RESULT_KEYS:
      assert isinstance(row.get(key), float) and np.isfinite(row[key]), (key, row.get(key))
    assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1
    assert row["staging_n"] == 8 and row["staging_k"] == 2  # the 8 abnormal test phantoms, mild / severe
  assert untrained["pixel_auroc"] != last["pixel_auroc"]  # the trained maps are not the untrained ones
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval/image_auroc" in l] == [0, 4, 8]
  train = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train] == [2, 4, 6, 8]
  assert all(np.isfinite(l[f"train/{k}"]) for l in train for k in TRAIN_KEYS)
  assert all(l["epoch"] == l["step"] / 2 for l in lines)  # 2 steps per epoch
  assert checkpoint_steps(wd) == [STEPS]
  for step in (0, 4, 8):
    assert sorted(p.name for p in (wd / "figures" / f"step_{step:06d}").iterdir()) == FIGURES
  assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tensorboard").rglob("*"))
  params = read_params(wd)
  assert {k.split(".")[0] for k in params} >= {"image_encoder", "backbone", "decoder", "projector", "predictor"}
  assert all(np.isfinite(v).all() for v in params.values())
  assert json.loads((wd / "support_set.json").read_text())["k"] == 16  # every training phantom
  console = (wd / "console.txt").read_text()
  assert "compiled in" in console and "untrained (step 0)" in console and "last epoch" in console


def test_sigterm_then_resume_ends_with_the_uninterrupted_parameters_and_metrics(uninterrupted, tmp_path):
  wd = tmp_path / "b"
  step = sigterm_after_first_train_row(_train_cmd(wd), wd, launcher_env())
  assert 2 <= step < STEPS and checkpoint_steps(wd) == [step]  # periodic checkpoints come only at step 8
  assert not (wd / "params_process0.npz").exists()
  resume_to_the_uninterrupted_run(_train_cmd(wd), wd, step, uninterrupted, launcher_env())


def test_predict_writes_rows_summary_panels_and_reconstructions(uninterrupted, tmp_path):
  data = uninterrupted / "phantom_data" / "images" / "test"
  images = [sorted((data / "normal").glob("*.png"))[0], sorted((data / "abnormal").glob("*.png"))[0]]
  listing = tmp_path / "inputs.txt"
  listing.write_text("".join(f"{p}\n" for p in images))
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), "--workdir", str(uninterrupted),
                         "--input", str(listing), "--out", str(out)], env=launcher_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [f"{p.stem}_{kind}.png" for p in images for kind in ("panel", "reconstruction")]
      + ["predictions.json", "predictions.jsonl"])
  rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
  threshold = json.loads((uninterrupted / "results.json").read_text())["decision"]["threshold"]
  assert [r["file"] for r in rows] == [str(p) for p in images]
  summary = json.loads((out / "predictions.json").read_text())
  norm = summary["normalization"]
  assert summary["n_images"] == 2 and len(summary["predictions"]) == 2 and norm["threshold"] == threshold
  for r in rows:
    assert r["threshold"] == threshold and 0 <= r["score"] <= 1 and r["raw_score"] > 0
    expected = np.clip(0.5 + 0.5 * (r["raw_score"] - threshold) / (threshold - norm["low"]), 0, 1)
    assert r["score"] == pytest.approx(expected, abs=1e-6)
    assert r["abnormal"] == (r["raw_score"] > threshold)
  for rec in summary["predictions"]:
    assert Path(rec["panel"]).stat().st_size > 1000


def test_evaluate_reproduces_the_last_epoch_and_writes_only_where_told(uninterrupted, tmp_path):
  before = {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()}
  out = tmp_path / "eval.json"
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--workdir", str(uninterrupted),
                         "--out", str(out)], env=launcher_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["runs"][str(uninterrupted)]
  last = json.loads((uninterrupted / "results.json").read_text())["last_epoch"]
  assert got["step"] == STEPS
  assert got["image_auroc"] == pytest.approx(last["image_auroc"], abs=1e-6)
  for k, v in last.items():
    assert got[k] == pytest.approx(v, abs=1e-6), k
  assert {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()} == before
  assert sorted(p.name for p in (tmp_path / "eval_figures" / uninterrupted.name).iterdir()) == FIGURES
