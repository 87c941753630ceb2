"""Tiny CLIP for CPU tests and smoke runs (random init, ~2 M parameters with the token table).

The backbone section that every experiment config shares; `arg` picks another architecture
by name or points at converted weights, e.g.

  --config configs/tiny.py                       # the tiny random CLIP
  --config configs/tiny.py:variant=ViT-B-16      # ViT-B-32 | ViT-B-16 | ViT-L-14 | ViT-L-14-336 | tiny
  --config configs/tiny.py:variant=ViT-L-14,checkpoint=ckpt/vit_l14   # after launch/convert_weights.py
"""
import ml_collections

from mediclip_jax import config_defaults
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="tiny", checkpoint="")
  config = ml_collections.ConfigDict()
  config.seed = 100
  config.model = ml_collections.ConfigDict()
  config.model.clip = config_defaults.clip_config(arg.variant, arg.checkpoint or None)
  return config
