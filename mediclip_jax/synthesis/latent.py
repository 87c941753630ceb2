"""Latent-space anomaly synthesis in the style of DeCo-Diff (direction of deviation, latent patch shuffle).

Per sample, on the latent grid L×L of a frozen VAE, with a patch size P that divides L:
region mask M (1 = keep, ⌊G·(1−r)⌋ of G = (L/P)² cells, r ~ U(0, r_max)); a second mask S
(ratio q ~ U(0, q_max)) choosing Gaussian vs shuffled-latent noise; patches drawn from a
pool of latents (default: the support set's latents, so a sample's result does not depend
on the rest of the batch or on the device split); the cosine schedule over T steps and the
direction of deviation η = n − c_t·z0; then

  deviation task: z_anom = M·z0 + (1−M)·(z0 + λ·√(1−ᾱ_t)·η), n = S·ε + (1−S)·shuffle(z0)
  shuffle task:   the same with n = shuffle(z0) only.

Decoding gives x_anom; the two-stage mask is where |x_anom − D(z0)| > threshold inside the
upsampled corrupted region, so VAE blur is never labelled anomalous. Latents may be
standardised per channel with support-set statistics first. Everything is per sample (vmap
over keys), static-shaped and jittable (every patch size is built, one is selected per sample).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TASK_DEVIATION = 0
TASK_SHUFFLE = 1
TASK_IDENTITY = 2


def default_config() -> ml_collections.ConfigDict:
  """All knobs of the latent tasks; defaults are DeCo-Diff's *(ref)* where it has one."""
  c = ml_collections.ConfigDict()
  c.patch_sizes = (1, 2, 4, 8, 16)          # latent pixels; each must divide the latent size (L = 32 at 256²)
  c.patch_probs = (0.30, 0.25, 0.20, 0.15, 0.10)  # (ref) 256² table
  c.r_max = 0.7                             # (ref) region ratio r ~ U(0, r_max)
  c.q_max = 0.3                             # (ref) shuffled-noise ratio q ~ U(0, q_max)
  c.T = 10                                  # (ref) cosine schedule steps; t ~ U{0..T-1}
  c.severity = (1.0, 1.0)                   # λ ~ U(lo, hi); 1 gives DeCo-Diff's x_t
  c.pool = "support"                        # "support" (device-split independent) | "batch" (DeCo-Diff)
  c.standardise = True                      # per-channel standardisation with support statistics
  c.roundtrip_normals = True                # identity samples are D(E(x)) instead of x
  c.two_stage_threshold = 0.05              # |x_anom − D(z0)| threshold, images in [0, 1]
  return c


def validate_config(cfg: ml_collections.ConfigDict, latent_size: int) -> None:
  """Raises ValueError naming the offending field when the config cannot work at `latent_size`."""
  divisors = [d for d in range(1, latent_size + 1) if latent_size % d == 0]
  bad = [p for p in cfg.patch_sizes if int(p) < 1 or latent_size % int(p)]
  if bad:
    raise ValueError(f"latent.patch_sizes: {bad} do not divide the latent size {latent_size}; "
                     f"choose from its divisors {divisors}")
  if len(cfg.patch_probs) != len(cfg.patch_sizes):
    raise ValueError(f"latent.patch_probs: expected {len(cfg.patch_sizes)} probabilities (one per "
                     f"latent.patch_sizes entry), got {len(cfg.patch_probs)}")
  if min(cfg.patch_probs) < 0 or sum(cfg.patch_probs) <= 0:
    raise ValueError(f"latent.patch_probs: expected non-negative weights with a positive sum, got {cfg.patch_probs}")
  for name in ("r_max", "q_max"):
    if not 0.0 <= float(cfg[name]) <= 1.0:
      raise ValueError(f"latent.{name}: expected a ratio in [0, 1], got {cfg[name]}")
  if int(cfg.T) < 1:
    raise ValueError(f"latent.T: expected at least 1 step, got {cfg.T}")
  if len(cfg.severity) != 2 or cfg.severity[0] > cfg.severity[1]:
    raise ValueError(f"latent.severity: expected a range (lo, hi) with lo <= hi, got {cfg.severity}")
  if cfg.pool not in ("support", "batch"):
    raise ValueError(f"latent.pool: expected 'support' or 'batch', got {cfg.pool!r}")


# ----------------------------------------------------------------------------------------
# Schedule and direction of deviation
# ----------------------------------------------------------------------------------------

def cosine_schedule(T: int = 10) -> dict[str, np.ndarray]:
  """IDDPM cosine schedule (squaredcos_cap_v2) as DeCo-Diff builds it: ᾱ_t = Π(1 − β_i), β capped at 0.999.

  Returns float32 tables of length T: alpha_bar, sqrt_alpha_bar, sqrt_one_minus (√(1−ᾱ_t)) and
  c (c_t = (1 − √ᾱ_t)/√(1 − ᾱ_t)).
  """
  def f(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], np.float64)
  ab = np.cumprod(1.0 - betas)
  sq, sm = np.sqrt(ab), np.sqrt(1.0 - ab)
  return {"alpha_bar": ab.astype(np.float32), "sqrt_alpha_bar": sq.astype(np.float32),
          "sqrt_one_minus": sm.astype(np.float32), "c": ((1.0 - sq) / sm).astype(np.float32)}


def direction_of_deviation(z0: jax.Array, n: jax.Array, c_t: jax.Array) -> jax.Array:
  """η = n − c_t·z0, so that z0 + √(1−ᾱ_t)·η = √ᾱ_t·z0 + √(1−ᾱ_t)·n."""
  return n - c_t * z0


# ----------------------------------------------------------------------------------------
# Masks and patch shuffles (per sample, static P)
# ----------------------------------------------------------------------------------------

def _upsample(cells: jax.Array, p: int) -> jax.Array:
  return jnp.repeat(jnp.repeat(cells, p, axis=0), p, axis=1)


def region_mask(key: jax.Array, latent_size: int, patch: int, ratio: jax.Array) -> jax.Array:
  """(L, L, 1) float mask, 1 = keep: exactly ⌊G·(1−ratio)⌋ of the G = (L/P)² patch cells are kept."""
  g = latent_size // patch
  n_keep = jnp.floor(g * g * (1.0 - ratio)).astype(jnp.int32)
  order = jnp.argsort(jax.random.uniform(key, (g * g,)))  # a random order of the cells
  rank = jnp.zeros(g * g, jnp.int32).at[order].set(jnp.arange(g * g, dtype=jnp.int32))
  cells = (rank < n_keep).astype(jnp.float32).reshape(g, g)
  return _upsample(cells, patch)[..., None]


def to_patches(z: jax.Array, patch: int) -> jax.Array:
  """(..., L, L, C) -> (..., G, P, P, C), patches in row-major grid order."""
  *lead, h, w, c = z.shape
  x = z.reshape(*lead, h // patch, patch, w // patch, patch, c)
  x = jnp.moveaxis(x, -4, -3)  # (..., gh, gw, P, P, C)
  return x.reshape(*lead, (h // patch) * (w // patch), patch, patch, c)


def from_patches(p: jax.Array, latent_size: int) -> jax.Array:
  """Inverse of `to_patches` for a square L×L grid."""
  *lead, _, patch, _, c = p.shape
  g = latent_size // patch
  x = p.reshape(*lead, g, g, patch, patch, c)
  x = jnp.moveaxis(x, -3, -4)
  return x.reshape(*lead, latent_size, latent_size, c)


def shuffle_from_pool(key: jax.Array, pool: jax.Array, patch: int) -> jax.Array:
  """One (L, L, C) latent made of G patches drawn without replacement from the K·G patches of `pool` (K, L, L, C)."""
  k, l = pool.shape[0], pool.shape[1]
  g = (l // patch) ** 2
  patches = to_patches(pool, patch).reshape(k * g, patch, patch, pool.shape[-1])
  pick = jnp.argsort(jax.random.uniform(key, (k * g,)))[:g]  # without replacement
  return from_patches(patches[pick], l)


def shuffle_batch(key: jax.Array, z: jax.Array, patch: int) -> jax.Array:
  """DeCo-Diff's batch-pooled shuffle: one permutation over all N·G patches of z (N, L, L, C)."""
  n, l = z.shape[0], z.shape[1]
  g = (l // patch) ** 2
  patches = to_patches(z, patch).reshape(n * g, patch, patch, z.shape[-1])
  perm = jnp.argsort(jax.random.uniform(key, (n * g,)))
  return from_patches(patches[perm].reshape(n, g, patch, patch, z.shape[-1]), l)


# ----------------------------------------------------------------------------------------
# The tasks (per sample)
# ----------------------------------------------------------------------------------------

def corrupt(z0: jax.Array, keep: jax.Array, n: jax.Array, t: jax.Array, severity: jax.Array,
            schedule: dict[str, np.ndarray]) -> jax.Array:
  """z_anom = M·z0 + (1−M)·(z0 + λ·√(1−ᾱ_t)·η), η = n − c_t·z0."""
  eta = direction_of_deviation(z0, n, jnp.asarray(schedule["c"])[t])
  return keep * z0 + (1.0 - keep) * (z0 + severity * jnp.asarray(schedule["sqrt_one_minus"])[t] * eta)


def synthesize_one(key: jax.Array, z0: jax.Array, pool: jax.Array, task: jax.Array,
                   cfg: ml_collections.ConfigDict, shuffled: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One sample's latent anomaly: returns (z_anom (L, L, C), corrupted region (L, L) float, 1 = corrupted).

  `task`: TASK_DEVIATION, TASK_SHUFFLE or TASK_IDENTITY (z_anom = z0, empty region).
  `pool` (K, L, L, C) supplies shuffled patches; or pass `shuffled` (one latent per P, stacked
  (len(patch_sizes), L, L, C)) to use a precomputed batch-pooled shuffle.
  """
  l = z0.shape[0]
  sizes = tuple(int(p) for p in cfg.patch_sizes)
  sched = cosine_schedule(int(cfg.T))
  kp, kr, kq, km, ks, ksh, ke, kt, kl = jax.random.split(key, 9)
  r = jax.random.uniform(kr, (), maxval=float(cfg.r_max))
  q = jax.random.uniform(kq, (), maxval=float(cfg.q_max))

  def branch(i: int, p: int) -> Callable[[], tuple[jax.Array, jax.Array, jax.Array]]:
    def f():
      keep = region_mask(km, l, p, r)
      # S (1 = Gaussian source) keeps ⌊G(1−q)⌋ cells: a fraction ≈ q takes shuffled latents.
      s_gauss = region_mask(ks, l, p, q)
      shuf = shuffled[i] if shuffled is not None else shuffle_from_pool(ksh, pool, p)
      return keep, s_gauss, shuf
    return f

  logits = jnp.log(jnp.asarray(cfg.patch_probs, jnp.float32))
  idx = jax.random.categorical(kp, logits)
  # Every patch size is computed and one is selected: what lax.switch becomes under vmap anyway,
  # and it avoids switch's mixed varying/replicated operands (the pool) under jax.shard_map.
  outs = [branch(i, p)() for i, p in enumerate(sizes)]
  keep, s_gauss, shuf = (jnp.stack([o[j] for o in outs])[idx] for j in range(3))
  eps = jax.random.normal(ke, z0.shape, z0.dtype)
  n = jnp.where(task == TASK_SHUFFLE, shuf, s_gauss * eps + (1.0 - s_gauss) * shuf)
  t = jax.random.randint(kt, (), 0, int(cfg.T))
  lo, hi = (float(v) for v in cfg.severity)
  lam = jax.random.uniform(kl, (), minval=lo, maxval=hi)
  z_anom = corrupt(z0, keep, n, t, lam, sched)
  identity = task == TASK_IDENTITY
  z_anom = jnp.where(identity, z0, z_anom)
  region = jnp.where(identity, 0.0, 1.0 - keep[..., 0])
  return z_anom, region


def two_stage_mask(x_anom: jax.Array, recon: jax.Array, region: jax.Array, threshold: float) -> jax.Array:
  """(B, H, W) mask: |x_anom − D(z0)| > threshold inside the latent region upsampled (nearest) to H×W."""
  f = x_anom.shape[-1] // region.shape[-1]
  up = jnp.repeat(jnp.repeat(region, f, axis=-2), f, axis=-1)
  return ((jnp.abs(x_anom - recon) > threshold) & (up > 0.5)).astype(jnp.float32)


def latent_stats(latents: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and std of (K, L, L, C) latents (the support set's)."""
  mean = jnp.mean(latents, axis=(0, 1, 2))
  std = jnp.sqrt(jnp.mean(jnp.square(latents - mean), axis=(0, 1, 2)))
  return mean, jnp.maximum(std, eps)


# ----------------------------------------------------------------------------------------
# Batch entry point
# ----------------------------------------------------------------------------------------

def latent_synthesize(keys: jax.Array, images: jax.Array, support_latents: jax.Array,
                      vae_apply: tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]],
                      cfg: ml_collections.ConfigDict, tasks: jax.Array,
                      stats: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Latent anomalies for a batch.

  Args:
    keys: (B,) per-sample PRNG keys.
    images: (B, H, W) float in [0, 1].
    support_latents: (K, L, L, C) scaled latents of the support set (`encode_gray` output).
    vae_apply: (encode_fn: (B,H,W) -> (B,L,L,C), decode_fn: (B,L,L,C) -> (B,H,W)), e.g.
      `functools.partial(vae.encode_gray, model)` and `partial(vae.decode_gray, model)`.
    cfg: `default_config()`.
    tasks: (B,) int (TASK_DEVIATION / TASK_SHUFFLE / TASK_IDENTITY), chosen by the caller
      (`mix.build_synthesis` draws them from the one task table).
    stats: optional stored (mean, std) per channel; computed from support_latents when None.

  Returns:
    dict(image=(B,H,W) the anomalous image (identity: D(E(x)) or x per cfg.roundtrip_normals),
         mask=(B,H,W) two-stage mask, recon=(B,H,W) D(E(x)), task=(B,) int).
  With cfg.pool == "support" nothing crosses samples, so this is safe per device under
  jax.shard_map and independent of how the batch is split.
  """
  encode_fn, decode_fn = vae_apply
  b = images.shape[0]
  z0 = encode_fn(images).astype(jnp.float32)
  l = z0.shape[1]
  validate_config(cfg, l)
  if cfg.standardise:
    mean, std = stats if stats is not None else latent_stats(support_latents)
  else:
    mean, std = jnp.zeros(z0.shape[-1]), jnp.ones(z0.shape[-1])
  zs = (z0 - mean) / std
  pool = (support_latents.astype(jnp.float32) - mean) / std
  tasks = jnp.asarray(tasks, jnp.int32)

  shuffled = None
  if cfg.pool == "batch":  # DeCo-Diff: one permutation over the batch's patches, for every P
    kb = jax.random.fold_in(keys[0], 11)
    shuffled = jnp.stack([shuffle_batch(jax.random.fold_in(kb, i), zs, int(p))
                          for i, p in enumerate(cfg.patch_sizes)], axis=1)  # (B, nP, L, L, C)
    z_anom, region = jax.vmap(lambda k, z, t, s: synthesize_one(k, z, pool, t, cfg, s))(keys, zs, tasks, shuffled)
  else:
    z_anom, region = jax.vmap(lambda k, z, t: synthesize_one(k, z, pool, t, cfg))(keys, zs, tasks)
  z_anom = z_anom * std + mean
  z_anom = jnp.where((tasks == TASK_IDENTITY)[:, None, None, None], z0, z_anom)
  decoded = decode_fn(jnp.concatenate([z_anom, z0], axis=0))
  x_anom, recon = decoded[:b], decoded[b:]
  mask = two_stage_mask(x_anom, recon, region, float(cfg.two_stage_threshold))
  normal = recon if cfg.roundtrip_normals else images.astype(jnp.float32)
  image = jnp.where((tasks == TASK_IDENTITY)[:, None, None], normal, x_anom)
  return {"image": image, "mask": mask, "recon": recon, "task": tasks}


def patch_size_choices(latent_size: int, candidates: Sequence[int] = (1, 2, 4, 7, 8, 14, 16)) -> tuple[int, ...]:
  """The candidates that divide `latent_size` (e.g. (1, 2, 4, 7, 14) for 28, (1, 2, 4, 8, 16) for 32)."""
  return tuple(p for p in candidates if latent_size % p == 0 and p < latent_size)
