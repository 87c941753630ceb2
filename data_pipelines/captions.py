"""Image-text pairs for noise-robust CLIP adaptation (MIRAGE): captions, pair files, noise and splits.

Sources (`SOURCES`), each with its classes (`CLASSES`; a pair's "label" is the index, 0 always "normal", so
zero-shot AUROC is normal against the rest):
  phantom_reports    findings reports written from the ground truth of chest phantoms (`phantom.py`):
                     which anomaly, on which side, in which zone, how large (`phantom_report`)
  busi_captions      class captions of the BUSI breast ultrasound images (normal / benign / malignant)
  brainmri_captions  class captions of the BrainMRI images (normal / tumour)
Pair files are JSON lines read by `records.read_pairs` ("image", "text", "label", "class" and, for
phantom reports, the facts the text states); `make_caption_pairs` points at the dataset's own image folder
through the "image_root" of pairs_meta.json beside the pairs file rather than copying images.
Training noise: `inject_false_positives` swaps captions between pairs and records which;
`same_class_fraction` measures the false negatives InfoNCE meets in a batch. Everything is deterministic
in its seed; an rng chooses phrasing only, never a stated fact.
"""
from __future__ import annotations

import json
import numbers
import os
import zlib
from pathlib import Path

import numpy as np

from data_pipelines import datasets, phantom

SOURCES = ("phantom_reports", "busi_captions", "brainmri_captions")
CLASSES: dict[str, tuple[str, ...]] = {
    "phantom_reports": ("normal", "nodule", "opacity", "cardiomegaly"),
    "busi_captions": ("normal", "benign", "malignant"),
    "brainmri_captions": ("normal", "tumour"),
}
FIELD_OF_VIEW_MM = 350.0
"""Nominal width of a phantom image in mm (an adult chest radiograph's field), for stated sizes."""
SIZE_WORDS = ("small", "medium-sized", "large")
SIZE_EDGES_MM = {"nodule": (17, 23), "opacity": (42, 52)}
"""Diameter (mm, as stated) from which a finding is medium-sized, then large: about the terciles of what
`phantom.phantom` draws (nodules 12-28 mm, opacities 31-66 mm)."""
DEGREES = ("mild", "moderate", "marked")
DEGREE_EDGES_PCT = (33, 42)
"""Cardiac enlargement (%, as stated; the phantom draws 25-50 %) from which it is moderate, then marked."""
META = "pairs_meta.json"
PAIRS = "pairs.jsonl"
VERSION = 1
"""Bumped when the generated texts or files change, so an old pair folder is refused, not silently reused."""

CLASS_PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "phantom_reports": {
        "normal": ("a normal chest radiograph", "a chest x-ray of a healthy patient",
                   "a chest x-ray with no abnormality"),
        "nodule": ("a chest radiograph with a lung nodule", "a chest x-ray showing a pulmonary nodule",
                   "a chest x-ray with a small round spot in the lung"),
        "opacity": ("a chest radiograph with a lung opacity", "a chest x-ray showing pulmonary opacity",
                    "a chest x-ray with a hazy patch in the lung"),
        "cardiomegaly": ("a chest radiograph with cardiomegaly", "a chest x-ray showing an enlarged heart",
                         "a chest x-ray with a large cardiac shadow"),
    },
    "busi_captions": {
        "normal": ("a normal breast ultrasound", "an ultrasound image of a healthy breast",
                   "a breast sonogram with no tumour"),
        "benign": ("a breast ultrasound showing a benign lesion", "an ultrasound image of a benign breast mass",
                   "a breast sonogram with a fibroadenoma"),
        "malignant": ("a breast ultrasound showing a cancerous mass", "a breast sonogram with a malignant tumour",
                      "an ultrasound of a malignant breast lesion"),
    },
    "brainmri_captions": {
        "normal": ("a normal brain MRI scan", "an MRI of a healthy brain", "a brain MRI with no tumour"),
        "tumour": ("a brain MRI with a tumour", "an MRI scan showing a brain tumour",
                   "a brain MR image with a mass"),
    },
}
"""Zero-shot prompt ensembles, worded apart from the training captions so that zero-shot scores measure
transfer rather than recall of a training sentence."""

# ------------------------------------------------------------------------------------------- phantom reports

_NORMAL_LUNGS = ("the lungs are clear.", "clear lungs bilaterally.", "both lung fields are clear and well expanded.",
                 "lungs are well aerated and clear.")
_NORMAL_HEART = ("heart size is normal.", "the cardiac silhouette is within normal limits.",
                 "normal cardiomediastinal contours.", "normal heart size.")
_NORMAL_CLOSE = ("", "normal chest radiograph.", "no acute cardiopulmonary findings.", "unremarkable study.")
_TEMPLATES = {
    "nodule": (
        "{size} {d} mm nodule in the {side} {zone} zone.",
        "findings: a {size} pulmonary nodule measuring {d} mm in the {zone} zone of the {side} lung.",
        "there is a {d} mm {size} nodule projecting over the {side} {zone} zone. The rest of the lungs are clear.",
        "{side} {zone} zone: solitary {size} nodule, approximately {d} mm across.",
        "impression: {size} nodule ({d} mm), {side} lung, {zone} zone.",
    ),
    "opacity": (
        "{size} patchy opacity in the {side} {zone} zone, about {d} mm across.",
        "findings: a {size} area of airspace opacity in the {zone} zone of the {side} lung, roughly {d} mm.",
        "there is a {size} ill-defined opacity measuring approximately {d} mm over the {side} {zone} zone.",
        "{side} {zone} zone opacity, {size}, approximately {d} mm in diameter.",
    ),
    "cardiomegaly": (
        "{degree} cardiomegaly: the cardiac silhouette is enlarged, about {pct} % larger than expected.",
        "findings: enlarged cardiac silhouette, consistent with {degree} cardiomegaly (estimated {pct} % "
        "enlargement).",
        "the heart is enlarged. Impression: {degree} cardiomegaly, cardiac silhouette about {pct} % above normal "
        "size. Lungs are clear.",
        "cardiomegaly, {degree}; cardiac silhouette enlarged by approximately {pct} %.",
    ),
}


def _sentence(text: str) -> str:
  return text[:1].upper() + text[1:]


def _band(value: float, edges, words) -> str:
  return words[int(np.searchsorted(edges, value, side="right"))]


def report_facts(kind: str | None, mask: np.ndarray) -> dict:
  """The facts `phantom_report` states, from the ground truth: {"class"} and, for nodule and opacity,
  "side" (the patient's), "zone", "diameter_mm" (int: the mask's equivalent diameter at `FIELD_OF_VIEW_MM`
  across the image) and "size" (from the stated diameter); for cardiomegaly "enlargement_pct" (int) and
  "degree" (from the stated percentage). `kind` None or "normal" is a normal study (its mask must be empty)."""
  mask = np.asarray(mask)
  if kind is None or kind == "normal":
    if mask.any():
      raise ValueError(f"kind {kind!r} is a normal study, but its mask marks {int((mask > 0.5).sum())} pixels")
    return {"class": "normal"}
  if kind not in phantom.ANOMALIES:
    raise ValueError(f"kind must be None, 'normal' or one of {phantom.ANOMALIES}, got {kind!r}")
  f = phantom.anomaly_facts(kind, mask)
  if kind == "cardiomegaly":
    pct = int(round((f["enlargement"] - 1.0) * 100))
    return {"class": kind, "enlargement_pct": pct, "degree": _band(pct, DEGREE_EDGES_PCT, DEGREES)}
  d = int(round(f["diameter_px"] * FIELD_OF_VIEW_MM / mask.shape[1]))
  return {"class": kind, "side": f["side"], "zone": f["zone"], "diameter_mm": d,
          "size": _band(d, SIZE_EDGES_MM[kind], SIZE_WORDS)}


def phantom_report(kind: str | None, mask: np.ndarray, rng: np.random.Generator) -> str:
  """A findings report of a phantom chest radiograph from its ground truth (`report_facts`): the anomaly;
  for a nodule or opacity the patient's side (radiological convention: the image's left half is the
  patient's RIGHT), the upper/middle/lower zone of the mask centroid (`phantom.LUNG_ZONE_EDGES_V`) and the
  equivalent diameter in mm with a size word; for cardiomegaly an enlarged cardiac silhouette with its
  estimated enlargement and degree. Normal studies (`kind` None or "normal") get one of 128 phrasings
  that use no anomaly word. `rng` picks the phrasing only."""
  facts = report_facts(kind, mask)
  if facts["class"] == "normal":
    lungs, heart = _NORMAL_LUNGS[rng.integers(4)], _NORMAL_HEART[rng.integers(4)]
    close = _NORMAL_CLOSE[rng.integers(4)]
    parts = [lungs, heart] if rng.integers(2) == 0 else [heart, lungs]
    return " ".join(_sentence(p) for p in parts + ([close] if close else []))
  templates = _TEMPLATES[facts["class"]]
  template = templates[rng.integers(len(templates))]
  if facts["class"] == "cardiomegaly":
    return _sentence(template.format(degree=facts["degree"], pct=facts["enlargement_pct"]))
  return _sentence(template.format(size=facts["size"], d=facts["diameter_mm"], side=facts["side"],
                                   zone=facts["zone"]))


# ------------------------------------------------------------------------------------------ class captions

_CAPTIONS = {
    "busi_captions": {
        "normal": (
            "Breast ultrasound image of normal breast tissue.",
            "Ultrasound of the breast showing normal fibroglandular tissue and fat.",
            "Normal breast sonogram with homogeneous parenchyma.",
            "B-mode breast ultrasound: normal layers of skin, fat and glandular tissue.",
            "Sonographic image of healthy breast tissue.",
        ),
        "benign": (
            "Breast ultrasound showing a benign-appearing mass with smooth, circumscribed margins.",
            "Oval, well-circumscribed hypoechoic breast lesion with parallel orientation, likely benign.",
            "Sonogram of the breast with a benign lesion: round or oval shape and sharp margins.",
            "Benign breast mass on ultrasound, such as a fibroadenoma or cyst, with regular borders.",
            "Breast ultrasound image of a benign tumour with well-defined edges.",
        ),
        "malignant": (
            "Breast ultrasound showing an irregular hypoechoic mass with spiculated margins, suspicious for "
            "malignancy.",
            "Malignant-appearing breast lesion on ultrasound: irregular shape, angular margins and posterior "
            "shadowing.",
            "Sonogram of the breast with a malignant tumour, taller than wide, with ill-defined borders.",
            "Ultrasound image of breast cancer: an irregular, poorly circumscribed hypoechoic mass.",
            "Breast ultrasound with a suspicious solid mass with indistinct, microlobulated margins.",
        ),
    },
    "brainmri_captions": {
        "normal": (
            "Brain MRI slice with normal anatomy.",
            "Axial magnetic resonance image of a healthy brain.",
            "MRI of the brain showing symmetric ventricles and normal grey and white matter.",
            "Normal brain MR image with unremarkable parenchyma.",
            "Brain scan on MRI, unremarkable.",
        ),
        "tumour": (
            "Brain MRI showing a tumour.",
            "Axial MR image of the brain with a space-occupying mass.",
            "MRI of the brain with an intracranial tumour and surrounding oedema.",
            "Brain MR image showing a focal mass lesion consistent with a tumour.",
            "Magnetic resonance image of a brain tumour distorting the normal anatomy.",
        ),
    },
}
_ALIASES = {"brainmri_captions": {"tumor": "tumour"}}


def _class(source: str, class_name: str) -> str:
  name = _ALIASES.get(source, {}).get(class_name, class_name)
  if name not in CLASSES[source]:
    raise ValueError(f"class_name must be one of {CLASSES[source]} for {source}, got {class_name!r}")
  return name


def busi_caption(class_name: str, rng: np.random.Generator) -> str:
  """A caption of a BUSI breast ultrasound image of class normal / benign / malignant (five phrasings each,
  `rng` picks one)."""
  options = _CAPTIONS["busi_captions"][_class("busi_captions", class_name)]
  return options[rng.integers(len(options))]


def brainmri_caption(class_name: str, rng: np.random.Generator) -> str:
  """A caption of a BrainMRI image of class normal / tumour ("tumor" accepted; five phrasings each)."""
  options = _CAPTIONS["brainmri_captions"][_class("brainmri_captions", class_name)]
  return options[rng.integers(len(options))]


# ---------------------------------------------------------------------------------------------- pair files


def _claim(root: Path, meta: dict) -> bool:
  """True when `root` already holds pairs made with `meta` (reuse them); False when it holds none (make
  them). Pairs made otherwise, or a pairs file without a record of how it was made, are refused."""
  meta_path, pairs_path = root / META, root / PAIRS
  if not meta_path.is_file():
    if pairs_path.exists():
      raise datasets.DatasetError(f"{root}: holds {PAIRS} but no {META} recording how it was made; refusing to "
                                  f"overwrite it (choose another folder or remove it)")
    return False
  try:
    old = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise datasets.DatasetError(f"{meta_path}: unreadable ({e}); refusing to overwrite {root}") from e
  if old != meta:
    diff = {k: (old.get(k) if isinstance(old, dict) else None, meta.get(k)) for k in meta
            if not isinstance(old, dict) or old.get(k) != meta.get(k)}
    raise datasets.DatasetError(f"{root}: holds pairs made with other parameters (recorded, requested: {diff}); "
                                f"refusing to overwrite them: choose another folder or remove {root}")
  if not pairs_path.is_file():
    raise datasets.DatasetError(f"{root}: {META} is there but {PAIRS} is missing; remove {root} and make it again")
  return True


def _write(root: Path, lines: list[dict], meta: dict) -> str:
  """pairs.jsonl, then pairs_meta.json last, each through a temporary file: a folder with a meta file holds
  a complete pairs file."""
  for name, text in ((PAIRS, "".join(json.dumps(r) + "\n" for r in lines)),
                     (META, json.dumps(meta, indent=1) + "\n")):
    tmp = root / (name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / name)
  return str(root / PAIRS)


def _check_seed(seed) -> int:
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return int(seed)


def make_phantom_pairs(root: str | os.PathLike, n: int, size: int = 64, seed: int = 0,
                       abnormal_fraction: float = 0.5) -> str:
  """Writes `n` phantom chest radiographs root/images/NNNNNN.png with findings reports (`phantom_report`)
  to root/pairs.jsonl and returns its path. round(n * abnormal_fraction) images are abnormal, the three
  anomaly kinds in turn (counts within one of each other), the rest normal, in an order shuffled by `seed`.
  Image i is `phantom.phantom(size, SeedSequence((seed, i)))` and its phrasing rng is seeded by (seed, i, 1),
  so an image does not depend on n. Lines: "image", "text", "label" (index into
  CLASSES["phantom_reports"]), "class" and the facts the text states (`report_facts`: side, zone,
  diameter_mm, size; cardiomegaly enlargement_pct, degree). The parameters are recorded in
  root/pairs_meta.json: a root made with the same ones is reused as it is (nothing rewritten), one made with
  others refused (DatasetError naming root). About 1 ms an image at size 64 (n=2000: 2 s on one core)."""
  if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n must be a positive integer, got {n!r}")
  if not isinstance(abnormal_fraction, numbers.Real) or not 0.0 <= abnormal_fraction <= 1.0:
    raise ValueError(f"abnormal_fraction must be in [0, 1], got {abnormal_fraction!r}")
  if not isinstance(size, numbers.Integral) or not 64 <= size <= 224:
    raise ValueError(f"size must be an integer in [64, 224] (phantom.phantom), got {size!r}")
  seed = _check_seed(seed)
  root = Path(root)
  meta = {"source": "phantom_reports", "version": VERSION, "n": int(n), "size": int(size), "seed": seed,
          "abnormal_fraction": float(abnormal_fraction), "field_of_view_mm": FIELD_OF_VIEW_MM}
  if _claim(root, meta):
    return str(root / PAIRS)
  n_abnormal = int(round(n * abnormal_fraction))
  kinds = ["normal"] * (n - n_abnormal) + [phantom.ANOMALIES[i % 3] for i in range(n_abnormal)]
  kinds = [kinds[i] for i in np.random.default_rng(np.random.SeedSequence([seed, n])).permutation(n)]
  (root / "images").mkdir(parents=True, exist_ok=True)
  classes, lines = CLASSES["phantom_reports"], []
  for i, kind in enumerate(kinds):
    image_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    im, mask = phantom.phantom(size, image_seed, None if kind == "normal" else kind)
    name = f"images/{i:06d}.png"
    phantom._to_png(im, root / name)  # pylint: disable=protected-access
    facts = report_facts(kind, mask)
    text = phantom_report(kind, mask, np.random.default_rng([seed, i, 1]))
    lines.append({"image": name, "text": text, "label": classes.index(kind), **facts})
  return _write(root, lines, meta)


def _dataset_class(sample: datasets.Sample, source: str) -> str:
  """The caption class of a listed image: its clsname (or label_name) when it is one of the source's classes,
  else from the label for two-class sources (BrainMRI lists tumours as "abnormal"); refused when the name and
  the label disagree."""
  classes = CLASSES[source]
  name = _ALIASES.get(source, {}).get(sample.clsname.lower(), sample.clsname.lower())
  if name not in classes:
    if len(classes) == 2 and name in ("abnormal", "anomaly"):
      name = classes[1]
    elif name == "good":
      name = "normal"
    else:
      raise datasets.DatasetError(f"{sample.where}: class {sample.clsname!r} of {sample.name!r} is none of "
                                  f"{classes} ({source})")
  if (name == "normal") != (sample.label == 0):
    raise datasets.DatasetError(f"{sample.where}: {sample.name!r} has class {sample.clsname!r} but label "
                                f"{sample.label}")
  return name


def make_caption_pairs(dataset_root: str | os.PathLike, source: str, out_dir: str | os.PathLike,
                       seed: int = 0) -> str:
  """Captions every image of a dataset (`datasets.load_dataset`: train then test split, in listing order)
  with `busi_caption` or `brainmri_caption` (`source` "busi_captions" / "brainmri_captions") and writes
  out_dir/pairs.jsonl ("image" relative to the dataset's image folder, "text", "label" the class index,
  "class", "split"); returns its path. The images stay where they are: out_dir/pairs_meta.json records
  their folder as "image_root", which `records.read_pairs` resolves them against. Each image's phrasing
  rng is seeded by (seed, crc32 of its name). Reuse and refusal of an existing out_dir as
  `make_phantom_pairs`."""
  if source not in ("busi_captions", "brainmri_captions"):
    raise ValueError(f"source must be 'busi_captions' or 'brainmri_captions' (phantom reports come from "
                     f"make_phantom_pairs), got {source!r}")
  seed = _check_seed(seed)
  dataset = datasets.load_dataset(dataset_root)
  image_root = Path(dataset.root) / "images" if dataset.layout == datasets.MEDICLIP else Path(dataset.root)
  out = Path(out_dir)
  meta = {"source": source, "version": VERSION, "seed": seed, "dataset_root": os.path.abspath(dataset.root),
          "image_root": os.path.abspath(image_root), "n": len(dataset.train) + len(dataset.test)}
  if _claim(out, meta):
    return str(out / PAIRS)
  caption = busi_caption if source == "busi_captions" else brainmri_caption
  lines = []
  for split, samples in (("train", dataset.train), ("test", dataset.test)):
    for s in samples:
      name = _dataset_class(s, source)
      rng = np.random.default_rng([seed, zlib.crc32(s.name.encode("utf-8"))])
      lines.append({"image": s.name, "text": caption(name, rng), "label": CLASSES[source].index(name),
                    "class": name, "split": split})
  out.mkdir(parents=True, exist_ok=True)
  return _write(out, lines, meta)


# -------------------------------------------------------------------------------------- noise and splits


def inject_false_positives(texts: list[str], rate: float, seed: int, *,
                           labels: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
  """Simulated false-positive pairs (an image with a caption that does not describe it): exactly
  round(rate * n) pairs, chosen uniformly, get the original caption of another random pair whose text
  differs from theirs (and, when `labels` is given, whose label differs too: a semantic mismatch, not a
  rephrasing of the same class). Returns (new texts, noisy (n,) bool), noisy True iff replaced. `rate`
  (the fp_rate) must be in [0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) < 1.0:
    raise ValueError(f"fp_rate must be a number in [0, 1), got {rate!r}")
  texts = [str(t) for t in texts]
  n = len(texts)
  k = round(float(rate) * n)
  if n == 0:
    return [], np.zeros(0, bool)
  ids = np.unique(np.asarray(texts), return_inverse=True)[1].reshape(-1)
  keys = ids
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f"labels must have shape ({n},) like texts, got {labels.shape}")
    keys = np.unique(labels, return_inverse=True)[1].reshape(-1)
  # partners of i: pairs j with another key and another text (counted as n - same key - same text + same both)
  both = np.unique(np.stack([keys, ids]), axis=1, return_inverse=True)[1].reshape(-1)
  partners = n - np.bincount(keys)[keys] - np.bincount(ids)[ids] + np.bincount(both)[both]
  eligible = np.flatnonzero(partners > 0)
  if k > len(eligible):
    raise ValueError(f"fp_rate {rate} asks for {k} false positives, but only {len(eligible)} of {n} pairs have "
                     f"a partner with a different {'label and ' if labels is not None else ''}text")
  rng = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), 7]))
  chosen = np.sort(rng.choice(eligible, size=k, replace=False))
  out, noisy = list(texts), np.zeros(n, bool)
  for i in chosen:
    for _ in range(32):  # rejection sampling; the exact draw when most pairs share i's text or label
      j = int(rng.integers(n))
      if keys[j] != keys[i] and ids[j] != ids[i]:
        break
    else:
      j = int(rng.choice(np.flatnonzero((keys != keys[i]) & (ids != ids[i]))))
    out[i], noisy[i] = texts[j], True
  return out, noisy


def split_indices(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
  """{"train", "val", "test"}: sorted int64 index arrays, disjoint and together covering range(len(labels)),
  stratified: class c's n_c images are split n_c * fractions rounded by largest remainder (each within one
  of its share), the members chosen by a permutation seeded by `seed`."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  fr = np.asarray(fractions, float)
  if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
    raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
                     f"got {fractions!r}")
  rng = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), 11]))
  parts = {"train": [], "val": [], "test": []}
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    share = len(members) * fr
    count = np.floor(share).astype(int)
    left = len(members) - count.sum()
    count[np.argsort(-(share - count), kind="stable")[:left]] += 1
    edges = np.concatenate([[0], np.cumsum(count)])
    for name, a, b in zip(parts, edges[:-1], edges[1:]):
      parts[name].append(members[a:b])
  return {name: np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
          for name, p in parts.items()}


def same_class_fraction(class_ids: np.ndarray) -> float:
  """Fraction of the ordered pairs (i, j), i != j, of a batch whose items share a class: the share of
  InfoNCE's negatives that are false negatives on such a batch. 0.0 for a batch of fewer than two."""
  ids = np.asarray(class_ids)
  if ids.ndim != 1:
    raise ValueError(f"class_ids must be 1-D, got shape {ids.shape}")
  n = len(ids)
  if n < 2:
    return 0.0
  counts = np.unique(ids, return_counts=True)[1].astype(np.int64)
  return float((counts * (counts - 1)).sum() / (n * (n - 1)))
