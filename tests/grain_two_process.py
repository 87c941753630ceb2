"""One of two processes of tests/test_grain_input.py's multi-process check (127.0.0.1, CPU, gloo).

  python tests/grain_two_process.py <port> <process_id> <out_dir> <checkpoint_dir>

Joins the pair, then writes <out_dir>/process<i>.json: the record and sample indices of its rows of
every training batch of one epoch, its evaluation batches (index, valid), and whether the batches
after a checkpoint (saved at batch 2 with the iterator, restored into a fresh one with 2 workers)
equal those of the uninterrupted iterator.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from data_pipelines import grain_input  # pylint: disable=wrong-import-position
from mediclip_jax import checkpoints, parallel  # pylint: disable=wrong-import-position
from tests.test_grain_input import GLOBAL_BATCH, N_RECORDS, ListSource, flat_transform  # pylint: disable=wrong-import-position


def main(port: int, process_id: int, out_dir: str, ckpt_dir: str) -> None:
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=60)
  assert jax.process_count() == 2 and jax.process_index() == process_id
  source = ListSource(N_RECORDS)
  with grain_input.train_batches(source, global_batch_size=GLOBAL_BATCH, seed=5, transform=flat_transform,
                                 num_epochs=1) as it:
    train = [{"record_index": b["record_index"].tolist(), "sample_index": b["sample_index"].tolist()} for b in it]
  ev = grain_input.eval_batches(source, batch_size_per_process=4, transform=flat_transform)
  evals = [{"index": b["index"].tolist(), "valid": b["valid"].tolist(),
            "value": b["value"].tolist()} for b in ev]

  ckpt = checkpoints.Checkpointer(ckpt_dir)
  mesh = parallel.make_mesh()
  state = {"w": jax.device_put(jnp.zeros(2), parallel.replicated(mesh))}
  it = grain_input.train_batches(source, global_batch_size=GLOBAL_BATCH, seed=5, transform=flat_transform)
  for _ in range(2):
    next(it)
  ckpt.save(2, state, {"config": {}}, data_iterator=it)
  ckpt.wait()
  after = [next(it)["record_index"].tolist() for _ in range(4)]
  it.close()
  fresh = grain_input.train_batches(source, global_batch_size=GLOBAL_BATCH, seed=5, transform=flat_transform,
                                    worker_count=2)
  ckpt.restore_data(2, fresh)
  resumed = [next(fresh)["record_index"].tolist() for _ in range(4)]
  fresh.close()
  ckpt.restore(2, state, mesh)
  files = sorted(os.listdir(os.path.join(ckpt_dir, "2", checkpoints.DATA)))
  ckpt.close()
  with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
    json.dump({"train": train, "eval": evals, "resume_equal": after == resumed, "data_files": files}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
