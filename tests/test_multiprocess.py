"""Two processes on 127.0.0.1 (CPU, gloo collectives) train on real BrainMRI data as one job.

Checks: both processes end with bit-identical parameters; only process 0 writes results; the
evaluation sharded over processes gives the same metrics as a single process evaluating the
restored checkpoint; the pair's checkpoint restores in one process and training continues.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import processes
from tests.conftest import REPO

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 300


def _env() -> dict[str, str]:
  # One CPU device per process (no forced device count). Backend optimisation off: compiling
  # the train step dominates these short runs and takes half as long; all runs share the flag.
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def _cmd(workdir: Path, data_root: Path, epochs: int, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "brainmri.py") + ":tiny",
          "--workdir", str(workdir), f"--config.data.root={data_root}", "--config.data.image_size=64", f"--config.train.epochs={epochs}", "--config.eval.every_epochs=1000",
          "--config.train.checkpoint_every_steps=2", *extra]


def _run_all(cmds: list[list[str]], logs: list[Path], timeout: float, on_poll=None,
             ok_codes: tuple[int, ...] = (0,)) -> list[int]:
  return processes.run_together(cmds, logs, timeout, _env(), on_poll, ok_codes)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, shared_dir) -> dict:
  """Both processes train 4 steps (2 epochs of 16 images, batch 8) and each dumps its parameters."""
  wd = tmp_path_factory.mktemp("mp") / "run"
  data_root = shared_dir / "data" / "brainmri"
  port = processes.free_port()
  cmds = [_cmd(wd, data_root, 2, "--dump_params", "--coordinator_address", f"127.0.0.1:{port}",
               "--num_processes", "2", "--process_id", str(i)) for i in range(2)]
  logs = [wd.parent / f"process{i}.log" for i in range(2)]
  t0 = time.time()
  codes = _run_all(cmds, logs, RUN_TIMEOUT_S)
  wall = time.time() - t0
  text = [p.read_text() for p in logs]
  assert codes == [0, 0], f"exit codes {codes} after {wall:.0f}s\n" + "\n".join(t[-3000:] for t in text)
  print(f"two-process run: {wall:.1f}s")
  return {"workdir": wd, "data_root": data_root, "logs": text, "wall_s": wall}


def test_processes_end_with_identical_parameters(pair_run):
  wd = pair_run["workdir"]
  assert "2 devices, 2 processes; test=220 (110 per process, held in memory); 4 steps of 2 per epoch" in pair_run["logs"][0]
  p0, p1 = np.load(wd / "params_process0.npz"), np.load(wd / "params_process1.npz")
  assert p0.files and sorted(p0.files) == sorted(p1.files)
  for k in p0.files:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
  # Only process 0 writes results and prints them.
  assert "last epoch" in pair_run["logs"][0] and "last epoch" not in pair_run["logs"][1]
  results = json.loads((wd / "results.json").read_text())
  assert results["steps"] == 4 and 0.0 <= results["last_epoch"]["image_auroc"] <= 1.0
  assert (wd / "checkpoints" / "4").is_dir()


def test_checkpoint_restores_in_one_process_and_continues(pair_run, tmp_path):
  wd, root = pair_run["workdir"], pair_run["data_root"]
  pair_metrics = json.loads((wd / "results.json").read_text())["last_epoch"]
  # 1) Same number of epochs: one process restores step 4 and evaluates it alone. The metrics
  #    must match the two processes' (each scored half of the test set; gathered in order).
  t0 = time.time()
  codes = _run_all([_cmd(wd, root, 2)], [tmp_path / "eval.log"], RUN_TIMEOUT_S)
  log = (tmp_path / "eval.log").read_text()
  assert codes == [0], log[-3000:]
  assert "resumed from step 4" in log and "1 devices, 1 processes" in log
  single_metrics = json.loads((wd / "results.json").read_text())["last_epoch"]
  for k, v in pair_metrics.items():
    assert abs(single_metrics[k] - v) <= 1e-6, (k, v, single_metrics[k])
  print("metrics 2 processes vs 1:", {k: (v, abs(single_metrics[k] - v)) for k, v in pair_metrics.items()})
  t1 = time.time()
  # 2) More epochs: training continues from the pair's checkpoint to step 6.
  codes = _run_all([_cmd(wd, root, 3)], [tmp_path / "more.log"], RUN_TIMEOUT_S)
  log = (tmp_path / "more.log").read_text()
  assert codes == [0], log[-3000:]
  assert "resumed from step 4" in log
  assert json.loads((wd / "results.json").read_text())["steps"] == 6
  assert (wd / "checkpoints" / "6").is_dir()
  print(f"single-process evaluate of restored step 4: {t1 - t0:.1f}s; continue to step 6: {time.time() - t1:.1f}s")


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(shared_dir, tmp_path):
  """A SIGTERM that reaches only process 1: both agree at the next log step, checkpoint it together and exit."""
  wd = tmp_path / "run"
  port = processes.free_port()
  cmds = [_cmd(wd, shared_dir / "data" / "brainmri", 20, "--config.train.checkpoint_every_steps=1000",
               "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i))
          for i in range(2)]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  sent = []

  def signal_after_first_log(procs):
    metrics = wd / "metrics.jsonl"
    if not sent and metrics.is_file() and metrics.read_text().strip():
      procs[1].send_signal(signal.SIGTERM)
      sent.append(time.time())

  codes = _run_all(cmds, logs, RUN_TIMEOUT_S, signal_after_first_log, ok_codes=(0, 130))
  text = [p.read_text() for p in logs]
  assert sent, "training ended before the signal could be sent"
  assert codes == [130, 130], f"exit codes {codes}\n" + "\n".join(t[-3000:] for t in text)
  steps = [re.search(r"checkpoint written at step (\d+)", t) for t in text]
  assert all(steps), text[0][-2000:]
  step = int(steps[0].group(1))
  assert int(steps[1].group(1)) == step and step < 40
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [step]
  print(f"SIGTERM to process 1 only: both stopped at step {step}, "
        f"{time.time() - sent[0]:.1f}s after the signal")
