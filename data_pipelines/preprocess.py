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

"open" reads a file into an 8-bit grey ("L") or colour ("RGB") image, so that every image goes
through the reference's 8-bit steps above; for "L" and "RGB" files (all released images) it
changes nothing. Per PIL mode:
  L, RGB                    as stored
  1                         "L" (0 or 255)
  P, PA                     "RGB" through the palette (transparency dropped)
  LA, RGBA, RGBX            "L" / "RGB": the alpha channel is dropped, not composited
  CMYK, YCbCr               "RGB" (PIL's conversion)
  I;16, I;16L, I;16B, I;16N 16-bit unsigned (16-bit PNG and TIFF): value / 65535 * 255, rounded
  I                         32-bit signed: values in [0, 65535] are read as 16 bits (value / 65535 * 255);
                            larger values by the type's range (value / (2^31 - 1) * 255); a negative
                            value is an error (signed data such as CT numbers needs a window first)
  F                         32-bit float: values must lie in [0, 1] (value * 255, rounded); values outside,
                            NaN or infinity are errors naming the file. No per-image min-max stretch:
                            it would give every image the same contrast and hide intensity anomalies.
  anything else             an error naming the mode (e.g. I;16S, LAB, HSV)
High bit depths are rounded to 8 bits before the resize, not resized in PIL's float mode "F":
PIL's 8-bit resize rounds between its horizontal and vertical passes, so a float resize differs
from it by up to one grey level (1/255 = 3.9e-3) on about a third of the pixels, while rounding
first gives the 8-bit reference result exactly (a 16-bit file made as 257 x an 8-bit one
preprocesses identically to it). The model sees 8-bit inputs either way.
Masks keep "any non-zero pixel is lesion" on the stored values: a 16-bit or float mask with value 1
is lesion (no scaling); colour and palette masks go through "L" as before.

Also on opening, images and masks alike:
  EXIF orientation is applied (`ImageOps.exif_transpose`), so a mask and its image are compared and
    resized as a viewer shows them; the reference ignores EXIF (the released images have none).
  Multi-frame files (multi-page TIFF, animated PNG) are refused: which frame is the image is unclear.
  Images above PIL's `Image.MAX_IMAGE_PIXELS` (89,478,485 pixels by default, about 9459 x 9459) are
    refused naming the file and the limit, at PIL's warning threshold, not only at its error
    threshold (twice that). Raise `PIL.Image.MAX_IMAGE_PIXELS` in your own launcher to allow more.
  Unreadable, truncated or corrupt files are refused naming the file.
All of these raise ValueError with the file's path first.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112
_AS_IS = ("L", "RGB")
_TO_L = ("1", "LA")
_TO_RGB = ("P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr")
_UINT16 = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_DEPTH = _UINT16 + ("I", "F")
MODES = _AS_IS + _TO_L + _TO_RGB + _HIGH_DEPTH
"""PIL modes read (see the module docstring for how); any other mode is refused."""
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


class _MultiFrame(ValueError):
  pass


def _open(path: str | os.PathLike) -> Image.Image:
  """The file's image, loaded, EXIF orientation applied, in its own PIL mode."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(path)
      im.load()
      frames = getattr(im, "n_frames", 1)
      if frames > 1 and im.format != "MPO":  # MPO: a JPEG with a preview or depth map after the picture
        raise _MultiFrame(f"{path}: holds {frames} frames ({im.format}); expected a single image")
      if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ValueError(f"{path}: image larger than the limit of {Image.MAX_IMAGE_PIXELS} pixels "
                     f"(PIL.Image.MAX_IMAGE_PIXELS; {e})") from e
  except _MultiFrame:
    raise
  except _READ_ERRORS as e:
    raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
  return im


def _high_depth(im: Image.Image, path) -> np.ndarray:
  """The pixels of an I;16*, I or F image as float64, non-finite values refused."""
  a = np.asarray(im).astype(np.float64)
  if not np.isfinite(a).all():
    raise ValueError(f"{path}: {int((~np.isfinite(a)).sum())} pixels are NaN or infinite (mode {im.mode}); "
                     f"expected finite values")
  return a


def _eight_bit(im: Image.Image, path) -> Image.Image:
  """An image in one of the 8-bit modes as "L" or "RGB"; other modes refused by name."""
  mode = im.mode
  if mode in _AS_IS:
    return im
  if mode in _TO_L:
    return im.convert("L")
  if mode in _TO_RGB:
    return (im.convert("RGBA") if mode == "P" and "transparency" in im.info else im).convert("RGB")
  raise ValueError(f"{path}: PIL mode {mode!r} is not read; expected one of {', '.join(MODES)}")


def _image(path: str | os.PathLike) -> Image.Image:
  """The file as an 8-bit "L" or "RGB" image (module docstring: the rule per mode)."""
  im = _open(path)
  mode = im.mode
  if mode not in _HIGH_DEPTH:
    return _eight_bit(im, path)
  a = _high_depth(im, path)
  lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
  if mode == "F":
    if lo < 0 or hi > 1:
      raise ValueError(f"{path}: float pixels (mode F) must lie in [0, 1], got [{lo:.6g}, {hi:.6g}]; "
                       f"scale the image to [0, 1] first")
    scale = 255.0
  elif mode == "I":
    if lo < 0:
      raise ValueError(f"{path}: 32-bit integer pixels (mode I) must be non-negative, got minimum {lo:.0f}; "
                       f"signed data needs a display window first (e.g. to 16-bit unsigned)")
    scale = 255.0 / (65535 if hi <= 65535 else 2**31 - 1)
  else:
    scale = 255.0 / 65535
  return Image.fromarray(np.rint(a * scale).astype(np.uint8), "L")


def _mask_image(path: str | os.PathLike) -> Image.Image:
  """The file as an "L" mask whose non-zero pixels are the lesion (stored values, not scaled)."""
  im = _open(path)
  if im.mode in _HIGH_DEPTH:
    return Image.fromarray(np.where(_high_depth(im, path) != 0, 255, 0).astype(np.uint8), "L")
  return _eight_bit(im, path).convert("L")


def load_native(path: str | os.PathLike) -> np.ndarray:
  """The file's 8-bit pixels at its own resolution in its native channels: (H, W) uint8 for grey files,
  (H, W, 3) for colour ones (the rule per mode above). What dataset records store; `train_array`,
  `test_array` turn it into model input exactly as the file itself would be read."""
  return np.asarray(_image(path))


def load_native_mask(path: str | os.PathLike) -> np.ndarray:
  """A mask file at its own resolution as uint8 {0, 1} (any non-zero stored pixel is lesion)."""
  return (np.asarray(_mask_image(path)) != 0).astype(np.uint8)


def _pil(native: np.ndarray) -> Image.Image:
  a = np.asarray(native)
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3))):
    raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3) uint8 pixels, got {a.dtype} {a.shape}")
  return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a, "L" if a.ndim == 2 or
                         a.shape[-1] == 1 else "RGB")


def train_array(native: np.ndarray, size: int = 224) -> np.ndarray:
  """Training input from native pixels (`load_native`): resize first, then grayscale, as the reference."""
  im = _pil(native).resize((size, size), Image.BILINEAR).convert("L")
  return np.asarray(im, np.uint8).astype(np.float32) / 255.0


def load_train_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
  """Training image as the reference reads it: resize first, then grayscale."""
  return train_array(load_native(path), size)


COLORS = ("rgb", "grey")


def _check_color(color: str) -> None:
  if color not in COLORS:
    raise ValueError(f"data.color must be one of {COLORS}, got {color!r}")


def test_array(native: np.ndarray, size: int = 224, color: str = "grey") -> np.ndarray:
  """Test input from native pixels (`load_native`): RGB, resize, then grey for color="grey"."""
  _check_color(color)
  im = _pil(native).convert("RGB").resize((size, size), Image.BILINEAR)
  if color == "grey":
    im = im.convert("L")
  return np.asarray(im, np.uint8).astype(np.float32) / 255.0


def mask_array(native_mask: np.ndarray, size: int = 224) -> np.ndarray:
  """A {0, 1} float mask at `size` from a native mask (`load_native_mask`): NEAREST resize, non-zero is lesion."""
  m = Image.fromarray((np.asarray(native_mask) != 0).astype(np.uint8).reshape(np.shape(native_mask)[:2]), "L")
  return (np.asarray(m.resize((size, size), Image.NEAREST)) != 0).astype(np.float32)


def load_test_image(path: str | os.PathLike, size: int = 224, color: str = "grey") -> np.ndarray:
  """Test image as the reference reads it (RGB, then resize): (H, W, 3) for "rgb", one grey channel (H, W)
  for "grey"."""
  _check_color(color)
  return test_array(load_native(path), size, color)


def load_mask(path: str | os.PathLike | None, size: int = 224) -> np.ndarray:
  """Binary lesion mask: any non-zero pixel after a NEAREST resize is lesion
  (the reference rule; JPEG ringing counts). None gives an all-zero mask."""
  if path is None:
    return np.zeros((size, size), np.float32)
  return mask_array(load_native_mask(path), size)


def check_mask_size(image: np.ndarray, mask: np.ndarray, image_path, mask_path) -> None:
  """Refuses a mask whose size differs from its image's: resizing both to the model size would stretch it."""
  (ih, iw), (mh, mw) = np.shape(image)[:2], np.shape(mask)[:2]
  if (ih, iw) != (mh, mw):
    raise ValueError(f"{mask_path}: mask is {mw}x{mh} (width x height) but its image {image_path} "
                     f"is {iw}x{ih}; a mask must have its image's size")


def load_test_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike | None, size: int = 224,
                   color: str = "grey") -> tuple[np.ndarray, np.ndarray]:
  """`load_test_image` and `load_mask` of an image and its mask (None: all zero), refusing a mask whose size
  (after EXIF orientation) differs from the image's: resizing both to `size` would stretch it silently."""
  _check_color(color)
  image = load_native(image_path)
  if mask_path is None:
    return test_array(image, size, color), np.zeros((size, size), np.float32)
  mask = load_native_mask(mask_path)
  check_mask_size(image, mask, image_path, mask_path)
  return test_array(image, size, color), mask_array(mask, size)


def load_original(path: str | os.PathLike, color: str = "grey") -> np.ndarray:
  """The file's own pixels at its own resolution, grey (H, W) or RGB (H, W, 3) uint8 as `color` reads it:
  what pictures are drawn on."""
  return original_array(load_native(path), color)


def original_array(native: np.ndarray, color: str = "grey") -> np.ndarray:
  """Native pixels as `color` reads them, at their own resolution (what pictures are drawn on)."""
  _check_color(color)
  im = _pil(native).convert("RGB")
  return np.asarray(im.convert("L") if color == "grey" else im)


def load_original_mask(path: str | os.PathLike) -> np.ndarray:
  """A mask file at its own resolution as booleans (any non-zero pixel is lesion, as `load_mask`)."""
  return load_native_mask(path) != 0
