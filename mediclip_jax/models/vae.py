"""Frozen VAEs for latent-space anomaly synthesis, in Flax NNX.

Two families, both NHWC, both with `.encode(x) -> latent` and `.decode(z) -> image`:

- `AutoencoderKL`: the LDM "kl" autoencoder in the diffusers module layout (SD 1.x/2.x
  4-channel with quant convs; SD3/FLUX-style 16 channels without them), also loadable
  from CompVis/MedVAE checkpoints by key mapping (mediclip_jax/weights/vae_convert.py).
- `TAEF2`: the 1.3 M + 1.3 M parameter tiny autoencoder of the FLUX.2 latent space, the
  default VAE for tests and CPU runs.

Module attribute names mirror the PyTorch state-dict names, so the converter maps a
parameter path to its PyTorch key mechanically. Parameters are float32; `dtype` is the
compute dtype (bf16 when configured); GroupNorm statistics and attention softmax stay fp32.
`encode_gray`/`decode_gray` adapt the project's (B, H, W) images in [0, 1] to any VAE.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mediclip_jax.synthesis import mix
from mediclip_jax.weights import vae_convert

KIND_TAEF2 = "taef2"
KIND_KL = "autoencoder_kl"


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, pad=None, bias: bool = True,
          dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A k×k conv with explicit padding (symmetric k//2 unless `pad` is given), never 'SAME'."""
  if pad is None:
    pad = ((k // 2, k // 2), (k // 2, k // 2))
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, use_bias=bias,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _gn(channels: int, groups: int, eps: float, *, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm computed in fp32 (exact two-pass variance, as PyTorch)."""
  return nnx.GroupNorm(channels, groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


def _norm(gn: nnx.GroupNorm, x: jax.Array, dtype) -> jax.Array:
  return gn(x.astype(jnp.float32)).astype(dtype)


def _upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 upsampling of an NHWC tensor."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ----------------------------------------------------------------------------------------
# AutoencoderKL (diffusers layout)
# ----------------------------------------------------------------------------------------

class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv ×2 with a 1×1 shortcut when channels change (diffusers ResnetBlock2D)."""

  def __init__(self, cin: int, cout: int, groups: int, eps: float, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.norm1 = _gn(cin, groups, eps, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, **kw)
    self.norm2 = _gn(cout, groups, eps, param_dtype=param_dtype, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, **kw)
    self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(_norm(self.norm1, x, self.dtype)))
    h = self.conv2(nnx.silu(_norm(self.norm2, h, self.dtype)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head spatial self-attention with GroupNorm and a residual (diffusers Attention)."""

  def __init__(self, c: int, groups: int, eps: float, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.group_norm = _gn(c, groups, eps, param_dtype=param_dtype, rngs=rngs)
    self.to_q = nnx.Linear(c, c, **kw)
    self.to_k = nnx.Linear(c, c, **kw)
    self.to_v = nnx.Linear(c, c, **kw)
    self.to_out = nnx.List([nnx.Linear(c, c, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = _norm(self.group_norm, x, self.dtype).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    p = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = self.to_out[0](jnp.einsum("bqk,bkc->bqc", p, v))
    return x + o.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """ResNet, optional attention, ResNet at the lowest resolution."""

  def __init__(self, c: int, groups: int, eps: float, add_attention: bool, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(c, c, groups, eps, **kw), ResnetBlock(c, c, groups, eps, **kw)])
    self.attentions = nnx.List([AttentionBlock(c, groups, eps, **kw)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for a in self.attentions:
      x = a(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3×3 conv with the SD VAE's asymmetric (0, 1) zero padding."""

  def __init__(self, c: int, *, dtype, param_dtype, rngs):
    self.conv = _conv(c, c, 3, stride=2, pad=((0, 1), (0, 1)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest ×2 then a 3×3 conv."""

  def __init__(self, c: int, *, dtype, param_dtype, rngs):
    self.conv = _conv(c, c, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(_upsample2x(x))


class EncoderBlock(nnx.Module):
  """`layers` ResNet blocks, then an optional Downsample (diffusers DownEncoderBlock2D)."""

  def __init__(self, cin: int, cout: int, layers: int, groups: int, eps: float, down: bool, *,
               dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, groups, eps, **kw) for j in range(layers)])
    self.downsamplers = nnx.List([Downsample(cout, **kw)] if down else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class DecoderBlock(nnx.Module):
  """`layers` ResNet blocks, then an optional Upsample (diffusers UpDecoderBlock2D)."""

  def __init__(self, cin: int, cout: int, layers: int, groups: int, eps: float, up: bool, *,
               dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, groups, eps, **kw) for j in range(layers)])
    self.upsamplers = nnx.List([Upsample(cout, **kw)] if up else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class KLEncoder(nnx.Module):
  """Image -> 2·latent_channels moments (mean, log-variance)."""

  def __init__(self, in_ch: int, latent: int, boc: Sequence[int], layers: int, groups: int,
               mid_attention: bool, *, dtype, param_dtype, rngs, eps: float = 1e-6):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.conv_in = _conv(in_ch, boc[0], 3, **kw)
    blocks, cin = [], boc[0]
    for i, c in enumerate(boc):
      blocks.append(EncoderBlock(cin, c, layers, groups, eps, i < len(boc) - 1, **kw))
      cin = c
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(boc[-1], groups, eps, mid_attention, **kw)
    self.conv_norm_out = _gn(boc[-1], groups, eps, param_dtype=param_dtype, rngs=rngs)
    self.conv_out = _conv(boc[-1], 2 * latent, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(_norm(self.conv_norm_out, x, self.dtype)))


class KLDecoder(nnx.Module):
  """Latent -> image; up blocks have layers_per_block + 1 ResNets."""

  def __init__(self, out_ch: int, latent: int, boc: Sequence[int], layers: int, groups: int,
               mid_attention: bool, *, dtype, param_dtype, rngs, eps: float = 1e-6):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    rev = list(reversed(boc))
    self.conv_in = _conv(latent, rev[0], 3, **kw)
    self.mid_block = MidBlock(rev[0], groups, eps, mid_attention, **kw)
    blocks, cin = [], rev[0]
    for i, c in enumerate(rev):
      blocks.append(DecoderBlock(cin, c, layers + 1, groups, eps, i < len(rev) - 1, **kw))
      cin = c
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = _gn(boc[0], groups, eps, param_dtype=param_dtype, rngs=rngs)
    self.conv_out = _conv(boc[0], out_ch, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for b in self.up_blocks:
      x = b(x)
    return self.conv_out(nnx.silu(_norm(self.conv_norm_out, x, self.dtype)))


class AutoencoderKL(nnx.Module):
  """The LDM KL autoencoder in diffusers layout; `encode` returns the posterior mean (NHWC).

  Inputs are in [-1, 1]. `scaling_factor`/`shift_factor` are not applied by encode/decode
  (as in diffusers); `encode_gray`/`decode_gray` apply them: z = (mean - shift)·scale.
  """

  input_range = (-1.0, 1.0)

  def __init__(self, *, in_channels: int = 3, out_channels: int = 3,
               block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
               latent_channels: int = 4, norm_num_groups: int = 32, scaling_factor: float = 0.18215,
               shift_factor: float = 0.0, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
               mid_block_add_attention: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    boc = tuple(int(c) for c in block_out_channels)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.in_channels, self.out_channels, self.latent_channels = in_channels, out_channels, latent_channels
    self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor or 0.0)
    self.downscale = 2 ** (len(boc) - 1)
    self.encoder = KLEncoder(in_channels, latent_channels, boc, layers_per_block, norm_num_groups,
                             mid_block_add_attention, **kw)
    self.decoder = KLDecoder(out_channels, latent_channels, boc, layers_per_block, norm_num_groups,
                             mid_block_add_attention, **kw)
    self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, **kw) if use_quant_conv else None
    self.post_quant_conv = _conv(latent_channels, latent_channels, 1, **kw) if use_post_quant_conv else None

  def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (mean, logvar) of q(z|x), logvar clamped to [-30, 20] as in diffusers."""
    h = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x: jax.Array) -> jax.Array:
    """NHWC image in [-1, 1] -> posterior mean (B, H/f, W/f, latent_channels)."""
    return self.encode_moments(x)[0]

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latent -> NHWC image in (about) [-1, 1]."""
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


# ----------------------------------------------------------------------------------------
# TAEF2
# ----------------------------------------------------------------------------------------

class ReLU(nnx.Module):
  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(x)


class Clamp(nnx.Module):
  """Soft clamp of the decoder input: tanh(x/3)·3."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(x / 3.0) * 3.0


class Upsample2x(nnx.Module):
  def __call__(self, x: jax.Array) -> jax.Array:
    return _upsample2x(x)


class TaeBlock(nnx.Module):
  """Three 3×3 convs with ReLUs and an identity skip; optionally a GroupNorm "pool" residual first."""

  def __init__(self, c: int, midblock_gn: bool, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.conv = nnx.List([_conv(c, c, 3, **kw), ReLU(), _conv(c, c, 3, **kw), ReLU(), _conv(c, c, 3, **kw)])
    self.pool = nnx.List([
        _conv(c, 4 * c, 1, bias=False, **kw), _gn(4 * c, 4, 1e-5, param_dtype=param_dtype, rngs=rngs),
        ReLU(), _conv(4 * c, c, 1, bias=False, **kw)]) if midblock_gn else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool is not None:
      h = self.pool[0](x)
      h = self.pool[3](nnx.relu(_norm(self.pool[1], h, self.dtype)))
      x = x + h
    h = x
    for layer in self.conv:
      h = layer(h)
    return nnx.relu(h + x)


class _Sequential(nnx.Module):
  """A list of layers addressed by their PyTorch nn.Sequential index (`layers.<i>`)."""

  def __init__(self, layers: list):
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class TAEF2(nnx.Module):
  """Tiny autoencoder for the FLUX.2 latent space: RGB in [0, 1] <-> 32-channel latent at 1/8.

  Every 3×3 conv (stride 2 included) pads 1 on both sides, like PyTorch; the encoder is
  deterministic (`encode` returns the latent itself). No scaling or shift (s = 1).
  """

  input_range = (0.0, 1.0)

  def __init__(self, *, channels: int = 64, latent_channels: int = 32, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = channels
    self.dtype = dtype
    self.in_channels, self.out_channels, self.latent_channels = 3, 3, latent_channels
    self.scaling_factor, self.shift_factor = 1.0, 0.0
    self.downscale = 8

    def blk(gn=False):
      return TaeBlock(c, gn, **kw)

    def down():
      return _conv(c, c, 3, stride=2, bias=False, **kw)

    self.encoder = _Sequential([
        _conv(3, c, 3, **kw), blk(),
        down(), blk(), blk(), blk(),
        down(), blk(), blk(), blk(),
        down(), blk(True), blk(True), blk(True),
        _conv(c, latent_channels, 3, **kw)])

    def up():
      return _conv(c, c, 3, bias=False, **kw)

    self.decoder = _Sequential([
        Clamp(), _conv(latent_channels, c, 3, **kw), ReLU(),
        blk(True), blk(True), blk(True), Upsample2x(), up(),
        blk(), blk(), blk(), Upsample2x(), up(),
        blk(), blk(), blk(), Upsample2x(), up(),
        blk(), _conv(c, 3, 3, **kw)])

  def encode(self, x: jax.Array) -> jax.Array:
    """NHWC RGB in [0, 1] -> latent (B, H/8, W/8, 32)."""
    return self.encoder(x.astype(self.dtype))

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent -> NHWC RGB in (about) [0, 1]."""
    return self.decoder(z.astype(self.dtype))


Vae = AutoencoderKL | TAEF2


# ----------------------------------------------------------------------------------------
# Grayscale wrappers: the project's images are (B, H, W) float32 in [0, 1].
# ----------------------------------------------------------------------------------------

def encode_gray(vae: Vae, images01: jax.Array) -> jax.Array:
  """(B, H, W) in [0, 1] -> scaled latent z = (E(x) - shift)·scale, (B, H/f, W/f, C), float32.

  The gray channel is replicated to the VAE's input channels and mapped to its input range.
  """
  lo, hi = vae.input_range
  x = images01.astype(jnp.float32)[..., None] * (hi - lo) + lo
  x = jnp.broadcast_to(x, x.shape[:-1] + (vae.in_channels,))
  z = vae.encode(x).astype(jnp.float32)
  return (z - vae.shift_factor) * vae.scaling_factor


def decode_gray(vae: Vae, z: jax.Array) -> jax.Array:
  """Scaled latent -> (B, H, W) in [0, 1]: undo scale/shift, decode, average the channels, clip."""
  lo, hi = vae.input_range
  x = vae.decode(z.astype(jnp.float32) / vae.scaling_factor + vae.shift_factor).astype(jnp.float32)
  return jnp.clip((jnp.mean(x, axis=-1) - lo) / (hi - lo), 0.0, 1.0)


def codec(vae: Vae) -> mix.Codec:
  """The frozen VAE as the grey-image encode/decode pair of its state that synthesis runs."""
  graphdef, state = nnx.split(vae)
  return mix.Codec(state, lambda s, x: encode_gray(nnx.merge(graphdef, s), x),
                   lambda s, z: decode_gray(nnx.merge(graphdef, s), z))


# ----------------------------------------------------------------------------------------
# Config, factory, loader
# ----------------------------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
  """VAE config: `kind`, `path` (None = random init) and the architecture fields for random init.

  For `autoencoder_kl`, a diffusers directory's config.json, or the tensor shapes of a
  single checkpoint file, override the architecture fields when loading.
  """
  c = ml_collections.ConfigDict()
  c.kind = KIND_TAEF2          # "taef2" | "autoencoder_kl"
  c.path = ml_collections.config_dict.placeholder(str)  # taef2: dir with taef2_{encoder,decoder}.safetensors or .pth
  c.dtype = "float32"          # compute dtype ("bfloat16" for bf16 compute); params stay float32
  c.seed = 0                   # random-init seed
  # TAEF2 random init
  c.taef2_channels = 64
  c.taef2_latent_channels = 32
  # AutoencoderKL (SD kl-f8 defaults)
  c.in_channels = 3
  c.out_channels = 3
  c.block_out_channels = (128, 256, 512, 512)
  c.layers_per_block = 2
  c.latent_channels = 4
  c.norm_num_groups = 32
  c.scaling_factor = 0.18215
  c.shift_factor = 0.0
  c.use_quant_conv = True
  c.use_post_quant_conv = True
  c.mid_block_add_attention = True
  c.layout = "auto"            # single-file checkpoints: "auto" | "diffusers" | "compvis"
  return c


def _dtype(cfg) -> jnp.dtype:
  try:
    return jnp.dtype(cfg.dtype)
  except TypeError as e:
    raise ValueError(f"vae.dtype: expected a dtype name such as 'float32' or 'bfloat16', got {cfg.dtype!r}") from e


def build_vae(cfg: ml_collections.ConfigDict) -> Vae:
  """A randomly initialised VAE of `cfg.kind` with the config's architecture."""
  dt = _dtype(cfg)
  rngs = nnx.Rngs(int(cfg.seed))
  if cfg.kind == KIND_TAEF2:
    return TAEF2(channels=int(cfg.taef2_channels), latent_channels=int(cfg.taef2_latent_channels),
                 dtype=dt, rngs=rngs)
  if cfg.kind == KIND_KL:
    groups = int(cfg.norm_num_groups)
    bad = [c for c in cfg.block_out_channels if c % groups]
    if bad:
      raise ValueError(f"vae.block_out_channels {tuple(cfg.block_out_channels)}: every entry must be "
                       f"divisible by vae.norm_num_groups={groups}")
    return AutoencoderKL(
        in_channels=int(cfg.in_channels), out_channels=int(cfg.out_channels),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=int(cfg.layers_per_block),
        latent_channels=int(cfg.latent_channels), norm_num_groups=groups,
        scaling_factor=float(cfg.scaling_factor), shift_factor=float(cfg.shift_factor or 0.0),
        use_quant_conv=bool(cfg.use_quant_conv), use_post_quant_conv=bool(cfg.use_post_quant_conv),
        mid_block_add_attention=bool(cfg.mid_block_add_attention), dtype=dt, rngs=rngs)
  raise ValueError(f"vae.kind: expected {KIND_TAEF2!r} or {KIND_KL!r}, got {cfg.kind!r}")


def downscale_factor(cfg: ml_collections.ConfigDict) -> int | None:
  """Image-to-latent downscale of the VAE `cfg` describes (TAEF2: 8; AutoencoderKL: 2 per extra level), or None
  when an AutoencoderKL file will bring its own architecture."""
  if cfg.kind == KIND_TAEF2:
    return 8
  if cfg.kind == KIND_KL and cfg.path is None:
    return 2 ** (len(cfg.block_out_channels) - 1)
  return None


def load_vae(cfg: ml_collections.ConfigDict) -> Vae:
  """Builds the VAE of `cfg` and loads `cfg.path` into it (random init when path is None)."""
  if cfg.path is None:
    return build_vae(cfg)
  path = os.fspath(cfg.path)
  if cfg.kind == KIND_TAEF2:
    tensors = vae_convert.read_taef2(path)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.taef2_latent_channels = int(tensors["encoder.layers.14.weight"].shape[0])
      cfg.taef2_channels = int(tensors["encoder.layers.0.weight"].shape[0])
  elif cfg.kind == KIND_KL:
    tensors, arch = vae_convert.read_autoencoder_kl(path, layout=cfg.layout)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      for k, v in arch.items():
        cfg[k] = v
  else:
    raise ValueError(f"vae.kind: expected {KIND_TAEF2!r} or {KIND_KL!r}, got {cfg.kind!r}")
  model = nnx.eval_shape(lambda: build_vae(cfg))  # shapes only: every parameter comes from the file
  vae_convert.assign_torch_state(model, tensors, source=path)
  abstract = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"{path}: the VAE state {abstract[:3]} was not filled from the checkpoint")
  return model
