"""launch/predict.py on archives: file lists, TFDS builds, CSV rows, top-k panels, shards that split a list,
unreadable images. A stand-in model (tests/fake_predict.py: score = mean brightness) keeps these fast; the real models' scoring is
covered by tests/test_train_e2e.py and tests/test_export.py."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

def _predict(tmp_path, *args):
  script = REPO / "tests" / "fake_predict.py"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path), *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=300)


def _archive(folder: Path, n: int = 7) -> list[Path]:
  """n grey images of brightness 10, 40, 70, ...: image i scores (10 + 30 i) / 255."""
  folder.mkdir(parents=True)
  paths = []
  for i in range(n):
    p = folder / f"img_{i}.png"
    Image.fromarray(np.full((20 + i, 30), 10 + 30 * i, np.uint8)).save(p)
    paths.append(p)
  return paths


def _jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_file_list_gives_one_csv_row_per_image_and_panels_for_the_top_k(tmp_path):
  paths = _archive(tmp_path / "a")
  (tmp_path / "list.txt").write_text("".join(f"a/{p.name}\n" for p in reversed(paths)) + "\n")
  out = tmp_path / "out"
  proc = _predict(tmp_path, "--input", tmp_path / "list.txt", "--rows", "csv", "--panels", "2", "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [p.name for p in reversed(paths)]  # the list's order
  for r in rows:
    i = int(r["name"][4])
    assert float(r["raw_score"]) == pytest.approx((10 + 30 * i) / 255, abs=1e-6)
    assert r["abnormal"] == str((10 + 30 * i) / 255 > 0.5) and r["file"] == str(tmp_path / "a" / r["name"])
  summary = json.loads((out / "predictions.json").read_text())
  assert summary["n_images"] == 7 and summary["n_abnormal"] == 3 and summary["n_unreadable"] == 0
  assert sorted(p["name"] for p in summary["predictions"]) == ["img_5.png", "img_6.png"]  # the two brightest
  assert sorted(f.name for f in out.glob("*_panel.png")) == ["img_5_panel.png", "img_6_panel.png"]


def test_a_bad_file_list_line_is_named(tmp_path):
  _archive(tmp_path / "a", 2)
  (tmp_path / "list.txt").write_text("a/img_0.png\na/missing.png\n")
  proc = _predict(tmp_path, "--input", tmp_path / "list.txt", "--out", tmp_path / "out")
  assert proc.returncode == 1 and f"{tmp_path / 'list.txt'}:2: " in proc.stderr and "missing.png" in proc.stderr


def test_shards_split_a_folder_into_disjoint_parts_that_cover_it(tmp_path):
  paths = _archive(tmp_path / "a")
  out = tmp_path / "out"
  for i in range(3):
    proc = _predict(tmp_path, "--input", tmp_path / "a", "--shard", f"{i}/3", "--panels", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
  parts = [[r["name"] for r in _jsonl(out / f"predictions-{i:05d}-of-00003.jsonl")] for i in range(3)]
  assert sorted(sum(parts, [])) == sorted(p.name for p in paths) and all(parts)
  for i in range(3):  # each process's panels in its own folder: equal stems in two shards cannot collide
    assert len(list((out / f"panels-{i:05d}-of-00003").glob("*_panel.png"))) == 1


def test_an_unreadable_image_stops_the_run_or_becomes_an_error_row(tmp_path):
  paths = _archive(tmp_path / "a", 5)
  paths[3].write_bytes(b"\x89PNG\r\n\x1a\n broken")
  out = tmp_path / "out"
  proc = _predict(tmp_path, "--input", tmp_path / "a", "--out", out)
  assert proc.returncode == 1 and f"{paths[3]}: cannot read image" in proc.stderr
  assert "the rows scored so far are in" in proc.stderr
  proc = _predict(tmp_path, "--input", tmp_path / "a", "--skip_unreadable", "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _jsonl(out / "predictions.jsonl")
  assert len(rows) == 5 and "cannot read image" in rows[3]["error"] and "score" not in rows[3]
  assert [r["name"] for r in rows if "error" not in r] == ["img_0.png", "img_1.png", "img_2.png", "img_4.png"]
  assert json.loads((out / "predictions.json").read_text())["n_unreadable"] == 1


def test_a_tfds_build_is_scored_record_by_record(tmp_path):
  from data_pipelines import records, tfds_builders
  build = tfds_builders.build(tfds_builders.PhantomChest(4, 3, 3, size=64, seed=1, data_dir=tmp_path / "tfds",
                                                         progress=False))
  out = tmp_path / "out"
  proc = _predict(tmp_path, "--input", build.directory, "--split", "test", "--panels", "1", "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _jsonl(out / "predictions.jsonl")
  source = records.open_tfds(build.directory, "test")
  assert [r["name"] for r in rows] == [source[i]["name"] for i in range(len(source))]
  assert [r["file"] for r in rows] == [records.record_ref(build.directory, "test", i) for i in range(len(source))]
  from data_pipelines import preprocess
  for i, r in enumerate(rows):  # the stand-in's score: mean of the model-size image
    expected = np.repeat(preprocess.test_array(source[i]["image"], 32, "grey").mean(), 1)[0]
    assert r["raw_score"] == pytest.approx(float(expected), abs=1e-6)
  assert len(list(out.glob("*_panel.png"))) == 1
