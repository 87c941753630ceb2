"""launch/train.py end to end on the embedded phantom data: outputs checked against an independent
computation, SIGTERM's stop path, kill -9 and resume, predict, clear data errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import REPO
from tests.processes import checkpoint_steps, run_to_completion

pytestmark = pytest.mark.slow

OVERRIDES = ["--config.train.epochs=6", "--config.train.checkpoint_every_steps=2", "--config.eval.every_epochs=3",
             "--config.data.phantom_n_test=8", "--config.data.phantom_size=64", "--config.data.image_size=64"]


def _train_cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "chestxray.py") +
          ":phantom,tiny", "--workdir", str(workdir), *OVERRIDES, *extra]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _restore(workdir: Path):
  from data_pipelines import datasets
  from mediclip_jax import parallel
  from mediclip_jax.evaluate import restore
  mesh = parallel.make_mesh()
  return restore.load_run(str(workdir), mesh, dataset=datasets.load_dataset(workdir / "phantom_data")), mesh


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
  from flax import nnx
  run, _ = _restore(workdir)
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(run.state["params"])}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("run") / "a"
  return run_to_completion(_train_cmd(wd), wd, _env())


def test_results_equal_an_independent_computation(uninterrupted):
  """results.json's last epoch equals sklearn's AUROCs on maps the restored checkpoint computes afresh."""
  from data_pipelines import run_data
  from mediclip_jax.evaluate import scoring
  wd = uninterrupted
  results = json.loads((wd / "results.json").read_text())
  run, mesh = _restore(wd)
  dataset = run_data.open_dataset(run.config.data, str(wd), run.config.seed)
  test = run_data.test_set(dataset, run.config.data)
  images, masks = test.arrays()
  maps, scores = scoring.score_share(run.trainable.scorer(run.state), images, 5, mesh)
  last = results["last_epoch"]
  assert abs(roc_auc_score(test.labels, scores) - last["image_auroc"]) < 1e-6
  assert abs(roc_auc_score(masks.ravel() > 0, maps.ravel()) - last["pixel_auroc"]) < 1e-6
  # The untrained row (same config, zero steps) is there, and differs from the trained one.
  assert results["untrained"]["pixel_auroc"] != last["pixel_auroc"]
  assert results["steps"] == 12 and run.step == 12
  # The stored decision: threshold = max score of the support images (quantile 1), measured on the test set.
  support = np.stack([np.asarray(x) for x in run.trainable.calibration_images])
  _, support_scores = scoring.score_share(run.trainable.scorer(run.state), support, 5, mesh)
  thr = results["decision"]["threshold"]
  assert thr == pytest.approx(float(support_scores.max()), abs=1e-6) == run.metadata["threshold"]
  assert last["image_sensitivity"] == pytest.approx(np.mean(scores[test.labels == 1] > thr))
  assert last["image_specificity"] == pytest.approx(np.mean(scores[test.labels == 0] <= thr))
  assert "chosen on the test set" in results["decision"]["rule"]


def test_outputs_metrics_tensorboard_checkpoints_console(uninterrupted):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  wd = uninterrupted
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval/image_auroc" in l] == [0, 6, 12]  # untrained, every 3 epochs
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6, 8, 10, 12]
  assert all(isinstance(l["epoch"], float) and l["epoch"] == l["step"] / 2 for l in lines)  # 2 steps per epoch
  acc = EventAccumulator(str(wd / "tensorboard"), size_guidance={"images": 0})
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
  assert [e.step for e in acc.Images("eval/roc_pr_hist")] == [0, 6, 12]
  assert [e.step for e in acc.Images("eval/abnormal_lowest")] == [0, 6, 12]
  for step in (0, 6, 12):
    assert sorted(p.name for p in (wd / "figures" / f"step_{step:06d}").iterdir()) == [
        "abnormal_highest.png", "abnormal_lowest.png", "normal_highest.png", "normal_lowest.png", "roc_pr_hist.png"]
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
  support = json.loads((wd / "support_set.json").read_text())
  assert support["k"] == 16 and support["seed"] == 100
  console = (wd / "console.txt").read_text()
  assert "compiled in" in console and "untrained (step 0)" in console and "last epoch" in console
  assert "orbax" not in console.lower()  # third-party INFO logs are off by default



def _wait(cond, proc: subprocess.Popen, timeout: float = 600) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    if cond():
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError("timed out")


def test_sigterm_writes_a_checkpoint_at_its_step_then_kill9_then_resume(uninterrupted, tmp_path):
  wd = tmp_path / "b"
  # 1) SIGTERM with periodic checkpoints off: the only checkpoint can come from the stop path.
  #    Documented exit code: 130.
  proc = subprocess.Popen(_train_cmd(wd, "--config.train.checkpoint_every_steps=1000"), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = wd / "metrics.jsonl"
  _wait(lambda: metrics.is_file() and "train/loss" in metrics.read_text(), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 130, err[-3000:]
  step = int(err.split("checkpoint written at step ")[1].split(";")[0])
  assert 2 <= step < 12 and checkpoint_steps(wd) == [step]
  # 2) kill -9 mid-run: nothing is flushed; the last finished checkpoint survives.
  proc = subprocess.Popen(_train_cmd(wd), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait(lambda: any(s >= step + 2 for s in checkpoint_steps(wd)), proc)
  proc.kill()
  proc.wait(timeout=60)
  # 3) rerun to the end: resumes and must land on the uninterrupted run's parameters.
  proc = subprocess.run(_train_cmd(wd), env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resumed from step" in proc.stderr
  a, b = _final_params(uninterrupted), _final_params(wd)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_predict_writes_overlay_for_a_busi_image(uninterrupted, shared_dir, tmp_path):
  image = sorted((shared_dir / "data" / "busi" / "images" / "test" / "abnormal").glob("*"))[0]
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), "--workdir", str(uninterrupted),
                         "--input", str(image), "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "score" in proc.stdout and "raw" in proc.stdout
  out = json.loads((tmp_path / "predictions.json").read_text())
  rec, norm = out["predictions"][0], out["normalization"]
  assert 0 <= rec["score"] <= 1 and Path(rec["panel"]).stat().st_size > 1000
  expected = np.clip(0.5 + 0.5 * (rec["raw_score"] - norm["threshold"]) / (norm["threshold"] - norm["low"]), 0, 1)
  assert rec["score"] == pytest.approx(expected, abs=1e-6)
  assert rec["abnormal"] == (rec["raw_score"] > rec["threshold"]) == (rec["score"] > 0.5)
  from PIL import Image
  from mediclip_jax.evaluate import figures
  w, h = Image.open(image).size  # the panel is drawn at the file's own resolution, not the model's 64
  lay = figures.panel_layout(h, w, with_mask=False)
  assert Image.open(rec["panel"]).size == (lay.total_width, lay.header + h)


def test_evaluate_reproduces_the_run_and_writes_only_where_told(uninterrupted, tmp_path):
  before = {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()}
  out = tmp_path / "eval.json"
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--workdir", str(uninterrupted),
                         "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["runs"][str(uninterrupted)]
  last = json.loads((uninterrupted / "results.json").read_text())["last_epoch"]
  for k, v in last.items():
    assert abs(got[k] - v) < 1e-6, k
  assert {p: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()} == before
  pictures = sorted(p.name for p in (tmp_path / "eval_figures" / uninterrupted.name).iterdir())
  assert pictures == ["abnormal_highest.png", "abnormal_lowest.png", "normal_highest.png", "normal_lowest.png",
                      "roc_pr_hist.png"]


def test_missing_data_fails_fast_naming_directory_layouts_and_the_way_out(tmp_path):
  cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "chestxray.py"),
         "--workdir", str(tmp_path / "w")]
  t0 = time.time()
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 1
  for part in ("data/chexpert", "samples/train.json", "train/normal", "--config.data.root=", ":phantom"):
    assert part in proc.stderr, (part, proc.stderr)
  assert time.time() - t0 < 120
  assert not (tmp_path / "w").exists()  # a failed start leaves no workdir describing a run that does not exist


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
  import hashlib

  def digest():
    return {str(p.relative_to(uninterrupted)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in uninterrupted.rglob("*") if p.is_file() and p.name not in (".lock", "console.txt")}
  before = digest()
  proc = subprocess.run(_train_cmd(uninterrupted), env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "nothing to do" in proc.stderr and "last epoch" in proc.stdout
  assert digest() == before  # no event file, no figures, no metrics row, results.json as it was
