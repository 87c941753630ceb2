"""Pixel-space anomaly synthesis tasks, as pure jit/vmap-able JAX functions (DESIGN §6, MEDICLIP.md §2).

Each task maps (key, image[, source], cfg) to (image, mask): images are float32
(H, W) in [0, 1], masks float32 (H, W) in {0, 1}. Shapes come from the inputs and
stay static; every random size, angle and position is a traced value. Each task
places 1 anomaly, then another of the same task on top with probability ½ (up to
`shapes.max_anomalies`); the extra anomalies are always computed and selected, so
the cost is static.

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
is bilinear (`jax.scipy.ndimage.map_coordinates` supports order ≤ 1; the reference
uses cubic splines); outputs are not quantised to uint8; the softened mask of the
intensity task is filtered on the whole image rather than the patch box; hole filling
of the cut-paste label propagates the outside region for `hole_fill_iters` steps
instead of a full morphological reconstruction.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy import ndimage as jndi

from mediclip_jax.synthesis import shapes

PASTE_MODES = ("hard", "poisson")


def default_config() -> ml_collections.ConfigDict:
  """Every pixel-task knob; defaults are the reference's (MEDICLIP.md §2.4–2.6)."""
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


def _gauss_matrix(n: int, sigma: jax.Array, max_sigma: float, truncate: float) -> jax.Array:
  """(n, n) matrix of a 1-D Gaussian filter with scipy's "reflect" boundary folded in."""
  radius = int(truncate * max_sigma + 0.5)
  if radius >= n:
    raise ValueError(f"Gaussian radius {radius} (truncate·σ) must be smaller than the image side {n}")
  sigma = jnp.asarray(sigma, jnp.float32)
  r_eff = jnp.floor(truncate * sigma + 0.5)
  g = lambda d: jnp.exp(-0.5 * (d / sigma) ** 2) * (jnp.abs(d) <= r_eff)
  offs = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  norm = jnp.sum(g(offs))
  i = jnp.arange(n, dtype=jnp.float32)[:, None]
  j = jnp.arange(n, dtype=jnp.float32)[None, :]
  # Output i reads padded index i + t; reflection maps -1-j and 2n-1-j back onto j.
  return (g(j - i) + g(-1.0 - j - i) + g(2.0 * n - 1.0 - j - i)) / norm


def gaussian_filter(x: jax.Array, sigma: jax.Array, max_sigma: float, truncate: float = 4.0) -> jax.Array:
  """2-D Gaussian filter with a traced σ <= max_sigma (scipy.ndimage.gaussian_filter, mode "reflect").

  Written as A_h · x · A_wᵀ with dense banded matrices: static shapes for any σ, one
  matmul per axis (fast on accelerators), and a dot never recomputes its operand the
  way a fused chain of shifted slices can on XLA:CPU.
  """
  h, w = x.shape
  hp = jax.lax.Precision.HIGHEST
  y = jnp.matmul(_gauss_matrix(h, sigma, max_sigma, truncate), x, precision=hp)
  return jnp.matmul(y, _gauss_matrix(w, sigma, max_sigma, truncate).T, precision=hp)


def _dilate3(x: jax.Array) -> jax.Array:
  """Binary 3×3 dilation of a {0, 1} float image (outside the image never wins), as separable shifts.

  Callers apply it to loop-carried (materialised) arrays only: chained shifted slices
  of an expensive producer would make XLA:CPU recompute the producer per tap.
  """
  for axis in (0, 1):
    n = x.shape[axis]
    lo = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
    hi = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)
    x = jnp.maximum(jnp.maximum(lo, x), hi)
  return x


def close_and_fill(changed: jax.Array, region: jax.Array, iters: int) -> jax.Array:
  """3×3 closing of `changed`, then holes filled (float {0, 1}).

  A hole is a non-closed pixel that the outside of `region` cannot reach in `iters`
  3×3 steps through non-closed pixels (bounded stand-in for morphological
  reconstruction; unchanged pixels deep inside an anomaly count as holes). Loop
  iterations 0 and 1 do the closing as two complemented dilations, 1 - D(1 - D(x)),
  so every dilation reads a materialised loop carry.
  """
  region = region.astype(jnp.float32)

  def body(i, c):
    x, reach = c
    x = jnp.where(i < 2, 1.0 - _dilate3(x), x)
    free = 1.0 - x
    reach = jnp.where(i < 2, free * (1.0 - region), jnp.maximum(reach, _dilate3(reach) * free))
    return x, reach

  closed, reach = jax.lax.fori_loop(0, 2 + iters, body, (changed.astype(jnp.float32), jnp.zeros_like(region)))
  return jnp.maximum(closed, (1.0 - closed) * (1.0 - reach))


def _sample(image: jax.Array, sy: jax.Array, sx: jax.Array) -> jax.Array:
  return jndi.map_coordinates(image, [sy, sx], order=1, mode="nearest")


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
  m = mask.astype(jnp.float32)
  m = m.at[0, :].set(0).at[-1, :].set(0).at[:, 0].set(0).at[:, -1].set(0)
  rows, cols = jnp.any(m > 0, axis=1), jnp.any(m > 0, axis=0)
  y0, y1 = _bbox_1d(rows)
  x0, x1 = _bbox_1d(cols)
  has = jnp.any(rows)
  sy, sx = jnp.minimum(y0, h - wy), jnp.minimum(x0, w - wx)
  t = jax.lax.dynamic_slice(target, (sy, sx), (wy, wx))
  s = jax.lax.dynamic_slice(source, (sy, sx), (wy, wx))
  m = jax.lax.dynamic_slice(m, (sy, sx), (wy, wx))
  oy, ox = y0 - sy, x0 - sx  # box corner in the window
  ny = jnp.where(has, y1 - y0 - 1, 0)  # interior size (nothing to solve for an empty mask)
  nx = jnp.where(has, x1 - x0 - 1, 0)
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
  out = jnp.where(interior > 0, u, t)
  return jax.lax.dynamic_update_slice(target, out, (sy, sx))


def _repeat(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict, once):
  """Applies `once` 1..max_anomalies times (each next with extra_anomaly_prob); returns image, union mask."""
  flags = shapes.num_anomalies_flags(jax.random.fold_in(key, 1_000_003), cfg.shapes)
  x = image
  union = jnp.zeros_like(image)
  for a in range(int(cfg.shapes.max_anomalies)):
    xa, ma = once(jax.random.fold_in(key, a), x)
    x = jnp.where(flags[a], xa, x)
    union = jnp.where(flags[a], jnp.maximum(union, ma), union)
  return x, union


def _local(corner: jax.Array, hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  yy, xx = shapes.pixel_grid(hw)
  return yy - corner[0], xx - corner[1]


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
  box_bound = shapes.size_bounds(cc.min_prop, cc.max_prop, hw)[1]  # the mask lies in a box smaller than this

  def once(k, x):
    k_shape, k_place, k_src, k_rot, k_scale, k_flip, k_corner = jax.random.split(k, 7)
    shape = shapes.sample_perlin_shape(k_shape, hw, cc.min_prop, cc.max_prop, sc)
    fn = lambda y, x_: shapes.perlin_mask(shape, y, x_)
    corner = shapes.place(k_place, fn, shape.size, x, sc)
    ly, lx = _local(corner, hw)
    m = fn(ly, lx)
    if fg is not None:
      m = m & fg
    src = source[jax.random.randint(k_src, (), 0, source.shape[0])]
    vals = warp_region(k_rot, k_scale, k_flip, k_corner, shape.size, ly, lx, src, cc)
    if cc.paste_mode == "poisson":
      vals = jnp.clip(poisson_blend(x, vals, m, int(cc.poisson_erode), window=box_bound), 0.0, 1.0)
    return jnp.where(m, vals, x), m.astype(jnp.float32)

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
  uniform over positions inside the source (MEDICLIP.md §2.4 steps 2–5).
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

  def once(k, x):
    k_shape, k_place, k_noise, k_tsig, k_amp, k_sign, k_msig = jax.random.split(k, 7)
    shape = shapes.sample_perlin_shape(k_shape, hw, gc.min_prop, gc.max_prop, sc)
    fn = lambda y, x_: shapes.perlin_mask(shape, y, x_)
    corner = shapes.place(k_place, fn, shape.size, x, sc)
    m = fn(*_local(corner, hw))
    if fg is not None:
      m = m & fg
    mf = m.astype(jnp.float32)
    noise = jax.random.bernoulli(k_noise, 0.5, hw).astype(jnp.float32)  # [N(0, 1) >= 0]
    tsig = tex_sigmas[jax.random.randint(k_tsig, (), 0, tex_sigmas.shape[0])]
    tex = gaussian_filter(noise, tsig, float(max(gc.texture_sigmas)), tr)
    tex = (tex - jnp.min(tex)) / jnp.maximum(jnp.max(tex) - jnp.min(tex), 1e-12)
    amp = jax.random.uniform(k_amp, (), minval=gc.amplitude[0], maxval=gc.amplitude[1])
    amp = jnp.where(jax.random.bernoulli(k_sign), amp, -amp)
    tex = jnp.clip(tex * amp, -1.0, 1.0)
    msig = jax.random.uniform(k_msig, (), minval=gc.mask_sigma[0], maxval=gc.mask_sigma[1])
    soft = gaussian_filter(mf, msig, float(gc.mask_sigma[1]), tr)
    out = jnp.clip(jnp.where(m, x + tex * soft, x), 0.0, 1.0)
    return out, mf

  return _repeat(key, image, cfg, once)


def deformation(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Radial bulge inside a sheared, rotated rectangle or ellipse (the reference's Source task).

  Each anomaly's warp is analytic, so the anomalies are composed as coordinate maps
  (x_n(p) = x_0(w_1(...w_n(p)))) and the image is resampled once; this also keeps XLA
  from fusing one resampling into the next one's gather. Foreground placement of every
  anomaly uses the input image's foreground.
  """
  dc, sc = cfg.deformation, cfg.shapes
  hw = image.shape
  yy, xx = shapes.pixel_grid(hw)
  fg = shapes.foreground_mask(image, sc) if sc.foreground_only else None
  flags = shapes.num_anomalies_flags(jax.random.fold_in(key, 1_000_003), sc)
  warps = []
  union = jnp.zeros(hw, bool)
  for a in range(int(sc.max_anomalies)):
    k_shape, k_place, k_f, k_c = jax.random.split(jax.random.fold_in(key, a), 4)
    shape = shapes.sample_hypershape(k_shape, hw, dc.min_prop, dc.max_prop, sc)
    fn = functools.partial(shapes.hypershape_mask, shape)
    corner = shapes.place(k_place, fn, shape.box, image, sc)
    f = 2.0 ** jax.random.uniform(k_f, (), minval=dc.log2_factor[0], maxval=dc.log2_factor[1])
    c = shapes.random_point_in(k_c, fn, shape.box, int(sc.placement_candidates))
    m = fn(yy - corner[0], xx - corner[1])
    if fg is not None:
      m = m & fg
    union = union | (m & flags[a])
    warps.append((shape, corner, f, c, flags[a]))

  def warp(params, qy, qx):
    shape, corner, f, c, on = params
    ly, lx = qy - corner[0], qx - corner[1]
    inside = shapes.hypershape_mask(shape, ly, lx)
    if fg is not None:
      inside = inside & (_sample(fg.astype(jnp.float32), qy, qx) > 0.5)
    dy, dx = ly - c[0], lx - c[1]
    r = jnp.sqrt(dy * dy + dx * dx)
    rs = jnp.where(r > 0, r, 1.0)
    uy, ux = dy / rs, dx / rs
    big_r = shapes.hypershape_edge_distance(shape, c[0], c[1], uy, ux)
    new_r = big_r * jnp.clip(r / jnp.maximum(big_r, 1e-6), 0.0, 1.0) ** f
    border = (ly <= 0) | (ly >= shape.box[0] - 1.0) | (lx <= 0) | (lx >= shape.box[1] - 1.0)
    move = on & inside & ~border & (r > 0)
    return jnp.where(move, corner[0] + c[0] + new_r * uy, qy), jnp.where(move, corner[1] + c[1] + new_r * ux, qx)

  qy, qx = yy, xx
  for params in reversed(warps):
    qy, qx = warp(params, qy, qx)
  out = jnp.where(union, _sample(image, qy, qx), image)
  return out, union.astype(jnp.float32)


def identity(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The normal image and an empty mask (the model must also learn "nothing here")."""
  del key, cfg
  return image, jnp.zeros_like(image)
