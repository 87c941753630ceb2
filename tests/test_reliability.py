"""Reliability of a run: non-finite numbers, damaged checkpoints and concurrent trainers never pass silently
or brick a workdir. Each case asserts the error, and that what was written before is untouched."""
from __future__ import annotations

import hashlib
import os

import pytest

from configs import chestxray
from mediclip_jax import checkpoints, methods
from mediclip_jax.train import loop

pytestmark = pytest.mark.slow  # tiny training runs in process


def _config(epochs: int):
  c = chestxray.get_config("phantom,tiny")
  c.train.epochs, c.train.checkpoint_every_steps, c.train.log_every_steps, c.eval.every_epochs = epochs, 1, 100, 100
  c.train.max_to_keep = 10
  c.data.phantom_n_test, c.data.phantom_size, c.data.image_size, c.eval.batch_size = 4, 64, 64, 4
  c.eval.figures = False
  return c


def _tree_digest(path) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def test_infinite_learning_rate_stops_at_the_first_bad_step_and_writes_no_checkpoint(two_checkpoints, tmp_path):
  import shutil
  wd = tmp_path / "run"
  method = methods.get("mediclip")
  shutil.copytree(two_checkpoints, wd)  # the fixture's run: _config(epochs=1), 2 steps, a checkpoint each
  before = _tree_digest(wd / "checkpoints")
  c = _config(epochs=3)
  c.train.lr = float("inf")
  with pytest.raises(FloatingPointError, match=r"at step 3 .*the last checkpoint is step 2"):
    loop.train_and_evaluate(c, str(wd), method)
  assert _tree_digest(wd / "checkpoints") == before  # no checkpoint of a non-finite state, none touched
  ckpt = checkpoints.Checkpointer(str(wd / "checkpoints"))
  assert ckpt.latest_step() == 2
  ckpt.close()


def _damage(step_dir, how: str) -> None:
  """Damages one finished checkpoint folder the ways disks and interrupted copies do."""
  if how == "metadata removed":
    import shutil
    shutil.rmtree(step_dir / "metadata")
    return
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "r+b") as fh:
        if how == "truncated":
          fh.truncate(size // 2)
        else:  # zeroed
          fh.write(b"\0" * size)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ck") / "run"
  loop.train_and_evaluate(_config(epochs=1), str(wd), methods.get("mediclip"))  # checkpoints at steps 1, 2
  return wd


@pytest.mark.parametrize("how", ["truncated", "zeroed", "metadata removed", "empty newer folder"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(two_checkpoints, tmp_path, how):
  import shutil
  from mediclip_jax import parallel
  from mediclip_jax.evaluate import restore
  wd = tmp_path / "run"
  shutil.copytree(two_checkpoints, wd)
  if how == "empty newer folder":
    (wd / "checkpoints" / "3").mkdir()
    damaged, intact = 3, 2
  else:
    _damage(wd / "checkpoints" / "2", how)
    damaged, intact = 2, 1
  intact_digest = _tree_digest(wd / "checkpoints" / str(intact))
  run = restore.load_run(str(wd), parallel.make_mesh(), dataset=None)
  assert run.step == intact and len(run.problems) == 1 and f"checkpoints/{damaged}: damaged" in run.problems[0]
  assert (wd / "checkpoints" / str(damaged)).exists()  # evaluation never moves or deletes anything
  c = _config(epochs=2)
  c.train.checkpoint_fallback = False
  with pytest.raises(checkpoints.DamagedCheckpoint, match=f"checkpoints/{damaged}: damaged"):
    loop.train_and_evaluate(c, str(wd), methods.get("mediclip"))
  results = loop.train_and_evaluate(_config(epochs=2), str(wd), methods.get("mediclip"))  # resumes from intact
  assert results["steps"] == 4
  aside = [p.name for p in (wd / "checkpoints").iterdir() if p.name.startswith(f"{damaged}.damaged-")]
  assert len(aside) == 1  # set aside, not deleted
  assert _tree_digest(wd / "checkpoints" / str(intact)) == intact_digest  # untouched


def test_a_second_trainer_on_the_same_workdir_refuses_and_the_first_finishes(tmp_path):
  import json
  import subprocess
  import sys
  import time
  from tests.conftest import REPO
  wd = tmp_path / "run"
  cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "chestxray.py") +
         ":phantom,tiny", "--workdir", str(wd), "--config.data.phantom_n_test=4", "--config.data.phantom_size=64",
         "--config.data.image_size=64", "--config.train.epochs=10", "--config.eval.figures=False"]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock = wd / ".lock"
  deadline = time.time() + 300
  while not (lock.is_file() and str(first.pid) in lock.read_text()):
    assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
    time.sleep(0.2)
  t0 = time.time()
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 1 and f"in use by a trainer (pid {first.pid} on" in second.stderr, second.stderr[-2000:]
  assert time.time() - t0 < 60
  assert len([l for l in second.stderr.splitlines() if l.strip()]) <= 2  # one line, no traceback
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20  # one writer, no interleaving


def test_resuming_with_another_image_size_or_shot_is_refused_before_anything_is_written(two_checkpoints, tmp_path):
  import shutil
  wd = tmp_path / "run"
  shutil.copytree(two_checkpoints, wd)
  before = _tree_digest(wd)
  c = _config(epochs=2)
  c.data.image_size, c.data.k_shot = 32, 8
  with pytest.raises(ValueError, match=r"cannot resume checkpoint step 2 .*data.image_size: 64 -> 32.*data.k_shot: 16 -> 8"):
    loop.train_and_evaluate(c, str(wd), methods.get("mediclip"))
  after = _tree_digest(wd)
  after.pop(".lock", None)
  before.pop(".lock", None)
  assert after == before  # config.json, support set, checkpoints, metrics: all as they were


def _launch(script, *args, cwd=None):
  import subprocess
  import sys
  from tests.conftest import REPO
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], env=env, capture_output=True,
                        text=True, timeout=300, cwd=cwd)


def _one_error_line(stderr: str) -> str:
  """The launcher's own error line; a traceback fails the test."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def _cli_cases(tmp_path, wd):
  import numpy as np
  from tests.conftest import REPO
  (tmp_path / "a_file").write_text("x")
  np.save(tmp_path / "nan.npy", np.full((2, 8, 8), np.nan, np.float32))
  train = ["--config", str(REPO / "configs" / "chestxray.py") + ":phantom,tiny"]
  normal = wd / "phantom_data" / "images" / "test" / "normal"
  image = str(normal / sorted(os.listdir(normal))[0])
  return [  # (launcher, args, exit code, message)
      ("train.py", train + ["--workdir", str(tmp_path / "w"), "--config.train.epoch=3"], 2, 'Did you mean "epochs"'),
      ("train.py", train + ["--workdir", str(tmp_path / "w"), "--config.train.batch_size=0"], 1,
       "config.train.batch_size must be a positive integer"),
      ("train.py", train + ["--workdir", str(tmp_path / "a_file")], 1, "a_file"),
      ("train.py", train + ["--workdir", str(tmp_path / "w"), "--coordinator_address", "127.0.0.1:29523",
                            "--num_processes", "2", "--process_id", "1", "--distributed_timeout", "2"], 1,
       "no coordinator answers at 127.0.0.1:29523 after 2 s"),
      ("evaluate.py", ["--workdir", str(tmp_path / "missing")], 1, "no checkpoints/ directory"),
      ("evaluate.py", ["--workdir", str(wd), "--smoothing_sigma", "-1", "--out", str(tmp_path / "e.json")], 1,
       "--smoothing_sigma must be >= 0"),
      ("predict.py", ["--workdir", str(wd), "--input", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "p")], 1,
       "values are NaN or infinite"),
      ("predict.py", ["--workdir", str(wd), "--input", image, "--threshold", "nan", "--out", str(tmp_path / "p")], 1,
       "needs finite values"),
      ("predict.py", ["--workdir", str(wd), "--input", image, "--out", str(tmp_path / "a_file")], 1,
       "is a file; expected a folder"),
  ]


def test_launchers_refuse_bad_input_in_one_line_and_touch_nothing(two_checkpoints, tmp_path):
  # The refusals run as forked launchers of one host process (tests/test_configs.py's launcher host: a fresh
  # launcher module, absl flags, exit code, stdout and stderr per call, without a ~4 s interpreter start each).
  from tests.conftest import REPO
  from tests.test_configs import launcher_host_process
  before = _tree_digest(two_checkpoints)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  with launcher_host_process(env) as run:
    for script, args, code, message in _cli_cases(tmp_path, two_checkpoints):
      returncode, _, stderr = run(script.removesuffix(".py"), args, timeout=300)
      assert returncode == code, (script, args, stderr[-2000:])
      assert message in _one_error_line(stderr), (script, message, stderr[-2000:])
  assert _tree_digest(two_checkpoints) == before
  assert not (tmp_path / "w").exists() and not (tmp_path / "p").exists()
  # Evaluating with another data root (here a copy) writes only --out: the run's support set stays as it was.
  import shutil
  shutil.copytree(two_checkpoints / "phantom_data", tmp_path / "data_copy")
  proc = _launch("evaluate.py", "--workdir", str(two_checkpoints), "--data_root", str(tmp_path / "data_copy"),
                 "--out", str(tmp_path / "eval.json"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _tree_digest(two_checkpoints) == before and (tmp_path / "eval.json").is_file()



def test_evaluate_and_predict_use_the_intact_checkpoint_and_say_so(two_checkpoints, tmp_path):
  import shutil
  wd = tmp_path / "run"
  shutil.copytree(two_checkpoints, wd)
  _damage(wd / "checkpoints" / "2", "truncated")
  before = _tree_digest(wd)
  proc = _launch("evaluate.py", "--workdir", str(wd), "--out", str(tmp_path / "eval.json"))
  assert proc.returncode == 0 and "checkpoints/2: damaged" in proc.stderr, proc.stderr[-3000:]
  assert "evaluating step 1 instead" in proc.stderr
  normal = wd / "phantom_data" / "images" / "test" / "normal"
  proc = _launch("predict.py", "--workdir", str(wd), "--input", str(normal), "--out", str(tmp_path / "p"))
  assert proc.returncode == 0 and "checkpoints/2: damaged" in proc.stderr and "using step 1 instead" in proc.stderr
  assert _tree_digest(wd) == before  # reported, not moved: only a resuming trainer sets it aside


def test_a_16_bit_image_scores_as_its_8_bit_version(two_checkpoints, shared_dir, tmp_path):
  import numpy as np
  from PIL import Image
  from data_pipelines import preprocess
  from mediclip_jax import parallel
  from mediclip_jax.evaluate import restore, scoring
  src = sorted((shared_dir / "data" / "brainmri" / "images" / "test" / "abnormal").glob("*"))[0]
  eight = np.asarray(Image.open(src).convert("L"))
  Image.fromarray(eight).save(tmp_path / "8bit.png")
  Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16bit.png")  # full 16-bit range
  assert Image.open(tmp_path / "16bit.png").mode.startswith("I;16")
  mesh = parallel.make_mesh()
  run = restore.load_run(str(two_checkpoints), mesh)
  size, color = int(run.config.data.image_size), run.config.data.color
  images = np.stack([preprocess.load_test_image(tmp_path / f, size, color) for f in ("8bit.png", "16bit.png")])
  maps, scores = scoring.score_share(run.trainable.scorer(run.state), images, 2, mesh)
  assert abs(scores[0] - scores[1]) < 1e-3 and np.abs(maps[0] - maps[1]).max() < 1e-3
