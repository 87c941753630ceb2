"""Config building blocks shared by the files in configs/ (each file documents its launch command)."""
from __future__ import annotations

import ml_collections

from mediclip_jax.models.clip import VARIANTS, get_variant

# MediCLIP taps the residual stream after blocks 12, 18, 24 of ViT-L/14 (1-based). For other depths
# we keep the same relative depths: half, three quarters and the last block.
REFERENCE_TAPS = {"ViT-L-14": (12, 18, 24), "ViT-L-14-336": (12, 18, 24)}


def default_taps(variant: str) -> tuple[int, ...]:
  cfg = get_variant(variant)
  if variant in REFERENCE_TAPS:
    return REFERENCE_TAPS[variant]
  n = cfg.vision_layers
  return tuple(sorted({max(1, n // 2), max(1, 3 * n // 4), n}))


def clip_config(variant: str = "ViT-L-14", checkpoint: str | None = None) -> ml_collections.ConfigDict:
  """The backbone section: an architecture by name, optional weights, precision and taps.

  `variant` is one of VARIANTS (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, tiny). With a
  `checkpoint` the architecture comes from the checkpoint and `variant` is checked against it.
  """
  arch = get_variant(variant)
  return ml_collections.ConfigDict({
      "variant": variant,
      "checkpoint": checkpoint,  # HF dir, OpenAI/open_clip file, or our own converted dir; None = random init
      "act": ml_collections.FieldReference(None, field_type=str),  # override (quick_gelu | gelu); None = checkpoint's
      "image_size": arch.image_size,
      "tap_layers": default_taps(variant),
      "dtype": "float32",  # compute dtype: float32 | bfloat16; parameters stay float32
      "random_init_seed": 0,
  })


def variants() -> tuple[str, ...]:
  return tuple(VARIANTS)
