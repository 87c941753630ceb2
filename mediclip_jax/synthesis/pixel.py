"""Pixel-space anomaly synthesis tasks, as pure jit/vmap-able JAX functions.

Each task maps (key, image[, source], cfg) to (image, mask): images are float32
(H, W) in [0, 1], masks float32 (H, W) in {0, 1}. Shapes come from the inputs and
stay static; every random size, angle and position is a traced value. Each task
places 1 anomaly, then another of the same task on top with probability ½ (up to
`shapes.max_anomalies`); extra anomalies run under `lax.cond` (skipped when samples
are mapped one by one, computed and selected under vmap). Each anomaly works on a
static window of its box's size bound, placed around the box, not on the whole image.

Tasks:
  * cutpaste: a rotated, scaled region of a support image resampled into a Perlin
    mask's box and pasted inside the mask, hard (the reference) or by Poisson image
    editing (`paste_mode = "poisson"`, a direct DST solve as OpenCV's seamlessClone).
    Label: where the image changed, closed 3×3 and with holes filled.
  * gauss_intensity: X + γ·σ̂·G inside a Perlin mask, σ̂ a Gaussian-filtered Bernoulli
    texture min-max normalised, G the mask softened by a Gaussian. Label: the mask.
  * deformation: a radial bulge inside a sheared, rotated rectangle or ellipse; each
    pixel at radius r from a random centre samples radius R·(r/R)^f. Label: the shape.
  * identity: the image unchanged, an empty mask.

Deviations from the reference (documented, configurable where it matters): resampling
is bilinear (one 2×2-block gather per pixel; the reference uses cubic splines); outputs
are not quantised to uint8; the softened mask of the intensity task is filtered as on the
whole image rather than on the patch box; deformation anomalies are resampled in turn
with bilinear interpolation; hole filling
of the cut-paste label propagates the outside region for `hole_fill_iters` steps
instead of a full morphological reconstruction.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections

from mediclip_jax.synthesis import shapes

PASTE_MODES = ("hard", "poisson")


def default_config() -> ml_collections.ConfigDict:
  """Every pixel-task knob; defaults are the reference MediCLIP's."""
  c = ml_collections.ConfigDict()
  c.shapes = shapes.default_config()
  c.cutpaste = ml_collections.ConfigDict()
  c.cutpaste.min_prop = 0.1  # Perlin box side in [round(0.1·224), round(0.6·224)) = [22, 134)
  c.cutpaste.max_prop = 0.6
  c.cutpaste.max_rotation = math.pi / 4  # source region angle ~ U(-π/4, π/4)
  c.cutpaste.scale_exp = 0.1  # scale c = 1 + Exp(0.1), s = c or 1/c
  c.cutpaste.max_source_fraction = 0.8  # the rotated region fits within 80 % of the source image
  c.cutpaste.paste_mode = "hard"  # "hard" (reference) | "poisson"
  c.cutpaste.poisson_erode = 3  # guidance mask eroded by a 7×7 square (3 × 3×3, as OpenCV seamlessClone)
  c.cutpaste.change_threshold = 0.5 / 255.0  # a pixel "changed" when |new - old| exceeds this
  c.cutpaste.hole_fill_iters = 8
  c.gauss_intensity = ml_collections.ConfigDict()
  c.gauss_intensity.min_prop = 0.3  # [67, 179)
  c.gauss_intensity.max_prop = 0.8
  c.gauss_intensity.texture_sigmas = (4.0, 7.0)
  c.gauss_intensity.amplitude = (0.4, 0.6)  # γ ~ ±U(0.4, 0.6)
  c.gauss_intensity.mask_sigma = (1.0, 4.0)  # softening σ ~ U(1, 4)
  c.gauss_intensity.truncate = 4.0
  c.deformation = ml_collections.ConfigDict()
  c.deformation.min_prop = 0.2  # [45, 134]
  c.deformation.max_prop = 0.6
  c.deformation.log2_factor = (0.5, 2.0)  # f = 2^U(0.5, 2)
  return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending field."""
  shapes.validate_config(cfg.shapes)
  if cfg.cutpaste.paste_mode not in PASTE_MODES:
    raise ValueError(f"cutpaste.paste_mode must be one of {PASTE_MODES}, got {cfg.cutpaste.paste_mode!r}")
  for name in ("cutpaste", "gauss_intensity", "deformation"):
    t = cfg[name]
    if not 0.0 < t.min_prop <= t.max_prop < 1.0:
      raise ValueError(f"{name}.min_prop/max_prop must satisfy 0 < min_prop <= max_prop < 1, got ({t.min_prop}, {t.max_prop})")
  if len(cfg.gauss_intensity.texture_sigmas) < 1 or min(cfg.gauss_intensity.texture_sigmas) <= 0:
    raise ValueError(f"gauss_intensity.texture_sigmas must be positive values, got {cfg.gauss_intensity.texture_sigmas}")
  lo, hi = cfg.gauss_intensity.mask_sigma
  if not 0 < lo <= hi:
    raise ValueError(f"gauss_intensity.mask_sigma must be (lo, hi) with 0 < lo <= hi, got {cfg.gauss_intensity.mask_sigma}")
  if int(cfg.cutpaste.hole_fill_iters) < 0 or int(cfg.cutpaste.poisson_erode) < 0:
    raise ValueError("cutpaste.hole_fill_iters and cutpaste.poisson_erode must be >= 0")


# ----------------------------------------------------------------------------------------------
# Small image operators


def _gauss_kernel(sigma: jax.Array, radius: int, truncate: float) -> jax.Array:
  """(2·radius+1,) normalised Gaussian taps, zero beyond scipy's own radius round(truncate·σ)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  g = jnp.exp(-0.5 * (d / sigma) ** 2) * (jnp.abs(d) <= jnp.floor(truncate * sigma + 0.5))
  return g / jnp.sum(g)


def _correlate_valid(x: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """Σ_t taps[t] · x[t : t + n_out] along `axis` (n_out = size - len(taps) + 1), on a materialised input.

  The barrier keeps XLA:CPU from fusing an expensive producer into every tap.
  """
  x = jax.lax.optimization_barrier(x)
  n_out = x.shape[axis] - taps.shape[0] + 1
  return sum(taps[t] * jax.lax.slice_in_dim(x, t, t + n_out, axis=axis) for t in range(taps.shape[0]))


def _gauss_radius(max_sigma: float, truncate: float, n: int) -> int:
  radius = int(truncate * max_sigma + 0.5)
  if radius >= n:
    raise ValueError(f"Gaussian radius {radius} (truncate·σ) must be smaller than the image side {n}")
  return radius


def gaussian_filter(x: jax.Array, sigma: jax.Array, max_sigma: float, truncate: float = 4.0) -> jax.Array:
  """2-D Gaussian filter with a traced σ <= max_sigma (scipy.ndimage.gaussian_filter, mode "reflect").

  Separable: the image is reflect-padded by the static radius of max_sigma and each axis
  is a sum of shifted slices weighted by σ's taps (zero past σ's own radius), so shapes
  stay static for any σ at (2r+1) multiply-adds per pixel and axis.
  """
  r = _gauss_radius(max_sigma, truncate, min(x.shape))
  k = _gauss_kernel(sigma, r, truncate)
  y = _correlate_valid(jnp.pad(x, ((r, r), (0, 0)), mode="symmetric"), k, 0)
  return _correlate_valid(jnp.pad(y, ((0, 0), (r, r)), mode="symmetric"), k, 1)


def _gaussian_filter_window(x: jax.Array, start: jax.Array, win: tuple[int, int], sigma: jax.Array,
                            max_sigma: float, truncate: float) -> jax.Array:
  """gaussian_filter(x, ...) on the static-size window at `start` only (exact: reads the reflect-padded image)."""
  r = _gauss_radius(max_sigma, truncate, min(x.shape))
  k = _gauss_kernel(sigma, r, truncate)
  ext = jax.lax.dynamic_slice(jnp.pad(x, r, mode="symmetric"), (start[0], start[1]), (win[0] + 2 * r, win[1] + 2 * r))
  return _correlate_valid(_correlate_valid(ext, k, 0), k, 1)


# Binary masks as bits: a row of W pixels is ceil(W / 32) uint32 words, column 32·i + b in bit b of word i.


def _pack(x: jax.Array) -> jax.Array:
  h, w = x.shape
  nw = -(-w // 32)
  x = jnp.pad(x.astype(jnp.uint32), ((0, 0), (0, nw * 32 - w))).reshape(h, nw, 32)
  return jnp.sum(x << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _unpack(p: jax.Array, w: int) -> jax.Array:
  bits = (p[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return bits.reshape(p.shape[0], -1)[:, :w] > 0


def _dilate_bits(p: jax.Array, valid: jax.Array) -> jax.Array:
  """3×3 binary dilation of a packed mask, nothing outside the image."""
  zero_col = jnp.zeros_like(p[:, :1])
  prev = jnp.concatenate([zero_col, p[:, :-1]], axis=1)  # word i - 1
  nxt = jnp.concatenate([p[:, 1:], zero_col], axis=1)  # word i + 1
  x = p | (p << 1) | (prev >> 31) | (p >> 1) | (nxt << 31)
  zero_row = jnp.zeros_like(x[:1])
  x = x | jnp.concatenate([zero_row, x[:-1]], axis=0) | jnp.concatenate([x[1:], zero_row], axis=0)
  return x & valid


def close_and_fill(changed: jax.Array, region: jax.Array, iters: int) -> jax.Array:
  """3×3 closing of `changed`, then holes filled (float {0, 1}).

  A hole is a non-closed pixel that the outside of `region` cannot reach in `iters`
  3×3 steps through non-closed pixels (bounded stand-in for morphological
  reconstruction; unchanged pixels deep inside an anomaly count as holes). The closing's
  erosion counts the outside of the image as set. Works on bit-packed rows, so each
  step is a few integer ops per 32 pixels.
  """
  h, w = changed.shape
  valid = _pack(jnp.ones((1, w), bool))
  closed = ~_dilate_bits(~_dilate_bits(_pack(changed > 0), valid) & valid, valid) & valid
  free = ~closed & valid
  reach = free & ~_pack(region > 0)
  reach = jax.lax.fori_loop(0, iters, lambda _, q: q | (_dilate_bits(q, valid) & free), reach)
  return _unpack(closed | (~reach & valid), w).astype(jnp.float32)


def _sample(image: jax.Array, sy: jax.Array, sx: jax.Array) -> jax.Array:
  """Bilinear sample at (sy, sx), coordinates clamped to the image (map_coordinates order=1, mode "nearest").

  One gather of a 2×2 block per point: XLA:CPU gathers cost per element and index, and
  fuses the coordinate computation into every index array, so two indices beat
  jax.scipy's four separate (y, x) lookups by about 3×.
  """
  h, w = image.shape
  y0 = jnp.clip(jnp.floor(sy), 0.0, h - 2.0)
  x0 = jnp.clip(jnp.floor(sx), 0.0, w - 2.0)
  wy, wx = jnp.clip(sy - y0, 0.0, 1.0), jnp.clip(sx - x0, 0.0, 1.0)
  idx = jnp.stack([y0, x0], axis=-1).astype(jnp.int32)
  nb = idx.ndim - 1
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(nb, nb + 1), collapsed_slice_dims=(), start_index_map=(0, 1))
  v = jax.lax.gather(image, idx, dnums, slice_sizes=(2, 2), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return (1.0 - wy) * ((1.0 - wx) * v[..., 0, 0] + wx * v[..., 0, 1]) + wy * ((1.0 - wx) * v[..., 1, 0] + wx * v[..., 1, 1])


def _window(corner: jax.Array, win: tuple[int, int], hw: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A static win-sized window holding the box at `corner` (box inside the image, sides <= win): int32
  start and the box-local row/column coordinates of its pixels (win-shaped)."""
  start = jnp.minimum(corner.astype(jnp.int32), jnp.array([hw[0] - win[0], hw[1] - win[1]], jnp.int32))
  ly, lx = shapes.pixel_grid(win)
  return start, ly + (start[0].astype(jnp.float32) - corner[0]), lx + (start[1].astype(jnp.float32) - corner[1])


def _erode_zero_pad(x: jax.Array, radius: int) -> jax.Array:
  """Binary erosion by a (2r+1)² square, pixels outside the array counting as 0 (separable mins)."""
  if radius == 0:
    return x
  h, w = x.shape
  p = jnp.pad(x, radius)
  rows = functools.reduce(jnp.minimum, [p[i:i + h, :] for i in range(2 * radius + 1)])
  return functools.reduce(jnp.minimum, [rows[:, j:j + w] for j in range(2 * radius + 1)])


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """out[i, j] = x[i + dy, j + dx], zero where that falls outside."""
  h, w = x.shape
  p = jnp.pad(x, 1)
  return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _bbox_1d(any_: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last true index of a 1-D bool array (0, n-1 when none is true; callers check)."""
  n = any_.shape[0]
  return jnp.argmax(any_).astype(jnp.int32), (n - 1 - jnp.argmax(any_[::-1])).astype(jnp.int32)


def _dst_basis(n_win: int, start: jax.Array, n: jax.Array) -> jax.Array:
  """(n_win, n_win) DST-I basis of the n interior rows start+1..start+n of a window, zero elsewhere.

  B[r, k] = sin(π (r - start)(k + 1) / (n + 1)) for interior rows r and modes k < n: the
  size-n transform embedded in a static-size matrix, so the solve size stays traced.
  """
  r = jnp.arange(n_win, dtype=jnp.float32)[:, None] - start.astype(jnp.float32)
  k = jnp.arange(1, n_win + 1, dtype=jnp.float32)[None, :]
  nf = n.astype(jnp.float32)
  valid = (r >= 1) & (r <= nf) & (k <= nf)
  return jnp.where(valid, jnp.sin(math.pi * r * k / (nf + 1.0)), 0.0)


def _blend_window(t: jax.Array, s: jax.Array, m: jax.Array, erode_iters: int) -> jax.Array:
  """The Poisson solve of `poisson_blend` on a window holding the whole (border-cleared) mask `m`."""
  wy, wx = t.shape
  m = m.astype(jnp.float32)
  rows, cols = jnp.any(m > 0, axis=1), jnp.any(m > 0, axis=0)
  oy, y1 = _bbox_1d(rows)
  ox, x1 = _bbox_1d(cols)
  has = jnp.any(rows)
  ny = jnp.where(has, y1 - oy - 1, 0)  # interior size (nothing to solve for an empty mask)
  nx = jnp.where(has, x1 - ox - 1, 0)
  ry = jnp.arange(wy)[:, None] - oy
  rx = jnp.arange(wx)[None, :] - ox
  interior = ((ry >= 1) & (ry <= ny) & (rx >= 1) & (rx <= nx)).astype(jnp.float32)
  # The mask is zero outside its box, so eroding the window with zero padding equals eroding the image.
  e = _erode_zero_pad(m, int(erode_iters))
  vx = e * (_shift(s, 0, 1) - s) + (1.0 - e) * (_shift(t, 0, 1) - t)
  vy = e * (_shift(s, 1, 0) - s) + (1.0 - e) * (_shift(t, 1, 0) - t)
  div = (vx - _shift(vx, 0, -1)) + (vy - _shift(vy, -1, 0))
  # Known ring values move to the right-hand side.
  known = t * (1.0 - interior)
  ring = _shift(known, -1, 0) + _shift(known, 1, 0) + _shift(known, 0, -1) + _shift(known, 0, 1)
  rhs = interior * (div - ring)
  by, bx = _dst_basis(wy, oy, ny), _dst_basis(wx, ox, nx)
  hp = jax.lax.Precision.HIGHEST
  coef = jnp.matmul(jnp.matmul(by.T, rhs, precision=hp), bx, precision=hp)
  ky = jnp.arange(1, wy + 1, dtype=jnp.float32)
  kx = jnp.arange(1, wx + 1, dtype=jnp.float32)
  nyf, nxf = ny.astype(jnp.float32), nx.astype(jnp.float32)
  lam_y = 2.0 * jnp.cos(math.pi * ky / (nyf + 1.0)) - 2.0
  lam_x = 2.0 * jnp.cos(math.pi * kx / (nxf + 1.0)) - 2.0
  modes = (ky[:, None] <= nyf) & (kx[None, :] <= nxf)
  coef = jnp.where(modes, coef / jnp.where(modes, lam_y[:, None] + lam_x[None, :], -1.0), 0.0)
  u = jnp.matmul(jnp.matmul(by, coef, precision=hp), bx.T, precision=hp)
  u = u * (4.0 / jnp.maximum((nyf + 1.0) * (nxf + 1.0), 1.0))
  return jnp.where(interior > 0, u, t)


def _clear_image_border(m: jax.Array, start: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Zeroes the pixels of window `m` (at `start`) that lie on the image's outermost rows/columns."""
  ry = jnp.arange(m.shape[0])[:, None] + start[0]
  rx = jnp.arange(m.shape[1])[None, :] + start[1]
  return m & (ry > 0) & (ry < hw[0] - 1) & (rx > 0) & (rx < hw[1] - 1)


def poisson_blend(target: jax.Array, source: jax.Array, mask: jax.Array, erode_iters: int = 3,
                  window: tuple[int, int] | None = None) -> jax.Array:
  """Poisson image editing of `source` into `target` inside `mask` (all (H, W), aligned), as OpenCV.

  Follows cv2.seamlessClone(NORMAL_CLONE) with the centre that maps the mask onto
  itself: the mask's image border is cleared, the solve domain is the mask's bounding
  box, whose outer ring keeps the target values (Dirichlet); the guidance field is the
  forward-difference gradient of the source inside the mask eroded by a
  (2·erode_iters+1)² square and of the target elsewhere; Δf = div (backward differences)
  is solved by a direct DST-I of the box interior (four dense matmuls). Only the box
  interior changes; callers composite inside the mask.

  `window` (static) bounds the bounding box size: the work is done in a window of that
  size around the box (taken from the whole image when None); a box larger than the
  window gives wrong results, so pass it only when the caller knows the bound.
  """
  h, w = target.shape
  wy, wx = (h, w) if window is None else (min(int(window[0]), h), min(int(window[1]), w))
  m = _clear_image_border(mask > 0, jnp.zeros(2, jnp.int32), (h, w))
  y0, _ = _bbox_1d(jnp.any(m, axis=1))
  x0, _ = _bbox_1d(jnp.any(m, axis=0))
  start = (jnp.minimum(y0, h - wy), jnp.minimum(x0, w - wx))
  cut = lambda a: jax.lax.dynamic_slice(a, start, (wy, wx))
  return jax.lax.dynamic_update_slice(target, _blend_window(cut(target), cut(source), cut(m), erode_iters), start)


def _repeat(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict, once):
  """Applies `once` 1..max_anomalies times (each next with extra_anomaly_prob); returns image, union mask.

  Extra anomalies run under `lax.cond`: a real branch (skipped when off) when samples are
  mapped one by one, a select of both results under vmap.
  """
  flags = shapes.num_anomalies_flags(jax.random.fold_in(key, 1_000_003), cfg.shapes)
  x, union = once(jax.random.fold_in(key, 0), image)
  for a in range(1, int(cfg.shapes.max_anomalies)):
    def apply(c, a=a):
      xa, ma = once(jax.random.fold_in(key, a), c[0])
      return xa, jnp.maximum(c[1], ma)
    x, union = jax.lax.cond(flags[a], apply, lambda c: c, (x, union))
  return x, union


# ----------------------------------------------------------------------------------------------
# Tasks


def cutpaste(key: jax.Array, image: jax.Array, source: jax.Array,
             cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Pastes a rotated, scaled region of `source` ((H, W), or (K, H, W): one drawn per anomaly)."""
  cc, sc = cfg.cutpaste, cfg.shapes
  hw = image.shape
  if source.ndim == 2:
    source = source[None]
  fg = shapes.foreground_mask(image, sc) if sc.foreground_only else None
  # Each anomaly is computed on a static window of the box's size bound around its box.
  win = tuple(min(b, s) for b, s in zip(shapes.size_bounds(cc.min_prop, cc.max_prop, hw)[1], hw))

  def once(k, x):
    k_shape, k_place, k_src, k_rot, k_scale, k_flip, k_corner = jax.random.split(k, 7)
    shape = shapes.sample_perlin_shape(k_shape, hw, cc.min_prop, cc.max_prop, sc)
    fn = lambda y, x_: shapes.perlin_mask(shape, y, x_)
    corner = shapes.place(k_place, fn, shape.size, x, sc)
    start, ly, lx = _window(corner, win, hw)
    cut = lambda a: jax.lax.dynamic_slice(a, (start[0], start[1]), win)
    m = fn(ly, lx)
    if fg is not None:
      m = m & cut(fg)
    src = source[jax.random.randint(k_src, (), 0, source.shape[0])]
    vals = warp_region(k_rot, k_scale, k_flip, k_corner, shape.size, ly, lx, src, cc)
    xw = cut(x)
    if cc.paste_mode == "poisson":
      vals = jnp.clip(_blend_window(xw, vals, _clear_image_border(m, start, hw), int(cc.poisson_erode)), 0.0, 1.0)
    put = lambda full, w: jax.lax.dynamic_update_slice(full, w, (start[0], start[1]))
    return put(x, jnp.where(m, vals, xw)), put(jnp.zeros(hw, jnp.float32), m.astype(jnp.float32))

  out, union = _repeat(key, image, cfg, once)
  changed = (jnp.abs(out - image) > float(cc.change_threshold)) & (union > 0)
  # Changes below the threshold (invisible at uint8) are undone, so pixels outside the label are exact.
  out = jnp.where(changed, out, image)
  label = close_and_fill(changed, union, int(cc.hole_fill_iters))
  if fg is not None:
    label = label * fg
  return out, label


def warp_region(k_rot: jax.Array, k_scale: jax.Array, k_flip: jax.Array, k_corner: jax.Array, size: jax.Array,
                ly: jax.Array, lx: jax.Array, src: jax.Array, cc: ml_collections.ConfigDict) -> jax.Array:
  """Source values at target box-local coordinates (ly, lx): a rotated, scaled region of `src`.

  Angle ~ U(±max_rotation), scale 1 + Exp(scale_exp) or its inverse, limited so the
  rotated region fits in max_source_fraction of the source; the region's corner is
  uniform over positions inside the source, as the reference.
  """
  hw = jnp.array(src.shape, jnp.float32)
  theta = jax.random.uniform(k_rot, (), minval=-float(cc.max_rotation), maxval=float(cc.max_rotation))
  rot = jnp.stack([jnp.stack([jnp.cos(theta), -jnp.sin(theta)]), jnp.stack([jnp.sin(theta), jnp.cos(theta)])])
  corners = jnp.stack([jnp.stack([a, b]) for a in (jnp.float32(0.0), size[0] - 1.0)
                       for b in (jnp.float32(0.0), size[1] - 1.0)])

  def extent(m):
    p = corners @ m.T
    lo = jnp.floor(jnp.min(p, axis=0))
    return lo, jnp.ceil(jnp.max(p, axis=0)) - lo + 1.0

  c = 1.0 + jax.random.exponential(k_scale, ()) * float(cc.scale_exp)
  s = jnp.where(jax.random.bernoulli(k_flip), c, 1.0 / c)
  _, ext_r = extent(rot)
  s = jnp.minimum(s, jnp.min(float(cc.max_source_fraction) * hw / ext_r))
  m = s * rot
  lo, ext = extent(m)
  src_corner = jnp.floor(jax.random.uniform(k_corner, (2,)) * jnp.maximum(hw - ext + 1.0, 1.0))
  sy = src_corner[0] - lo[0] + m[0, 0] * ly + m[0, 1] * lx
  sx = src_corner[1] - lo[1] + m[1, 0] * ly + m[1, 1] * lx
  return _sample(src, sy, sx)


def gauss_intensity(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Adds a smooth random texture of amplitude ±U(0.4, 0.6), faded by a softened Perlin mask."""
  gc, sc = cfg.gauss_intensity, cfg.shapes
  hw = image.shape
  fg = shapes.foreground_mask(image, sc) if sc.foreground_only else None
  tex_sigmas = jnp.asarray(gc.texture_sigmas, jnp.float32)
  tr = float(gc.truncate)

  win = tuple(min(b, s) for b, s in zip(shapes.size_bounds(gc.min_prop, gc.max_prop, hw)[1], hw))
  words = -(-hw[1] // 32)

  def once(k, x):
    k_shape, k_place, k_noise, k_tsig, k_amp, k_sign, k_msig = jax.random.split(k, 7)
    shape = shapes.sample_perlin_shape(k_shape, hw, gc.min_prop, gc.max_prop, sc)
    fn = lambda y, x_: shapes.perlin_mask(shape, y, x_)
    corner = shapes.place(k_place, fn, shape.size, x, sc)
    start, ly, lx = _window(corner, win, hw)
    cut = lambda a: jax.lax.dynamic_slice(a, (start[0], start[1]), win)
    m = fn(ly, lx)
    if fg is not None:
      m = m & cut(fg)
    mf = m.astype(jnp.float32)
    # [N(0, 1) >= 0] is a fair coin per pixel: one random bit each.
    noise = _unpack(jax.random.bits(k_noise, (hw[0], words), jnp.uint32), hw[1]).astype(jnp.float32)
    tsig = tex_sigmas[jax.random.randint(k_tsig, (), 0, tex_sigmas.shape[0])]
    tex = gaussian_filter(noise, tsig, float(max(gc.texture_sigmas)), tr)
    lo, hi = jnp.min(tex), jnp.max(tex)  # normalised over the whole image, as the reference
    tex = (cut(tex) - lo) / jnp.maximum(hi - lo, 1e-12)
    amp = jax.random.uniform(k_amp, (), minval=gc.amplitude[0], maxval=gc.amplitude[1])
    amp = jnp.where(jax.random.bernoulli(k_sign), amp, -amp)
    tex = jnp.clip(tex * amp, -1.0, 1.0)
    msig = jax.random.uniform(k_msig, (), minval=gc.mask_sigma[0], maxval=gc.mask_sigma[1])
    full_m = jax.lax.dynamic_update_slice(jnp.zeros(hw, jnp.float32), mf, (start[0], start[1]))
    soft = _gaussian_filter_window(full_m, start, win, msig, float(gc.mask_sigma[1]), tr)
    xw = cut(x)
    out = jnp.clip(jnp.where(m, xw + tex * soft, xw), 0.0, 1.0)
    return jax.lax.dynamic_update_slice(x, out, (start[0], start[1])), full_m

  return _repeat(key, image, cfg, once)


def deformation(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Radial bulge inside a sheared, rotated rectangle or ellipse (the reference's Source task).

  Each pixel of the shape at radius r from a random inner point c, along direction u,
  samples the image at c + R·(r/R)^f·u, R the distance from c to the shape's edge along u.
  Anomalies are applied one after another (as the reference), each on a window of the
  box bound around its box; foreground placement uses the input image's foreground.
  """
  dc, sc = cfg.deformation, cfg.shapes
  hw = image.shape
  fg = shapes.foreground_mask(image, sc) if sc.foreground_only else None
  win = tuple(min(b, s) for b, s in zip(shapes.size_bounds(dc.min_prop, dc.max_prop, hw)[1], hw))

  def once(k, x):
    k_shape, k_place, k_f, k_c = jax.random.split(k, 4)
    shape = shapes.sample_hypershape(k_shape, hw, dc.min_prop, dc.max_prop, sc)
    fn = functools.partial(shapes.hypershape_mask, shape)
    corner = shapes.place(k_place, fn, shape.box, image, sc)
    f = 2.0 ** jax.random.uniform(k_f, (), minval=dc.log2_factor[0], maxval=dc.log2_factor[1])
    c = shapes.random_point_in(k_c, fn, shape.box, int(sc.placement_candidates))
    start, ly, lx = _window(corner, win, hw)
    cut = lambda a: jax.lax.dynamic_slice(a, (start[0], start[1]), win)
    m = fn(ly, lx)
    if fg is not None:
      m = m & cut(fg)
    dy, dx = ly - c[0], lx - c[1]
    r = jnp.sqrt(dy * dy + dx * dx)
    rs = jnp.where(r > 0, r, 1.0)
    uy, ux = dy / rs, dx / rs
    big_r = shapes.hypershape_edge_distance(shape, c[0], c[1], uy, ux)
    new_r = big_r * jnp.clip(r / jnp.maximum(big_r, 1e-6), 0.0, 1.0) ** f
    border = (ly <= 0) | (ly >= shape.box[0] - 1.0) | (lx <= 0) | (lx >= shape.box[1] - 1.0)
    move = m & ~border & (r > 0)
    qy = corner[0] + jnp.where(move, c[0] + new_r * uy, ly)
    qx = corner[1] + jnp.where(move, c[1] + new_r * ux, lx)
    put = lambda full, w: jax.lax.dynamic_update_slice(full, w, (start[0], start[1]))
    return put(x, jnp.where(m, _sample(x, qy, qx), cut(x))), put(jnp.zeros(hw, jnp.float32), m.astype(jnp.float32))

  return _repeat(key, image, cfg, once)


def identity(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The normal image and an empty mask (the model must also learn "nothing here")."""
  del key, cfg
  return image, jnp.zeros_like(image)
