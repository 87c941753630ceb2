"""The denoising diffusion process: noise schedules, forward noising and the deterministic DDIM reverse loop.

Pure functions of arrays, shared by the latent diffusion baseline's training (ε-prediction on latents noised
in closed form) and its scoring (partial noising to t*, then DDIM back to a pseudo-healthy latent). Timesteps
are integers 0..T with ᾱ_0 = 1 (t = 0 is the clean sample); `eps_fn(x, t)` is any ε-predictor.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """betas[t] for t = 1..T (index 0 unused, 0) and alpha_bar[t] = prod_{s<=t} (1 - betas[s]), alpha_bar[0] = 1."""
  betas: np.ndarray
  alpha_bar: np.ndarray

  @property
  def steps(self) -> int:
    return len(self.betas) - 1


def make_schedule(kind: str, steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Schedule:
  """The linear schedule of Ho et al. (betas from beta_start to beta_end) or the cosine one of Nichol &
  Dhariwal (alpha_bar from a squared cosine, betas clipped at 0.999), in float64 on the host."""
  if kind not in SCHEDULES:
    raise ValueError(f"diffusion schedule must be one of {SCHEDULES}, got {kind!r}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"diffusion steps must be a positive integer, got {steps!r}")
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
  else:
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(steps)], np.float64)
  betas = np.concatenate([[0.0], betas])
  return Schedule(betas=betas, alpha_bar=np.cumprod(1.0 - betas))


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t in closed form: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise; `t` (B,) integer, x0 and noise (B, ...)."""
  ab = jnp.asarray(s.alpha_bar, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def q_step(s: Schedule, x_prev: jax.Array, t: int, noise: jax.Array) -> jax.Array:
  """One forward step: x_t = sqrt(1 - β_t) x_{t-1} + sqrt(β_t) noise."""
  b = float(s.betas[t])
  return math.sqrt(1.0 - b) * x_prev + math.sqrt(b) * noise


def predict_x0(s: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """The clean sample implied by x_t and a noise estimate."""
  ab = jnp.asarray(s.alpha_bar, jnp.float32)[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def ddim_timesteps(t_star: int, n_steps: int) -> np.ndarray:
  """The decreasing timesteps DDIM visits from t* to 0: n_steps + 1 integers, evenly spaced, t* first, 0 last
  (fewer when t* < n_steps: every integer)."""
  if not 0 <= t_star:
    raise ValueError(f"t* must be >= 0, got {t_star}")
  if n_steps < 1:
    raise ValueError(f"DDIM steps must be >= 1, got {n_steps}")
  return np.unique(np.round(np.linspace(0, t_star, min(n_steps, max(t_star, 1)) + 1)).astype(np.int32))[::-1].copy()


def ddim_reverse(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], s: Schedule, x_t: jax.Array, t_star: int,
                 n_steps: int) -> jax.Array:
  """Deterministic DDIM (η = 0) from x_{t*} back to x_0, one `lax.scan` over the timestep pairs: at each,
  x0 = predict_x0(x_t, ε), x_{t'} = sqrt(ᾱ_{t'}) x0 + sqrt(1 - ᾱ_{t'}) ε. t* = 0 returns x_t unchanged."""
  ts = ddim_timesteps(t_star, n_steps)
  if len(ts) < 2:
    return x_t
  ab = jnp.asarray(s.alpha_bar, jnp.float32)
  pairs = jnp.asarray(np.stack([ts[:-1], ts[1:]], axis=1))

  def body(x, pair):
    t, t_next = pair[0], pair[1]
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    eps = eps_fn(x, tb)
    x0 = (x - jnp.sqrt(1.0 - ab[t]) * eps) / jnp.sqrt(ab[t])
    return jnp.sqrt(ab[t_next]) * x0 + jnp.sqrt(1.0 - ab[t_next]) * eps, None

  x, _ = jax.lax.scan(body, x_t, pairs)
  return x


NOISES = ("gaussian", "perlin")


def perlin_noise(key: jax.Array, shape: tuple[int, int, int, int], base_res: int, octaves: int,
                 persistence: float = 0.5) -> jax.Array:
  """(B, H, W, C) fractal Perlin noise (AnoDDPM's structured noise, gradient-noise form): octave o has a
  lattice of base_res·2^o cells over the field, random unit gradients at its corners and quintic fade
  interpolation, weighted persistence^o; each (sample, channel) field is standardised to zero mean and unit
  variance, so it can stand in for ε of the Gaussian process. Needs base_res·2^(octaves-1) <= min(H, W)."""
  b, h, w, c = shape
  if base_res < 1 or octaves < 1 or base_res * 2 ** (octaves - 1) > min(h, w):
    raise ValueError(f"perlin noise: base_res {base_res} x 2^(octaves {octaves} - 1) must lie in [1, {min(h, w)}] "
                     f"(the latent side)")
  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  total = jnp.zeros((b, c, h, w), jnp.float32)
  for o in range(octaves):
    res = base_res * 2 ** o
    angles = 2 * jnp.pi * jax.random.uniform(jax.random.fold_in(key, o), (b, c, res + 1, res + 1))
    gy, gx = jnp.sin(angles), jnp.cos(angles)
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) * res / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) * res / w
    iy, ix = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy, dx):
      g_y, g_x = gy[:, :, iy + dy][:, :, :, ix + dx], gx[:, :, iy + dy][:, :, :, ix + dx]
      return g_y * (fy - dy) + g_x * (fx - dx)

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    total = total + persistence ** o * (top * (1 - u) + bottom * u)
  total = total - jnp.mean(total, axis=(2, 3), keepdims=True)
  total = total / jnp.maximum(jnp.std(total, axis=(2, 3), keepdims=True), 1e-6)
  return total.transpose(0, 2, 3, 1)


def sample_noise(key: jax.Array, shape: tuple[int, ...], kind: str, base_res: int = 2, octaves: int = 3,
                 persistence: float = 0.5) -> jax.Array:
  """ε of `shape` (B, H, W, C): standard Gaussian, or standardised fractal Perlin noise (`perlin_noise`)."""
  if kind == "gaussian":
    return jax.random.normal(key, shape, jnp.float32)
  if kind == "perlin":
    return perlin_noise(key, shape, base_res, octaves, persistence)
  raise ValueError(f"diffusion noise must be one of {NOISES}, got {kind!r}")
