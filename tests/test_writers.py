"""Our TensorBoard event files are read back by TensorBoard itself; JSONL and progress output."""
from __future__ import annotations

import io
import json

import pytest

from mediclip_jax.train.writers import JsonlWriter, Progress, TensorBoardWriter, crc32c, read_records


def test_crc32c_known_vector():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_tensorboard_reads_our_scalars(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  w = TensorBoardWriter(str(tmp_path))
  for step in range(1, 4):
    w.scalars(step, {"train/loss": 1.0 / step, "eval/image_auroc": 0.5 + step / 10})
  w.close()
  assert len(read_records(w.path)) == 4  # file_version + 3 summaries, CRCs checked
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["eval/image_auroc", "train/loss"]
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3]
  assert [round(e.value, 6) for e in loss] == [1.0, 0.5, round(1 / 3, 6)]


def test_jsonl_appends_and_drops_non_finite(tmp_path):
  path = tmp_path / "m.jsonl"
  for v in (1.5, float("nan")):
    w = JsonlWriter(str(path))
    w.write({"step": 1, "loss": v})
    w.close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 1.5}, {"step": 1, "loss": None}]


def test_progress_prints_rate_and_eta():
  buf = io.StringIO()
  p = Progress(total=10, start=0, stream=buf)
  p.update(5, "loss 0.1")
  line = buf.getvalue()
  assert "5/10" in line and "step/s" in line and "ETA" in line and "loss 0.1" in line
