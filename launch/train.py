"""Trains MediCLIP with on-device anomaly synthesis; evaluates, checkpoints and resumes.

  python launch/train.py --config configs/chestxray.py:phantom,tiny --workdir runs/phantom
  python launch/train.py --config configs/brainmri.py --config.data.root=../shared/data/brainmri \
      --config.model.clip.checkpoint=ckpt/vit_l14 --workdir runs/brainmri
  python launch/train.py --config configs/chestxray.py --config.train.epochs=50   # any field: --config.x=y

Re-running with the same --workdir resumes from its last checkpoint (SIGTERM writes one first).
Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment (--distributed).
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, support set). "
                               "Default: runs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with settings from the "
                                 "environment (TPU pods, SLURM, Open MPI).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives implementation for "
                                       "multi-process CPU runs.")


def init_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value:
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv) -> int:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  init_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from data_pipelines.datasets import DatasetError  # pylint: disable=import-outside-toplevel
  from mediclip_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/chestxray.py:phantom,tiny", file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(
      flags.FLAGS["config"].config_filename))[0])
  try:
    results = train_and_evaluate(config, workdir)
  except (FileNotFoundError, DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    return 130
  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, "last_epoch": results["last_epoch"],
                      "best_epoch_on_test (reference protocol)": results["best_epoch_on_test (reference protocol)"]},
                     indent=2))
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
