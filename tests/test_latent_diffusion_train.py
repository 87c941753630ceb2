"""The latent diffusion baseline through the generic loop and the launchers on generated chest phantoms: 1 vs 8
devices (same steps, one compilation, same maps), a run that trains, evaluates and checkpoints, SIGTERM then
resume to the same parameters, predict (panels with the pseudo-healthy reconstruction) and evaluate (the last
epoch reproduced; scoring settings changed with --set) on the trained run.

Every launcher runs as a subprocess (their absl flags collide in one process); tests/method_multidevice.py takes
the training run's config flags.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.processes import (assert_one_vs_eight, checkpoint_steps, launcher_env, one_vs_eight, read_params,
                             resume_to_the_uninterrupted_run, run_to_completion, sigterm_after_first_train_row)

pytestmark = pytest.mark.slow

CONFIG = ["--config", f"{REPO / 'configs' / 'latent_diffusion.py'}:phantom,tiny"]
# 16 training phantoms read at 32 px (4 x 4 x 32 latents), batch 8: 2 steps per epoch, 8 steps; evaluations at
# steps 0, 4, 8; train rows every 2 steps; the periodic checkpoint only at the end. Two t* and two draws, so
# the maps average four reverse processes. lr 1e-4: at 1e-3 Adam amplifies the summation-order rounding of
# near-zero gradients between 1 and 8 devices past 1e-5 (as for SSL-AnoVAE).
OVERRIDES = ["--config.data.phantom_n_train=16", "--config.data.phantom_n_test=8", "--config.data.image_size=32",
             "--config.train.batch_size=8", "--config.train.epochs=4", "--config.train.lr=1e-4",
             "--config.train.warmup_steps=2", "--config.eval.every_epochs=2", "--config.train.checkpoint_every_steps=8",
             "--config.train.log_every_steps=2", "--config.score.t_stars=(100, 300)", "--config.score.draws=2",
             "--config.score.reverse_steps=3"]
STEPS = 8
FIGURES = ["abnormal_highest.png", "abnormal_lowest.png", "normal_highest.png", "normal_lowest.png", "roc_pr_hist.png"]
TRAIN_KEYS = ("loss", "grad_norm", "param_norm", "t_mean")


def _train_cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), *CONFIG, "--workdir", str(workdir), *OVERRIDES,
          "--dump_params", *extra]



def test_one_vs_eight_devices_same_parameters_losses_maps_and_one_compilation():
  """3 steps on 1 and on 8 devices agree in parameters and EMA (1e-5); 6 steps compile the step once per mesh."""
  res = one_vs_eight([*CONFIG, *OVERRIDES])
  c = res["config"]
  assert res["n_devices"] == 8 and c["train"]["batch_size"] == 8 and c["data"]["image_size"] == 32
  assert c["augment"]["preset"] == "grey"  # flips, rotation, crops, intensity, blur and noise drawn per sample
  assert_one_vs_eight(res, ("params", "ema"))
  assert res["max_latent_norm_diff"] <= 1e-5, res


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("ld_run") / "a"
  return run_to_completion(_train_cmd(wd), wd, launcher_env())


def test_run_writes_results_checkpoints_and_figures(uninterrupted):
  wd = uninterrupted
  results = json.loads((wd / "results.json").read_text())
  assert results["steps"] == STEPS and results["backbone"]["architecture"] == "DiT"
  assert results["backbone"]["vae"]["kind"] == "taef2"
  untrained, last = results["untrained"], results["last_epoch"]
  for row in (untrained, last):
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
      assert isinstance(row.get(key), float) and 0 <= row[key] <= 1, (key, row.get(key))
  assert untrained["pixel_auroc"] != last["pixel_auroc"]  # the trained maps are not the untrained ones
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval/image_auroc" in l] == [0, 4, 8]
  train = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train] == [2, 4, 6, 8]
  assert all(np.isfinite(l[f"train/{k}"]) for l in train for k in TRAIN_KEYS)
  assert all(1 <= l["train/t_mean"] <= 1000 for l in train)
  assert checkpoint_steps(wd) == [STEPS]
  for step in (0, 4, 8):
    assert sorted(p.name for p in (wd / "figures" / f"step_{step:06d}").iterdir()) == FIGURES
  params = read_params(wd)
  assert {k.split(".")[0] for k in params} == {"embed", "time_fc1", "time_fc2", "blocks", "final_modulation", "out"}
  assert all(np.isfinite(v).all() for v in params.values())
  console = (wd / "console.txt").read_text()
  assert "compiled in" in console and "untrained (step 0)" in console and "last epoch" in console


def test_sigterm_then_resume_ends_with_the_uninterrupted_parameters_and_metrics(uninterrupted, tmp_path):
  wd = tmp_path / "b"
  step = sigterm_after_first_train_row(_train_cmd(wd), wd, launcher_env())
  assert 2 <= step < STEPS and checkpoint_steps(wd) == [step]
  resume_to_the_uninterrupted_run(_train_cmd(wd), wd, step, uninterrupted, launcher_env())


def test_predict_writes_panels_with_the_pseudo_healthy_reconstruction(uninterrupted, tmp_path):
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
      [f"{p.stem}_panel.png" for p in images] + [f"{p.stem}_reconstruction.png" for p in images]
      + ["predictions.json", "predictions.jsonl"])
  rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
  assert [r["file"] for r in rows] == [str(p) for p in images] and all(r["raw_score"] > 0 for r in rows)
  for rec in json.loads((out / "predictions.json").read_text())["predictions"]:
    picture = np.asarray(Image.open(rec["reconstruction"]))
    assert picture.shape[1] >= 3 * 160 and picture.std() > 1  # three columns (32 px enlarged 5x), something drawn


def test_evaluate_reproduces_the_last_epoch_and_the_untrained_row_and_rescores_with_set(uninterrupted, tmp_path):
  before = {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()}
  evaluate = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--workdir", str(uninterrupted)]
  out = tmp_path / "eval.json"
  proc = subprocess.run(evaluate + ["--out", str(out)], env=launcher_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["runs"][str(uninterrupted)]
  last = json.loads((uninterrupted / "results.json").read_text())["last_epoch"]
  for k, v in last.items():
    assert got[k] == pytest.approx(v, abs=1e-6), k
  rescored = tmp_path / "t50.json"
  proc = subprocess.run(evaluate + ["--out", str(rescored), "--set", "score.t_stars=(50,)",
                                    "--set", "score.reverse_steps=1"], env=launcher_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(rescored.read_text())
  assert res["set"] == {"score.t_stars": [50], "score.reverse_steps": 1}
  assert res["runs"][str(uninterrupted)]["pixel_auroc"] != got["pixel_auroc"]
  untrained = tmp_path / "untrained.json"
  proc = subprocess.run(evaluate + ["--out", str(untrained), "--untrained"], env=launcher_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got0 = json.loads(untrained.read_text())["runs"][str(uninterrupted)]
  want0 = json.loads((uninterrupted / "results.json").read_text())["untrained"]
  assert got0["step"] == 0
  for k, v in want0.items():  # the step-0 row of the training run, rebuilt without its checkpoint
    assert got0[k] == pytest.approx(v, abs=1e-6), k
  bad = subprocess.run(evaluate + ["--out", str(tmp_path / "x.json"), "--set", "model.width=64"], env=launcher_env(),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "model.width" in bad.stderr and "score" in bad.stderr
  assert {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()} == before


def test_a_run_older_than_a_field_it_lacks_is_refused_naming_the_field(uninterrupted, tmp_path):
  """A run whose stored config predates a field the method reads is refused with the field's name (launch/evaluate.py
  and predict.py print it as their error) rather than failing inside the method's build."""
  import shutil

  import jax

  from mediclip_jax import parallel
  from mediclip_jax.evaluate import restore
  old = tmp_path / "old"
  shutil.copytree(uninterrupted, old)
  metas = [p for p in (old / "checkpoints" / str(STEPS)).rglob("*") if p.is_file() and b"grad_clip_norm" in p.read_bytes()]
  assert metas, "the checkpoint's metadata holds the config"
  for p in metas:
    p.write_bytes(p.read_bytes().replace(b'"grad_clip_norm"', b'"grad_clip_old"'))
  with pytest.raises(ValueError, match=r"lacks a field .*grad_clip_norm.* older version"):
    restore.load_run(str(old), parallel.make_mesh(jax.devices()[:1]))
