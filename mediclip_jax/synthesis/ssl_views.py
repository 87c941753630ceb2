"""The SSL data transformations T1, T2 of SSL-AnoVAE: random views of one image, on device.

BYOL makes the SSL latent z_S invariant to the transformation T, so T decides what z_S becomes
blind to: it must never destroy or imitate the cue that defines the target anomaly. Presets
hold modality-aware choices (`oct`, `fundus`, `grey`), the ablation ladder (`geometric` <
`photometric` < `cutout`) and the control `none` (identity views).

A view of an image (H, W, C) float32 in [0, 1], C = 1 or 3, is, in this order:

  1. geometry, ONE bilinear resampling: a random resized crop (area fraction U(crop_scale),
     aspect exp U(log crop_ratio) relative to the image's own aspect), rotated about its centre
     by U(±rotate_deg), flipped with hflip_p / vflip_p. Samples outside the image take the
     nearest edge pixel (edge clamping, scipy's mode "nearest").
  2. brightness x·(1+b), contrast m + (x−m)·(1+c) (m the image mean), gamma x^exp(g), with
     b, c, g uniform in ±brightness, ±contrast, ±gamma; the same for every channel (no hue change).
  3. with blur_p, a separable Gaussian blur of σ ~ U(0, blur_sigma) (static radius ⌈3·blur_sigma⌉,
     symmetric reflection at the border, as scipy's mode "reflect").
  4. with edge_p, a blend (1−a)·x + a·|∇x| with a ~ U(0, edge_strength), |∇x| the Sobel gradient
     magnitude normalised by its maximum over the image.
  5. speckle x·(1 + σ·n) and additive noise x + σ'·n', σ ~ U(0, speckle_std), σ' ~ U(0, noise_std),
     n, n' standard normal per pixel, shared by the channels (the noise never adds colour).
  6. with cutout_p, one box of round(cutout_size·H) × round(cutout_size·W) pixels set to 0, centred
     anywhere in the image (it may stick out).
  7. clipping to [0, 1].

Config values are static: an operation whose strength or probability is zero is left out of
the traced function, so zero parameters give an exact identity (preset `none` returns the
input). Every scalar draw has a fixed slot in one uniform vector drawn from the view key, whatever
is enabled (the noise fields follow the slots in the same vector), so two configs that share an
operation's parameters draw the same values for it: the ablation presets differ only in the
operations they add. Everything is jit- and vmap-able; no Python control flow depends on traced
values. The geometry's output is kept apart from later operations (an optimisation barrier), so
XLA does not recompute the resampling inside every blur or Sobel tap.

Config fields are None by default, meaning "the preset's value"; a number overrides the
preset (so `--config.ssl.views.preset=oct --config.ssl.views.noise_std=0` works in any order).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mediclip_jax.synthesis import mix

PROB_FIELDS = ("hflip_p", "vflip_p", "blur_p", "edge_p", "cutout_p")
RANGE_FIELDS = ("crop_scale", "crop_ratio")
FIELDS = ("hflip_p", "vflip_p", "rotate_deg", "crop_scale", "crop_ratio", "brightness", "contrast", "gamma",
          "blur_p", "blur_sigma", "noise_std", "speckle_std", "edge_p", "edge_strength", "cutout_p", "cutout_size")
SECTION = "config.ssl.views"
BLUR_TRUNCATE = 3.0  # kernel radius ⌈3·blur_sigma⌉

_NONE = dict(hflip_p=0.0, vflip_p=0.0, rotate_deg=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
             brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, blur_sigma=0.0, noise_std=0.0,
             speckle_std=0.0, edge_p=0.0, edge_strength=0.0, cutout_p=0.0, cutout_size=0.0)
_GEOMETRIC = dict(_NONE, hflip_p=0.5, rotate_deg=15.0, crop_scale=(0.6, 1.0), crop_ratio=(0.75, 4.0 / 3.0))
_PHOTOMETRIC = dict(_GEOMETRIC, brightness=0.3, contrast=0.3, gamma=0.3, blur_p=0.5, blur_sigma=1.5, noise_std=0.05,
                    edge_p=0.2, edge_strength=0.5)
PRESET_VALUES: dict[str, dict] = {
    "none": _NONE,
    # Layered retina: no vertical flip or large rotation (layer order), no contrast/gamma (layer and
    # fluid reflectivity), no blur (thin layers, hyper-reflective foci), no cutout (dark fluid pockets).
    "oct": dict(_NONE, hflip_p=0.5, rotate_deg=10.0, crop_scale=(0.6, 1.0), crop_ratio=(0.9, 1.1), brightness=0.1,
                noise_std=0.02, speckle_std=0.1),
    # Round field of view without up/down: any orientation; no blur or noise (microaneurysms, small
    # haemorrhages), no contrast/gamma or colour jitter (exudate brightness and lesion colour).
    "fundus": dict(_NONE, hflip_p=0.5, vflip_p=0.5, rotate_deg=180.0, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25),
                   brightness=0.1),
    # MRI, ultrasound, X-ray: left-right symmetric anatomy, scanner-dependent intensity.
    "grey": dict(_NONE, hflip_p=0.5, rotate_deg=10.0, crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), brightness=0.2,
                 contrast=0.2, gamma=0.2, blur_p=0.3, blur_sigma=1.0, noise_std=0.02),
    "geometric": _GEOMETRIC,
    "photometric": _PHOTOMETRIC,
    "cutout": dict(_PHOTOMETRIC, cutout_p=0.5, cutout_size=0.25),
}
PRESETS: tuple[str, ...] = tuple(PRESET_VALUES)
DEFAULT_PRESET = "grey"

# Every scalar draw of a view is one slot of a single U[0, 1) vector, whatever is enabled; the speckle and
# noise fields follow the slots in the same vector. One threefry call per view instead of one per draw keeps
# compilation fast (each call is a separate loop for XLA), and JAX's default (partitionable) threefry makes
# the slots the same whether or not the fields are drawn.
_SLOTS = ("hflip", "vflip", "angle", "scale", "ratio", "center_y", "center_x", "brightness", "contrast", "gamma",
          "blur_on", "blur_sigma", "edge_on", "edge_strength", "speckle_sigma", "noise_sigma", "cutout_on",
          "cutout_y", "cutout_x")


class Params(NamedTuple):
  """Resolved, validated parameters (Python numbers, static under jit)."""
  hflip_p: float
  vflip_p: float
  rotate_deg: float
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  brightness: float
  contrast: float
  gamma: float
  blur_p: float
  blur_sigma: float
  noise_std: float
  speckle_std: float
  edge_p: float
  edge_strength: float
  cutout_p: float
  cutout_size: float


def default_config(preset: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
  """`preset` plus every parameter, None (= the preset's value) and typed, so command-line overrides parse."""
  _check_preset(preset, "preset")
  c = ml_collections.ConfigDict()
  c.preset = preset
  for name in FIELDS:
    c[name] = ml_collections.FieldReference(None, field_type=tuple if name in RANGE_FIELDS else float)
  return c


def _check_preset(preset, field: str, section: str = SECTION) -> None:
  if preset not in PRESET_VALUES:
    raise ValueError(f"{section}.{field} must be one of {PRESETS}, got {preset!r}")


def preset_values(preset: str) -> dict:
  """The parameter values of a preset (a fresh dict)."""
  _check_preset(preset, "preset")
  return dict(PRESET_VALUES[preset])


def apply_preset(cfg: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Sets `cfg.preset` and writes the preset's numbers into every parameter (in place; returns cfg).

  For config files that start from a preset and edit a few values. The numbers are explicit
  afterwards, so a later change of `preset` alone no longer changes them.
  """
  for name, value in preset_values(preset).items():
    cfg[name] = value
  cfg.preset = preset
  return cfg


def _number(name: str, value, section: str = SECTION) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{section}.{name} must be a finite number, got {value!r}")
  return float(value)


def _range(name: str, value, section: str = SECTION) -> tuple[float, float]:
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ValueError(f"{section}.{name} must be a (min, max) pair, got {value!r}")
  return _number(name, value[0], section), _number(name, value[1], section)


def resolve(cfg: ml_collections.ConfigDict, section: str = SECTION) -> Params:
  """The effective parameters: the preset's values, overridden by every field that is not None; validated.
  Errors name `<section>.<field>` (the config section the views are read from)."""
  _check_preset(cfg.get("preset"), "preset", section)
  values = preset_values(cfg.preset)
  for name in FIELDS:
    if cfg.get(name) is not None:
      values[name] = cfg[name]
  p = Params(**{n: _range(n, v, section) if n in RANGE_FIELDS else _number(n, v, section) for n, v in values.items()})
  for name in PROB_FIELDS:
    if not 0.0 <= getattr(p, name) <= 1.0:
      raise ValueError(f"{section}.{name} is a probability and must be in [0, 1], got {getattr(p, name)}")
  if not 0.0 <= p.rotate_deg <= 180.0:
    raise ValueError(f"{section}.rotate_deg (max |angle| in degrees) must be in [0, 180], got {p.rotate_deg}")
  lo, hi = p.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"{section}.crop_scale (area fractions) must satisfy 0 < min <= max <= 1, got {p.crop_scale}")
  lo, hi = p.crop_ratio
  if not 0.0 < lo <= hi:
    raise ValueError(f"{section}.crop_ratio (aspect ratios) must satisfy 0 < min <= max, got {p.crop_ratio}")
  for name in ("brightness", "contrast"):
    if not 0.0 <= getattr(p, name) < 1.0:
      raise ValueError(f"{section}.{name} (max relative change) must be in [0, 1), got {getattr(p, name)}")
  for name in ("gamma", "blur_sigma", "noise_std", "speckle_std"):
    if getattr(p, name) < 0.0:
      raise ValueError(f"{section}.{name} must be >= 0, got {getattr(p, name)}")
  for name in ("edge_strength", "cutout_size"):
    if not 0.0 <= getattr(p, name) <= 1.0:
      raise ValueError(f"{section}.{name} must be in [0, 1], got {getattr(p, name)}")
  return p


def validate_config(cfg: ml_collections.ConfigDict, section: str = SECTION) -> None:
  """Raises ValueError naming `<section>.<field>` (default `config.ssl.views`) when a value is out of range."""
  resolve(cfg, section)


# ----------------------------------------------------------------------------------------------
# Operations on one image (H, W, C)


def _bilinear(image: jax.Array, sy: jax.Array, sx: jax.Array) -> jax.Array:
  """Bilinear sample of every channel at (sy, sx) (H', W'), coordinates clamped to the image (edge clamping).

  One gather of a 2×2×C block per point. Integer coordinates give weights of exactly 0 and 1,
  so an identity or mirror map reproduces the pixels exactly.
  """
  h, w, c = image.shape
  y0 = jnp.clip(jnp.floor(sy), 0.0, h - 2.0)
  x0 = jnp.clip(jnp.floor(sx), 0.0, w - 2.0)
  wy = jnp.clip(sy - y0, 0.0, 1.0)[..., None]
  wx = jnp.clip(sx - x0, 0.0, 1.0)[..., None]
  idx = jnp.stack([y0, x0], axis=-1).astype(jnp.int32)
  nb = idx.ndim - 1
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(nb, nb + 1, nb + 2), collapsed_slice_dims=(),
                                         start_index_map=(0, 1))
  v = jax.lax.gather(image, idx, dnums, slice_sizes=(2, 2, c), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return (1.0 - wy) * ((1.0 - wx) * v[..., 0, 0, :] + wx * v[..., 0, 1, :]) \
      + wy * ((1.0 - wx) * v[..., 1, 0, :] + wx * v[..., 1, 1, :])


class _Draws:
  """The view's random numbers: named uniform slots, and with `fields` two (H, W, 1) standard normal fields."""

  def __init__(self, key: jax.Array, hw: tuple[int, int], fields: bool):
    n = len(_SLOTS)
    u = jax.random.uniform(key, (n + (2 * hw[0] * hw[1] if fields else 0),))
    self.u = dict(zip(_SLOTS, u[:n]))
    if fields:  # the inverse normal CDF, as jax.random.normal
      z = math.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(2.0 * u[n:] - 1.0, -1.0 + 2.0 ** -23))
      self.speckle, self.noise = z.reshape(2, hw[0], hw[1], 1)

  def uniform(self, name: str, lo: float, hi) -> jax.Array:
    return lo + (hi - lo) * self.u[name]

  def coin(self, name: str, p: float) -> jax.Array:
    return self.u[name] < p


def _geometry(d: _Draws, image: jax.Array, p: Params) -> jax.Array:
  """Flips, rotation and the resized crop as one affine map from output to source pixels, one resampling."""
  h, w, _ = image.shape
  area = d.uniform("scale", p.crop_scale[0], p.crop_scale[1])
  ratio = jnp.exp(d.uniform("ratio", math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])))
  ch = jnp.minimum(h * jnp.sqrt(area / ratio), float(h))  # crop size in pixels
  cw = jnp.minimum(w * jnp.sqrt(area * ratio), float(w))
  cy = ch / 2.0 + d.u["center_y"] * (h - ch) - 0.5  # crop centre, pixel-index coordinates
  cx = cw / 2.0 + d.u["center_x"] * (w - cw) - 0.5
  theta = d.uniform("angle", -1.0, 1.0) * math.radians(p.rotate_deg)
  fy = jnp.where(d.coin("vflip", p.vflip_p), -1.0, 1.0)
  fx = jnp.where(d.coin("hflip", p.hflip_p), -1.0, 1.0)
  oy = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2.0
  ox = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2.0
  dy = oy * (fy * ch / h)
  dx = ox * (fx * cw / w)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return _bilinear(image, cy + cos * dy - sin * dx, cx + sin * dy + cos * dx)


def _photometric(d: _Draws, x: jax.Array, p: Params) -> jax.Array:
  """Brightness, contrast and gamma, one factor each for all channels."""
  if p.brightness > 0:
    x = x * (1.0 + d.uniform("brightness", -p.brightness, p.brightness))
  if p.contrast > 0:
    m = jnp.mean(x)
    x = m + (x - m) * (1.0 + d.uniform("contrast", -p.contrast, p.contrast))
  if p.gamma > 0:
    x = jnp.clip(x, 0.0, 1.0) ** jnp.exp(d.uniform("gamma", -p.gamma, p.gamma))
  return x


def blur_radius(blur_sigma: float) -> int:
  """The static kernel radius for a maximum σ."""
  return int(math.ceil(BLUR_TRUNCATE * blur_sigma))


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur of (H, W, C) with a traced σ and a static radius (symmetric reflection).

  Each axis is one (n, n) matrix product: row i holds the taps at j − i plus their reflections
  about −½ and n − ½ (radius < n), so the graph stays small for any radius.
  """
  s = jnp.maximum(sigma, 1e-3)
  g = lambda d: jnp.where(jnp.abs(d) <= radius, jnp.exp(-0.5 * (d / s) ** 2), 0.0)
  norm = jnp.sum(g(jnp.arange(-radius, radius + 1, dtype=jnp.float32)))

  def matrix(n: int) -> jax.Array:
    i = jnp.arange(n, dtype=jnp.float32)[:, None]
    j = jnp.arange(n, dtype=jnp.float32)[None, :]
    return (g(j - i) + g(-1.0 - i - j) + g(2.0 * n - 1.0 - i - j)) / norm

  h, w, _ = x.shape
  return jnp.einsum("ij,jkc,lk->ilc", matrix(h), x, matrix(w), precision=jax.lax.Precision.HIGHEST)


def sobel_magnitude(x: jax.Array) -> jax.Array:
  """Per-channel Sobel gradient magnitude of (H, W, C), edge-padded, divided by its maximum (in [0, 1])."""
  h, w, _ = x.shape
  xp = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  s = lambda dy, dx: xp[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
  gy = (s(1, -1) + 2.0 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2.0 * s(-1, 0) + s(-1, 1))
  gx = (s(-1, 1) + 2.0 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2.0 * s(0, -1) + s(1, -1))
  mag = jnp.sqrt(gy * gy + gx * gx)
  return mag / jnp.maximum(jnp.max(mag), 1e-6)


def make_view(cfg: ml_collections.ConfigDict, section: str = SECTION) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """view(key, image (H, W, C) in [0, 1]) -> one random view (H, W, C) float32 in [0, 1]; deterministic per key.
  (Also the training augmentation of the latent diffusion baseline, read from `section`.)"""
  p = resolve(cfg, section)
  geometric = p.hflip_p > 0 or p.vflip_p > 0 or p.rotate_deg > 0 or p.crop_scale != (1.0, 1.0) \
      or p.crop_ratio != (1.0, 1.0)
  radius = blur_radius(p.blur_sigma)

  def view(key: jax.Array, image: jax.Array) -> jax.Array:
    x = jnp.asarray(image, jnp.float32)
    if x.ndim != 3 or x.shape[-1] not in (1, 3) or min(x.shape[:2]) < 2:
      raise ValueError(f"ssl view: expected one image (H, W, C) with H, W >= 2 and C in (1, 3), got shape {x.shape}")
    h, w, c = x.shape
    d = _Draws(key, (h, w), p.speckle_std > 0 or p.noise_std > 0)
    if geometric:
      x = jax.lax.optimization_barrier(_geometry(d, x, p))
    x = _photometric(d, x, p)
    if p.blur_p > 0 and radius > 0:
      if radius >= min(h, w):
        raise ValueError(f"{section}.blur_sigma = {p.blur_sigma} needs a kernel radius {radius} smaller than the "
                         f"image side {min(h, w)}")
      blurred = gaussian_blur(x, d.uniform("blur_sigma", 0.0, p.blur_sigma), radius)
      x = jnp.where(d.coin("blur_on", p.blur_p), blurred, x)
    if p.edge_p > 0 and p.edge_strength > 0:
      a = d.uniform("edge_strength", 0.0, p.edge_strength)
      x = jnp.where(d.coin("edge_on", p.edge_p), (1.0 - a) * x + a * sobel_magnitude(x), x)
    if p.speckle_std > 0:  # the noise fields are shared by the channels
      x = x * (1.0 + d.uniform("speckle_sigma", 0.0, p.speckle_std) * d.speckle)
    if p.noise_std > 0:
      x = x + d.uniform("noise_sigma", 0.0, p.noise_std) * d.noise
    if p.cutout_p > 0 and p.cutout_size > 0:
      sh, sw = max(1, round(p.cutout_size * h)), max(1, round(p.cutout_size * w))
      y0 = jnp.floor(d.u["cutout_y"] * h).astype(jnp.int32) - sh // 2  # centre anywhere in the image
      x0 = jnp.floor(d.u["cutout_x"] * w).astype(jnp.int32) - sw // 2
      rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
      box = (rows >= y0) & (rows < y0 + sh) & (cols >= x0) & (cols < x0 + sw) & d.coin("cutout_on", p.cutout_p)
      x = jnp.where(box[..., None], 0.0, x)
    return jnp.clip(x, 0.0, 1.0)

  return view


def make_views(cfg: ml_collections.ConfigDict
               ) -> Callable[[jax.Array, jax.Array | int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """views(key, step, images (B, H, W, C), sample_index (B,)) -> (v1, v2), two views per sample.

  Sample i's views use fold_in(k_i, 0) and fold_in(k_i, 1), with k_i = fold_in(fold_in(key, step),
  sample_index[i]) as in `mix.sample_keys`, so a sample's views do not depend on the rest of the
  batch or on the device split. Pass a key of its own stream (e.g. `rngs.stream(seed, "ssl_views")`),
  not the synthesis stream.
  """
  view = make_view(cfg)

  def views(key, step, images, sample_index):
    keys = mix.sample_keys(key, step, sample_index)
    k1 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return jax.vmap(view)(k1, images), jax.vmap(view)(k2, images)

  return views
