"""TFDS ArrayRecord builds (data_pipelines/tfds_builders.py) hold exactly what the files give
(data_pipelines/records.py), refuse bad inputs naming the file, never keep a stale build silently,
and read back by random access without TensorFlow; launch/prepare_data.py runs them."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import datasets, phantom, preprocess, records
from tests.conftest import REPO

tb = pytest.importorskip("data_pipelines.tfds_builders", reason="needs the tfds extra")


def _same(a: dict, b: dict) -> None:
  """Two records are equal: same keys, identical pixels, same scalar values and Python types."""
  assert a.keys() == b.keys(), (a.keys(), b.keys())
  for k in a:
    if isinstance(a[k], np.ndarray):
      assert a[k].dtype == b[k].dtype == np.uint8 and a[k].shape == b[k].shape, (k, a["name"], a[k].shape, b[k].shape)
      assert np.array_equal(a[k], b[k]), (k, a["name"])
    else:
      assert type(a[k]) is type(b[k]) and a[k] == b[k], (k, a[k], b[k])


def _check_build_matches_files(directory: str, dataset: datasets.Dataset, channels: int) -> None:
  """Every record of both splits equals FileSource's record of the sample of the same name."""
  by_name = {s.name: s for s in dataset.train + dataset.test}
  for split, samples in (("train", dataset.train), ("test", dataset.test)):
    source = records.open_tfds(directory, split)
    assert len(source) == len(samples)
    seen = set()
    for i in range(len(source)):
      rec = source[i]
      assert set(rec) == set(records.RECORD_KEYS)
      assert rec["image"].ndim == 3 and rec["image"].shape[-1] == channels
      assert rec["mask"].shape == rec["image"].shape[:2] + (1,) and set(np.unique(rec["mask"])) <= {0, 1}
      _same(rec, records.FileSource([by_name[rec["name"]]], channels=channels)[0])
      seen.add(rec["name"])
    assert seen == {s.name for s in samples}


def _copy_subset(src_root, dst_root, train: int, picks: dict[str, int]) -> str:
  """A small MediCLIP-layout copy: the first `train` training lines and, per clsname, `picks[clsname]` test lines."""
  (dst_root / "samples").mkdir(parents=True)
  lines = {"train": [], "test": []}
  for split in ("train", "test"):
    left = {"normal": train} if split == "train" else dict(picks)
    for line in (src_root / "samples" / f"{split}.json").read_text().splitlines():
      rec = json.loads(line)
      if left.get(rec["clsname"], 0) > 0:
        left[rec["clsname"]] -= 1
        lines[split].append(line)
        for key in ("filename", "mask"):
          if key in rec:
            (dst_root / "images" / rec[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src_root / "images" / rec[key], dst_root / "images" / rec[key])
    (dst_root / "samples" / f"{split}.json").write_text("\n".join(lines[split]) + "\n")
  return str(dst_root)


@pytest.fixture(scope="module")
def busi_small(shared_dir, tmp_path_factory) -> str:
  return _copy_subset(shared_dir / "data" / "busi", tmp_path_factory.mktemp("busi") / "busi", 3,
                      {"normal": 2, "benign": 2, "malignant": 2})


@pytest.fixture(scope="module")
def busi_small_build(busi_small, tmp_path_factory) -> str:
  return tb.build(tb.AnomalyDataset(busi_small, data_dir=tmp_path_factory.mktemp("tfds"), progress=False)).directory


# ------------------------------------------------------------------------------------------ real datasets


def test_brainmri_build_equals_the_files(shared_dir, tmp_path):
  root = shared_dir / "data" / "brainmri"
  result = tb.build(tb.AnomalyDataset(root, data_dir=tmp_path, progress=False))
  assert result.directory == str(tmp_path / "anomaly_dataset" / "brainmri" / "1.0.0") and not result.reused
  assert result.splits == {"train": 32, "test": 220} and result.bytes > 0
  info = records.tfds_info(tmp_path)  # a data_dir holding one build is accepted too
  assert info["directory"] == result.directory and info["channels"] == 3 and not info["has_masks"]
  assert info["splits"] == {"train": 32, "test": 220} and info["metadata"]["source"] == str(root)
  _check_build_matches_files(result.directory, datasets.load_dataset(root), channels=3)


def test_busi_subset_with_masks_equals_the_files(busi_small, busi_small_build):
  ds = datasets.load_dataset(busi_small)
  _check_build_matches_files(busi_small_build, ds, channels=3)
  test = records.open_tfds(busi_small_build, "test")
  recs = [test[i] for i in range(len(test))]
  assert {r["class_name"] for r in recs} == {"normal", "benign", "malignant"}
  assert all(r["has_mask"] == (r["label"] == 1) for r in recs)
  assert all(r["mask"].any() for r in recs if r["has_mask"]) and not any(r["mask"].any() for r in recs
                                                                           if not r["has_mask"])
  assert records.tfds_info(busi_small_build)["masks"] == {"train": 0, "test": 4}


@pytest.mark.slow
def test_busi_full_build_equals_the_files(shared_dir, tmp_path):
  root = shared_dir / "data" / "busi"
  result = tb.build(tb.AnomalyDataset(root, data_dir=tmp_path, progress=False))
  assert result.splits == {"train": 32, "test": 748}
  assert records.tfds_info(result.directory)["masks"] == {"train": 0, "test": 647}
  _check_build_matches_files(result.directory, datasets.load_dataset(root), channels=3)


def test_scalars_and_tfds_dataset_follow_record_order(busi_small, busi_small_build):
  for split in ("train", "test"):
    source = records.open_tfds(busi_small_build, split)
    sc = source.scalars()
    recs = [source[i] for i in range(len(source))]
    assert sc["name"] == [r["name"] for r in recs] and sc["class_name"] == [r["class_name"] for r in recs]
    assert sc["label"].tolist() == [r["label"] for r in recs] and sc["has_mask"].tolist() == [r["has_mask"]
                                                                                              for r in recs]
    files = records.FileSource(getattr(datasets.load_dataset(busi_small), split)).scalars()
    assert sorted(files["name"]) == sorted(sc["name"])
  ds = records.tfds_dataset(busi_small_build)
  assert ds.layout == records.TFDS and ds.root == busi_small_build and ds.has_masks
  datasets.check_masks_complete(ds)
  test = records.open_tfds(busi_small_build, "test")
  for i, s in enumerate(ds.test):
    r = test[i]
    assert (s.name, s.label, s.clsname, s.mask_path is not None) == (r["name"], r["label"], r["class_name"],
                                                                    r["has_mask"])


def test_grey_dataset_stores_one_channel_and_mixed_stores_three(tmp_path):
  """C = 1 when every image is grey; one colour image makes C = 3 with the grey ones as R = G = B, which gives
  the same model input as the grey file."""
  rng = np.random.default_rng(0)

  def folder(root, colour: bool):
    for d in ("train/normal", "test/normal", "test/abnormal"):
      (root / d).mkdir(parents=True)
    for d, n in (("train/normal", 2), ("test/normal", 1), ("test/abnormal", 1)):
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30), np.uint8), "L").save(root / d / f"g{i}.png")
    if colour:
      Image.fromarray(rng.integers(0, 256, (16, 18, 3), np.uint8), "RGB").save(root / "test" / "abnormal" / "c.png")
    return root

  grey = folder(tmp_path / "grey", False)
  assert records.dataset_channels(s.path for s in datasets.load_dataset(grey).test) == 1
  d1 = tb.build(tb.AnomalyDataset(grey, data_dir=tmp_path / "out", progress=False)).directory
  _check_build_matches_files(d1, datasets.load_dataset(grey), channels=1)
  mixed = folder(tmp_path / "mixed", True)
  d3 = tb.build(tb.AnomalyDataset(mixed, data_dir=tmp_path / "out", progress=False)).directory
  ds = datasets.load_dataset(mixed)
  _check_build_matches_files(d3, ds, channels=3)
  by_name = {s.name: s for s in ds.train}
  train = records.open_tfds(d3, "train")
  for i in range(len(train)):
    rec = train[i]
    path = by_name[rec["name"]].path
    assert np.array_equal(preprocess.train_array(rec["image"], 16), preprocess.load_train_image(path, 16))
    assert np.array_equal(preprocess.test_array(rec["image"], 16, "grey"), preprocess.load_test_image(path, 16))


# --------------------------------------------------------------------------------------------- phantoms


def test_phantom_build_has_the_phantoms_and_their_masks(tmp_path):
  result = tb.build(tb.PhantomChest(6, 4, 4, size=64, seed=3, data_dir=tmp_path, progress=False))
  assert result.splits == {"train": 6, "test": 8}
  ref = phantom.phantom_arrays(6, 4, 4, size=64, seed=3)
  info = records.tfds_info(result.directory)
  assert info["channels"] == 1 and info["masks"] == {"train": 0, "test": 4}
  test = records.open_tfds(result.directory, "test")
  kinds = []
  for i in range(len(test)):
    rec = test[i]
    j = int(rec["name"].rsplit("_", 1)[1][:4])  # the test index make_phantom_dataset names files by
    assert np.array_equal(rec["image"][..., 0], np.round(np.clip(ref["test_images"][j], 0, 1) * 255).astype(np.uint8))
    assert np.array_equal(rec["mask"][..., 0], ref["test_masks"][j].astype(np.uint8))
    assert (rec["label"], rec["class_name"], rec["has_mask"]) == (int(ref["test_labels"][j]), ref["test_kinds"][j],
                                                                  bool(ref["test_labels"][j]))
    assert rec["mask"].any() == rec["has_mask"]
    kinds.append(rec["class_name"])
  assert sorted(kinds) == sorted(["normal"] * 4 + ["nodule", "opacity", "cardiomegaly", "nodule"])
  train = records.open_tfds(result.directory, "train")
  assert sorted(train.scalars()["name"]) == [f"train/normal/phantom_{i:04d}.png" for i in range(6)]


def test_phantom_build_matches_the_phantom_files(tmp_path):
  """The same names and pixels as make_phantom_dataset's files, so both sources give a run the same data."""
  root = phantom.make_phantom_dataset(tmp_path / "files", 3, 2, 3, size=64, seed=1)
  result = tb.build(tb.PhantomChest(3, 2, 3, size=64, seed=1, data_dir=tmp_path / "out", progress=False))
  _check_build_matches_files(result.directory, datasets.load_dataset(root), channels=1)


def test_workers_build_the_same_records(tmp_path):
  one = tb.build(tb.PhantomChest(4, 2, 3, size=64, data_dir=tmp_path / "a", progress=False))
  two = tb.build(tb.PhantomChest(4, 2, 3, size=64, data_dir=tmp_path / "b", workers=2, progress=False))
  for split in ("train", "test"):
    a, b = records.open_tfds(one.directory, split), records.open_tfds(two.directory, split)
    assert len(a) == len(b)
    for i in range(len(a)):
      _same(a[i], b[i])


# ---------------------------------------------------------------------------------------------- refusals


def _refused(builder_fn, match: str, target) -> None:
  with pytest.raises(ValueError, match=match):
    tb.build(builder_fn())
  assert not target.exists() or not any(p.name == "1.0.0" for p in target.rglob("*")), "a failed build left data"


def test_corrupt_image_is_refused_naming_the_file(busi_small, tmp_path):
  root = tmp_path / "busi"
  shutil.copytree(busi_small, root)
  victim = root / "images" / json.loads((root / "samples" / "test.json").read_text().splitlines()[-1])["filename"]
  victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
  _refused(lambda: tb.AnomalyDataset(root, data_dir=tmp_path / "out", progress=False), str(victim), tmp_path / "out")


def test_mask_of_another_size_is_refused_naming_the_file(busi_small, tmp_path):
  root = tmp_path / "busi"
  shutil.copytree(busi_small, root)
  rec = [json.loads(x) for x in (root / "samples" / "test.json").read_text().splitlines() if "mask" in x][0]
  mask = root / "images" / rec["mask"]
  Image.open(mask).resize((40, 30)).save(mask, format="JPEG")
  _refused(lambda: tb.AnomalyDataset(root, data_dir=tmp_path / "out", progress=False), f"{mask}.*mask is 40x30",
           tmp_path / "out")


def test_missing_mask_is_refused_naming_the_line(busi_small, tmp_path):
  root = tmp_path / "busi"
  shutil.copytree(busi_small, root)
  lines = (root / "samples" / "test.json").read_text().splitlines()
  n = next(i for i, x in enumerate(lines) if "mask" in x)
  rec = json.loads(lines[n])
  del rec["mask"]
  lines[n] = json.dumps(rec)
  (root / "samples" / "test.json").write_text("\n".join(lines) + "\n")
  with pytest.raises(datasets.DatasetError, match=rf"test.json:{n + 1}: abnormal test image .* has no 'mask'"):
    tb.AnomalyDataset(root, data_dir=tmp_path / "out", progress=False)


def test_rebuild_reuses_same_inputs_refuses_others_and_overwrites(busi_small, tmp_path):
  out = tmp_path / "out"
  first = tb.build(tb.AnomalyDataset(busi_small, data_dir=out, name="x", progress=False))
  again = tb.build(tb.AnomalyDataset(busi_small, data_dir=out, name="x", progress=False))
  assert again.reused and again.directory == first.directory and again.splits == first.splits
  other = tb.PhantomChest(3, 2, 2, size=64, data_dir=out, name="x", progress=False)
  assert tb.build(other).directory != first.directory  # another builder: another folder
  changed = tmp_path / "changed"
  shutil.copytree(busi_small, changed)
  lines = (changed / "samples" / "test.json").read_text().splitlines()
  (changed / "samples" / "test.json").write_text("\n".join(lines[:-1]) + "\n")  # one test image fewer
  with pytest.raises(ValueError, match=f"already exists .*{busi_small}.*--overwrite"):
    tb.build(tb.AnomalyDataset(changed, data_dir=out, name="x", progress=False))
  assert records.tfds_info(first.directory)["splits"] == first.splits  # untouched
  rebuilt = tb.build(tb.AnomalyDataset(changed, data_dir=out, name="x", progress=False), overwrite=True)
  assert not rebuilt.reused and rebuilt.splits["test"] == first.splits["test"] - 1


def test_bad_names_and_parameters_are_refused(busi_small, tmp_path):
  with pytest.raises(ValueError, match="dataset name"):
    tb.AnomalyDataset(busi_small, data_dir=tmp_path, name="a/b")
  with pytest.raises(ValueError, match="size"):
    tb.PhantomChest(2, 1, 1, size=32, data_dir=tmp_path)


# ------------------------------------------------------------------------------------------ image-text pairs


def _pairs_folder(tmp_path, rng=np.random.default_rng(1)):
  (tmp_path / "img").mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (12, 14 + i, 3), np.uint8), "RGB").save(tmp_path / "img" / f"{i}.png")
  Image.fromarray(rng.integers(0, 256, (10, 10), np.uint8), "L").save(tmp_path / "img" / "g.png")
  return tmp_path


def test_pairs_from_jsonl_and_csv(tmp_path):
  folder = _pairs_folder(tmp_path)
  rows = [{"image": "img/0.png", "text": "a chest x-ray", "label": 1}, {"image": "img/1.png", "text": "normal"},
          {"image": "img/g.png", "text": "grey one", "label": 0}, {"image": "img/0.png", "text": "same image again"}]
  (folder / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / "p.csv").write_text("image,text,label\n" + "".join(f'{r["image"]},"{r["text"]}",{r.get("label", "")}\n'
                                                               for r in rows))
  for name in ("p.jsonl", "p.csv"):
    pairs = records.read_pairs(folder / name)
    assert [(p.name, p.text, p.label) for p in pairs] == [(r["image"], r["text"], r.get("label", 0)) for r in rows]
    result = tb.build(tb.ImageTextPairs(folder / name, data_dir=tmp_path / "out", name=name.replace(".", "_"),
                                        progress=False))
    assert result.splits == {"train": 4}
    source = records.open_tfds(result.directory, "train")
    info = records.tfds_info(result.directory)
    assert info["kind"] == "pairs" and info["channels"] == 3
    got = sorted((source[i] for i in range(len(source))), key=lambda r: r["text"])
    want = sorted(records.PairFileSource(pairs, channels=3), key=lambda r: r["text"])
    assert len(got) == len(want)
    for a, b in zip(got, want):
      assert set(a) == set(records.PAIR_KEYS)
      _same(a, b)
    assert sorted(source.scalars()["text"]) == sorted(r["text"] for r in rows)


@pytest.mark.parametrize("content, match", [
    ('{"image": "img/0.png"}\n', r"p.jsonl:1: missing 'text'"),
    ('{"image": "img/0.png", "text": "x"}\n{"text": "y"}\n', r"p.jsonl:2: missing 'image'"),
    ('{"image": "img/0.png", "text": "x"}\n\n{"image": "img/9.png", "text": "y"}\n', r"p.jsonl:3: image .*9.png does not exist"),
    ('{"image": "img/0.png", "text": "  "}\n', r"p.jsonl:1: empty 'text'"),
    ('{"image": "../x.png", "text": "a"}\n', r"p.jsonl:1: image '../x.png' is not inside"),
    ('{"image": "img/0.png", "text": "a", "label": "one"}\n', r"p.jsonl:1: 'label' must be an integer"),
])
def test_bad_pairs_are_refused_naming_file_and_line(tmp_path, content, match):
  folder = _pairs_folder(tmp_path)
  (folder / "p.jsonl").write_text(content)
  with pytest.raises(datasets.DatasetError, match=match):
    tb.ImageTextPairs(folder / "p.jsonl", data_dir=tmp_path / "out")


def test_bad_csv_pairs_are_refused(tmp_path):
  folder = _pairs_folder(tmp_path)
  (folder / "p.csv").write_text("image,caption\nimg/0.png,x\n")
  with pytest.raises(datasets.DatasetError, match=r"p.csv:1: the header must name the columns 'image' and 'text'"):
    records.read_pairs(folder / "p.csv")
  (folder / "p.csv").write_text("image,text\nimg/0.png,x\nimg/1.png,\n")
  with pytest.raises(datasets.DatasetError, match=r"p.csv:3: empty 'text'"):
    records.read_pairs(folder / "p.csv")


# ------------------------------------------------------------------------------------- opening, pickling


def test_sources_pickle_and_read_the_same_after(busi_small, busi_small_build):
  ds = datasets.load_dataset(busi_small)
  files = records.FileSource(ds.test, channels=3)
  built = records.open_tfds(busi_small_build, "test")
  built[0]  # opened readers must not travel
  for source in (files, built):
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == len(source)
    _same(copy[1], source[1])
    _same(copy[-1], source[len(source) - 1])
    with pytest.raises(IndexError):
      copy[len(source)]


def test_open_tfds_finds_the_build_or_says_what_is_there(busi_small_build, tmp_path):
  version = Path(busi_small_build)
  assert records.is_tfds_dir(version) and not records.is_tfds_dir(tmp_path)
  for where in (version, version.parent, version.parents[2]):  # version dir, config dir, data_dir
    assert records.resolve_tfds_dir(where) == str(version)
  with pytest.raises(ValueError, match="holds no TFDS build"):
    records.open_tfds(tmp_path, "test")
  with pytest.raises(ValueError, match="no such directory"):
    records.open_tfds(tmp_path / "missing", "test")
  with pytest.raises(ValueError, match=r"no split 'val'; it has \['test', 'train'\]"):
    records.open_tfds(version, "val")
  two = tmp_path / "two"
  for name in ("a", "b"):
    tb.build(tb.PhantomChest(2, 1, 1, size=64, data_dir=two, name=name, progress=False))
  assert records.is_tfds_dir(two)
  with pytest.raises(ValueError, match="holds 2 TFDS builds; pass one of them"):
    records.open_tfds(two, "train")


def test_records_module_imports_no_tensorflow_datasets():
  code = ("import sys; sys.path.insert(0, '.'); import data_pipelines.records as r; "
          "print(sorted(m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "launch/prepare_data.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_prepare_data_cli(busi_small, tmp_path):
  out = tmp_path / "tfds"
  run = _cli("--data_root", busi_small, "--name", "busi_small", "--out", str(out))
  assert run.returncode == 0, run.stderr[-3000:]
  version = out / "anomaly_dataset" / "busi_small" / "1.0.0"
  assert f"dataset: {version}" in run.stdout and f"--config.data.tfds_dir={version}" in run.stdout
  assert "train 3, test 6 examples" in run.stdout and " on disk" in run.stdout and "built in" in run.stdout
  assert "busi_small train" in run.stderr  # the progress of each split (plain lines into a pipe)
  again = _cli("--data_root", busi_small, "--name", "busi_small", "--out", str(out))
  assert again.returncode == 0 and "reused the existing build" in again.stdout
  clash = _cli("--phantom", "6", "--size", "64", "--name", "busi_small", "--out", str(out))
  assert clash.returncode == 0, clash.stderr[-3000:]  # another builder, another folder
  ph = out / "phantom_chest" / "busi_small" / "1.0.0"
  assert records.tfds_info(ph)["splits"] == {"train": 3, "test": 3}
  stale = _cli("--phantom", "8", "--size", "64", "--name", "busi_small", "--out", str(out))
  assert stale.returncode == 1 and stale.stderr.strip().splitlines()[-1].startswith(f"error: {ph}: already exists")
  assert "Traceback" not in stale.stderr
  over = _cli("--phantom", "8", "--size", "64", "--name", "busi_small", "--out", str(out), "--overwrite")
  assert over.returncode == 0 and records.tfds_info(ph)["splits"] == {"train": 4, "test": 4}
  none = _cli("--out", str(out))
  assert none.returncode == 1 and "error: give exactly one of --data_root, --phantom, --pairs" in none.stderr
  bad = _cli("--data_root", str(tmp_path / "nowhere"), "--out", str(out))
  assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
