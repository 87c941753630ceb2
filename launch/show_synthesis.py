"""Writes a PNG grid of what the model is trained on: for each pixel task, original, synthesised, mask overlay.

Reads the first normal training images of a MediCLIP-layout dataset
(`<root>/samples/train.json`), runs every task of `mix.TASKS` on them with the JAX
synthesis, and writes one row per (task, image): original | synthesised | mask in red
over the synthesised image. Default output: out/synthesis/<dataset>_pixel.png
(<dataset> = the root folder's name; out/ is gitignored).

  python launch/show_synthesis.py --data ../shared/data/brainmri
  python launch/show_synthesis.py --data ../shared/data/busi --paste-mode poisson --foreground-only
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mediclip_jax.synthesis import data, mix


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True, help="MediCLIP-layout dataset root, e.g. ../shared/data/brainmri")
  ap.add_argument("--out", default=None, help="PNG path (default out/synthesis/<dataset>_pixel.png)")
  ap.add_argument("--images", type=int, default=3, help="images per task")
  ap.add_argument("--support", type=int, default=16, help="support images used as cut-paste sources")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--paste-mode", default="hard", choices=["hard", "poisson"])
  ap.add_argument("--foreground-only", action="store_true", help="keep anomalies inside the body region")
  args = ap.parse_args()

  root = Path(args.data)
  out = Path(args.out) if args.out else Path("out") / "synthesis" / f"{root.resolve().name}_pixel.png"
  support = data.read_images(root, n=args.support, size=args.size)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = args.paste_mode
  cfg.pixel.shapes.foreground_only = args.foreground_only
  mix.validate_config(cfg)
  n = min(args.images, len(support))
  key = jax.random.key(args.seed)
  rows = []
  for t, name in enumerate(mix.TASKS):
    fn = jax.jit(jax.vmap(functools.partial(mix.apply_task, t, support=jnp.asarray(support), cfg=cfg)))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, t), i))(jnp.arange(n))
    img, mask = jax.device_get(fn(keys, jnp.asarray(support[:n])))
    for i in range(n):
      orig = np.repeat(support[i][..., None], 3, -1)
      syn = np.repeat(img[i][..., None], 3, -1)
      over = syn * (1 - 0.5 * mask[i][..., None]) + 0.5 * mask[i][..., None] * np.array([1.0, 0.0, 0.0])
      rows.append(np.concatenate([orig, syn, over], 1))
    print(f"{name:16s} mask fraction {float(mask.mean()):.3f}")
  grid = np.concatenate(rows, 0)
  out.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.clip(grid * 255 + 0.5, 0, 255).astype(np.uint8)).save(out)
  print(f"wrote {out} ({len(mix.TASKS)} tasks × {n} images; columns: original | synthesised | mask overlay)")


if __name__ == "__main__":
  main()
