"""Trains a method (`config.method`, default MediCLIP) with on-device anomaly synthesis; evaluates,
checkpoints and resumes.

  python launch/train.py --config configs/chestxray.py:phantom,tiny --workdir runs/phantom
  python launch/train.py --config configs/brainmri.py --config.data.root=../shared/data/brainmri \
      --config.model.clip.checkpoint=ckpt/vit_l14 --workdir runs/brainmri
  python launch/train.py --config configs/chestxray.py --config.train.epochs=50   # any field: --config.x=y

Re-running with the same --workdir resumes from its last checkpoint (SIGTERM writes one first).
Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment (--distributed); every
process runs the same command with the same --workdir (on a shared file system); see
docs/multihost.md. Checkpoints restore with any process or device count.

  python launch/train.py --config configs/brainmri.py:tiny --workdir runs/mh \
      --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 0   # and --process_id 1
"""
from __future__ import annotations

import os
import sys
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from mediclip_jax import config_utils, methods, parallel
from mediclip_jax.train import loop, writers
from mediclip_jax.train.workdir import WorkdirBusy

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, support set). "
                               "Default: runs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with settings from the "
                                 "environment (TPU pods, SLURM, Open MPI).")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", "gloo", ["gloo", "mpi"], "CPU collectives "
                                     "implementation of multi-process CPU runs (ignored by GPU/TPU).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds a process waits for the "
                                            "coordinator (process 0) and for all processes to join.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
_DUMP_PARAMS = flags.DEFINE_bool("dump_params", False, "Each process writes its copy of the final parameters "
                                 "to <workdir>/params_process<i>.npz (checks that processes agree).")


def init_distributed() -> bool:
  """Joins the multi-process run before anything initialises a JAX backend (no device queries here)."""
  if _COORDINATOR.value and _DISTRIBUTED.value:
    raise app.UsageError("give either --coordinator_address (with --num_processes, --process_id) or "
                         "--distributed, not both")
  if not _COORDINATOR.value and (_NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None):
    raise app.UsageError("--num_processes/--process_id need --coordinator_address (or use --distributed)")
  try:
    return parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               from_environment=_DISTRIBUTED.value, cpu_collectives=_CPU_COLLECTIVES.value,
                               timeout_s=_DISTRIBUTED_TIMEOUT.value)
  except ValueError as e:  # bad process numbers, an unreachable coordinator: one line, exit 1
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv) -> int:
  del argv
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(config)
    return 0
  init_distributed()
  writers.configure_logging(flags.FLAGS.verbosity)  # -v 1: third-party INFO logs too
  parallel.quiet_other_processes()
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(
      flags.FLAGS["config"].config_filename))[0])
  try:
    results = loop.train_and_evaluate(config, workdir, methods.get(config.method), dump_params=_DUMP_PARAMS.value)
  except (OSError, ValueError, FloatingPointError, WorkdirBusy) as e:  # DatasetError, CheckpointError: ValueErrors
    if flags.FLAGS.verbosity >= 1:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 1
  except loop.Interrupted as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    return 130
  if jax.process_index() == 0:
    print(writers.summary_table(loop.summary_rows(results)))
    if "decision" in results:  # anomaly detectors
      print(loop.decision_line(results))
    for name, path in results.get("outputs", {}).items():  # what a method writes besides checkpoints
      print(f"{name}: {path}")
    pictures = os.path.join(workdir, "figures")
    print(f"results: {os.path.join(workdir, 'results.json')}" + (f"; pictures: {pictures}" if os.path.isdir(pictures)
                                                                 else ""))
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_utils.parse_flags)
