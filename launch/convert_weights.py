"""Converts CLIP weights (Hugging Face dir, OpenAI/open_clip .pt/.bin/.safetensors) to our format.

  python launch/convert_weights.py --src ~/models/clip-vit-large-patch14 --out ckpt/vit_l14
  python launch/convert_weights.py --src ViT-L-14.pt --out ckpt/vit_l14            # OpenAI TorchScript
  python launch/convert_weights.py --src open_clip_model.safetensors --act gelu --out ckpt/x

The output directory holds clip_config.json and model.safetensors (fp32), readable without torch;
point `model.clip.checkpoint` at it. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from mediclip_jax.weights.clip_convert import load_clip, save_clip
from mediclip_jax.weights.io import CheckpointError
from mediclip_jax.weights.params import flat_params


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="checkpoint file or directory")
  p.add_argument("--out", required=True, help="output directory (must not hold another checkpoint)")
  p.add_argument("--act", choices=["quick_gelu", "gelu"], default=None,
                 help="activation for OpenAI-layout files (OpenAI weights: quick_gelu; most open_clip: gelu)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
  args = p.parse_args(argv)
  if os.path.exists(os.path.join(args.out, "model.safetensors")) and not args.overwrite:
    print(f"error: {args.out} already holds a checkpoint; pass --overwrite to replace it", file=sys.stderr)
    return 2
  try:
    model = load_clip(args.src, act=args.act)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  save_clip(model, args.out)
  n = sum(int(np.prod(v.shape)) for v in flat_params(model).values())
  print(f"wrote {args.out}: {model.cfg} ({n / 1e6:.1f} M parameters)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
