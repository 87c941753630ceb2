"""Dataset readers, preprocessing (grey and RGB test images), support sets, per-process batch shares, phantoms."""
from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from PIL import Image

from mediclip_jax.models.clip import CLIP_MEAN, CLIP_STD, clip_normalize
from data_pipelines import batches, datasets, normal_images, phantom, preprocess, support
from data_pipelines.datasets import DatasetError


# ----------------------------------------------------------------------------- real data


def test_brainmri_mediclip_layout(shared_dir):
  d = datasets.load_dataset(shared_dir / "data" / "brainmri")
  assert d.layout == "mediclip"
  assert (len(d.train), len(d.test)) == (32, 220)
  assert sum(s.label for s in d.test) == 155
  assert not d.has_masks
  assert all(s.label == 0 for s in d.train)
  assert d.test[0].name.startswith("test/") and d.test[0].path.endswith(d.test[0].name)


def test_busi_masks_and_preprocessing(shared_dir):
  d = datasets.load_dataset(shared_dir / "data" / "busi")
  assert (len(d.train), len(d.test)) == (32, 748)
  abnormal = [s for s in d.test if s.label == 1]
  assert len(abnormal) == 647 and all(s.mask_path for s in abnormal)
  assert {s.clsname for s in abnormal} == {"benign", "malignant"}
  assert all(s.mask_path is None for s in d.test if s.label == 0)
  s = abnormal[0]
  m = preprocess.load_mask(s.mask_path, 224)
  raw = np.asarray(Image.open(s.mask_path).convert("L").resize((224, 224), Image.NEAREST))
  np.testing.assert_array_equal(m, (raw != 0).astype(np.float32))
  assert m.dtype == np.float32 and 0 < m.mean() < 1
  im = preprocess.load_test_image(s.path, 224)
  ref = np.asarray(Image.open(s.path).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)[..., 0] / 255
  assert im.shape == (224, 224) and np.abs(im - ref).max() <= 1 / 255 + 1e-6  # R = G = B
  tr = preprocess.load_train_image(d.train[0].path, 224)
  ref = np.asarray(Image.open(d.train[0].path).resize((224, 224), Image.BILINEAR).convert("L"), np.float32) / 255
  np.testing.assert_array_equal(tr, ref)


def test_test_image_rgb_and_grey(shared_dir):
  """color="rgb" keeps the three channels (here a BrainMRI test image whose channels differ), "grey" gives
  one channel; both as PIL reads them (RGB, bilinear resize, then L for grey)."""
  d = datasets.load_dataset(shared_dir / "data" / "brainmri")
  path = next(s.path for s in d.test if s.name == "test/abnormal/image_204.jpg")
  rgb = preprocess.load_test_image(path, 224, color="rgb")
  ref = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
  assert rgb.shape == (224, 224, 3) and rgb.dtype == np.float32
  np.testing.assert_array_equal(rgb, np.asarray(ref, np.float32) / 255)
  assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 0.1 or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 0.1
  grey = preprocess.load_test_image(path, 224, color="grey")
  assert grey.shape == (224, 224) and grey.dtype == np.float32
  np.testing.assert_array_equal(grey, np.asarray(ref.convert("L"), np.float32) / 255)
  with pytest.raises(ValueError, match="data.color"):
    preprocess.load_test_image(path, 224, color="gray")


def test_normal_images(shared_dir):
  root = shared_dir / "data" / "busi"
  images, names = normal_images.load_normal_images(root, 64, 3)
  d = datasets.load_dataset(root)
  assert images.shape == (3, 64, 64) and images.dtype == np.float32
  assert names == [s.name for s in d.train[:3]]
  np.testing.assert_array_equal(images[1], preprocess.load_train_image(d.train[1].path, 64))
  assert len(normal_images.load_normal_images(root, 32)[0]) == 32


# ----------------------------------------------------------------------------- plain folders


def _png(path, value, size=(20, 16)):
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.full(size[::-1], value, np.uint8)
  Image.fromarray(arr).save(path)


@pytest.fixture
def folder_ds(tmp_path):
  root = tmp_path / "plain"
  for i in range(3):
    _png(root / "train" / "normal" / f"n{i}.png", 40 + i)
  _png(root / "test" / "normal" / "t0.png", 50)
  _png(root / "test" / "abnormal" / "a0.png", 200)
  _png(root / "test" / "abnormal" / "a1.jpg", 210)
  m = np.zeros((16, 20), np.uint8)
  m[4:8, 5:9] = 1  # a mask with value 1 must still count as lesion
  (root / "test" / "masks").mkdir(parents=True)
  Image.fromarray(m).save(root / "test" / "masks" / "a0.png")
  Image.fromarray(m * 255).save(root / "test" / "masks" / "a1_mask.png")
  return root


def test_plain_folder_layout(folder_ds):
  d = datasets.load_dataset(folder_ds)
  assert d.layout == "folder" and d.has_masks
  assert [s.name for s in d.train] == ["train/normal/n0.png", "train/normal/n1.png", "train/normal/n2.png"]
  assert [(s.name, s.label) for s in d.test] == [("test/normal/t0.png", 0), ("test/abnormal/a0.png", 1),
                                                  ("test/abnormal/a1.jpg", 1)]
  assert d.test[0].mask_path is None and d.test[1].mask_path.endswith("a0.png")
  assert d.test[2].mask_path.endswith("a1_mask.png")
  m = preprocess.load_mask(d.test[1].mask_path, 32)
  assert m.sum() > 0 and set(np.unique(m)) == {0.0, 1.0}
  im = preprocess.load_train_image(d.train[1].path, 32)
  assert im.shape == (32, 32) and np.allclose(im, 41 / 255)


def test_plain_folder_errors(folder_ds):
  (folder_ds / "test" / "masks" / "a1_mask.png").unlink()
  with pytest.raises(DatasetError, match=r"a1\.jpg: no mask named a1"):
    datasets.load_dataset(folder_ds)
  _png(folder_ds / "test" / "masks" / "a1.png", 255)
  _png(folder_ds / "test" / "masks" / "zz.png", 255)
  with pytest.raises(DatasetError, match="no abnormal image of the same stem.*zz"):
    datasets.load_dataset(folder_ds)
  (folder_ds / "test" / "masks" / "zz.png").unlink()
  (folder_ds / "train" / "normal" / "notes.txt").write_text("x")
  with pytest.raises(DatasetError, match="notes.txt: unexpected entry"):
    datasets.load_dataset(folder_ds)


def test_mvtec_layout_with_good_folders_defect_classes_and_ground_truth(tmp_path):
  root = tmp_path / "bottle"
  for i in range(2):
    _png(root / "train" / "good" / f"{i:03d}.png", 40 + i)
  _png(root / "test" / "good" / "000.png", 50)
  _png(root / "test" / "broken_large" / "000.png", 200)
  _png(root / "test" / "contamination" / "000.png", 210)
  _png(root / "ground_truth" / "broken_large" / "000_mask.png", 255)
  _png(root / "ground_truth" / "contamination" / "000_mask.png", 255)
  d = datasets.load_dataset(root)
  assert d.layout == "mvtec" and d.has_masks and len(d.train) == 2
  assert [(s.name, s.label, s.clsname) for s in d.test] == [
      ("test/good/000.png", 0, "good"), ("test/broken_large/000.png", 1, "broken_large"),
      ("test/contamination/000.png", 1, "contamination")]
  assert d.test[0].mask_path is None and d.test[2].mask_path.endswith("contamination/000_mask.png")
  (root / "ground_truth" / "contamination" / "000_mask.png").unlink()
  with pytest.raises(DatasetError, match=r"contamination/000\.png: no mask named 000_mask"):
    datasets.load_dataset(root)
  _png(root / "ground_truth" / "contamination" / "000_mask.png", 255)
  _png(root / "train" / "broken_large" / "x.png", 1)
  with pytest.raises(DatasetError, match="besides good/"):
    datasets.load_dataset(root)


def test_missing_root_and_unknown_layout(tmp_path):
  with pytest.raises(DatasetError, match="is not a directory") as e:
    datasets.load_dataset(tmp_path / "nope")
  assert "samples/train.json" in str(e.value) and "test/abnormal" in str(e.value)
  (tmp_path / "odd" / "train").mkdir(parents=True)
  with pytest.raises(DatasetError, match="matches neither dataset layout") as e:
    datasets.load_dataset(tmp_path / "odd")
  msg = str(e.value)
  for p in ("odd/samples/train.json", "odd/samples/test.json", "odd/train/normal", "odd/test/normal",
            "odd/test/abnormal", "odd/test/masks"):
    assert p in msg


def _mediclip_ds(root):
  _png(root / "images" / "train" / "normal" / "a.png", 10)
  _png(root / "images" / "test" / "abnormal" / "b.png", 10)
  _png(root / "images" / "test" / "ground_true" / "b_mask.png", 255)
  (root / "samples").mkdir(parents=True)
  (root / "samples" / "train.json").write_text(
      json.dumps({"filename": "train/normal/a.png", "label": 0, "label_name": "normal", "clsname": "normal"}) + "\n")
  (root / "samples" / "test.json").write_text(json.dumps(
      {"filename": "test/abnormal/b.png", "label": 1, "label_name": "abnormal", "clsname": "x",
       "mask": "test/ground_true/b_mask.png"}) + "\n\n")
  return root


def test_mediclip_layout_errors(tmp_path):
  root = _mediclip_ds(tmp_path / "m")
  d = datasets.load_dataset(root)
  assert len(d.train) == 1 and d.test[0].mask_path.endswith("b_mask.png")
  train = root / "samples" / "train.json"
  good = train.read_text()
  train.write_text(good + '{"filename": "train/normal/a.png", "label": 0\n')
  with pytest.raises(DatasetError, match=r"train\.json:2: malformed JSON"):
    datasets.load_dataset(root)
  train.write_text(good + json.dumps({"filename": "train/normal/gone.png", "label": 0}) + "\n")
  with pytest.raises(DatasetError, match=r"train\.json:2: image .*gone\.png does not exist"):
    datasets.load_dataset(root)
  train.write_text(json.dumps({"filename": "train/normal/a.png", "label": 1}) + "\n")
  with pytest.raises(DatasetError, match="normal images only"):
    datasets.load_dataset(root)
  train.write_text(good)
  test = root / "samples" / "test.json"
  test.write_text(json.dumps({"filename": "test/abnormal/b.png", "label": 1, "mask": "test/ground_true/x.png"}))
  with pytest.raises(DatasetError, match=r"test\.json:1: mask .*x\.png does not exist"):
    datasets.load_dataset(root)
  test.write_text(json.dumps({"filename": "test/abnormal/b.png", "label": "yes"}))
  with pytest.raises(DatasetError, match=r"test\.json:1: 'label' must be 0 or 1"):
    datasets.load_dataset(root)


# ----------------------------------------------------------------------------- preprocessing


def test_clip_normalize_numpy_and_jit():
  g = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
  x = np.asarray(clip_normalize(g))
  assert x.shape == (2, 2, 3)
  np.testing.assert_allclose(x[0, 1], (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-6)
  y = np.asarray(jax.jit(clip_normalize)(g[None]))
  np.testing.assert_allclose(y[0], x, rtol=1e-6)


# ----------------------------------------------------------------------------- support sets


def test_support_set_round_trip(shared_dir, tmp_path):
  d = datasets.load_dataset(shared_dir / "data" / "brainmri")
  a = support.draw_support(d, 16, seed=100)
  assert len(a) == 16 and len({s.name for s in a}) == 16
  assert [s.name for s in a] == [s.name for s in support.draw_support(d, 16, seed=100)]
  assert [s.name for s in a] != [s.name for s in support.draw_support(d, 16, seed=101)]
  assert len(support.draw_support(d, -1)) == 32
  with pytest.raises(ValueError, match=r"k must be -1 or in \[1, 32\]"):
    support.draw_support(d, 33)
  f = support.write_support(tmp_path, a, 100, d.root)
  rec = json.loads(f.read_text())
  assert rec["seed"] == 100 and rec["k"] == 16 and rec["files"] == [s.name for s in a]
  assert support.read_support(f, d) == a
  assert support.read_support(tmp_path, d) == a  # a directory: its support_set.json
  rec["files"][3] = "train/normal/not_there.jpg"
  f.write_text(json.dumps(rec))
  with pytest.raises(DatasetError, match=r"support_set\.json: files\[3\] 'train/normal/not_there\.jpg' is not a training image"):
    support.read_support(f, d)
  f.write_text("{not json")
  with pytest.raises(DatasetError, match="support_set.json: malformed JSON"):
    support.read_support(f, d)


# ----------------------------------------------------------------------------- per-process shares


def test_process_slices():
  assert batches.process_slice(8, 0, 1) == slice(0, 8)
  assert [batches.process_slice(12, p, 4) for p in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
  assert batches.process_slice(8) == slice(0, 8)  # defaults: this single process
  with pytest.raises(ValueError, match="global batch size 10 is not divisible by process_count 4"):
    batches.process_slice(10, 0, 4)
  with pytest.raises(ValueError, match="process_index 4"):
    batches.process_slice(8, 4, 4)
  parts = [batches.process_eval_indices(10, p, 3) for p in range(3)]
  assert [i.tolist() for i, _ in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
  assert parts[2][1].tolist() == [True, True, False, False]
  idx, valid = batches.process_eval_indices(10)  # defaults: this single process
  assert idx.tolist() == list(range(10)) and valid.all()
  with pytest.raises(ValueError, match="process_index 3"):
    batches.process_eval_indices(10, 3, 3)


# ----------------------------------------------------------------------------- phantoms


def test_phantom_determinism_and_masks():
  a = phantom.phantom_arrays(3, 2, 6, size=64, seed=7)
  b = phantom.phantom_arrays(3, 2, 6, size=64, seed=7)
  c = phantom.phantom_arrays(3, 2, 6, size=64, seed=8)
  for k in ("train_images", "test_images", "test_masks"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["train_images"], c["train_images"])
  more = phantom.phantom_arrays(5, 2, 6, size=64, seed=7)  # an image does not depend on the count
  np.testing.assert_array_equal(more["train_images"][:3], a["train_images"])
  imgs, masks = a["test_images"], a["test_masks"]
  assert imgs.dtype == np.float32 and imgs.min() >= 0 and imgs.max() <= 1
  assert a["test_labels"].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
  assert a["test_kinds"].tolist()[2:5] == ["nodule", "opacity", "cardiomegaly"]
  assert np.all(masks[:2] == 0) and all(0 < m.mean() < 0.2 for m in masks[2:])
  assert set(np.unique(masks)) <= {0.0, 1.0}
  # The anomaly brightens its masked area relative to the same patient without it.
  for i, kind in zip(range(3), phantom.ANOMALIES):
    seed = phantom._image_seed(7, "test_abnormal", i)
    base, _ = phantom.phantom(64, seed)
    im, m = phantom.phantom(64, seed, kind)
    assert (im - base)[m > 0].mean() > 0.1, kind
  with pytest.raises(ValueError, match=r"size must be in \[64, 224\]"):
    phantom.phantom(32)


def test_phantom_dataset_on_disk(tmp_path):
  t = time.perf_counter()
  phantom.phantom_arrays(16, 42, 42, size=128, seed=0)
  assert time.perf_counter() - t < 10.0  # ~100 images at 128^2
  root = phantom.make_phantom_dataset(tmp_path / "ph", n_train=4, n_test_normal=2, n_test_abnormal=3, size=64, seed=3)
  d = datasets.load_dataset(root)
  assert d.layout == "mediclip" and (len(d.train), len(d.test)) == (4, 5) and d.has_masks
  arr = phantom.phantom_arrays(4, 2, 3, size=64, seed=3)
  im = preprocess.load_train_image(d.train[0].path, 64)
  assert np.abs(im - arr["train_images"][0]).max() <= 0.5 / 255 + 1e-6
  m = preprocess.load_mask(d.test[-1].mask_path, 64)
  np.testing.assert_array_equal(m, arr["test_masks"][-1])
  assert [s.clsname for s in d.test] == ["normal", "normal", "nodule", "opacity", "cardiomegaly"]
