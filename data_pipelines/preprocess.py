"""Image, mask and CLIP-input preprocessing as the MediCLIP reference does it.

Host side (PIL, for parity with the reference's antialiased resizes):
  training image: open -> resize BILINEAR -> "L" -> uint8 / 255   (H, W) float32
  test image:     open -> "RGB" -> resize BILINEAR -> "L" -> / 255 (H, W) float32
                  (the released images have R = G = B, and PIL's "L" weights sum to
                  exactly 1, so this is the single channel the reference feeds thrice)
  mask:           open -> "L" -> resize NEAREST -> != 0              (H, W) float32 {0, 1}
The device side (grayscale -> 3-channel CLIP input) is `mediclip_jax.models.clip.clip_normalize`,
which runs inside the jitted step.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

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


def load_test_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
  """Test image as the reference reads it: RGB first, then resize; one gray channel."""
  im = _open(path).convert("RGB").resize((size, size), Image.BILINEAR).convert("L")
  return np.asarray(im, np.uint8).astype(np.float32) / 255.0


def load_mask(path: str | os.PathLike | None, size: int = 224) -> np.ndarray:
  """Binary lesion mask: any non-zero pixel after a NEAREST resize is lesion
  (the reference rule; JPEG ringing counts). None gives an all-zero mask."""
  if path is None:
    return np.zeros((size, size), np.float32)
  im = _open(path).convert("L").resize((size, size), Image.NEAREST)
  return (np.asarray(im) != 0).astype(np.float32)


def load_images(paths: Sequence[str | os.PathLike], size: int = 224, train: bool = True) -> np.ndarray:
  """(N, size, size) float32 stack of training (or test) images."""
  fn = load_train_image if train else load_test_image
  if not paths:
    return np.zeros((0, size, size), np.float32)
  return np.stack([fn(p, size) for p in paths])


def otsu_threshold(gray: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold of a [0, 1] image (maximises the between-class variance)."""
  hist, edges = np.histogram(np.clip(gray, 0, 1), bins=bins, range=(0.0, 1.0))
  p = hist.astype(np.float64) / max(hist.sum(), 1)
  centers = 0.5 * (edges[:-1] + edges[1:])
  w0 = np.cumsum(p)
  m0 = np.cumsum(p * centers)
  mt = m0[-1]
  w1 = 1.0 - w0
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (mt * w0 - m0) ** 2 / (w0 * w1)
  between[~np.isfinite(between)] = -1.0
  return float(edges[int(np.argmax(between)) + 1])


def _shift_or(m: np.ndarray, r: int, op) -> np.ndarray:
  """Square dilation (op=np.logical_or) or erosion (np.logical_and) of radius r."""
  h, w = m.shape
  pad_val = op is np.logical_and
  p = np.pad(m, r, constant_values=pad_val)
  out = p[r:r + h, r:r + w].copy()
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      op(out, p[r + dy:r + dy + h, r + dx:r + dx + w], out=out)
  return out


def foreground_mask(gray: np.ndarray, threshold: float | None = None, closing: int = 3) -> np.ndarray:
  """Body/foreground mask of a grayscale image (H, W) in [0, 1], as bool.

  Threshold (Otsu when None) -> largest connected component -> morphological
  closing of radius `closing` -> holes filled. Used to keep synthetic anomalies
  inside the anatomy instead of the black background.
  """
  from mediclip_jax.evaluate.metrics import mask_regions  # numpy-only labelling

  g = np.asarray(gray, np.float32)
  if g.ndim != 2:
    raise ValueError(f"foreground_mask expects one (H, W) image, got shape {g.shape}")
  t = otsu_threshold(g) if threshold is None else float(threshold)
  m = g > t
  labels, n = mask_regions(m)
  if n == 0:
    return np.zeros_like(m)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  sizes[0] = 0
  m = labels == int(np.argmax(sizes))
  if closing > 0:
    m = _shift_or(_shift_or(m, closing, np.logical_or), closing, np.logical_and)
  # Fill holes: background components not touching the border.
  bg, nb = mask_regions(~m, connectivity=4)
  border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
  holes = (bg > 0) & ~np.isin(bg, border)
  return m | holes
