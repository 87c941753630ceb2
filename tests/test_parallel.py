"""Scale-out: 1 device vs 8 fake devices give the same step; the step compiles once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


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
