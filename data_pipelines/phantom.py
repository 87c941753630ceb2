"""Deterministic chest-radiograph-like phantoms: the embedded default dataset.

Each image is drawn from its own generator seeded by (seed, split, index), so an
image does not depend on how many others are generated. Anatomy (in normalised
coordinates u, v in [-1, 1], v downwards): a soft body ellipse, two dark lungs,
curved bright ribs, a bright heart over the lower middle, a spine with vertebrae,
smooth low-frequency intensity drift and fine grain. Test anomalies:
  nodule        a small bright disc inside a lung (mask: the disc)
  opacity       a soft bright patch inside a lung (mask: where it adds > 35 % of its peak)
  cardiomegaly  the heart drawn 1.25-1.5x larger (mask: the added area)
Images are grayscale float32 in [0, 1]; masks float32 {0, 1}.
`anomaly_facts(kind, mask)` reads back from a mask where an anomaly is and how large (findings reports).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

ANOMALIES = ("nodule", "opacity", "cardiomegaly")
LUNG_ZONE_EDGES_V = (-0.27, 0.10)
"""Upper/middle and middle/lower zone boundaries in v (normalised, downwards): thirds of the nominal lung
field v in [-0.63, 0.47] (lung centre -0.08, half-height 0.55; each patient's lungs vary by a few hundredths)."""
ZONES = ("upper", "middle", "lower")
_SPLIT_IDS = {"train": 0, "test_normal": 1, "test_abnormal": 2}


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipse(u, v, cu, cv, au, av, soft):
  """Soft indicator of an ellipse; `soft` is the edge width in normalised units."""
  r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
  return _sigmoid((1.0 - r) * min(au, av) / soft)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Low-frequency noise in about [-1, 1]: a random grid bicubically upsampled."""
  grid = rng.standard_normal((cells, cells)).astype(np.float32)
  im = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
  return np.asarray(im, np.float32)


def _anatomy(rng: np.random.Generator, size: int) -> dict:
  """Random anatomy parameters of one patient."""
  j = lambda s: float(rng.uniform(-s, s))
  return {
      "body": (j(0.03), 0.05 + j(0.03), 0.86 + j(0.05), 0.98 + j(0.04)),
      "lungs": [(-0.38 + j(0.03), -0.08 + j(0.04), 0.27 + j(0.03), 0.55 + j(0.05)),
                (0.38 + j(0.03), -0.08 + j(0.04), 0.27 + j(0.03), 0.55 + j(0.05))],
      "heart": (0.10 + j(0.04), 0.28 + j(0.04), 0.24 + j(0.03), 0.21 + j(0.03)),
      "rib_phase": j(0.04),
      "rib_gap": 0.15 + j(0.015),
      "rib_curve": 0.42 + j(0.06),
      "lung_depth": 0.28 + j(0.04),
      "heart_level": 0.80 + j(0.04),
      "drift_seed": int(rng.integers(2**31)),
  }


def _render(a: dict, size: int, rng: np.random.Generator, heart_scale: float = 1.0) -> tuple[np.ndarray, dict]:
  lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
  v, u = np.meshgrid(lin, lin, indexing="ij")
  soft = 2.5 / size
  bu, bv, bau, bav = a["body"]
  body = _ellipse(u, v, bu, bv, bau, bav, 4 * soft)
  img = 0.06 + 0.40 * body
  lungs = np.zeros_like(u)
  for (cu, cv, au, av) in a["lungs"]:
    lungs = np.maximum(lungs, _ellipse(u, v, cu, cv, au, av, 3 * soft))
  img -= a["lung_depth"] * lungs
  # Ribs: bands following v = v0 + c*u^2 on each side, brighter within the body.
  phase = (v - a["rib_curve"] * u ** 2 - a["rib_phase"]) / a["rib_gap"]
  ribs = np.exp(-((phase - np.round(phase)) ** 2) / (2 * 0.12 ** 2))
  ribs *= _sigmoid((np.abs(u) - 0.09) / soft) * _sigmoid((0.5 - v) / 0.05) * _sigmoid((v + 0.75) / 0.05)
  img += 0.10 * ribs * body
  hu, hv, hau, hav = a["heart"]
  heart_soft = _ellipse(u, v, hu, hv, hau * heart_scale, hav * heart_scale, 1.5 * soft)
  img = img * (1 - heart_soft) + a["heart_level"] * heart_soft
  spine = _sigmoid((0.07 - np.abs(u)) / soft) * (v > -0.9)
  vertebrae = 0.5 + 0.5 * np.cos(v * np.pi / 0.09)
  img += (0.08 + 0.05 * vertebrae) * spine * body
  drift_rng = np.random.default_rng(a["drift_seed"])
  img += 0.04 * _smooth_noise(drift_rng, size, 6) * body
  img += 0.012 * rng.standard_normal((size, size)).astype(np.float32)
  parts = {"u": u, "v": v, "body": body, "lungs": lungs,
           "heart": _ellipse(u, v, hu, hv, hau, hav, 3 * soft) > 0.5}
  return img.astype(np.float32), parts


def _lung_point(rng: np.random.Generator, a: dict, margin: float) -> tuple[float, float]:
  cu, cv, au, av = a["lungs"][int(rng.integers(2))]
  ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * (1.0 - margin)
  return cu + au * rad * np.cos(ang), cv + av * rad * np.sin(ang)


def phantom(size: int = 224, seed: int = 0, anomaly: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One phantom image (size, size) float32 in [0, 1] and its anomaly mask
  (all zero when anomaly is None). Deterministic in (size, seed, anomaly)."""
  if not 64 <= size <= 224:
    raise ValueError(f"phantom size must be in [64, 224], got {size}")
  if anomaly is not None and anomaly not in ANOMALIES:
    raise ValueError(f"anomaly must be None or one of {ANOMALIES}, got {anomaly!r}")
  rng = np.random.default_rng(seed)
  a = _anatomy(rng, size)
  noise_rng = np.random.default_rng([seed, 1])
  an_rng = np.random.default_rng([seed, 2])
  mask = np.zeros((size, size), np.float32)
  if anomaly == "cardiomegaly":
    scale = float(an_rng.uniform(1.25, 1.5))
    img, parts = _render(a, size, noise_rng, heart_scale=scale)
    hu, hv, hau, hav = a["heart"]
    u, v = parts["u"], parts["v"]
    big = ((u - hu) / (hau * scale)) ** 2 + ((v - hv) / (hav * scale)) ** 2 < 1.0
    mask = (big & ~parts["heart"]).astype(np.float32)
    return np.clip(img, 0, 1), mask
  img, parts = _render(a, size, noise_rng)
  u, v = parts["u"], parts["v"]
  if anomaly == "nodule":
    cu, cv = _lung_point(an_rng, a, 0.35)
    r = float(an_rng.uniform(0.035, 0.08))
    d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2)
    disc = 1.0 / (1.0 + np.exp((d - r) / (1.2 / size)))
    img = img + float(an_rng.uniform(0.22, 0.32)) * disc
    mask = (d <= r).astype(np.float32)
  elif anomaly == "opacity":
    cu, cv = _lung_point(an_rng, a, 0.4)
    su, sv = an_rng.uniform(0.07, 0.14, 2)
    th = an_rng.uniform(0, np.pi)
    du, dv = u - cu, v - cv
    ru, rv = du * np.cos(th) + dv * np.sin(th), -du * np.sin(th) + dv * np.cos(th)
    blob = np.exp(-0.5 * ((ru / su) ** 2 + (rv / sv) ** 2)) * parts["lungs"]
    img = img + float(an_rng.uniform(0.18, 0.26)) * blob
    mask = (blob > 0.35).astype(np.float32)
  return np.clip(img, 0, 1).astype(np.float32), mask


def anomaly_facts(kind: str, mask: np.ndarray) -> dict:
  """Where and how large the anomaly of a (size, size) mask from `phantom(size, seed, kind)` is, read from the
  mask alone. Every kind: "centroid_uv" (u right, v down, in [-1, 1]), "area_px", "diameter_px" (equivalent
  diameter: of the disc with the mask's area). Nodule and opacity: "side", the patient's side, "right" when
  the centroid is in the image's left half (radiological convention: the patient faces the viewer), and
  "zone", upper/middle/lower by `LUNG_ZONE_EDGES_V`. Cardiomegaly: "enlargement", the heart's scale
  factor, from the mask (the added ring between the normal and the enlarged ellipse): the outer ellipse is
  the ring filled row by row, the inner the hole, and scale = sqrt(outer / inner area) (within about
  0.025 of the drawn scale at size 64, 0.005 at 224)."""
  if kind not in ANOMALIES:
    raise ValueError(f"kind must be one of {ANOMALIES}, got {kind!r}")
  m = np.asarray(mask) > 0.5
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"mask must be a square 2-D array, got shape {np.shape(mask)}")
  area = int(m.sum())
  if area == 0:
    raise ValueError(f"the {kind} mask is empty: no anomaly to describe")
  size = m.shape[0]
  rows, cols = np.nonzero(m)
  u, v = (cols.mean() + 0.5) / size * 2 - 1, (rows.mean() + 0.5) / size * 2 - 1
  facts = {"centroid_uv": (float(u), float(v)), "area_px": area, "diameter_px": float(2 * np.sqrt(area / np.pi))}
  if kind == "cardiomegaly":
    filled = 0
    for r in np.unique(rows):
      c = np.flatnonzero(m[r])
      filled += int(c[-1] - c[0] + 1)
    facts["enlargement"] = float(np.sqrt(filled / max(filled - area, 1)))
  else:
    facts["side"] = "right" if u < 0 else "left"
    facts["zone"] = ZONES[int(np.searchsorted(LUNG_ZONE_EDGES_V, v))]
  return facts


def _image_seed(seed: int, split: str, index: int) -> int:
  return int(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]).generate_state(1)[0])


def phantom_arrays(n_train: int = 16, n_test_normal: int = 24, n_test_abnormal: int = 24,
                   size: int = 224, seed: int = 0) -> dict[str, np.ndarray]:
  """In-memory phantom dataset: train_images (n_train, S, S); test_images, test_masks
  (n_test, S, S); test_labels (n_test,) 0/1; test_kinds (n_test,) str. Test normals
  come first; abnormal kinds cycle through ANOMALIES."""
  train = [phantom(size, _image_seed(seed, "train", i))[0] for i in range(n_train)]
  test, masks, kinds = [], [], []
  for i in range(n_test_normal):
    im, m = phantom(size, _image_seed(seed, "test_normal", i))
    test.append(im), masks.append(m), kinds.append("normal")
  for i in range(n_test_abnormal):
    kind = ANOMALIES[i % len(ANOMALIES)]
    im, m = phantom(size, _image_seed(seed, "test_abnormal", i), kind)
    test.append(im), masks.append(m), kinds.append(kind)
  empty = np.zeros((0, size, size), np.float32)
  return {
      "train_images": np.stack(train) if train else empty,
      "test_images": np.stack(test) if test else empty,
      "test_masks": np.stack(masks) if masks else empty,
      "test_labels": np.array([0] * n_test_normal + [1] * n_test_abnormal, np.int32),
      "test_kinds": np.array(kinds),
  }


def _to_png(x: np.ndarray, path: Path) -> None:
  Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), mode="L").save(path)


def write_mediclip_layout(root: str | os.PathLike, prefix: str, train_images, test_images, test_masks, test_labels,
                          test_stems, test_classes) -> str:
  """Writes generated images in the MediCLIP layout under `root` and returns root:
  images/{train/normal, test/normal, test/abnormal, test/ground_true}/*.png and samples/{train,test}.json.
  Normal images are <split>/normal/<prefix>_<index>.png; abnormal test image i is test/abnormal/<stem>_<i>.png with
  its mask test/ground_true/<stem>_mask_<i>.png and clsname `test_classes[i]` (listed with the mask)."""
  root = Path(root)
  for d in ("train/normal", "test/normal", "test/abnormal", "test/ground_true"):
    (root / "images" / d).mkdir(parents=True, exist_ok=True)
  (root / "samples").mkdir(parents=True, exist_ok=True)
  train_lines = []
  for i, im in enumerate(train_images):
    name = f"train/normal/{prefix}_{i:04d}.png"
    _to_png(im, root / "images" / name)
    train_lines.append({"filename": name, "label": 0, "label_name": "normal", "clsname": "normal"})
  test_lines = []
  for i, (im, m, lab, stem, cls) in enumerate(zip(test_images, test_masks, test_labels, test_stems, test_classes)):
    if lab == 0:
      name = f"test/normal/{prefix}_{i:04d}.png"
      rec = {"filename": name, "label": 0, "label_name": "normal", "clsname": "normal"}
    else:
      name = f"test/abnormal/{stem}_{i:04d}.png"
      mname = f"test/ground_true/{stem}_mask_{i:04d}.png"
      _to_png(m, root / "images" / mname)
      rec = {"filename": name, "label": 1, "label_name": "abnormal", "clsname": str(cls), "mask": mname}
    _to_png(im, root / "images" / name)
    test_lines.append(rec)
  for split, lines in (("train", train_lines), ("test", test_lines)):
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (root / "samples" / f"{split}.json").write_text(text, encoding="utf-8")
  return str(root)


def make_phantom_dataset(root: str | os.PathLike, n_train: int = 16, n_test_normal: int = 24,
                         n_test_abnormal: int = 24, size: int = 224, seed: int = 0) -> str:
  """Writes a phantom dataset in the MediCLIP layout under `root` and returns root (`write_mediclip_layout`:
  abnormal images named and classed by their anomaly kind, masks listed)."""
  data = phantom_arrays(n_train, n_test_normal, n_test_abnormal, size, seed)
  return write_mediclip_layout(root, "phantom", data["train_images"], data["test_images"], data["test_masks"],
                               data["test_labels"], data["test_kinds"], data["test_kinds"])
