"""Run outputs: strict JSONL, TensorBoard events read back by TensorBoard, the progress bar's
compile-free rate, quiet third-party logs, and the text summaries."""
from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import pytest
from PIL import Image

from mediclip_jax.train import writers
from mediclip_jax.train.writers import (JsonlWriter, Progress, TensorBoardWriter, configure_logging, eval_line,
                                        summary_table)


def _strict_loads(line: str):
  def reject(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(line, parse_constant=reject)


def test_jsonl_is_strict_json():
  with pytest.raises(ValueError):  # the strict reader does reject what json.dumps writes by default
    _strict_loads(json.dumps({"x": float("nan")}))


def test_jsonl_non_finite_as_null_and_numpy_unwrapped(tmp_path):
  path = tmp_path / "sub" / "m.jsonl"
  w = JsonlWriter(str(path))
  w.write({"step": np.int64(3), "loss": np.float32(0.5), "nan": float("nan"), "inf": np.float64(np.inf),
           "nested": {"xs": [1.0, float("-inf")], "arr": np.array([0.25, np.nan])}})
  w.close()
  (line,) = path.read_text().splitlines()
  assert _strict_loads(line) == {"step": 3, "loss": 0.5, "nan": None, "inf": None,
                                 "nested": {"xs": [1.0, None], "arr": [0.25, None]}}


def test_jsonl_appends_on_reopen(tmp_path):
  path = tmp_path / "m.jsonl"
  for step in (1, 2):
    w = JsonlWriter(str(path))
    w.write({"step": step})
    w.close()
  assert [_strict_loads(l) for l in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]


def test_tensorboard_reads_back_scalars_and_image(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  w = TensorBoardWriter(str(tmp_path))
  for step in range(1, 4):
    w.scalars(step, {"train/loss": 1.0 / step, "eval/image_auroc": np.float32(0.5 + step / 10), "note": "x"})
  img = np.zeros((4, 6, 3), np.float32)
  img[1, 2] = (1.0, 0.5, 0.0)
  w.images(7, {"grid/synthesis": img})
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.IMAGES: 0})
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["eval/image_auroc", "train/loss"]
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3]
  assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
  assert [e.value for e in acc.Scalars("eval/image_auroc")] == pytest.approx([0.6, 0.7, 0.8])
  (ev,) = acc.Images("grid/synthesis")
  assert (ev.step, ev.height, ev.width) == (7, 4, 6)
  decoded = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
  expected = np.zeros((4, 6, 3), np.uint8)
  expected[1, 2] = (255, 128, 0)
  np.testing.assert_array_equal(decoded, expected)


def test_tensorboard_creates_no_event_file_without_writes(tmp_path):
  logdir = tmp_path / "tb"
  w = TensorBoardWriter(str(logdir))
  w.scalars(5, {"note": "not a number"})
  w.images(5, {})
  w.close()
  assert not logdir.exists() or not any(logdir.iterdir())
  w = TensorBoardWriter(str(logdir))
  w.scalars(5, {"loss": 1.0})
  w.close()
  assert len(list(logdir.glob("events.out.tfevents.*"))) == 1


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_reports_compile_once_and_steady_rate():
  buf = _Terminal()
  p = Progress(total_steps=20, stream=buf)
  p.compiling()
  time.sleep(0.5)  # the first step, as slow as a compilation
  p.update(1, "loss 1.0")
  for step in range(2, 8):
    time.sleep(0.01)
    p.update(step, "loss 0.5")
  p.write("eval step 7 (epoch 1): image_auroc 0.500")
  p.close()
  out = buf.getvalue()
  assert "compiling…" in out
  assert out.count("compiled in") == 1
  assert re.search(r"compiled in 0\.[5-9] s", out)
  assert "eval step 7 (epoch 1): image_auroc 0.500" in re.split(r"[\r\n]", out)  # a line of its own
  assert p.rate is not None and p.rate > 20  # 0.5 s first step left out: ~100 steps/s, not ~12
  shown = float(re.findall(r"([\d.]+) step/s", out)[-1])
  assert shown > 20 and "loss 0.5" in out.rsplit("\r", 1)[-1] and "7/20" in out.rsplit("\r", 1)[-1]


def test_progress_after_resume_excludes_first_step_and_has_no_compile_line():
  buf = _Terminal()
  p = Progress(total_steps=100, start_step=50, stream=buf)
  p.update(51)
  assert p.rate is None  # one update gives no steady-state interval yet
  time.sleep(0.02)
  p.update(53)
  p.close()
  assert 0 < p.rate < 2 / 0.02 + 1e-6
  assert "compiled in" not in buf.getvalue() and "53/100" in buf.getvalue()


def test_progress_into_a_log_writes_plain_lines_at_most_every_interval_and_at_the_end():
  buf = io.StringIO()  # not a terminal
  p = Progress(total_steps=6, stream=buf, log_every_s=0.05)
  p.compiling()
  p.update(1)
  p.update(2)  # within the interval: no line
  time.sleep(0.06)
  p.update(3, "loss 0.5")
  p.update(6)
  p.close()
  assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
  lines = buf.getvalue().splitlines()
  assert lines[0] == "compiling the train step…" and lines[1].startswith("compiled in")
  assert lines[2].startswith("step 3/6 (50%)") and lines[2].endswith("loss 0.5")
  assert lines[3].startswith("step 6/6 (100%)") and len(lines) == 4


def test_progress_disabled_draws_no_bar_but_writes_lines():
  buf = io.StringIO()
  p = Progress(total_steps=10, stream=buf, enabled=False)
  p.compiling()
  p.update(1)
  p.write("hello")
  p.close()
  lines = buf.getvalue().splitlines()
  assert lines[0].startswith("compiled in") and lines[1:] == ["hello"]


@pytest.fixture
def restore_logging():
  from absl import logging as absl_logging
  names = ("", writers.LOGGER_NAME) + writers.THIRD_PARTY_LOGGERS
  levels = {n: logging.getLogger(n).level for n in names}
  verbosity = absl_logging.get_verbosity()
  yield
  absl_logging.set_verbosity(verbosity)
  for n, lvl in levels.items():
    logging.getLogger(n).setLevel(lvl)


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records: list[logging.LogRecord] = []

  def emit(self, record):
    self.records.append(record)


def test_configure_logging_silences_orbax_but_not_ours(tmp_path, restore_logging):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  del restore_logging

  def save_and_restore(directory):
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True)
    m = ocp.CheckpointManager(str(directory), options=options)
    tree = {"a": jnp.ones((4,)), "b": jnp.zeros((2, 3))}
    m.save(1, args=ocp.args.StandardSave(tree))
    m.wait_until_finished()
    m.restore(1, args=ocp.args.StandardRestore(tree))
    m.close()

  handler = _Records()
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    root.setLevel(logging.INFO)
    configure_logging(1)
    save_and_restore(tmp_path / "loud")
    loud = [r for r in handler.records if "orbax" in r.pathname]
    assert len(loud) > 10  # orbax is chatty at INFO
    handler.records.clear()
    configure_logging(0)
    save_and_restore(tmp_path / "quiet")
    logging.getLogger("mediclip_jax.train").info("ours")
    assert [(r.name, r.getMessage()) for r in handler.records] == [("mediclip_jax.train", "ours")]
  finally:
    root.removeHandler(handler)


def test_eval_line():
  assert (eval_line(40, 20, {"image_auroc": 0.61234, "image_ap": 0.7, "pixel_auroc": np.float32(0.9006)})
          == "eval step 40 (epoch 20): image_auroc 0.612 image_ap 0.700 pixel_auroc 0.901")


def test_summary_table():
  table = summary_table({
      "untrained (step 0)": {"image_auroc": 0.5, "image_ap": 0.41234},
      "last epoch": {"image_auroc": 0.81, "image_ap": 0.7, "pixel_auroc": 0.95},
      "best epoch on test (epoch 3)": {"image_auroc": 0.9, "pixel_auroc": 0.96},
  })
  header, rule, *rows = table.splitlines()
  assert header.split() == ["image_auroc", "image_ap", "pixel_auroc"]
  assert set(rule) <= {"-", " "}
  assert rows[0].split() == ["untrained", "(step", "0)", "0.500", "0.412", "—"]
  assert rows[1].split() == ["last", "epoch", "0.810", "0.700", "0.950"]
  assert rows[2].split() == ["best", "epoch", "on", "test", "(epoch", "3)", "0.900", "—", "0.960"]
  ends = {len(line) for line in [header] + rows}
  assert len(ends) == 1  # fixed width: every column right-aligned to the same edge
  for name in ("image_auroc", "image_ap"):
    col_end = header.index(name) + len(name)
    assert all(row[col_end - 1] != " " for row in rows)
