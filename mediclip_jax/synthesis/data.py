"""Reading normal training images in MediCLIP's layout for synthesis tools and tests.

`<root>/samples/<split>.json` holds one JSON object per line whose "filename" is
relative to `<root>/images` (the authors' release) or to `<root>`. Images are read
as the reference's training path does: PIL, bilinear resize to size², grayscale "L",
then /255 to float32 in [0, 1].
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def sample_paths(root: str | os.PathLike, split: str = "train", label: int | None = 0) -> list[Path]:
  """Image paths listed in `<root>/samples/<split>.json`, optionally only those with `label`."""
  root = Path(root)
  listing = root / "samples" / f"{split}.json"
  if not listing.is_file():
    raise FileNotFoundError(f"{listing} not found: expected MediCLIP's layout <root>/samples/{split}.json")
  out = []
  for line in listing.read_text().splitlines():
    if not line.strip():
      continue
    rec = json.loads(line)
    if label is not None and int(rec.get("label", 0)) != label:
      continue
    name = rec["filename"]
    cands = [root / "images" / name, root / name]
    path = next((c for c in cands if c.is_file()), None)
    if path is None:
      raise FileNotFoundError(f"{name!r} from {listing} is neither under {root / 'images'} nor under {root}")
    out.append(path)
  return out


def read_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
  """One image as float32 (size, size) in [0, 1] (PIL bilinear resize, then grayscale)."""
  with Image.open(path) as im:
    im = im.resize((size, size), Image.Resampling.BILINEAR).convert("L")
    return np.asarray(im, np.float32) / 255.0


def read_images(root: str | os.PathLike, split: str = "train", n: int | None = None, size: int = 224) -> np.ndarray:
  """The first `n` normal images of a split as float32 (n, size, size)."""
  paths = sample_paths(root, split)
  if n is not None:
    paths = paths[:n]
  if not paths:
    raise ValueError(f"no normal images listed for split {split!r} under {root}")
  return np.stack([read_image(p, size) for p in paths])
