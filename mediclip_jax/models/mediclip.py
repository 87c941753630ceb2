"""The MediCLIP detector: frozen CLIP + learnable prompts + adapters + map maker + image score.

Only `prompts` and `adapters` hold trainable parameters (see `TRAINABLE`); the CLIP towers
stay frozen. Maps are computed as in the reference: per tapped layer the cosine similarity of
the adapted patch tokens with the two class text features, averaged over layers, bilinearly
upsampled with align_corners=True, then a 2-way softmax (optionally with a logit scale).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.models.adapters import Adapters
from mediclip_jax.models.clip import CLIP
from mediclip_jax.models.prompts import ABNORMAL_WORDS, NORMAL_WORDS, PromptLearner
from mediclip_jax.weights.tokenizer import Tokenizer

# Parameters the optimiser updates; everything else (the CLIP towers) is frozen.
TRAINABLE = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("prompts"), nnx.PathContains("adapters")))


@functools.lru_cache(maxsize=16)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation matrix with align_corners=True (PyTorch semantics)."""
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
  i0 = np.clip(np.floor(src).astype(int), 0, n_in - 2)
  frac = src - i0
  m[np.arange(n_out), i0] = 1 - frac
  m[np.arange(n_out), i0 + 1] += frac
  return m


def upsample_align_corners(x: jax.Array, size: int) -> jax.Array:
  """(B, g, g, ...) -> (B, size, size, ...) bilinear, align_corners=True, via two small matmuls."""
  m = jnp.asarray(align_corners_matrix(x.shape[1], size))
  return jnp.einsum("ih,jw,bhw...->bij...", m, m, x, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass
class DetectorOutput:
  """`prob_abnormal`: (B, H, W) anomaly map in [0,1]; `score`: (B,) image score (max of the map)."""
  prob_abnormal: jax.Array
  score: jax.Array


jax.tree_util.register_dataclass(DetectorOutput, data_fields=["prob_abnormal", "score"], meta_fields=[])


class MediCLIP(nnx.Module):
  """MediCLIP few-shot anomaly detector around a CLIP backbone."""

  def __init__(self, clip: CLIP, tokenizer: Tokenizer, *, tap_layers: tuple[int, ...] = (12, 18, 24),
               n_ctx: int = 8, ctx_init_std: float = 0.02, causal_text_mask: bool = False,
               logit_scale: float | None = None, class_words=(NORMAL_WORDS, ABNORMAL_WORDS), rngs: nnx.Rngs):
    cfg = clip.cfg
    if not tap_layers:
      raise ValueError("model.tap_layers must name at least one layer")
    bad = [t for t in tap_layers if not 1 <= t <= cfg.vision_layers]
    if bad:
      raise ValueError(f"model.tap_layers {bad} outside 1..{cfg.vision_layers} of this backbone")
    self.clip = clip
    self.tap_layers = tuple(int(t) for t in tap_layers)
    self.logit_scale = logit_scale
    self.prompts = PromptLearner(tokenizer, cfg.text_width, class_words, n_ctx=n_ctx, init_std=ctx_init_std,
                                 causal_mask=causal_text_mask, rngs=rngs)
    self.adapters = Adapters(len(self.tap_layers), cfg.vision_width, cfg.embed_dim, rngs=rngs)

  def text_features(self) -> jax.Array:
    """T: (embed_dim, 2), unit columns, column 0 normal. Independent of the image."""
    return self.prompts(self.clip.text)

  def patch_similarities(self, images: jax.Array, text_features: jax.Array) -> jax.Array:
    """Layer-averaged cosine similarities on the patch grid: (B, g, g, 2), fp32."""
    taps = self.clip.visual(images, tap_layers=self.tap_layers).taps
    taps = [jax.lax.stop_gradient(t[:, 1:]) for t in taps]  # frozen backbone, CLS dropped
    feats = self.adapters(taps)
    sims = jnp.mean(jnp.stack([f @ text_features for f in feats]), axis=0)  # (B, N, 2)
    g = int(round(sims.shape[1] ** 0.5))
    return sims.reshape(sims.shape[0], g, g, -1)

  def __call__(self, images: jax.Array, text_features: jax.Array | None = None) -> DetectorOutput:
    """images: (B, H, W, 3) CLIP-normalised. Pass cached `text_features` at evaluation."""
    t = self.text_features() if text_features is None else text_features
    sims = upsample_align_corners(self.patch_similarities(images, t), images.shape[1])
    diff = sims[..., 1] - sims[..., 0]
    if self.logit_scale is not None:
      diff = diff * self.logit_scale
    prob = jax.nn.sigmoid(diff)  # == softmax over the two classes, abnormal channel
    return DetectorOutput(prob_abnormal=prob, score=jnp.max(prob, axis=(1, 2)))
