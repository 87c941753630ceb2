"""launch/train.py end to end on the embedded phantom data; kill and resume; predict; clear data errors."""
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

from mediclip_jax.train.writers import read_records
from tests.conftest import REPO

OVERRIDES = ["--config.train.epochs=6", "--config.train.checkpoint_every_steps=2", "--config.eval.every_epochs=3",
             "--config.data.phantom_n_test=8", "--config.data.phantom_size=64", "--config.data.image_size=64",
             "--config.model.clip.image_size=64"]


def _train_cmd(workdir: Path) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "chestxray.py") +
          ":phantom,tiny", "--workdir", str(workdir), *OVERRIDES]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
  from mediclip_jax.evaluate.restore import load_trained
  from flax import nnx
  t = load_trained(str(workdir))
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(t.params)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("run") / "a"
  proc = subprocess.run(_train_cmd(wd), env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return wd


def test_end_to_end_outputs(uninterrupted):
  wd = uninterrupted
  results = json.loads((wd / "results.json").read_text())
  last = results["last_epoch"]
  for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
    assert 0.0 <= last[key] <= 1.0, (key, last)
  assert "best_epoch_on_test (reference protocol)" in results
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in l for l in lines) and any("eval/image_auroc" in l for l in lines)
  events = list((wd / "tensorboard").glob("events.out.tfevents.*"))
  assert events and len(read_records(str(events[0]))) > 3  # CRC-checked records
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
  support = json.loads((wd / "support_set.json").read_text())
  assert support["k"] == 16 and support["seed"] == 100


def _wait_for_checkpoint(wd: Path, proc: subprocess.Popen, min_step: int, timeout: float = 600) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    # Orbax writes into a temporary folder and renames it to the step number when finished.
    ckpts = wd / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    if steps and max(steps) >= min_step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    time.sleep(0.1)
  raise AssertionError("no checkpoint appeared in time")


def test_sigterm_and_kill9_then_resume_gives_same_parameters(uninterrupted, tmp_path):
  wd = tmp_path / "b"
  # 1) SIGTERM: the run writes a checkpoint at the current step and exits.
  proc = subprocess.Popen(_train_cmd(wd), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(wd, proc, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode in (0, 130), err[-3000:]
  # 2) kill -9 mid-run: nothing is flushed; the last finished checkpoint survives.
  proc = subprocess.Popen(_train_cmd(wd), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(wd, proc, 6)
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
  assert "score" in proc.stdout and "threshold" in proc.stdout
  rec = json.loads((tmp_path / "predictions.json").read_text())[0]
  assert 0 <= rec["score"] <= 1 and Path(rec["overlay"]).stat().st_size > 1000
  from PIL import Image
  assert Image.open(rec["overlay"]).size == (3 * 64, 64)


def test_missing_data_fails_fast_naming_directory_and_layouts(tmp_path):
  cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "chestxray.py"),
         "--workdir", str(tmp_path / "w")]
  t0 = time.time()
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 1
  assert "data/chexpert" in proc.stderr and "samples/train.json" in proc.stderr and "train/normal" in proc.stderr
  assert time.time() - t0 < 120
