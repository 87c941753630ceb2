"""Image, mask and CLIP-input preprocessing as the MediCLIP reference does it.

Host side (PIL, for parity with the reference's antialiased resizes):
  training image: open -> resize BILINEAR -> "L" -> uint8 / 255   (H, W) float32
  test image:     open -> "RGB" -> resize BILINEAR -> / 255          (H, W, 3) float32  color="rgb"
                  open -> "RGB" -> resize BILINEAR -> "L" -> / 255   (H, W) float32     color="grey"
  mask:           open -> "L" -> resize NEAREST -> != 0              (H, W) float32 {0, 1}
The reference feeds test images to CLIP as RGB. Most released images have R = G = B, but
not all: in 27 of 220 BrainMRI and 16 of 748 BUSI test images the channels differ, almost
all of them abnormal, so colour leaks the label ("rgb" reproduces it, "grey" removes it).
Grey images become 3-channel CLIP input on the device, inside the jitted step.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _open(path: str | os.PathLike) -> Image.Image:
  try:
    im = Image.open(path)
    im.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read image ({e})") from e
  return im


def load_train_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
  """Training image as the reference reads it: resize first, then grayscale."""
  im = _open(path).resize((size, size), Image.BILINEAR).convert("L")
  return np.asarray(im, np.uint8).astype(np.float32) / 255.0


COLORS = ("rgb", "grey")


def load_test_image(path: str | os.PathLike, size: int = 224, color: str = "grey") -> np.ndarray:
  """Test image as the reference reads it (RGB, then resize): (H, W, 3) for "rgb", one grey channel (H, W)
  for "grey"."""
  if color not in COLORS:
    raise ValueError(f"data.color must be one of {COLORS}, got {color!r}")
  im = _open(path).convert("RGB").resize((size, size), Image.BILINEAR)
  if color == "grey":
    im = im.convert("L")
  return np.asarray(im, np.uint8).astype(np.float32) / 255.0


def load_mask(path: str | os.PathLike | None, size: int = 224) -> np.ndarray:
  """Binary lesion mask: any non-zero pixel after a NEAREST resize is lesion
  (the reference rule; JPEG ringing counts). None gives an all-zero mask."""
  if path is None:
    return np.zeros((size, size), np.float32)
  im = _open(path).convert("L").resize((size, size), Image.NEAREST)
  return (np.asarray(im) != 0).astype(np.float32)


def load_original(path: str | os.PathLike, color: str = "grey") -> np.ndarray:
  """The file's own pixels at its own resolution, grey (H, W) or RGB (H, W, 3) uint8 as `color` reads it:
  what pictures are drawn on."""
  if color not in COLORS:
    raise ValueError(f"data.color must be one of {COLORS}, got {color!r}")
  im = _open(path).convert("RGB")
  return np.asarray(im.convert("L") if color == "grey" else im)


def load_original_mask(path: str | os.PathLike) -> np.ndarray:
  """A mask file at its own resolution as booleans (any non-zero pixel is lesion, as `load_mask`)."""
  return np.asarray(_open(path).convert("L")) != 0
