"""Gaussian smoothing of maps, in JAX: the one implementation evaluation and the methods' scorers share."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """Normalised 1-D Gaussian taps, radius int(truncate*sigma + 0.5) as scipy.ndimage."""
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def gaussian_smooth(maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0) -> jax.Array:
  """Separable Gaussian blur over the last two axes with scipy's 'reflect' border
  (= numpy 'symmetric'), matching scipy.ndimage.gaussian_filter(sigma) per map, as
  peers (AnomalyCLIP, MVFA) smooth anomaly maps with sigma = 4 before scoring."""
  k = gaussian_kernel1d(sigma, truncate)
  r = (k.shape[0] - 1) // 2
  x = jnp.asarray(maps, jnp.float32)
  h, w = x.shape[-2:]
  lead = [(0, 0)] * (x.ndim - 2)
  # Borders wider than the image reflect repeatedly, as scipy does.
  xp = jnp.pad(x, lead + [(r, r), (0, 0)], mode="symmetric")
  x = sum(float(k[i]) * xp[..., i:i + h, :] for i in range(k.shape[0]))
  xp = jnp.pad(x, lead + [(0, 0), (r, r)], mode="symmetric")
  return sum(float(k[i]) * xp[..., :, i:i + w] for i in range(k.shape[0]))
