"""CLIP ViT image and text towers (OpenAI / open_clip architecture) in Flax NNX.

Pre-LayerNorm transformers with fused QKV projections. The vision tower returns
the raw residual stream after configured blocks (1-based, "after block i"),
which is what MediCLIP's adapters consume, plus the pooled, projected CLS
embedding. Position embeddings are stored at the checkpoint's grid and resampled
(bicubic, as PyTorch's `F.interpolate(align_corners=False)`) when an image of
another size comes in, so one checkpoint serves any input size.

Dtype policy: parameters are created (and stored) in `param_dtype` (fp32);
matmuls, attention and the residual stream run in `dtype` (e.g. bf16).
LayerNorm statistics and the attention softmax are computed in fp32.

Building from weights: `load_clip` (any checkpoint `mediclip_jax.weights.clip_convert` reads,
architecture taken from the checkpoint), `clip_from_config` (a config's `model.clip` section)
and `save_clip` (our own format).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.weights import clip_convert
from mediclip_jax.weights.io import CheckpointError
from mediclip_jax.weights.params import assign_flat_params, flat_params

Activation = Literal["quick_gelu", "gelu"]


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a CLIP ViT model (both towers)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  text_width: int
  text_layers: int
  text_heads: int
  context_length: int = 77
  vocab_size: int = 49408
  mlp_ratio: float = 4.0
  act: Activation = "quick_gelu"
  ln_eps: float = 1e-5

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown CLIP config fields {unknown}; expected a subset of {sorted(names)}")
    return cls(**d)


# The OpenAI checkpoints use QuickGELU; MediCLIP's backbone is ViT-L/14 at 224.
VARIANTS: dict[str, CLIPConfig] = {
    "ViT-B-32": CLIPConfig(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B-16": CLIPConfig(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-L-14": CLIPConfig(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L-14-336": CLIPConfig(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    # A few-hundred-thousand-parameter model (plus the 49,408-token embedding) for CPU tests.
    "tiny": CLIPConfig(32, 32, 8, 64, 4, 4, 32, 2, 4),
}


def get_variant(name: str, **overrides) -> CLIPConfig:
  """Returns the named architecture, optionally with fields replaced (e.g. act='gelu')."""
  aliases = {n.lower().replace("/", "-"): n for n in VARIANTS}
  key = aliases.get(name.lower().replace("/", "-"))
  if key is None:
    raise ValueError(f"unknown CLIP variant {name!r}; expected one of {sorted(VARIANTS)}")
  return dataclasses.replace(VARIANTS[key], **overrides)


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  raise ValueError(f"CLIP act must be 'quick_gelu' or 'gelu', got {name!r}")


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for offsets t in [0,1) (PyTorch's a = -0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch bicubic resampling (align_corners=False, clamped borders)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    i0 = math.floor(src)
    w = _cubic_weights(np.array(src - i0))
    for k in range(4):
      m[i, min(max(i0 - 1 + k, 0), n_in - 1)] += w[k]
  return m


def resize_pos_embed(pos: jax.Array, new_grid: int) -> jax.Array:
  """Resamples a (1 + g*g, W) CLS+grid position embedding to (1 + n*n, W) bicubically."""
  old_grid = math.isqrt(pos.shape[0] - 1)
  if old_grid * old_grid != pos.shape[0] - 1:
    raise ValueError(f"position embedding of length {pos.shape[0]} is not 1 + a square grid")
  if old_grid == new_grid:
    return pos
  m = jnp.asarray(bicubic_matrix(old_grid, new_grid), jnp.float32)
  grid = pos[1:].astype(jnp.float32).reshape(old_grid, old_grid, -1)
  grid = jnp.einsum("ih,jw,hwc->ijc", m, m, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(new_grid * new_grid, -1)]).astype(pos.dtype)


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection (OpenAI `in_proj` layout)."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    self.heads = heads
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                            kernel_init=_normal(width ** -0.5), bias_init=nnx.initializers.zeros)
    self.qkv = lin(width, 3 * width)
    self.out = lin(width, width)

  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    b, t, w = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, w // self.heads), 3, axis=2)
    y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=causal)
    return self.out(y.reshape(b, t, w))


class Block(nnx.Module):
  """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = round(width * mlp_ratio)  # round: ratios such as 6144/1408 are not exact in float
    self.ln_1 = nnx.LayerNorm(width, epsilon=ln_eps, **kw)
    self.attn = Attention(width, heads, **kw)
    self.ln_2 = nnx.LayerNorm(width, epsilon=ln_eps, **kw)
    self.fc = nnx.Linear(width, hidden, kernel_init=_normal(width ** -0.5), **kw)
    self.proj = nnx.Linear(hidden, width, kernel_init=_normal(hidden ** -0.5), **kw)
    self.act = _activation(act)

  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    x = x + self.attn(self.ln_1(x), causal)
    return x + self.proj(self.act(self.fc(self.ln_2(x))))


@dataclasses.dataclass
class VisionOutput:
  """`taps[i]`: (B, 1 + grid², width) residual stream after block `tap_layers[i]`; `embedding`: (B, embed_dim)."""
  taps: tuple[jax.Array, ...]
  embedding: jax.Array


jax.tree_util.register_dataclass(VisionOutput, data_fields=["taps", "embedding"], meta_fields=[])


class VisionTower(nnx.Module):
  """ViT image encoder: patchify, CLS + position embeddings, ln_pre, blocks, ln_post on CLS, projection."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    w, p = cfg.vision_width, cfg.patch_size
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = nnx.Param(_normal((3 * p * p) ** -0.5)(rngs.params(), (p, p, 3, w), param_dtype))
    self.class_embedding = nnx.Param(_normal(w ** -0.5)(rngs.params(), (w,), param_dtype))
    self.pos_embed = nnx.Param(_normal(w ** -0.5)(rngs.params(), (1 + cfg.grid_size ** 2, w), param_dtype))
    self.ln_pre = nnx.LayerNorm(w, epsilon=cfg.ln_eps, **kw)
    self.blocks = nnx.List([Block(w, cfg.vision_heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, **kw)
                            for _ in range(cfg.vision_layers)])
    self.ln_post = nnx.LayerNorm(w, epsilon=cfg.ln_eps, **kw)
    self.proj = nnx.Param(_normal(w ** -0.5)(rngs.params(), (w, cfg.embed_dim), param_dtype))

  def __call__(self, images: jax.Array, tap_layers: tuple[int, ...] = ()) -> VisionOutput:
    """images: (B, H, W, 3) CLIP-normalised; H, W multiples of the patch size."""
    b, h, w_img, c = images.shape
    p = self.cfg.patch_size
    if c != 3 or h % p or w_img % p or h != w_img:
      raise ValueError(f"expected square (B, H, W, 3) images with H a multiple of {p}, got {images.shape}")
    for layer in tap_layers:
      if not 1 <= layer <= len(self.blocks):
        raise ValueError(f"tap layer {layer} outside 1..{len(self.blocks)} (1-based, after the block)")
    g = h // p
    x = images.astype(self.dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = jnp.einsum("bijpqc,pqcw->bijw", x, self.patch_embed[...].astype(self.dtype)).reshape(b, g * g, -1)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + resize_pos_embed(self.pos_embed[...], g).astype(self.dtype)
    x = self.ln_pre(x)
    taps = {}
    wanted = set(tap_layers)
    for i, block in enumerate(self.blocks, start=1):
      x = block(x)
      if i in wanted:
        taps[i] = x
    pooled = self.ln_post(x[:, 0]) @ self.proj[...].astype(self.dtype)
    return VisionOutput(taps=tuple(taps[i] for i in tap_layers), embedding=pooled)


class TextTower(nnx.Module):
  """Text encoder: token + position embeddings, blocks, ln_final, projection at the EOT token."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    w = cfg.text_width
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Param(_normal(0.02)(rngs.params(), (cfg.vocab_size, w), param_dtype))
    self.pos_embed = nnx.Param(_normal(0.01)(rngs.params(), (cfg.context_length, w), param_dtype))
    self.blocks = nnx.List([Block(w, cfg.text_heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, **kw)
                            for _ in range(cfg.text_layers)])
    self.ln_final = nnx.LayerNorm(w, epsilon=cfg.ln_eps, **kw)
    self.proj = nnx.Param(_normal(w ** -0.5)(rngs.params(), (w, cfg.embed_dim), param_dtype))

  def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
    """(N, T) int ids -> (N, T, width) token embeddings (no position embedding)."""
    return self.token_embedding[...][token_ids].astype(self.dtype)

  def encode_embeddings(self, x: jax.Array, eot_index: jax.Array, causal: bool = True) -> jax.Array:
    """Runs the transformer on ready token embeddings (N, T, width); returns (N, embed_dim) at `eot_index`.

    This is the path learnable prompts take: MediCLIP's reference calls it with `causal=False`.
    """
    t = x.shape[1]
    if t > self.cfg.context_length:
      raise ValueError(f"sequence length {t} exceeds the context length {self.cfg.context_length}")
    x = x.astype(self.dtype) + self.pos_embed[...][:t].astype(self.dtype)
    for block in self.blocks:
      x = block(x, causal=causal)
    x = self.ln_final(x)
    eot = jnp.take_along_axis(x, eot_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return eot @ self.proj[...].astype(self.dtype)

  def __call__(self, token_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(N, T) ids from `Tokenizer` -> (N, embed_dim); pools at the EOT token (the largest id)."""
    return self.encode_embeddings(self.embed_tokens(token_ids), jnp.argmax(token_ids, axis=-1), causal)


class CLIP(nnx.Module):
  """Both towers. `logit_scale` is kept for checkpoint completeness (MediCLIP does not use it)."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.visual = VisionTower(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text = TextTower(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), param_dtype))

  def encode_image(self, images: jax.Array) -> jax.Array:
    return self.visual(images).embedding

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    return self.text(token_ids)


def create_clip(cfg: CLIPConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIP:
  """A randomly initialised CLIP (`load_clip` fills one from a checkpoint)."""
  return CLIP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def read_clip(path: str | os.PathLike, config: CLIPConfig | None = None,
              act: str | None = None) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
  """(architecture, flat parameters) of a checkpoint, without building the model.

  `config` replaces the architecture the checkpoint implies (needed for OpenAI-layout files
  whose head width is not 64); `act` overrides the activation of any layout.
  """
  arch, params = clip_convert.read_clip_checkpoint(path, config.to_dict() if config else None, act)
  return CLIPConfig.from_dict(arch), params


def build_clip(cfg: CLIPConfig, params: dict[str, np.ndarray], source: str,
               dtype=jnp.float32, param_dtype=jnp.float32) -> CLIP:
  """A CLIP of architecture `cfg` holding `params` (names and shapes checked, naming `source` in errors)."""
  model = create_clip(cfg, dtype=dtype, param_dtype=param_dtype)
  assign_flat_params(model, params, source)
  return model


def load_clip(path: str | os.PathLike, config: CLIPConfig | None = None, act: str | None = None,
              dtype=jnp.float32, param_dtype=jnp.float32) -> CLIP:
  """Builds a CLIP of the checkpoint's architecture and fills it (shapes and names checked).

  Any ViT architecture loads: it is read from the checkpoint (see `read_clip`).
  """
  cfg, params = read_clip(path, config, act)
  return build_clip(cfg, params, os.fspath(path), dtype=dtype, param_dtype=param_dtype)


def save_clip(model: CLIP, directory: str | os.PathLike) -> None:
  """Writes our own checkpoint format (clip_config.json + fp32 model.safetensors), readable without torch."""
  clip_convert.write_clip_checkpoint(directory, model.cfg.to_dict(), flat_params(model))


# Fields a named variant must share with a checkpoint. Not the image size (position embeddings
# are resampled at call time) nor the activation (a property of the weights, overridable by `act`).
VARIANT_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPConfig) if f.name not in ("image_size", "act"))

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_variant(cfg: CLIPConfig, variant: str, source: str) -> None:
  """Raises CheckpointError naming `source`, `variant` and each field where `cfg` differs from it."""
  expected = get_variant(variant)
  diff = [f"{f}: variant {getattr(expected, f)}, checkpoint {getattr(cfg, f)}"
          for f in VARIANT_FIELDS if getattr(expected, f) != getattr(cfg, f)]
  if diff:
    raise CheckpointError(f"{source}: does not match model.clip.variant={variant!r} ({'; '.join(diff)}); "
                          "leave model.clip.variant unset (its default) to take the checkpoint's architecture")


def clip_from_config(c) -> CLIP:
  """The backbone a config's `model.clip` section describes: a checkpoint's weights, or random init.

  Fields read: `variant` (architecture name or None), `checkpoint` (path or None), `act`
  (None, quick_gelu or gelu), `dtype` (float32 or bfloat16 compute) and `random_init_seed`.
  Without a checkpoint `variant` names the architecture to initialise. With one the
  architecture is the checkpoint's; a `variant` name is then only checked against it.
  """
  dtype = _DTYPES.get(c.dtype)
  if dtype is None:
    raise ValueError(f"model.clip.dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
  if not c.checkpoint:
    if not c.variant:
      raise ValueError("model.clip.variant is required when model.clip.checkpoint is None: random init "
                       f"needs an architecture, one of {sorted(VARIANTS)}")
    overrides = {"act": c.act} if c.act else {}
    return create_clip(get_variant(c.variant, **overrides), seed=c.random_init_seed, dtype=dtype)
  source = os.fspath(c.checkpoint)
  cfg, params = read_clip(source, act=c.act)
  if c.variant:
    check_variant(cfg, c.variant, source)
  return build_clip(cfg, params, source, dtype=dtype)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(gray01: jax.Array) -> jax.Array:
  """(…, H, W) grayscale in [0, 1] -> (…, H, W, 3) CLIP input (channels repeated, OpenAI mean/std)."""
  x = jnp.asarray(gray01, jnp.float32)[..., None]
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
