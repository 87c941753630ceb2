"""Scale-out: 1 device vs 8 fake devices give the same step; the step compiles once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_one_vs_eight_devices_same_loss_and_params_no_recompile():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_equivalence.py")], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  print(res)
  assert res["n_devices"] == 8
  assert res["max_loss_diff"] <= 1e-5, res
  assert res["max_param_diff"] <= 1e-5, res
  assert res["loss_8"][-1] < res["loss_8"][0]  # the three steps did train
  assert res["compiles_1"] == 1 and res["compiles_8"] == 1  # 10 steps, one compilation each
  # Evaluation split over 8 devices (11 images, padded batches) returns the single-device maps, in order.
  assert res["eval_n"] == 11 and res["local_rows_roundtrip"]
  assert res["eval_map_diff"] <= 1e-5 and res["eval_score_diff"] <= 1e-5, res


def test_initialize_checks_flags_before_touching_a_backend():
  from mediclip_jax import parallel
  assert parallel.initialize() is False  # single process: nothing to do
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize("127.0.0.1:1", num_processes=2)
  with pytest.raises(ValueError, match="--process_id=2"):
    parallel.initialize("127.0.0.1:1", num_processes=2, process_id=2)


def test_gather_rows_and_eval_batch_sizes_single_process():
  from mediclip_jax import parallel
  x = np.arange(12.0).reshape(4, 3)
  np.testing.assert_array_equal(parallel.gather_rows(x, np.array([1, 1, 0, 1], bool)), x[[0, 1, 3]])
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert parallel.eval_batch_sizes(5, mesh) == (5, 5)
  assert parallel.any_process(True) and not parallel.any_process(False)
