"""data_pipelines/grain_input.py: seed-pure shuffled training batches, per-process rows, workers, resumable
state (also through a real Checkpointer), evaluation shares; launch/bench_input.py end to end.

Sources here are in-memory lists of records (records.py's layout) of varying native sizes; a row's
"value" is its record's number, so every batch can be checked against its "record_index".
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from grain import sharding

from data_pipelines import grain_input, preprocess
from mediclip_jax import checkpoints, parallel
from tests import processes
from tests.conftest import REPO

N_RECORDS, GLOBAL_BATCH = 39, 6  # 6 steps per epoch, 3 records dropped per epoch


class ListSource:
  """Records in memory (a list of dicts), as records.py's sources give them; `labels` optional."""

  def __init__(self, n: int, with_labels: bool = False):
    rng = np.random.default_rng(n)
    self.records = []
    for i in range(n):
      h, w = 10 + i % 7, 12 + i % 5
      self.records.append({"image": rng.integers(0, 256, (h, w, 1 + 2 * (i % 2)), dtype=np.uint8),
                           "mask": np.zeros((h, w, 1), np.uint8), "has_mask": False, "label": i % 3 == 0,
                           "class_name": "normal", "name": f"r{i}"})
    if with_labels:
      self.labels = lambda: [int(r["label"]) for r in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]


def flat_transform(record: dict) -> dict:
  """A model input at 8 px plus the record's number."""
  return {"image": preprocess.train_array(record["image"], 8), "value": np.int32(int(record["name"][1:]))}


def _train(seed=5, workers=0, n=N_RECORDS, batch=GLOBAL_BATCH, **kw) -> grain_input.TrainBatches:
  return grain_input.train_batches(ListSource(n), global_batch_size=batch, seed=seed, transform=flat_transform,
                                   worker_count=workers, **kw)


def _take(it, k: int) -> list[dict]:
  out = [next(it) for _ in range(k)]
  for b in out:
    np.testing.assert_array_equal(b["value"], b["record_index"])
  return out


def _same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_batches_other_seed_differs_any_worker_count():
  with _train(seed=5) as a, _train(seed=5) as b, _train(seed=6) as c, _train(seed=5, workers=2) as w:
    ba, bb, bc, bw = _take(a, 8), _take(b, 8), _take(c, 8), _take(w, 8)
  _same(ba, bb)
  _same(ba, bw)  # workers build whole batches: the order does not depend on worker_count
  assert [x["record_index"].tolist() for x in ba] != [x["record_index"].tolist() for x in bc]
  assert ba[0]["image"].shape == (GLOBAL_BATCH, 8, 8) and ba[0]["image"].dtype == np.float32
  assert ba[0]["record_index"].dtype == np.int32 and ba[0]["sample_index"].dtype == np.int32


def test_every_record_once_per_epoch_minus_the_remainder():
  """39 records, global batch 6: each epoch 6 batches = 36 distinct records, the 3 left out differ by epoch."""
  with _train(num_epochs=3) as it:
    assert it.steps_per_epoch == 6
    batches = list(it)
  assert len(batches) == 18
  rows = np.concatenate([b["record_index"] for b in batches]).reshape(3, 36)
  dropped = []
  for epoch in rows:
    assert len(set(epoch.tolist())) == 36
    dropped.append(sorted(set(range(N_RECORDS)) - set(epoch.tolist())))
  assert len({tuple(d) for d in dropped}) > 1
  assert not np.array_equal(rows[0], rows[1])  # a new permutation each epoch
  np.testing.assert_array_equal(np.concatenate([b["sample_index"] for b in batches]), np.arange(18 * 6))


def test_processes_take_disjoint_rows_of_the_same_global_batches():
  with _train(batch=6) as whole:
    single = _take(whole, 6)
  parts = []
  for p in range(3):
    with _train(batch=6, shard_options=sharding.ShardOptions(p, 3)) as it:
      parts.append(_take(it, 6))
  for step in range(6):
    joined = {k: np.concatenate([parts[p][step][k] for p in range(3)]) for k in single[step]}
    _same([single[step]], [joined])
  assert parts[0][0]["image"].shape == (2, 8, 8)


def test_bad_settings_refused():
  with pytest.raises(ValueError, match="not divisible by the process count 4"):
    _train(batch=6, shard_options=sharding.ShardOptions(0, 4))
  with pytest.raises(ValueError, match="fewer than one global batch"):
    _train(n=5, batch=6)
  with pytest.raises(ValueError, match="num_epochs"):
    _train(num_epochs=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_gives_the_uninterrupted_batches(workers):
  """7 batches, state, 5 more (A); a fresh iterator set to the state gives B == A (epoch boundary at 12)."""
  with _train(workers=workers) as it:
    _take(it, 7)
    state = it.get_state()
    a = _take(it, 5)
  with _train(workers=2 - workers) as fresh:  # another worker count restores the same position
    fresh.set_state(state)
    b = _take(fresh, 5)
  _same(a, b)
  assert json.loads(state)["next_batch"] == 7
  with _train(num_epochs=3) as bounded:  # the epoch count only says where the stream ends
    bounded.set_state(state)
    _same(a, _take(bounded, 5))
  with _train(seed=6) as other, pytest.raises(ValueError, match="seed: saved 5, now 6"):
    other.set_state(state)


def test_resume_through_a_checkpoint(tmp_path):
  mesh = parallel.make_mesh()
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=5)
  state = {"w": jnp.arange(3.0)}
  with _train() as it:
    _take(it, 7)
    ckpt.save(7, state, {"config": {}}, data_iterator=it)
    a = _take(it, 5)
    ckpt.save(12, state, {"config": {}})  # without the data item, as every older checkpoint
  ckpt.wait()
  assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "7" / checkpoints.DATA)
  with _train(workers=2) as fresh:
    ckpt.restore_data(7, fresh)
    _same(a, _take(fresh, 5))
    assert ckpt.has_data(7) and not ckpt.has_data(12)
    with pytest.raises(ValueError, match=r"ckpt/12: the checkpoint has no data iterator state"):
      ckpt.restore_data(12, fresh)
  # The state item and metadata restore as before, with or without the data item.
  assert ckpt.restore(7, state, mesh)[1] == {"config": {}}
  assert ckpt.restore_intact(state, mesh)[0] == 12
  # Another process count's files: refused naming the checkpoint and what it holds.
  folder = tmp_path / "ckpt" / "7" / checkpoints.DATA
  os.rename(folder / "process_0-of-1.json", folder / "process_0-of-2.json")
  shutil.copy(folder / "process_0-of-2.json", folder / "process_1-of-2.json")
  with _train() as fresh, pytest.raises(ValueError, match=r"ckpt/7: no data iterator state for process 0 of 1 "
                                                          r".*process_0-of-2.json.*another process count"):
    ckpt.restore_data(7, fresh)
  ckpt.close()


def test_eval_batches_pad_and_mark_valid_rows():
  source = ListSource(11)
  seen = []
  lengths = []
  for p in range(2):  # per process ceil(11/2) = 6 rows -> 2 batches of 4, the last half padding
    ev = grain_input.eval_batches(source, batch_size_per_process=4, transform=flat_transform, process_index=p,
                                  process_count=2, worker_count=2 * p)
    out = list(ev)
    lengths.append((len(ev), len(out)))
    for b in out:
      assert b["image"].shape == (4, 8, 8) and b["valid"].dtype == bool
      np.testing.assert_array_equal(b["value"], b["index"])
      seen += b["index"][b["valid"]].tolist()
    assert out[-1]["valid"].tolist() == ([True, True, False, False] if p == 0 else [True, False, False, False])
  assert lengths == [(2, 2), (2, 2)]
  assert seen == list(range(11))


def test_source_labels():
  np.testing.assert_array_equal(grain_input.source_labels(ListSource(7)), [1, 0, 0, 1, 0, 0, 1])

  class Unreadable(ListSource):
    def __getitem__(self, i):
      raise AssertionError("labels() must be used, no record read")

  np.testing.assert_array_equal(grain_input.source_labels(Unreadable(7, with_labels=True)), [1, 0, 0, 1, 0, 0, 1])


@pytest.mark.slow
def test_two_processes_split_an_epoch_and_the_eval_set(tmp_path):
  port = processes.free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  cmds = [[sys.executable, str(REPO / "tests" / "grain_two_process.py"), str(port), str(i), str(tmp_path),
           str(tmp_path / "ckpt")] for i in range(2)]
  codes = processes.run_together(cmds, [tmp_path / f"process{i}.log" for i in range(2)], 240, env)
  text = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
  assert codes == [0, 0], "\n".join(text)
  res = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]
  # Training: 6 global batches of 6, 3 rows each per process; together each of 36 records once.
  assert len(res[0]["train"]) == len(res[1]["train"]) == 6
  rows = [sum((b["record_index"] for b in r["train"]), []) for r in res]
  assert not set(rows[0]) & set(rows[1])
  assert len(set(rows[0] + rows[1])) == 36 and set(rows[0] + rows[1]) <= set(range(N_RECORDS))
  samples = sorted(sum((b["sample_index"] for r in res for b in r["train"]), []))
  assert samples == list(range(36))
  with _train(num_epochs=1) as single:  # the same global batches as one process sees them
    for step, b in enumerate(single):
      assert b["record_index"].tolist() == res[0]["train"][step]["record_index"] + res[1]["train"][step]["record_index"]
  # Evaluation: 20 rows each, 5 batches of 4 each; valid rows cover 0..38 once.
  assert len(res[0]["eval"]) == len(res[1]["eval"]) == 5
  valid = [i for r in res for b in r["eval"] for i, v in zip(b["index"], b["valid"]) if v]
  assert valid == list(range(N_RECORDS))
  # Each process saved and restored its own iterator state.
  assert res[0]["resume_equal"] and res[1]["resume_equal"]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(res[0]["data_files"])


def test_bench_input_on_phantom_images(tmp_path):
  bench = tmp_path / "bench.json"
  bench.write_text(json.dumps({"modes": {"fused": {"images_per_s": 40.0}}, "batch": {"global": 8},
                               "device": {"process_count": 1}}))
  t0 = time.time()
  out = subprocess.run([sys.executable, str(REPO / "launch" / "bench_input.py"), "--phantom", "24", "--phantom_size", "64", "--image_size",
                        "32", "--batch_size", "4", "--batches", "4", "--warmup", "1", "--workers", "0,1", "--bench_json", str(bench)],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  lines = out.stdout.splitlines()
  table = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
  assert [row[0] for row in table] == ["0", "1"]
  assert all(float(row[1]) > 0 for row in table)
  assert "pipeline/step ratio" in out.stdout and "40.0 images/s" in out.stdout
  print(f"bench_input subprocess: {time.time() - t0:.1f}s")
