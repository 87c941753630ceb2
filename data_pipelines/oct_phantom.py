"""Deterministic retina OCT B-scan-like phantoms with lesion masks and layer ground truth.

The generated data of the SSL-AnoVAE method: layer-wise segmentation and anomaly staging need layered
images whose lesions deform the layers and come in grades. Each image is drawn from its own generator
seeded by (seed, split, index), as the chest phantoms (`phantom.py`), so an image does not depend on how
many others are generated. Rows are depth (downwards); t = (row + 0.5) / size, u in [-1, 1] across.

Anatomy: dark vitreous; a retina of the 7 BANDS, each with its reflectivity and a thickness that varies
smoothly along x, stacked upwards from Bruch's membrane (a tilted, curved line), the inner bands thinned
at a random foveal pit; below it a mid-dark textured choroid fading with depth. OCT-like multiplicative
speckle (gamma distributed, laterally correlated), a little additive noise and a smooth intensity drift.
`layers` labels 0 (vitreous), 1..7 (the bands, top to bottom) and 8 (choroid and below); the 8 band
boundaries have the intensity steps EDGE_SIGNS.

Lesions open a pocket along a cut surface and render the anatomy through the resulting displacement, so
the bands around them are really deformed (mask: the pocket):
  fluid_intraretinal  a near-black elliptical cyst in the inner/outer nuclear layers; the layers above
                      are lifted, those below squeezed down towards the photoreceptor line
  fluid_subretinal    a dark dome between the photoreceptor line and the RPE, lifting the retina
  deposit             a bright drusen-like mound on Bruch's membrane, bumping the RPE and retina up
Grades: mild (one small lesion) and severe (one large lesion, or two medium ones: about five times the
mild area). Images are float32 in [0, 1]; masks float32 {0, 1}; layers int32.
"""
from __future__ import annotations

import os

import numpy as np

from data_pipelines.phantom import _image_seed, _sigmoid, _smooth_noise, write_mediclip_layout

BANDS = ("nerve_fibre", "ganglion_inner_plexiform", "inner_nuclear", "outer_plexiform", "outer_nuclear",
         "photoreceptor", "rpe")
N_BOUNDARIES = len(BANDS) + 1       # vitreous/NFL (the ILM) ... RPE/choroid (Bruch's membrane)
EDGE_SIGNS = (1, -1, -1, 1, -1, 1, 1, -1)  # sign of the downward intensity step at each boundary
LESIONS = ("fluid_intraretinal", "fluid_subretinal", "deposit")
GRADES = ("mild", "severe")
SIZES = (64, 256)
_REFLECTIVITY = (0.03, 0.78, 0.47, 0.22, 0.50, 0.13, 0.55, 0.92)  # vitreous, then the bands
_THICKNESS = (0.035, 0.06, 0.035, 0.025, 0.07, 0.024, 0.028)    # per band, in units of the image height
_FOVEA_THINNING = (1.0, 0.9, 0.6, 0.5, -0.35, 0.0, 0.0)         # share of the foveal pit depth per band
# Per lesion kind: the band boundary the pocket opens at (None: inside the nuclear layers), the share of the
# pocket pushing downwards, the profile exponent (h = H (1 - r^2)^e: 0.5 an ellipse, larger a flatter dome),
# a factor on the grade's widths, and the fill level (None: drusen material, its level drawn per image).
_LESION_FORM = {"fluid_intraretinal": (None, 0.2, 0.5, 0.6, 0.02),
                "fluid_subretinal": (6, 0.0, 1.2, 1.0, 0.03),
                "deposit": (7, 0.0, 1.0, 0.9, None)}
_EDGE = 0.25  # partial-volume width of edges in pixels (logistic scale: 10-90 % over about one pixel)
_LIFT_BLEND = 0.08  # over this depth above a pocket the lift widens to its laterally smoothed profile


def _wave(rng: np.random.Generator, u: np.ndarray, amp: float) -> np.ndarray:
  """A smooth random curve over u in [-1, 1]: three sinusoids, amplitude about `amp`."""
  out = np.zeros_like(u)
  for f in (1, 2, 3):
    out += rng.standard_normal() / f * np.sin(np.pi * f * (u + 1) / 2 + rng.uniform(0, 2 * np.pi))
  return (amp / 1.2 * out).astype(np.float32)


def _anatomy(rng: np.random.Generator, size: int) -> dict:
  """Random anatomy of one eye: the 8 boundary curves (8, size) in t units and render parameters."""
  u = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
  bruch = (rng.uniform(0.56, 0.63) + rng.uniform(-0.06, 0.06) * u - rng.uniform(-0.02, 0.08) * u ** 2
           + _wave(rng, u, 0.006))
  fovea = np.exp(-0.5 * ((u - rng.uniform(-0.3, 0.3)) / rng.uniform(0.10, 0.16)) ** 2) * rng.uniform(0.45, 0.7)
  thick = []
  for base, pit in zip(_THICKNESS, _FOVEA_THINNING):
    vary = 1 + _wave(rng, u, 0.12)
    thick.append(base * rng.uniform(0.85, 1.15) * vary * (1 - pit * fovea))
  tops = bruch - np.cumsum(np.stack(thick)[::-1], axis=0)[::-1]  # each band's top, from the ILM down
  bounds = np.concatenate([tops, bruch[None]], axis=0).astype(np.float32)
  refl = np.asarray(_REFLECTIVITY, np.float32) + rng.uniform(-0.03, 0.03, len(_REFLECTIVITY)).astype(np.float32)
  refl[0] = _REFLECTIVITY[0]
  return {"u": u, "bounds": bounds, "refl": refl, "choroid_level": float(rng.uniform(0.34, 0.42)),
          "choroid_depth": float(rng.uniform(0.06, 0.10)), "texture_seed": int(rng.integers(2**31)),
          "drift_seed": int(rng.integers(2**31))}


def _lesions(rng: np.random.Generator, grade: str) -> list[tuple[float, float, float]]:
  """(centre u, half-width in u, height in t) of the lesions of one grade: the size carries the grade."""
  if grade == "mild":
    return [(rng.uniform(-0.5, 0.5), rng.uniform(0.08, 0.14), rng.uniform(0.025, 0.04))]
  if rng.uniform() < 0.5:
    return [(rng.uniform(-0.45, 0.45), rng.uniform(0.2, 0.3), rng.uniform(0.06, 0.085))]
  return [(rng.uniform(-0.6, -0.28), rng.uniform(0.13, 0.2), rng.uniform(0.045, 0.065)),
          (rng.uniform(0.28, 0.6), rng.uniform(0.13, 0.2), rng.uniform(0.045, 0.065))]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """1-D Gaussian smoothing (sigma in samples), edges repeated."""
  r = int(3 * sigma + 0.5)
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  return np.convolve(np.pad(x, r, mode="edge"), k / k.sum(), mode="valid").astype(np.float32)


def _pocket(a: dict, lesion: str, rng: np.random.Generator, grade: str, t: np.ndarray):
  """The lesion's displacement: source depth z (S, S) of every pixel, the pocket's top and bottom (S,) in t,
  the band it opens in (S,) and its fill level. Above the pocket everything is lifted by its height, the
  lift widening with distance (tissue drapes over a cyst); below, an intraretinal cyst's share pushing down
  fades out at the photoreceptor line, which stays in place."""
  b, u = a["bounds"], a["u"]
  at, down, power, width, fill = _LESION_FORM[lesion]
  if at is None:  # somewhere from the middle of the INL to the middle of the ONL
    f = rng.uniform(0.0, 1.0)
    cut = (1 - f) * 0.5 * (b[2] + b[3]) + f * 0.5 * (b[4] + b[5])
  else:
    cut = b[at]
  h = np.zeros_like(u)
  for cu, au, hh in _lesions(rng, grade):
    h += hh * np.clip(1 - ((u - cu) / (width * au)) ** 2, 0, None) ** power
  if fill is None:
    fill = float(rng.uniform(0.55, 0.68))
  top, bot = cut - (1 - down) * h, cut + down * h
  lift = (1 - down) * h
  spread = np.clip((top - t) / _LIFT_BLEND, 0, 1)
  above = t + lift + spread * ((1 - down) * _blur(h, 0.03 * len(u)) - lift)
  anchor = b[5]
  below = t - down * h * np.clip((anchor - t) / np.maximum(anchor - bot, 1e-3), 0, 1)
  z = np.where(t < top, above, np.where(t < bot, cut, below))
  label = np.sum(cut[None] - 1e-6 >= b, axis=0)  # per column: the band the pocket opens in
  return z.astype(np.float32), top, bot, label, fill


def _render(a: dict, z: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Noise-free anatomy at source depths z (S, S), and its layer labels."""
  b, refl = a["bounds"], a["refl"]
  w = _EDGE / size
  steps = _sigmoid((z[None] - b[:, None, :]) / w)  # (8, S, S)
  img = refl[0] + np.tensordot(np.diff(refl), steps[:-1], axes=1)
  texture = _smooth_noise(np.random.default_rng(a["texture_seed"]), size, 14)
  depth = np.clip(z - b[-1], 0, None)
  choroid = 0.06 + (a["choroid_level"] - 0.06) * np.exp(-depth / a["choroid_depth"]) * (1 + 0.3 * texture)
  img = img * (1 - steps[-1]) + choroid * steps[-1]
  layers = np.sum(z[None] >= b[:, None, :], axis=0).astype(np.int32)
  return img.astype(np.float32), layers


def oct_phantom(size: int = 128, seed: int = 0, lesion: str | None = None, grade: str | None = None,
                noise: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One OCT phantom: image (size, size) float32 in [0, 1], lesion mask float32 {0, 1} (all zero without a
  lesion) and layer labels int32 (0 vitreous, 1..7 BANDS, 8 choroid). Deterministic in the arguments; the
  same seed gives the same eye and speckle with and without a lesion. `noise` scales the speckle and the
  additive noise (0: noise-free)."""
  if not SIZES[0] <= size <= SIZES[1]:
    raise ValueError(f"oct_phantom size must be in [{SIZES[0]}, {SIZES[1]}], got {size}")
  if lesion is not None and lesion not in LESIONS:
    raise ValueError(f"lesion must be None or one of {LESIONS}, got {lesion!r}")
  if (lesion is None) != (grade is None) or (grade is not None and grade not in GRADES):
    raise ValueError(f"grade must be one of {GRADES} with a lesion and None without one, got grade={grade!r} "
                     f"for lesion={lesion!r}")
  if noise < 0:
    raise ValueError(f"noise must be >= 0, got {noise}")
  a = _anatomy(np.random.default_rng(seed), size)
  t = np.broadcast_to(((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None], (size, size))
  mask = np.zeros((size, size), np.float32)
  if lesion is None:
    img, layers = _render(a, t, size)
  else:
    z, top, bot, label, fill = _pocket(a, lesion, np.random.default_rng([seed, 2]), grade, t)
    img, layers = _render(a, z, size)
    w = _EDGE / size
    alpha = np.clip(_sigmoid((t - top) / w) - _sigmoid((t - bot) / w), 0, 1)
    if lesion == "deposit":  # drusen material, a little darker towards its base
      fill = fill * (1 - 0.15 * np.clip((t - top) / np.maximum(bot - top, 1e-3), 0, 1))
    img = img * (1 - alpha) + fill * alpha
    inside = (t >= top) & (t < bot)
    mask = inside.astype(np.float32)
    layers = np.where(inside, label[None], layers).astype(np.int32)
  drift = 1 + 0.06 * _smooth_noise(np.random.default_rng(a["drift_seed"]), size, 4)
  img = img * drift * (1 - 0.12 * a["u"] ** 2)  # lateral signal fall-off
  if noise > 0:
    rng = np.random.default_rng([seed, 1])
    k = 0.375 / (0.22 * noise) ** 2  # the lateral [1, 2, 1] / 4 smoothing keeps 0.375 of the variance
    g = rng.standard_gamma(k, (size, size + 2), dtype=np.float32) / k
    speckle = 0.25 * g[:, :-2] + 0.5 * g[:, 1:-1] + 0.25 * g[:, 2:]
    img = img * speckle + 0.015 * noise * rng.standard_normal((size, size), dtype=np.float32)
  return np.clip(img, 0, 1).astype(np.float32), mask, layers


def oct_phantom_arrays(n_train: int = 16, n_test_normal: int = 24, n_test_abnormal: int = 24, size: int = 128,
                       seed: int = 0) -> dict[str, np.ndarray]:
  """In-memory OCT phantom dataset: train_images, train_layers (n_train, S, S); test_images, test_masks,
  test_layers (n_test, S, S); test_labels (n_test,) 0/1; test_kinds and test_grades (n_test,) str
  ("normal" for normal images). Test normals come first; abnormal images cycle through LESIONS and
  alternate GRADES, so every kind meets every grade within six images."""
  train, train_layers = [], []
  for i in range(n_train):
    im, _, lay = oct_phantom(size, _image_seed(seed, "train", i))
    train.append(im), train_layers.append(lay)
  test, masks, layers, kinds, grades = [], [], [], [], []
  for i in range(n_test_normal):
    im, m, lay = oct_phantom(size, _image_seed(seed, "test_normal", i))
    test.append(im), masks.append(m), layers.append(lay), kinds.append("normal"), grades.append("normal")
  for i in range(n_test_abnormal):
    kind, grade = LESIONS[i % len(LESIONS)], GRADES[i % len(GRADES)]
    im, m, lay = oct_phantom(size, _image_seed(seed, "test_abnormal", i), kind, grade)
    test.append(im), masks.append(m), layers.append(lay), kinds.append(kind), grades.append(grade)
  empty, no_layers = np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.int32)
  return {
      "train_images": np.stack(train) if train else empty,
      "train_layers": np.stack(train_layers) if train else no_layers,
      "test_images": np.stack(test) if test else empty,
      "test_masks": np.stack(masks) if masks else empty,
      "test_layers": np.stack(layers) if layers else no_layers,
      "test_labels": np.array([0] * n_test_normal + [1] * n_test_abnormal, np.int32),
      "test_kinds": np.array(kinds),
      "test_grades": np.array(grades),
  }


def make_oct_phantom_dataset(root: str | os.PathLike, n_train: int = 16, n_test_normal: int = 24,
                             n_test_abnormal: int = 24, size: int = 128, seed: int = 0) -> str:
  """Writes an OCT phantom dataset in the MediCLIP layout under `root` and returns root
  (`phantom.write_mediclip_layout`). An abnormal image's clsname is its grade (mild / severe, what staging
  reads) and its file name carries the lesion kind: test/abnormal/<kind>_<grade>_<index>.png."""
  data = oct_phantom_arrays(n_train, n_test_normal, n_test_abnormal, size, seed)
  stems = [f"{k}_{g}" for k, g in zip(data["test_kinds"], data["test_grades"])]
  return write_mediclip_layout(root, "oct", data["train_images"], data["test_images"], data["test_masks"],
                               data["test_labels"], stems, data["test_grades"])
