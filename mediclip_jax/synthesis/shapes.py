"""Random lesion-shaped regions for pixel-space anomaly synthesis.

Two shape families, as in the reference `medsyn/task_shape.py`:

* Perlin masks: single-cell 2-D Perlin noise in a box of random size, rotated by
  U(-90°, 90°) about the box centre and thresholded at 0.3. The reference repeats
  this until the mask covers >= 20 % of its box; under `jax.jit` the trip count must
  be static, so `num_candidates` candidates are drawn at once and the first one that
  qualifies is kept (which has exactly the rejection sampler's distribution); if none
  does, the candidate with the largest coverage is used.
* Sheared and rotated rectangles or ellipses ("deformed hypershapes") with
  Gamma-distributed sizes, plus the distance from a point to the shape's edge along a
  direction, which the radial deformation needs.

Every shape is described by a few scalars and evaluated analytically at arbitrary
pixel coordinates, so masks have static shapes (the full image) while sizes, angles
and positions stay traced values. Placement draws the box corner uniformly so the box
lies inside the image (the reference), or, with `foreground_only`, so that a random
pixel of the shape lands on a random foreground pixel; the mask is then clipped to
the foreground.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Shape and placement knobs; defaults are the reference MediCLIP's."""
  c = ml_collections.ConfigDict()
  c.max_anomalies = 2  # 1 anomaly, then another with probability extra_anomaly_prob, up to this many
  c.extra_anomaly_prob = 0.5
  c.foreground_only = False  # the reference places anomalies anywhere, background included
  c.foreground_threshold = 0.05  # pixels with intensity > this (images in [0, 1]) are foreground
  c.placement_candidates = 32  # static trials for "a random pixel inside the shape"
  c.perlin = ml_collections.ConfigDict()
  c.perlin.threshold = 0.3
  c.perlin.min_coverage = 0.2
  c.perlin.num_candidates = 8  # static replacement of the reference's "repeat until >= 20 %" loop
  c.perlin.coverage_stride = 2  # coverage of a candidate is measured on every n-th pixel of its box
  c.perlin.max_rotation_deg = 90.0
  c.hypershape = ml_collections.ConfigDict()
  c.hypershape.offset = 0.03  # size proportion = clip(offset + Gamma(shape, scale), min, max)
  c.hypershape.gamma_shape = 2.0
  c.hypershape.gamma_scale = 0.1
  c.hypershape.shear_std = 0.2
  c.hypershape.ellipse_prob = 0.5
  return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when a shape knob is out of range."""
  if int(cfg.max_anomalies) < 1:
    raise ValueError(f"shapes.max_anomalies must be >= 1, got {cfg.max_anomalies}")
  if not 0.0 <= float(cfg.extra_anomaly_prob) <= 1.0:
    raise ValueError(f"shapes.extra_anomaly_prob must be in [0, 1], got {cfg.extra_anomaly_prob}")
  if int(cfg.perlin.num_candidates) < 1:
    raise ValueError(f"shapes.perlin.num_candidates must be >= 1, got {cfg.perlin.num_candidates}")
  if int(cfg.perlin.coverage_stride) < 1:
    raise ValueError(f"shapes.perlin.coverage_stride must be >= 1, got {cfg.perlin.coverage_stride}")
  if int(cfg.placement_candidates) < 1:
    raise ValueError(f"shapes.placement_candidates must be >= 1, got {cfg.placement_candidates}")
  if not 0.0 <= float(cfg.hypershape.ellipse_prob) <= 1.0:
    raise ValueError(f"shapes.hypershape.ellipse_prob must be in [0, 1], got {cfg.hypershape.ellipse_prob}")


def size_bounds(min_prop: float, max_prop: float, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Per-axis (lower, upper) patch sizes in pixels: round(prop · side), as the reference."""
  if not 0.0 < min_prop <= max_prop < 1.0:
    raise ValueError(f"size proportions must satisfy 0 < min_prop <= max_prop < 1, got ({min_prop}, {max_prop})")
  lo = tuple(max(1, int(round(min_prop * s))) for s in hw)
  hi = tuple(max(l + 1, int(round(max_prop * s))) for l, s in zip(lo, hw))
  return lo, hi


def pixel_grid(hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Row and column index arrays (float32) of an image of shape hw."""
  yy, xx = jnp.meshgrid(jnp.arange(hw[0], dtype=jnp.float32), jnp.arange(hw[1], dtype=jnp.float32), indexing="ij")
  return yy, xx


# ----------------------------------------------------------------------------------------------
# Perlin masks


class PerlinShape(NamedTuple):
  """A thresholded, rotated single-cell Perlin mask in a box of `size` pixels."""
  size: jax.Array  # (2,) float32 box height, width
  grad_angles: jax.Array  # (4,) corner gradient angles: (0,0), (1,0), (0,1), (1,1)
  rotation: jax.Array  # () radians, about the box centre
  threshold: jax.Array  # ()


def _fade(t: jax.Array) -> jax.Array:
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_noise(t0: jax.Array, t1: jax.Array, angles: jax.Array) -> jax.Array:
  """Single-cell 2-D Perlin noise at cell coordinates (t0, t1) in [0, 1)²."""
  c, s = jnp.cos(angles), jnp.sin(angles)
  n00 = t0 * c[0] + t1 * s[0]
  n10 = (t0 - 1.0) * c[1] + t1 * s[1]
  n01 = t0 * c[2] + (t1 - 1.0) * s[2]
  n11 = (t0 - 1.0) * c[3] + (t1 - 1.0) * s[3]
  f0, f1 = _fade(t0), _fade(t1)
  n0 = n00 * (1.0 - f0) + f0 * n10
  n1 = n01 * (1.0 - f0) + f0 * n11
  return math.sqrt(2.0) * ((1.0 - f1) * n0 + f1 * n1)


def perlin_mask(shape: PerlinShape, ly: jax.Array, lx: jax.Array) -> jax.Array:
  """Boolean mask at box-local pixel coordinates (ly, lx); false outside the box.

  The noise is sampled on the box's pixel lattice at t = index / size, rotated about
  the box centre with zero fill (imgaug Affine), then thresholded.
  """
  h, w = shape.size[0], shape.size[1]
  cy, cx = (h - 1.0) / 2.0, (w - 1.0) / 2.0
  ca, sa = jnp.cos(shape.rotation), jnp.sin(shape.rotation)
  dy, dx = ly - cy, lx - cx
  sy = ca * dy - sa * dx + cy
  sx = sa * dy + ca * dx + cx
  valid = (sy >= 0) & (sy <= h - 1.0) & (sx >= 0) & (sx <= w - 1.0)
  inbox = (ly >= 0) & (ly <= h - 1.0) & (lx >= 0) & (lx <= w - 1.0)
  noise = _perlin_noise(jnp.clip(sy / h, 0.0, 1.0), jnp.clip(sx / w, 0.0, 1.0), shape.grad_angles)
  return valid & inbox & (noise > shape.threshold)


def sample_perlin_shape(key: jax.Array, hw: tuple[int, int], min_prop: float, max_prop: float,
                        cfg: ml_collections.ConfigDict) -> PerlinShape:
  """Draws a Perlin shape whose mask covers >= min_coverage of its box (see module doc).

  Sizes are uniform integers in [round(min_prop·side), round(max_prop·side)) per axis
  (the reference's exclusive `np.random.randint`).
  """
  (lo_h, lo_w), (hi_h, hi_w) = size_bounds(min_prop, max_prop, hw)
  n = int(cfg.perlin.num_candidates)
  k_size, k_grad, k_rot = jax.random.split(key, 3)
  ks0, ks1 = jax.random.split(k_size)
  size = jnp.stack([jax.random.randint(ks0, (), lo_h, hi_h), jax.random.randint(ks1, (), lo_w, hi_w)]).astype(jnp.float32)
  angles = jax.random.uniform(k_grad, (n, 4), minval=0.0, maxval=2.0 * math.pi)
  max_rot = math.radians(float(cfg.perlin.max_rotation_deg))
  rots = jax.random.uniform(k_rot, (n,), minval=-max_rot, maxval=max_rot)
  thr = jnp.float32(cfg.perlin.threshold)
  stride = int(cfg.perlin.coverage_stride)
  gy, gx = jnp.meshgrid(jnp.arange(0, hi_h, stride, dtype=jnp.float32),
                        jnp.arange(0, hi_w, stride, dtype=jnp.float32), indexing="ij")
  inbox = (gy <= size[0] - 1.0) & (gx <= size[1] - 1.0)

  def coverage(a, r):
    m = perlin_mask(PerlinShape(size, a, r, thr), gy, gx)
    return jnp.sum(m) / jnp.maximum(jnp.sum(inbox), 1)

  cov = jax.vmap(coverage)(angles, rots)
  ok = cov >= float(cfg.perlin.min_coverage)
  pick = jnp.where(jnp.any(ok), jnp.argmax(ok), jnp.argmax(cov))
  return PerlinShape(size, angles[pick], rots[pick], thr)


# ----------------------------------------------------------------------------------------------
# Sheared and rotated rectangles / ellipses


class HyperShape(NamedTuple):
  """A rectangle or ellipse of `dims` (aligned frame), mapped by `matrix` into a box of `box` pixels.

  Box-local pixel p corresponds to the shape-frame point v = p - origin; the aligned
  point is inv_matrix · v.
  """
  dims: jax.Array  # (2,) aligned side lengths / diameters
  matrix: jax.Array  # (2, 2) rotation · shear, scaled to fit the box bound
  inv_matrix: jax.Array  # (2, 2)
  origin: jax.Array  # (2,) box-local position of the shape centre
  box: jax.Array  # (2,) float32 box height, width
  is_ellipse: jax.Array  # () bool


def _transformed_bounds(m: jax.Array, dims: jax.Array) -> tuple[jax.Array, jax.Array]:
  half = (dims - 1.0) / 2.0
  corners = jnp.stack([jnp.array([sy, sx], jnp.float32) for sy in (-1.0, 1.0) for sx in (-1.0, 1.0)]) * half
  pts = corners @ m.T
  return jnp.floor(jnp.min(pts, axis=0)), jnp.ceil(jnp.max(pts, axis=0))


def sample_hypershape(key: jax.Array, hw: tuple[int, int], min_prop: float, max_prop: float,
                      cfg: ml_collections.ConfigDict) -> HyperShape:
  """Draws a sheared, rotated rectangle or ellipse (the reference's EitherDeformedHypershapePatchMaker).

  Each side is int(clip((offset + Gamma(2, 0.1)) · side, lo, hi)) with inclusive bounds;
  shear ~ N(0, 0.2) per off-diagonal entry, rotation ~ U(-π/2, π/2); the matrix is
  scaled down when the bounding box would exceed the upper size bound.
  """
  hc = cfg.hypershape
  (lo_h, lo_w), (hi_h, hi_w) = size_bounds(min_prop, max_prop, hw)
  k_dim, k_shear, k_rot, k_kind = jax.random.split(key, 4)
  g = jax.random.gamma(k_dim, float(hc.gamma_shape), (2,)) * float(hc.gamma_scale)
  side = jnp.array(hw, jnp.float32)
  dims = jnp.floor(jnp.clip((float(hc.offset) + g) * side, jnp.array([lo_h, lo_w], jnp.float32),
                            jnp.array([hi_h, hi_w], jnp.float32)))
  shear = jax.random.normal(k_shear, (2,)) * float(hc.shear_std)
  theta = jax.random.uniform(k_rot, (), minval=-math.pi / 2, maxval=math.pi / 2)
  shear_m = jnp.array([[1.0, 0.0], [0.0, 1.0]]) + jnp.array([[0.0, 1.0], [0.0, 0.0]]) * shear[0] \
      + jnp.array([[0.0, 0.0], [1.0, 0.0]]) * shear[1]
  rot_m = jnp.stack([jnp.stack([jnp.cos(theta), -jnp.sin(theta)]), jnp.stack([jnp.sin(theta), jnp.cos(theta)])])
  m = rot_m @ shear_m
  ub = jnp.array([hi_h, hi_w], jnp.float32)
  lo, hi = _transformed_bounds(m, dims)
  ratio = jnp.max((hi + 1.0 - lo) / ub)
  m = jnp.where(ratio > 1.0, m / ratio, m)
  lo, hi = _transformed_bounds(m, dims)
  box = jnp.minimum(hi + 1.0 - lo, ub)
  is_ellipse = jax.random.uniform(k_kind, ()) < float(hc.ellipse_prob)
  return HyperShape(dims, m, jnp.linalg.inv(m), -lo, box, is_ellipse)


def hypershape_mask(shape: HyperShape, ly: jax.Array, lx: jax.Array) -> jax.Array:
  """Boolean mask at box-local coordinates (ly, lx); false outside the box."""
  vy, vx = ly - shape.origin[0], lx - shape.origin[1]
  a = shape.inv_matrix
  uy = a[0, 0] * vy + a[0, 1] * vx
  ux = a[1, 0] * vy + a[1, 1] * vx
  hy, hx = shape.dims[0] / 2.0, shape.dims[1] / 2.0
  rect = (jnp.abs(uy) <= hy) & (jnp.abs(ux) <= hx)
  ell = (uy / hy) ** 2 + (ux / hx) ** 2 <= 1.0
  inbox = (ly >= 0) & (ly <= shape.box[0] - 1.0) & (lx >= 0) & (lx <= shape.box[1] - 1.0)
  return jnp.where(shape.is_ellipse, ell, rect) & inbox


def hypershape_edge_distance(shape: HyperShape, oy: jax.Array, ox: jax.Array, dy: jax.Array,
                             dx: jax.Array) -> jax.Array:
  """Distance from box-local point o along unit direction d to the shape's edge.

  Computed in the aligned frame (where the shape is an axis-aligned rectangle or
  ellipse) and measured in pixels of the box, as the reference's edge-intersection
  function. `o` is assumed inside the shape.
  """
  a = shape.inv_matrix
  py, px = oy - shape.origin[0], ox - shape.origin[1]
  o0 = a[0, 0] * py + a[0, 1] * px
  o1 = a[1, 0] * py + a[1, 1] * px
  u0 = a[0, 0] * dy + a[0, 1] * dx
  u1 = a[1, 0] * dy + a[1, 1] * dx
  hy, hx = shape.dims[0] / 2.0, shape.dims[1] / 2.0
  eps = 1e-9
  # Rectangle: first crossing of |o + t u| = half along either axis.
  def axis_t(o, u, half):
    su = jnp.where(u >= 0, 1.0, -1.0)
    return jnp.where(jnp.abs(u) > eps, (su * half - o) / jnp.where(jnp.abs(u) > eps, u, 1.0), jnp.inf)
  t_rect = jnp.minimum(axis_t(o0, u0, hy), axis_t(o1, u1, hx))
  # Ellipse: positive root of sum((o + t u)² / half²) = 1.
  qa = (u0 / hy) ** 2 + (u1 / hx) ** 2
  qb = 2.0 * (o0 * u0 / hy ** 2 + o1 * u1 / hx ** 2)
  qc = (o0 / hy) ** 2 + (o1 / hx) ** 2 - 1.0
  disc = jnp.maximum(qb * qb - 4.0 * qa * qc, 0.0)
  t_ell = (-qb + jnp.sqrt(disc)) / jnp.maximum(2.0 * qa, eps)
  return jnp.maximum(jnp.where(shape.is_ellipse, t_ell, t_rect), 0.0)


# ----------------------------------------------------------------------------------------------
# Placement


def foreground_mask(image: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """Boolean body region: intensity above `foreground_threshold`."""
  return image > float(cfg.foreground_threshold)


def random_point_in(key: jax.Array, mask_fn, box: jax.Array, n: int) -> jax.Array:
  """A box-local pixel inside the shape, uniform over the shape.

  Draws `n` uniform pixels in the box and keeps the first inside (exactly uniform over
  the shape when any qualifies); falls back to the box centre.
  """
  u = jax.random.uniform(key, (n, 2))
  pts = jnp.floor(u * box)
  inside = mask_fn(pts[:, 0], pts[:, 1])
  centre = jnp.floor((box - 1.0) / 2.0)
  return jnp.where(jnp.any(inside), pts[jnp.argmax(inside)], centre)


def place(key: jax.Array, mask_fn, box: jax.Array, image: jax.Array,
          cfg: ml_collections.ConfigDict) -> jax.Array:
  """Top-left corner (2,) float32 of a box so the box lies inside the image.

  Uniform over valid corners (reference), or with `foreground_only` chosen so a random
  shape pixel lands on a random foreground pixel (uniform fallback without foreground).
  """
  hw = image.shape
  k_uni, k_q, k_p = jax.random.split(key, 3)
  span = jnp.array(hw, jnp.float32) - box  # inclusive upper corner
  uniform = jnp.floor(jax.random.uniform(k_uni, (2,)) * (span + 1.0))
  if not cfg.foreground_only:
    return uniform
  q = random_point_in(k_q, mask_fn, box, int(cfg.placement_candidates))
  yy, xx = pixel_grid(hw)
  ok = foreground_mask(image, cfg) & (yy - q[0] >= 0) & (yy - q[0] <= span[0]) & (xx - q[1] >= 0) & (xx - q[1] <= span[1])
  logits = jnp.where(ok, 0.0, -jnp.inf).reshape(-1)
  idx = jax.random.categorical(k_p, jnp.where(jnp.any(ok), logits, 0.0))
  p = jnp.stack([idx // hw[1], idx % hw[1]]).astype(jnp.float32)
  return jnp.where(jnp.any(ok), p - q, uniform)


def num_anomalies_flags(key: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """(max_anomalies,) bool: anomaly a is applied; the first always, each next with extra_anomaly_prob."""
  n = int(cfg.max_anomalies)
  cont = jax.random.uniform(key, (n,)) < float(cfg.extra_anomaly_prob)
  cont = cont.at[0].set(True)
  return jnp.cumprod(cont.astype(jnp.int32)).astype(bool)
