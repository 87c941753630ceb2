"""The same pixel tasks in numpy/scipy/OpenCV, one sample at a time, as the PyTorch original runs them.

A host-side counterpart of the pixel tasks of `mix.build_synthesis`: the baseline for
`launch/bench_synthesis.py` and the benchmark's "host" mode (CPU workers feeding the device
step, as the PyTorch original's DataLoader). It follows the reference's per-box algorithms:
Perlin masks with a real "repeat until >= 20 % coverage" loop and an OpenCV rotation,
scipy cubic-spline resampling for cut-paste and deformation, scipy Gaussian filters,
scipy morphology for the cut-paste label, and cv2.seamlessClone for Poisson pasting.
It reads the same config as the JAX version (`mix.default_config()`); random streams
differ, distributions match.
"""
from __future__ import annotations

import math

import cv2
import ml_collections
import numpy as np
from scipy import ndimage as ndi

from mediclip_jax.synthesis import mix, shapes


def _perlin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  t0 = (np.arange(h) / h)[:, None]
  t1 = (np.arange(w) / w)[None, :]
  a = rng.uniform(0, 2 * np.pi, 4)
  c, s = np.cos(a), np.sin(a)
  n00 = t0 * c[0] + t1 * s[0]
  n10 = (t0 - 1) * c[1] + t1 * s[1]
  n01 = t0 * c[2] + (t1 - 1) * s[2]
  n11 = (t0 - 1) * c[3] + (t1 - 1) * s[3]
  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  f0, f1 = fade(t0), fade(t1)
  return math.sqrt(2) * ((1 - f1) * (n00 * (1 - f0) + f0 * n10) + f1 * (n01 * (1 - f0) + f0 * n11))


def perlin_patch(rng: np.random.Generator, hw, min_prop, max_prop, sc) -> np.ndarray:
  """A bool Perlin mask of random size, regenerated until it covers >= min_coverage."""
  (lo_h, lo_w), (hi_h, hi_w) = shapes.size_bounds(min_prop, max_prop, hw)
  h, w = int(rng.integers(lo_h, hi_h)), int(rng.integers(lo_w, hi_w))
  while True:
    noise = _perlin(rng, h, w).astype(np.float32)
    ang = rng.uniform(-sc.perlin.max_rotation_deg, sc.perlin.max_rotation_deg)
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), ang, 1.0)
    noise = cv2.warpAffine(noise, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    m = noise > sc.perlin.threshold
    if m.mean() >= sc.perlin.min_coverage:
      return m


def hypershape_patch(rng: np.random.Generator, hw, min_prop, max_prop, sc):
  """(mask, edge_distance(origin, unit_dir)) of a sheared, rotated rectangle or ellipse."""
  hc = sc.hypershape
  (lo_h, lo_w), (hi_h, hi_w) = shapes.size_bounds(min_prop, max_prop, hw)
  ub = np.array([hi_h, hi_w], float)
  dims = np.floor(np.clip((hc.offset + rng.gamma(hc.gamma_shape, hc.gamma_scale, 2)) * np.array(hw),
                          [lo_h, lo_w], ub))
  sh = rng.normal(0, hc.shear_std, 2)
  th = rng.uniform(-np.pi / 2, np.pi / 2)
  m = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.array([[1, sh[0]], [sh[1], 1]])
  half = (dims - 1) / 2
  corners = np.array([[a, b] for a in (-1, 1) for b in (-1, 1)]) * half

  def bounds(mm):
    p = corners @ mm.T
    return np.floor(p.min(0)), np.ceil(p.max(0))

  lo, hi = bounds(m)
  ratio = np.max((hi + 1 - lo) / ub)
  if ratio > 1:
    m = m / ratio
    lo, hi = bounds(m)
  box = np.minimum(hi + 1 - lo, ub).astype(int)
  inv = np.linalg.inv(m)
  ell = rng.random() < hc.ellipse_prob
  yy, xx = np.mgrid[0:box[0], 0:box[1]].astype(float)
  v = np.stack([yy + lo[0], xx + lo[1]], -1) @ inv.T
  hd = dims / 2
  mask = ((v / hd) ** 2).sum(-1) <= 1 if ell else (np.abs(v) <= hd).all(-1)

  def edge(o, d):
    o2 = (o + lo) @ inv.T
    u2 = d @ inv.T
    if ell:
      qa = ((u2 / hd) ** 2).sum(-1)
      qb = 2 * (o2 * u2 / hd ** 2).sum(-1)
      qc = ((o2 / hd) ** 2).sum(-1) - 1
      return (-qb + np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0))) / np.maximum(2 * qa, 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
      t = np.where(np.abs(u2) > 1e-9, (np.sign(u2 + 1e-30) * hd - o2) / u2, np.inf)
    return np.maximum(t.min(-1), 0)

  return mask, edge


def _corner(rng, hw, box):
  return int(rng.integers(0, hw[0] - box[0], endpoint=True)), int(rng.integers(0, hw[1] - box[1], endpoint=True))


def _repeat(rng, image, sc, once):
  out = image.copy()
  union = np.zeros(image.shape, bool)
  for _ in range(int(sc.max_anomalies)):
    out, m = once(out)
    union |= m
    if rng.random() > sc.extra_anomaly_prob:
      break
  return out, union


def cutpaste(rng: np.random.Generator, image: np.ndarray, support: np.ndarray, pc) -> tuple[np.ndarray, np.ndarray]:
  cc, sc = pc.cutpaste, pc.shapes
  hw = image.shape

  def once(x):
    m = perlin_patch(rng, hw, cc.min_prop, cc.max_prop, sc)
    h, w = m.shape
    y0, x0 = _corner(rng, hw, m.shape)
    src = support[rng.integers(len(support))]
    th = rng.uniform(-cc.max_rotation, cc.max_rotation)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    corners = np.array([[a, b] for a in (0, h - 1) for b in (0, w - 1)], float)
    ext = lambda mm: (np.floor((corners @ mm.T).min(0)), np.ceil((corners @ mm.T).max(0)) - np.floor((corners @ mm.T).min(0)) + 1)
    c = 1 + rng.exponential(cc.scale_exp)
    s = c if rng.random() < 0.5 else 1 / c
    s = min(s, float(np.min(cc.max_source_fraction * np.array(hw) / ext(rot)[1])))
    mm = s * rot
    lo, e = ext(mm)
    sy = int(rng.integers(0, max(hw[0] - e[0], 0), endpoint=True))
    sx = int(rng.integers(0, max(hw[1] - e[1], 0), endpoint=True))
    patch = ndi.affine_transform(src, mm, offset=np.array([sy, sx]) - lo, output_shape=(h, w), order=3, mode="nearest")
    patch = np.clip(patch, 0.0, 1.0)
    out = x.copy()
    if cc.paste_mode == "poisson":
      full_src = x.copy()
      full_src[y0:y0 + h, x0:x0 + w] = patch
      full_m = np.zeros(hw, np.uint8)
      full_m[y0:y0 + h, x0:x0 + w] = m * 255
      ys, xs = np.nonzero(full_m)
      if len(ys):
        # OpenCV puts the mask's bounding box (width w) at x = centre.x - w // 2: this centre keeps it in place.
        centre = (int(xs.min() + (xs.max() - xs.min() + 1) // 2), int(ys.min() + (ys.max() - ys.min() + 1) // 2))
        to8 = lambda a: cv2.cvtColor(np.round(a * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        blended = cv2.seamlessClone(to8(full_src), to8(x), full_m, centre, cv2.NORMAL_CLONE)[..., 0] / 255.0
        out = np.where(full_m > 0, blended, x)
    else:
      region = out[y0:y0 + h, x0:x0 + w]
      region[m] = patch[m]
    full = np.zeros(hw, bool)
    full[y0:y0 + h, x0:x0 + w] = m
    return out, full

  out, union = _repeat(rng, image, sc, once)
  changed = union & (np.abs(out - image) > cc.change_threshold)
  out = np.where(changed, out, image)
  closed = ndi.binary_closing(changed, np.ones((3, 3)), border_value=0) | changed
  label = ndi.binary_fill_holes(closed)
  return out.astype(np.float32), label.astype(np.float32)


def gauss_intensity(rng: np.random.Generator, image: np.ndarray, pc) -> tuple[np.ndarray, np.ndarray]:
  gc, sc = pc.gauss_intensity, pc.shapes

  def once(x):
    m = perlin_patch(rng, image.shape, gc.min_prop, gc.max_prop, sc)
    h, w = m.shape
    y0, x0 = _corner(rng, image.shape, m.shape)
    tex = ndi.gaussian_filter((rng.standard_normal(image.shape) >= 0).astype(np.float64),
                              float(rng.choice(gc.texture_sigmas)), truncate=gc.truncate)
    tex = (tex - tex.min()) / max(tex.max() - tex.min(), 1e-12)
    amp = rng.uniform(*gc.amplitude) * (1 if rng.random() < 0.5 else -1)
    tex = np.clip(tex * amp, -1, 1)
    soft = ndi.gaussian_filter(m.astype(np.float64), rng.uniform(*gc.mask_sigma), truncate=gc.truncate)
    out = x.copy()
    reg = out[y0:y0 + h, x0:x0 + w]
    reg[m] = np.clip(reg + tex[y0:y0 + h, x0:x0 + w] * soft, 0, 1)[m]
    full = np.zeros(image.shape, bool)
    full[y0:y0 + h, x0:x0 + w] = m
    return out, full

  out, union = _repeat(rng, image, sc, once)
  return out.astype(np.float32), union.astype(np.float32)


def deformation(rng: np.random.Generator, image: np.ndarray, pc) -> tuple[np.ndarray, np.ndarray]:
  dc, sc = pc.deformation, pc.shapes

  def once(x):
    m, edge = hypershape_patch(rng, image.shape, dc.min_prop, dc.max_prop, sc)
    h, w = m.shape
    y0, x0 = _corner(rng, image.shape, m.shape)
    f = 2.0 ** rng.uniform(*dc.log2_factor)
    pts = np.argwhere(m)
    c = pts[rng.integers(len(pts))].astype(float)
    grid = np.mgrid[0:h, 0:w].astype(float)
    inner = m.copy()
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    p = np.argwhere(inner).astype(float)
    d = p - c
    r = np.sqrt((d ** 2).sum(-1))
    ok = r > 0
    u = d[ok] / r[ok, None]
    big_r = edge(c, u)
    new_r = big_r * np.clip(r[ok] / np.maximum(big_r, 1e-6), 0, 1) ** f
    q = p[ok].astype(int)
    grid[:, q[:, 0], q[:, 1]] = (c + new_r[:, None] * u).T
    patch = ndi.map_coordinates(x[y0:y0 + h, x0:x0 + w], grid, order=3, mode="nearest")
    out = x.copy()
    reg = out[y0:y0 + h, x0:x0 + w]
    reg[m] = np.clip(patch, 0, 1)[m]
    full = np.zeros(image.shape, bool)
    full[y0:y0 + h, x0:x0 + w] = m
    return out, full

  out, union = _repeat(rng, image, sc, once)
  return out.astype(np.float32), union.astype(np.float32)


def synthesize_sample_numpy(rng: np.random.Generator, image: np.ndarray, support: np.ndarray,
                            cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """One sample: picks a task with cfg.probs and applies it. image uint8 or float in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  support = np.asarray(support)
  if support.dtype == np.uint8:
    support = support.astype(np.float32) / 255.0
  probs = mix.task_probs(cfg).astype(np.float64)
  if probs[len(mix.PIXEL_TASKS):].sum() > 0:
    raise ValueError("synthesis.probs: the numpy reference runs pixel tasks only; latent tasks need the VAE on device")
  task = mix.PIXEL_TASKS[int(rng.choice(len(mix.PIXEL_TASKS), p=probs[:len(mix.PIXEL_TASKS)]))]
  pc = cfg.pixel
  if task == "cutpaste":
    return cutpaste(rng, image, support, pc)
  if task == "gauss_intensity":
    return gauss_intensity(rng, image, pc)
  if task == "deformation":
    return deformation(rng, image, pc)
  if task == "identity":
    return image.astype(np.float32), np.zeros(image.shape, np.float32)
  raise ValueError(f"task {task!r} has no numpy implementation; expected one of {mix.PIXEL_TASKS}")
