"""Running several test processes together (multi-process JAX on 127.0.0.1), bounded in time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(cmds: list[list[str]], logs: list[Path], timeout: float, env: dict[str, str], on_poll=None,
                 ok_codes: tuple[int, ...] = (0,)) -> list[int]:
  """Runs the commands together, each into its log; if one fails or time runs out, kills the rest (no
  stragglers). `on_poll(procs)` is called while they run (to send signals). Returns the exit codes."""
  files = [open(p, "w") for p in logs]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(c, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
           for c, f in zip(cmds, files)]
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.returncode not in (None, *ok_codes) for p in procs):
        break
      if on_poll is not None:
        on_poll(procs)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for f in files:
      f.close()
  return [p.returncode for p in procs]


def launcher_env() -> dict[str, str]:
  """The environment of a launcher subprocess: this checkout first on the path, CPU, every compiled program in
  the session's persistent cache (`tests/conftest.py`; minimum compile time 0)."""
  from tests.conftest import REPO
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def read_params(workdir: Path) -> dict[str, np.ndarray]:
  """The parameters a run wrote with `launch/train.py --dump_params` (process 0's copy)."""
  with np.load(Path(workdir) / "params_process0.npz") as f:
    return {k: f[k] for k in f.files}


def sigterm_after_first_train_row(cmd: list[str], workdir: Path, env: dict[str, str], timeout: float = 600) -> int:
  """Starts a training command, sends SIGTERM once its first train row is logged, checks that it exits with 130
  after writing a checkpoint, and returns that checkpoint's step."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = Path(workdir) / "metrics.jsonl"
  t0 = time.time()
  while not (metrics.is_file() and "train/loss" in metrics.read_text()):
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the first train row")
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 130, err[-3000:]
  return int(err.split("checkpoint written at step ")[1].split(";")[0])


def resume_to_the_uninterrupted_run(cmd: list[str], workdir: Path, step: int, uninterrupted: Path, env: dict[str, str],
                                    metric_tol: float = 1e-6) -> None:
  """Reruns a training command stopped at `step`: it must resume there and end with the uninterrupted run's
  parameters (to 1e-6) and its untrained and last-epoch metrics."""
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"resumed from step {step}" in proc.stderr
  a, b = read_params(uninterrupted), read_params(workdir)
  assert a.keys() == b.keys()
  diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
  print(f"resumed from step {step}: max |param diff| vs uninterrupted = {diff}")
  assert diff <= 1e-6
  want = json.loads((Path(uninterrupted) / "results.json").read_text())
  got = json.loads((Path(workdir) / "results.json").read_text())
  assert got["steps"] == want["steps"] and got["untrained"] == want["untrained"]
  assert got["last_epoch"].keys() == want["last_epoch"].keys()
  for k, v in want["last_epoch"].items():
    assert (v is None and got["last_epoch"][k] is None) or abs(got["last_epoch"][k] - v) <= metric_tol, k


def run_to_completion(cmd: list[str], workdir: Path, env: dict[str, str], timeout: float = 900) -> Path:
  """Runs a training command that must succeed; its console output is kept as workdir/console.txt."""
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (Path(workdir) / "console.txt").write_text(proc.stdout + proc.stderr)
  return Path(workdir)


def checkpoint_steps(workdir: Path) -> list[int]:
  """The steps of a run's finished checkpoints (its checkpoints/<step> folders), ascending."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def one_vs_eight(config_flags: list[str]) -> dict:
  """Runs tests/method_multidevice.py with a training run's config flags; its JSON result."""
  from tests.conftest import REPO
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "method_multidevice.py"), *config_flags],
                        env=launcher_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  print(res)
  return res


def assert_one_vs_eight(res: dict, trained_parts: tuple[str, ...]) -> None:
  """What every method's 1-vs-8 result must show: each trained state part the same to 1e-5 on both meshes after
  the compared steps and changed by them far beyond that; the loss the same; six steps compiled once per mesh;
  the same state scoring 11 padded images the same way on both."""
  for part in trained_parts:
    assert res[f"max_{part}_diff"] <= 1e-5, (part, res)
    assert res[f"{part}_change_1"] > 10 * max(res[f"max_{part}_diff"], 1e-8), (part, res)
    assert res[f"{part}_change_8"] == pytest.approx(res[f"{part}_change_1"], rel=0.01), (part, res)
  assert res["max_metric_diff"]["loss"] <= 1e-5, res
  # Six steps, one compilation each (and nothing else compiled while stepping).
  assert list(res["compiles_1"].values()) == [1] and list(res["compiles_8"].values()) == [1], res
  assert res["eval_n"] == 11 and res["eval_score_spread"] > 1e-4
  assert res["eval_map_diff"] <= 1e-5 and res["eval_score_diff"] <= 1e-5, res
