"""Image-text pairs for MIRAGE: phantom findings reports state the ground truth, class captions, pair files
(phantom and the real BUSI / BrainMRI folders, read back through `records.read_pairs`), false-positive
injection, stratified splits, the false-negative rate of a batch."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import captions, phantom, records
from data_pipelines.datasets import DatasetError, load_dataset

ANOMALY_WORDS = ("nodule", "opacit", "cardiomegaly", "enlarg", "mass", "lesion", "consolidation", "right", "left",
                 "upper", "lower", "zone", " mm", "%")


def _truth(kind: str, mask: np.ndarray) -> dict:
  """What a report must say, computed here from the mask without captions' or phantom's helpers."""
  size = mask.shape[0]
  rows, cols = np.nonzero(mask > 0.5)
  if kind == "cardiomegaly":
    return {}
  u = (cols.mean() + 0.5) / size * 2 - 1  # image x, left to right
  v = (rows.mean() + 0.5) / size * 2 - 1
  lo, hi = phantom.LUNG_ZONE_EDGES_V
  return {"side": "right" if u < 0 else "left",  # the image's left half is the patient's right
          "zone": "upper" if v < lo else ("middle" if v < hi else "lower"),
          "diameter_mm": 2 * np.sqrt(len(rows) / np.pi) * 350.0 / size}


def _stated(report: str) -> dict:
  """The facts a report states, parsed from its text."""
  low = report.lower()
  out = {"sides": set(re.findall(r"\b(right|left)\b", low)), "zones": set(re.findall(r"\b(upper|middle|lower)\b", low)),
         "mm": [int(x) for x in re.findall(r"(\d+) mm", low)], "pct": [int(x) for x in re.findall(r"(\d+) %", low)],
         "sizes": {w for w in captions.SIZE_WORDS if w in low}, "degrees": {w for w in captions.DEGREES if w in low},
         "kinds": {k for k in phantom.ANOMALIES if k in low}}
  return out


def test_reports_state_the_ground_truth():
  seen = Counter()
  for size in (64, 128):
    for seed in range(10 if size == 64 else 3):
      for kind in phantom.ANOMALIES:
        _, mask = phantom.phantom(size, seed, kind)
        texts = {captions.phantom_report(kind, mask, np.random.default_rng(r)) for r in range(12)}
        assert len(texts) >= 2, f"one phrasing only for {kind}: {texts}"
        facts = [_stated(t) for t in texts]
        assert all(f == facts[0] for f in facts), texts  # a different rng changes the phrasing, never a fact
        f, report = facts[0], sorted(texts)[0]
        assert f["kinds"] == {kind}, report
        if kind == "cardiomegaly":
          true_scale = float(np.random.default_rng([seed, 2]).uniform(1.25, 1.5))  # as phantom() draws it
          assert len(f["pct"]) == 1 and abs(f["pct"][0] - 100 * (true_scale - 1)) <= 3.0, (report, true_scale)
          degree = captions.DEGREES[int(np.searchsorted(captions.DEGREE_EDGES_PCT, f["pct"][0], side="right"))]
          assert f["degrees"] == {degree} and "silhouette" in report and not f["sides"] and not f["zones"], report
          continue
        t = _truth(kind, mask)
        assert f["sides"] == {t["side"]} and f["zones"] == {t["zone"]}, (report, t)
        assert len(f["mm"]) == 1 and abs(f["mm"][0] - t["diameter_mm"]) <= 0.5 + 1e-9, (report, t)
        word = captions.SIZE_WORDS[int(np.searchsorted(captions.SIZE_EDGES_MM[kind], f["mm"][0], side="right"))]
        assert f["sizes"] == {word}, report
        seen[t["side"]] += 1
        seen[t["zone"]] += 1
  assert set(seen) == {"right", "left", "upper", "middle", "lower"}, seen  # both sides, every zone checked
  for seed in range(5):
    _, mask = phantom.phantom(64, seed)
    for r in range(5):
      report = captions.phantom_report(None, mask, np.random.default_rng(r)).lower()
      assert not [w for w in ANOMALY_WORDS if w in report], report
  with pytest.raises(ValueError, match="mask marks"):
    captions.phantom_report(None, phantom.phantom(64, 0, "nodule")[1], np.random.default_rng(0))
  with pytest.raises(ValueError, match="empty"):
    captions.phantom_report("nodule", np.zeros((64, 64), np.float32), np.random.default_rng(0))


def test_phrasings_are_varied_and_prompts_differ_from_captions():
  normals = {captions.phantom_report(None, phantom.phantom(64, s)[1], np.random.default_rng(s)) for s in range(50)}
  assert len(normals) >= 6, normals
  every_caption = set(normals)
  for source, fn in (("busi_captions", captions.busi_caption), ("brainmri_captions", captions.brainmri_caption)):
    for name in captions.CLASSES[source]:
      texts = {fn(name, np.random.default_rng(s)) for s in range(40)}
      assert len(texts) >= 3, (source, name, texts)
      every_caption |= texts
    with pytest.raises(ValueError, match="class_name must be one of"):
      fn("abnormal", np.random.default_rng(0))
  assert captions.brainmri_caption("tumor", np.random.default_rng(0)) in every_caption
  for kind in phantom.ANOMALIES:
    every_caption |= {captions.phantom_report(kind, phantom.phantom(64, s, kind)[1], np.random.default_rng(s))
                      for s in range(30)}
  norm = lambda t: t.lower().strip(" .")
  captioned = {norm(t) for t in every_caption}
  assert set(captions.CLASS_PROMPTS) == set(captions.SOURCES) == set(captions.CLASSES)
  for source, classes in captions.CLASSES.items():
    assert classes[0] == "normal" and tuple(captions.CLASS_PROMPTS[source]) == classes
    for name, prompts in captions.CLASS_PROMPTS[source].items():
      assert len(set(prompts)) >= 3, (source, name)
      assert not {norm(p) for p in prompts} & captioned, (source, name)


def _tree_hash(root: Path) -> str:
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
  return h.hexdigest()


def test_make_phantom_pairs(tmp_path):
  path = Path(captions.make_phantom_pairs(tmp_path / "a", 24, size=64, seed=5))
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert len(lines) == 24 and path == tmp_path / "a" / "pairs.jsonl"
  assert Counter(l["class"] for l in lines) == {"normal": 12, "nodule": 4, "opacity": 4, "cardiomegaly": 4}
  pairs = records.read_pairs(path)
  classes = captions.CLASSES["phantom_reports"]
  assert [p.label for p in pairs] == [classes.index(p.class_name) for p in pairs] == [l["label"] for l in lines]
  assert all(os.path.isfile(p.path) and Path(p.path).parent == tmp_path / "a" / "images" for p in pairs)
  for i, l in enumerate(lines):  # the image is phantom() of its per-index seed; the facts are its mask's
    kind = None if l["class"] == "normal" else l["class"]
    im, mask = phantom.phantom(64, int(np.random.SeedSequence([5, i]).generate_state(1)[0]), kind)
    png = np.asarray(Image.open(pairs[i].path), np.float32) / 255
    assert np.abs(png - im).max() <= 0.5 / 255 + 1e-6
    assert {k: l[k] for k in l if k not in ("image", "text", "label")} == captions.report_facts(kind, mask)
    if kind in ("nodule", "opacity"):
      assert f"{l['diameter_mm']} mm" in l["text"] and l["side"] in l["text"].lower()
  meta = json.loads((tmp_path / "a" / "pairs_meta.json").read_text())
  assert (meta["n"], meta["size"], meta["seed"], meta["abnormal_fraction"]) == (24, 64, 5, 0.5)
  # Deterministic: the same parameters elsewhere give the same files.
  captions.make_phantom_pairs(tmp_path / "b", 24, size=64, seed=5)
  assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
  # Same parameters: reused, not rewritten; other parameters: refused naming the root, nothing touched.
  before, mtime = _tree_hash(tmp_path / "a"), path.stat().st_mtime_ns
  assert captions.make_phantom_pairs(tmp_path / "a", 24, size=64, seed=5) == str(path)
  assert path.stat().st_mtime_ns == mtime
  for kwargs in ({"seed": 6}, {"size": 96, "seed": 5}, {"seed": 5, "abnormal_fraction": 0.25}):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "a")) + ".*other parameters"):
      captions.make_phantom_pairs(tmp_path / "a", 24, **kwargs)
  with pytest.raises(DatasetError, match="other parameters"):
    captions.make_phantom_pairs(tmp_path / "a", 25, seed=5)
  assert _tree_hash(tmp_path / "a") == before
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "pairs.jsonl").write_text("{}\n")
  with pytest.raises(DatasetError, match="no pairs_meta.json"):
    captions.make_phantom_pairs(tmp_path / "c", 4)
  with pytest.raises(ValueError, match="abnormal_fraction"):
    captions.make_phantom_pairs(tmp_path / "d", 4, abnormal_fraction=1.5)
  other = Counter(json.loads(l)["class"] for l in open(captions.make_phantom_pairs(tmp_path / "e", 10, seed=1,
                                                                                   abnormal_fraction=0.9)))
  assert other == {"normal": 1, "nodule": 3, "opacity": 3, "cardiomegaly": 3}


@pytest.mark.parametrize("name, source", [("busi", "busi_captions"), ("brainmri", "brainmri_captions")])
def test_make_caption_pairs_on_real_datasets(shared_dir, tmp_path, name, source):
  root = shared_dir / "data" / name
  on_disk = sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*.jpg")
                   if "ground_true" not in p.parts)
  out = tmp_path / name
  path = captions.make_caption_pairs(root, source, out, seed=3)
  assert sorted(os.listdir(out)) == ["pairs.jsonl", "pairs_meta.json"]  # no image was copied
  assert json.loads((out / "pairs_meta.json").read_text())["image_root"] == str(root / "images")
  pairs = records.read_pairs(path)
  assert sorted(p.name for p in pairs) == on_disk  # one pair per image: 780 BUSI, 252 BrainMRI
  assert len(pairs) == {"busi": 780, "brainmri": 252}[name]
  assert all(p.path == str(root / "images" / p.name) and os.path.isfile(p.path) for p in pairs)
  counts = Counter(p.class_name for p in pairs)
  if name == "busi":  # the class is in the file name: benign_*.jpg, malignant_*.jpg, normal_*.jpg
    assert counts == Counter(Path(n).name.split("_")[0] for n in on_disk) == {"benign": 437, "malignant": 210,
                                                                              "normal": 133}
  else:  # image_*.jpg: the class is the folder (label)
    by_folder = Counter(n.split("/")[1] for n in on_disk)
    assert counts == {"normal": by_folder["normal"], "tumour": by_folder["abnormal"]}
    assert counts == {"normal": 97, "tumour": 155}
  classes = captions.CLASSES[source]
  assert all(p.label == classes.index(p.class_name) for p in pairs)
  listed = {s.name: s.label for s in (lambda d: d.train + d.test)(load_dataset(root))}
  assert all((p.label > 0) == bool(listed[p.name]) for p in pairs)
  texts = {c: {p.text for p in pairs if p.class_name == c} for c in classes}
  assert all(len(t) >= 3 for t in texts.values()) and not set.intersection(*texts.values())
  # Reused with the same parameters, refused with others; an explicit image_root wins over the sidecar.
  assert captions.make_caption_pairs(root, source, out, seed=3) == path
  with pytest.raises(DatasetError, match=re.escape(str(out))):
    captions.make_caption_pairs(root, source, out, seed=4)
  with pytest.raises(DatasetError, match=re.escape(path) + r":1: image .* does not exist"):
    records.read_pairs(path, image_root=tmp_path)


def test_read_pairs_image_root(tmp_path):
  images = tmp_path / "store"
  (images / "sub").mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "sub" / "a.png")
  pairs_dir = tmp_path / "pairs"
  pairs_dir.mkdir()
  f = pairs_dir / "p.jsonl"
  f.write_text(json.dumps({"image": "sub/a.png", "text": "t", "label": 2, "class": "nodule"}) + "\n")
  with pytest.raises(DatasetError, match=re.escape(f"{f}:1") + ": image .* does not exist"):
    records.read_pairs(f)  # no sidecar: relative to the file's folder, as before
  (pairs_dir / "pairs_meta.json").write_text(json.dumps({"image_root": str(images)}))
  (p,) = records.read_pairs(f)
  assert (p.path, p.name, p.label, p.class_name) == (str(images / "sub" / "a.png"), "sub/a.png", 2, "nodule")
  with pytest.raises(DatasetError, match=re.escape(f"{f}:1")):
    records.read_pairs(f, image_root=images / "sub")  # the explicit argument wins: sub/sub/a.png is not there
  f.write_text(json.dumps({"image": "../pairs/p.jsonl", "text": "t"}) + "\n")
  with pytest.raises(DatasetError, match=re.escape(f"{f}:1") + ".*not inside the image folder"):
    records.read_pairs(f)
  f.write_text(json.dumps({"image": "sub/a.png", "text": "t", "class": 3}) + "\n")
  with pytest.raises(DatasetError, match=re.escape(f"{f}:1") + ": 'class' must be a string"):
    records.read_pairs(f)
  (pairs_dir / "pairs_meta.json").write_text(json.dumps({"image_root": "relative/dir"}))
  with pytest.raises(DatasetError, match="pairs_meta.json: 'image_root' must be an absolute path"):
    records.read_pairs(f)
  (pairs_dir / "pairs_meta.json").write_text(json.dumps({"n": 3}))  # no image_root: the file's folder
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(pairs_dir / "b.png")
  (pairs_dir / "p.csv").write_text("image,text,class\nb.png,t,\n")
  (p,) = records.read_pairs(pairs_dir / "p.csv")
  assert (p.path, p.class_name) == (str(pairs_dir / "b.png"), "")


def test_inject_false_positives():
  texts = [f"caption {i % 10}" for i in range(100)]  # ten distinct texts, each ten times
  out, noisy = captions.inject_false_positives(texts, 0.3, seed=1)
  assert noisy.dtype == bool and noisy.shape == (100,) and noisy.sum() == 30
  changed = np.array([a != b for a, b in zip(out, texts)])
  np.testing.assert_array_equal(changed, noisy)  # flagged iff the text changed: each replacement differs
  assert set(out) <= set(texts) and texts == [f"caption {i % 10}" for i in range(100)]  # input untouched
  again = captions.inject_false_positives(texts, 0.3, seed=1)
  assert again[0] == out and (again[1] == noisy).all()
  other = captions.inject_false_positives(texts, 0.3, seed=2)
  assert not (other[1] == noisy).all()
  assert captions.inject_false_positives(texts[:10], 0.25, seed=0)[1].sum() == round(2.5) == 2
  none, flags = captions.inject_false_positives(texts, 0.0, seed=0)
  assert none == texts and not flags.any()
  labels = np.array([i % 10 // 5 for i in range(100)])  # captions 0-4 are class 0, 5-9 class 1
  out, noisy = captions.inject_false_positives(texts, 0.5, seed=3, labels=labels)
  assert noisy.sum() == 50
  assert all(int(out[i].split()[1]) // 5 != labels[i] for i in np.flatnonzero(noisy))  # another class's text
  for bad in (-0.1, 1.0, 1.5, float("nan"), True, "0.1"):
    with pytest.raises(ValueError, match="fp_rate"):
      captions.inject_false_positives(texts, bad, seed=0)
  with pytest.raises(ValueError, match="partner"):
    captions.inject_false_positives(["same"] * 5, 0.4, seed=0)


def test_split_indices():
  labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2, 3], [50, 23, 7, 1]))
  s = captions.split_indices(labels, seed=4)
  assert set(s) == {"train", "val", "test"}
  joined = np.concatenate(list(s.values()))
  assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and covering
  for part, frac in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
    idx = s[part]
    assert idx.dtype.kind == "i" and (np.diff(idx) > 0).all()
    for c in range(4):
      assert abs((labels[idx] == c).sum() - frac * (labels == c).sum()) < 1.0, (part, c)
  again = captions.split_indices(labels, seed=4)
  assert all((again[k] == s[k]).all() for k in s)
  assert not (captions.split_indices(labels, seed=5)["test"] == s["test"]).all() or len(s["test"]) == 0
  s2 = captions.split_indices(labels, seed=4, fractions=(0.5, 0.25, 0.25))
  assert abs((labels[s2["val"]] == 1).sum() - 23 * 0.25) < 1.0
  for bad in ((0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)):
    with pytest.raises(ValueError, match="fractions"):
      captions.split_indices(labels, 0, bad)


def test_same_class_fraction():
  assert captions.same_class_fraction(np.array([0, 0, 1, 1])) == pytest.approx(4 / 12)
  assert captions.same_class_fraction(np.array([0, 1, 2, 3])) == 0.0
  assert captions.same_class_fraction(np.array([5, 5, 5])) == 1.0
  assert captions.same_class_fraction(np.array([0, 0, 0, 1])) == pytest.approx(6 / 12)
  assert captions.same_class_fraction(np.array([7])) == 0.0
  ids = np.random.default_rng(1).integers(0, 4, 33)
  brute = np.mean([ids[i] == ids[j] for i in range(33) for j in range(33) if i != j])
  assert captions.same_class_fraction(ids) == pytest.approx(brute)
