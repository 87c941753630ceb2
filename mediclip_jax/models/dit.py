"""A diffusion transformer (DiT, Peebles & Xie 2023) that predicts the noise of a latent, in Flax NNX.

The latent (B, L, L, C) is cut into p x p patches (one linear embedding), given fixed 2-D sine-cosine
positions, and run through `depth` pre-LN blocks whose LayerNorms are modulated by the timestep
embedding (adaLN-Zero: shift, scale and a gate per sub-layer, the gates and the output layer initialised
at zero, so the untrained network predicts 0). The output is unpatchified back to (B, L, L, C).
Parameters are float32; `dtype` is the compute dtype; LayerNorm and the attention softmax run in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mediclip_jax import flops as flops_lib

FREQUENCY_DIM = 256  # sinusoidal timestep features before the embedding MLP


def default_config() -> ml_collections.ConfigDict:
  """DiT-S/2 (33 M parameters at 32 x 32 x 32 latents); `configs/latent_diffusion.py:tiny` shrinks it."""
  c = ml_collections.ConfigDict()
  c.patch_size = 2      # latent pixels per token side; must divide the latent side
  c.width = 384
  c.depth = 12
  c.heads = 6
  c.mlp_ratio = 4.0
  c.dtype = "float32"   # compute dtype ("bfloat16"); parameters stay float32
  return c


def validate_config(cfg: ml_collections.ConfigDict, latent_side: int) -> None:
  """Raises ValueError naming `config.model.<field>`."""
  for name in ("patch_size", "width", "depth", "heads"):
    if int(cfg[name]) < 1:
      raise ValueError(f"config.model.{name} must be >= 1, got {cfg[name]}")
  if cfg.width % cfg.heads:
    raise ValueError(f"config.model.width ({cfg.width}) must be divisible by config.model.heads ({cfg.heads})")
  if cfg.width % 4:
    raise ValueError(f"config.model.width must be divisible by 4 (2-D sine-cosine positions), got {cfg.width}")
  if latent_side % cfg.patch_size:
    raise ValueError(f"config.model.patch_size ({cfg.patch_size}) must divide the latent side {latent_side} "
                     f"(data.image_size / the VAE's downscale factor)")
  if not cfg.mlp_ratio > 0:
    raise ValueError(f"config.model.mlp_ratio must be > 0, got {cfg.mlp_ratio}")
  try:
    jnp.dtype(cfg.dtype)
  except TypeError as e:
    raise ValueError(f"config.model.dtype: expected a dtype name such as 'float32' or 'bfloat16', "
                     f"got {cfg.dtype!r}") from e


def timestep_features(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> jax.Array:
  """(B,) integer or real timesteps -> (B, dim) [cos | sin] features at geometric frequencies."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_positions(grid: int, width: int) -> np.ndarray:
  """(grid², width) fixed 2-D sine-cosine position embedding: half the channels encode the row, half the column."""
  def one_axis(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  return np.concatenate([one_axis(rows, width // 2), one_axis(cols, width // 2)], axis=1).astype(np.float32)


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters (the modulation supplies them), in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (_layer_norm(x) * (1.0 + scale[:, None]) + shift[:, None]).astype(dtype)


class DiTBlock(nnx.Module):
  """Self-attention and MLP, each behind an adaLN-modulated LayerNorm and a gated residual."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    hidden = int(width * mlp_ratio)
    self.heads, self.dtype = heads, dtype
    self.qkv = nnx.Linear(width, 3 * width, **kw)
    self.proj = nnx.Linear(width, width, **kw)
    self.fc1 = nnx.Linear(width, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, width, **kw)
    self.modulation = nnx.Linear(width, 6 * width, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    b, n, w = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        self.modulation(nnx.silu(c)).astype(jnp.float32), 6, axis=-1)
    h = _modulate(x, shift1, scale1, self.dtype)
    q, k, v = jnp.split(self.qkv(h).reshape(b, n, 3 * self.heads, w // self.heads), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(w // self.heads)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(self.dtype), v)
    x = x + gate1[:, None] * self.proj(attn.reshape(b, n, w)).astype(jnp.float32)
    h = _modulate(x, shift2, scale2, self.dtype)
    return x + gate2[:, None] * self.fc2(nnx.gelu(self.fc1(h), approximate=True)).astype(jnp.float32)


class DiT(nnx.Module):
  """eps_hat = DiT(z_t, t): latents (B, L, L, C) and timesteps (B,) -> a prediction of the latent's shape."""

  def __init__(self, cfg: ml_collections.ConfigDict, latent_side: int, latent_channels: int, *, rngs: nnx.Rngs):
    validate_config(cfg, latent_side)
    dtype = jnp.dtype(cfg.dtype)
    p, w = int(cfg.patch_size), int(cfg.width)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.patch, self.side, self.channels, self.dtype = p, latent_side, latent_channels, dtype
    self.grid = latent_side // p
    self.embed = nnx.Linear(p * p * latent_channels, w, **kw)
    self.time_fc1 = nnx.Linear(FREQUENCY_DIM, w, **kw)
    self.time_fc2 = nnx.Linear(w, w, **kw)
    self.blocks = nnx.List([DiTBlock(w, int(cfg.heads), float(cfg.mlp_ratio), dtype=dtype, rngs=rngs)
                            for _ in range(int(cfg.depth))])
    self.final_modulation = nnx.Linear(w, 2 * w, kernel_init=nnx.initializers.zeros, **kw)
    self.out = nnx.Linear(w, p * p * latent_channels, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
    b, p, g, ch = z.shape[0], self.patch, self.grid, self.channels
    tokens = z.astype(self.dtype).reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * ch)
    positions = sincos_positions(g, self.embed.out_features)  # fixed, a constant of the program
    x = self.embed(tokens).astype(jnp.float32) + positions[None]
    c = self.time_fc2(nnx.silu(self.time_fc1(timestep_features(t).astype(self.dtype)))).astype(jnp.float32)
    for block in self.blocks:
      x = block(x, c)
    shift, scale = jnp.split(self.final_modulation(nnx.silu(c)).astype(jnp.float32), 2, axis=-1)
    out = self.out(_modulate(x, shift, scale, self.dtype)).astype(jnp.float32)
    return out.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, ch)


def count_params(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def forward_flops(cfg: ml_collections.ConfigDict, latent_side: int, latent_channels: int) -> float:
  """Analytic forward FLOPs of one latent (matmuls only, multiply-add = 2): patch embedding, timestep MLP,
  the blocks (QKV, output, MLP, QK^T, PV, modulation) and the output layer."""
  p, w = int(cfg.patch_size), int(cfg.width)
  tokens, patch_dim = (latent_side // p) ** 2, p * p * latent_channels
  block = flops_lib.transformer_block_flops(tokens, w, float(cfg.mlp_ratio))
  mac = flops_lib.MAC
  per_block = block["linear"] + block["attention"] + mac * w * 6 * w
  embed = mac * tokens * patch_dim * w
  time = mac * (FREQUENCY_DIM * w + w * w)
  final = mac * (w * 2 * w + tokens * w * patch_dim)
  return float(embed + time + int(cfg.depth) * per_block + final)
