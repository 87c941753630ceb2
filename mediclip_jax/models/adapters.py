"""Per-layer adapters: a 1x1 linear map of patch tokens into the joint space, then L2 normalisation."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _torch_default_uniform(fan_in: int):
  """PyTorch's Conv2d/Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapters(nnx.Module):
  """One independent adapter per tapped layer (MediCLIP: 3 x (1024 -> 768) with bias)."""

  def __init__(self, n_layers: int, in_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    init = _torch_default_uniform(in_dim)
    self.layers = nnx.List([
        nnx.Linear(in_dim, out_dim, kernel_init=init, bias_init=init, dtype=dtype, rngs=rngs)
        for _ in range(n_layers)])

  def __call__(self, taps: Sequence[jax.Array]) -> list[jax.Array]:
    """taps: per layer (B, N, in_dim) patch tokens (CLS dropped) -> per layer unit-norm (B, N, out_dim) fp32."""
    if len(taps) != len(self.layers):
      raise ValueError(f"got {len(taps)} tapped layers for {len(self.layers)} adapters")
    out = []
    for tokens, layer in zip(taps, self.layers):
      v = layer(tokens).astype(jnp.float32)
      out.append(v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12))  # F.normalize
    return out
