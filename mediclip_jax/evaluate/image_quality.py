"""Full-reference image quality of grey images in [0, 1]: PSNR and SSIM, per image, jittable.

Used to judge a VAE's round trip (is it too lossy to synthesise latent anomalies from?) and
to report how far a synthesised image departs from its source.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of (B, H, W) images in [0, 1] (MSE floored at 1e-12)."""
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def ssim(a: jax.Array, b: jax.Array, sigma: float = 1.5, radius: int = 5) -> jax.Array:
  """Per-image SSIM of (B, H, W) images in [0, 1] (Wang et al. 2004: 11×11 Gaussian window σ = 1.5,
  K = (0.01, 0.03), data range 1, mean over the valid region)."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  g = jnp.exp(-0.5 * (x / sigma) ** 2)
  g = g / g.sum()

  def blur(v):
    v = jax.lax.conv_general_dilated(v[:, None], g[None, None, :, None], (1, 1), "VALID")
    return jax.lax.conv_general_dilated(v, g[None, None, None, :], (1, 1), "VALID")[:, 0]

  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = blur(a), blur(b)
  saa = blur(a * a) - mu_a ** 2
  sbb = blur(b * b) - mu_b ** 2
  sab = blur(a * b) - mu_a * mu_b
  m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
  return jnp.mean(m, axis=(1, 2))
