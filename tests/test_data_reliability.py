"""The data layer reads unusual images correctly or refuses them, and refuses listings it would otherwise
read wrongly, naming the file (and line) and what was expected. Each table row is one case."""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import datasets, preprocess, run_data
from data_pipelines.datasets import DatasetError

BRAIN_L = "train/normal/image_24.jpg"    # the one BrainMRI training image stored as "L"
BRAIN_RGB = "test/abnormal/image_204.jpg"  # a BrainMRI test image whose channels differ


def _png(path: Path, value, size=(20, 16)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _outputs(path) -> dict[str, np.ndarray]:
  """Everything the data layer makes of one image file."""
  return {"train": preprocess.load_train_image(path, 64),
          "test_grey": preprocess.load_test_image(path, 64, "grey"),
          "test_rgb": preprocess.load_test_image(path, 64, "rgb"),
          "original_grey": preprocess.load_original(path, "grey").astype(np.float32) / 255,
          "original_rgb": preprocess.load_original(path, "rgb").astype(np.float32) / 255}


def _assert_same_outputs(path, ref_path, atol=0.0):
  got, want = _outputs(path), _outputs(ref_path)
  for k in want:
    assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
    np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=f"{path}: {k}")


# ----------------------------------------------------------------------------- 8-bit parity


@pytest.mark.parametrize("dataset,name", [("brainmri", BRAIN_L), ("brainmri", BRAIN_RGB),
                                          ("busi", "test/malignant/malignant_10.jpg")])
def test_eight_bit_images_read_exactly_as_the_reference(shared_dir, dataset, name):
  """L and RGB files go through PIL exactly as before (the reference's steps), bit for bit."""
  path = shared_dir / "data" / dataset / "images" / name
  if not path.is_file():  # the BUSI name is an example; any abnormal image with a mask does
    d = datasets.load_dataset(shared_dir / "data" / dataset)
    path = Path(next(s.path for s in d.test if s.mask_path))
  raw = Image.open(path)
  out = _outputs(path)
  np.testing.assert_array_equal(
      out["train"], np.asarray(raw.resize((64, 64), Image.BILINEAR).convert("L"), np.float32) / 255)
  rgb = raw.convert("RGB").resize((64, 64), Image.BILINEAR)
  np.testing.assert_array_equal(out["test_rgb"], np.asarray(rgb, np.float32) / 255)
  np.testing.assert_array_equal(out["test_grey"], np.asarray(rgb.convert("L"), np.float32) / 255)
  np.testing.assert_array_equal(preprocess.load_original(path, "grey"), np.asarray(raw.convert("RGB").convert("L")))


def test_busi_masks_read_exactly_as_the_reference(shared_dir):
  d = datasets.load_dataset(shared_dir / "data" / "busi")
  for s in [s for s in d.test if s.mask_path][:3]:
    raw = Image.open(s.mask_path).convert("L")
    np.testing.assert_array_equal(preprocess.load_mask(s.mask_path, 64),
                                  (np.asarray(raw.resize((64, 64), Image.NEAREST)) != 0).astype(np.float32))
    np.testing.assert_array_equal(preprocess.load_original_mask(s.mask_path), np.asarray(raw) != 0)
    img, mask = preprocess.load_test_pair(s.path, s.mask_path, 64, "rgb")
    np.testing.assert_array_equal(img, preprocess.load_test_image(s.path, 64, "rgb"))
    np.testing.assert_array_equal(mask, preprocess.load_mask(s.mask_path, 64))


# ----------------------------------------------------------------------------- 1. 16-bit and float images


def _high_depth_files(tmp_path: Path, grey8: np.ndarray) -> dict[str, Path]:
  """The same grey picture stored at other bit depths, by the rule preprocess documents."""
  v = grey8.astype(np.int64)
  out = {}
  out["I;16 png"] = tmp_path / "i16.png"
  Image.fromarray((v * 257).astype(np.uint16)).save(out["I;16 png"])
  out["I;16 tiff"] = tmp_path / "i16.tif"
  Image.fromarray((v * 257).astype(np.uint16)).save(out["I;16 tiff"])
  out["I;16B tiff"] = tmp_path / "i16b.tif"
  Image.frombytes("I;16B", grey8.shape[::-1], (v * 257).astype(">u2").tobytes()).save(out["I;16B tiff"])
  out["I tiff, 16-bit values"] = tmp_path / "i32_16.tif"
  Image.fromarray((v * 257).astype(np.int32)).save(out["I tiff, 16-bit values"])
  out["I tiff, 32-bit values"] = tmp_path / "i32_31.tif"  # v * 257 * 2^15 <= 2^31 - 1
  Image.fromarray((v * 257 * 2**15).astype(np.int32)).save(out["I tiff, 32-bit values"])
  out["F tiff in [0, 1]"] = tmp_path / "f.tif"
  Image.fromarray((v / 255).astype(np.float32)).save(out["F tiff in [0, 1]"])
  return out


HIGH_DEPTH = ("I;16 png", "I;16 tiff", "I;16B tiff", "I tiff, 16-bit values", "I tiff, 32-bit values",
              "F tiff in [0, 1]")
EXPECTED_MODE = {"I;16 png": "I;16", "I;16 tiff": "I;16", "I;16B tiff": "I;16B", "I tiff, 16-bit values": "I",
                 "I tiff, 32-bit values": "I", "F tiff in [0, 1]": "F"}


@pytest.mark.parametrize("kind", HIGH_DEPTH)
def test_high_depth_image_reads_as_its_eight_bit_version(shared_dir, tmp_path, kind):
  """A real BrainMRI image stored at 16 bits (x 257), 32 bits or as floats preprocesses like the 8-bit file
  (within 1e-3; exactly, since high depths are rounded to 8 bits before PIL's 8-bit resize). Before, PIL's
  convert("L"/"RGB") saturated it to white."""
  grey8 = np.asarray(Image.open(shared_dir / "data" / "brainmri" / "images" / BRAIN_L).convert("L"))
  ref = tmp_path / "grey8.png"
  Image.fromarray(grey8).save(ref)
  path = _high_depth_files(tmp_path, grey8)[kind]
  assert Image.open(path).mode == EXPECTED_MODE[kind]
  _assert_same_outputs(path, ref, atol=1e-3)
  _assert_same_outputs(path, ref)  # in fact bit-identical
  assert preprocess.load_train_image(path, 64).std() > 0.05  # not a saturated, constant picture


def test_float_resize_would_miss_the_reference_by_a_grey_level(shared_dir):
  """Why high depths are rounded to 8 bits before resizing: PIL's float-mode resize differs from its 8-bit
  resize (which rounds between passes) by more than 1e-3 on many pixels."""
  grey8 = Image.open(shared_dir / "data" / "brainmri" / "images" / BRAIN_L).convert("L")
  ref = np.asarray(grey8.resize((64, 64), Image.BILINEAR), np.float32) / 255
  f = np.asarray(Image.fromarray(np.asarray(grey8, np.float32) / 255, "F").resize((64, 64), Image.BILINEAR))
  assert np.abs(f - ref).max() > 1e-3


@pytest.mark.parametrize("name,array,expect", [
    ("float_0_255.tif", np.linspace(0, 255, 320, dtype=np.float32).reshape(16, 20), r"must lie in \[0, 1\], got \[0, 255\]"),
    ("float_neg.tif", np.linspace(-0.5, 1, 320, dtype=np.float32).reshape(16, 20), r"must lie in \[0, 1\]"),
    ("float_nan.tif", np.where(np.eye(16, 20) > 0, np.nan, 0.5).astype(np.float32), r"16 pixels are NaN or infinite"),
    ("float_inf.tif", np.where(np.eye(16, 20) > 0, np.inf, 0.5).astype(np.float32), r"NaN or infinite"),
    ("int_negative.tif", np.full((16, 20), -1024, np.int32), r"must be non-negative, got minimum -1024"),
])
def test_high_depth_values_without_a_rule_are_refused(tmp_path, name, array, expect):
  path = tmp_path / name
  Image.fromarray(array).save(path)
  for load in (preprocess.load_train_image, preprocess.load_test_image, preprocess.load_original):
    with pytest.raises(ValueError, match=expect) as e:
      load(path)
    assert str(e.value).startswith(str(path))


def test_high_depth_masks_keep_any_nonzero_as_lesion(tmp_path):
  """A 16-bit or float mask with value 1 is lesion (no /65535 scaling that would round it to 0)."""
  m = np.zeros((16, 20), np.uint16)
  m[4:8, 5:9] = 1
  want = m != 0
  Image.fromarray(want.astype(np.uint8) * 255).save(tmp_path / "m8.png")
  want_resized = preprocess.load_mask(tmp_path / "m8.png", 40)
  assert want_resized.sum() == 10 * 8  # 4 of 16 rows -> 10 of 40, 4 of 20 columns -> 8 of 40
  for name, arr in (("m16.png", m), ("m32.tif", m.astype(np.int32)), ("mf.tif", m.astype(np.float32) * 0.2)):
    Image.fromarray(arr).save(tmp_path / name)
    np.testing.assert_array_equal(preprocess.load_original_mask(tmp_path / name), want, err_msg=name)
    np.testing.assert_array_equal(preprocess.load_mask(tmp_path / name, 40), want_resized, err_msg=name)
  Image.fromarray(np.where(want, np.nan, 0).astype(np.float32)).save(tmp_path / "nan.tif")
  with pytest.raises(ValueError, match=r"nan\.tif: 16 pixels are NaN or infinite"):
    preprocess.load_mask(tmp_path / "nan.tif", 40)


# ----------------------------------------------------------------------------- 2. modes and EXIF orientation


def _colour_picture() -> np.ndarray:
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(base).resize((40, 32), Image.BILINEAR))  # smooth-ish, 40 x 32


def _mode_case(tmp_path: Path, kind: str) -> tuple[Path, Path]:
  """(file in `kind`, an L or RGB file holding what preprocess should read from it)."""
  rgb = _colour_picture()
  grey = np.asarray(Image.fromarray(rgb).convert("L"))
  alpha = np.random.default_rng(1).integers(0, 256, grey.shape).astype(np.uint8)
  path, ref = tmp_path / f"{kind}.png", tmp_path / f"{kind}_ref.png"
  if kind == "P":
    im = Image.fromarray(rgb).quantize(16)
    im.save(path)
    im.convert("RGB").save(ref)
  elif kind == "P with transparency":
    im = Image.fromarray(rgb).quantize(16)
    im.save(path, transparency=3)
    im.convert("RGB").save(ref)
  elif kind == "LA":
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(path)
    Image.fromarray(grey).save(ref)
  elif kind == "RGBA":
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(path)
    Image.fromarray(rgb).save(ref)
  elif kind == "1":
    im = Image.fromarray(grey > 128)
    im.save(path)
    Image.fromarray(np.where(grey > 128, 255, 0).astype(np.uint8)).save(ref)
  elif kind == "CMYK":
    path = tmp_path / "cmyk.tif"
    im = Image.fromarray(rgb).convert("CMYK")
    im.save(path)
    im.convert("RGB").save(ref)
  elif kind == "YCbCr":
    path = tmp_path / "ycbcr.tif"
    im = Image.fromarray(rgb).convert("YCbCr")
    im.save(path)
    im.convert("RGB").save(ref)
  assert Image.open(path).mode == kind.split()[0], (kind, Image.open(path).mode)
  return path, ref


MODES = ("P", "P with transparency", "LA", "RGBA", "1", "CMYK", "YCbCr")


@pytest.mark.parametrize("kind", MODES)
def test_other_eight_bit_modes_read_as_their_grey_or_colour_picture(tmp_path, kind):
  """Palette through its colours, alpha dropped (not composited), 1-bit as 0/255, CMYK and YCbCr as RGB: then
  the reference's steps. Before, P and 1 were resized NEAREST and LA/RGBA with premultiplied alpha."""
  path, ref = _mode_case(tmp_path, kind)
  _assert_same_outputs(path, ref)


def test_unknown_mode_is_refused_by_name(tmp_path):
  path = tmp_path / "lab.tif"
  Image.new("LAB", (20, 16), (50, 0, 0)).save(path)
  assert Image.open(path).mode == "LAB"
  for load in (preprocess.load_train_image, preprocess.load_test_image, preprocess.load_mask,
               preprocess.load_original, preprocess.load_original_mask):
    with pytest.raises(ValueError, match=r"lab\.tif: PIL mode 'LAB' is not read; expected one of L, RGB, 1, LA, P"):
      load(path)


def _with_orientation(path: Path, array: np.ndarray, orientation: int):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(array).save(path, exif=exif)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, suffix):
  """A file tagged "rotate 90 degrees clockwise to view" (orientation 6) is read as a viewer shows it, images and
  masks alike, so a mask drawn on the shown picture (no tag) matches it, and so does a mask tagged like it."""
  stored = np.zeros((16, 40), np.uint8)   # 40 wide, 16 high as stored
  stored[:, :10] = 255                    # bright left band: after the rotation, the top band
  img = tmp_path / f"img{suffix}"
  _with_orientation(img, stored, 6)
  shown = np.rot90(stored, -1)            # 16 wide, 40 high
  original = preprocess.load_original(img)
  assert original.shape == (40, 16)
  assert original[:8].mean() > 200 and original[-8:].mean() < 50
  train = preprocess.load_train_image(img, 32)
  assert train[:6].mean() > 0.8 and train[-6:].mean() < 0.2
  mask_plain = tmp_path / "mask_plain.png"
  Image.fromarray(shown).save(mask_plain)
  mask_tagged = tmp_path / "mask_tagged.png"
  _with_orientation(mask_tagged, stored, 6)
  for mask in (mask_plain, mask_tagged):
    np.testing.assert_array_equal(preprocess.load_original_mask(mask), shown != 0)
    _, m = preprocess.load_test_pair(img, mask, 32)
    assert m[:6].mean() == 1.0 and m[-6:].mean() == 0.0
  untransposed_mask = tmp_path / "mask_stored.png"
  Image.fromarray(stored).save(untransposed_mask)
  with pytest.raises(ValueError, match=r"mask_stored\.png: mask is 40x16 .* its image .*img\.\w+ is 16x40"):
    preprocess.load_test_pair(img, untransposed_mask, 32)


# ----------------------------------------------------------------------------- 3. size limit


@pytest.mark.parametrize("limit,pil_reaction", [(200, "warning (between 1x and 2x the limit)"),
                                                (100, "error (over 2x the limit)")])
def test_images_over_the_pixel_limit_are_refused_naming_file_and_limit(tmp_path, monkeypatch, limit,
                                                                        pil_reaction):
  path = tmp_path / "big.png"
  _png(path, 7)  # 20 x 16 = 320 pixels
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
  for load in (preprocess.load_train_image, preprocess.load_test_image, preprocess.load_mask,
               preprocess.load_original, preprocess.load_original_mask):
    with pytest.raises(ValueError, match=rf"big\.png: image larger than the limit of {limit} pixels") as e:
      load(path)
    assert "PIL.Image.MAX_IMAGE_PIXELS" in str(e.value), pil_reaction
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 320)
  assert preprocess.load_train_image(path, 8).shape == (8, 8)


# ----------------------------------------------------------------------------- 4. corrupt files


def _corrupt(tmp_path: Path, kind: str) -> Path:
  good = tmp_path / "good.png"
  Image.fromarray(_colour_picture()).save(good)
  data = good.read_bytes()
  if kind == "truncated png":
    path = tmp_path / "trunc.png"
    path.write_bytes(data[: len(data) // 2])
  elif kind == "truncated jpeg":
    Image.fromarray(_colour_picture()).save(tmp_path / "good.jpg")
    path = tmp_path / "trunc.jpg"
    path.write_bytes((tmp_path / "good.jpg").read_bytes()[:400])
  elif kind == "empty file":
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
  elif kind == "text named .png":
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
  elif kind == "flipped png bytes":
    path = tmp_path / "flipped.png"
    b = bytearray(data)
    for i in range(60, len(b) - 20, 37):
      b[i] ^= 0xFF
    path.write_bytes(bytes(b))
  elif kind == "missing file":
    path = tmp_path / "gone.png"
  elif kind == "multi-page tiff":
    path = tmp_path / "volume.tif"
    Image.new("L", (20, 16)).save(path, save_all=True, append_images=[Image.new("L", (20, 16))] * 2)
  return path


CORRUPT = {"truncated png": "cannot read image", "truncated jpeg": "cannot read image",
           "empty file": "cannot read image", "text named .png": "cannot read image",
           "flipped png bytes": "cannot read image", "missing file": "cannot read image",
           "multi-page tiff": r"holds 3 frames \(TIFF\); expected a single image"}


@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_files_are_refused_naming_the_file(tmp_path, kind):
  path = _corrupt(tmp_path, kind)
  for load in (preprocess.load_train_image, preprocess.load_test_image, preprocess.load_mask,
               preprocess.load_original, preprocess.load_original_mask):
    with pytest.raises(ValueError, match=CORRUPT[kind]) as e:
      load(path)
    assert str(e.value).startswith(f"{path}: "), (load.__name__, str(e.value))


# ----------------------------------------------------------------------------- 5. mask size


def _data(pixel_metrics="auto", size=32, color="grey") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"pixel_metrics": pixel_metrics, "image_size": size, "color": color, "workers": 0})


def _folder(root: Path, mask_size=(20, 16)) -> Path:
  _png(root / "train" / "normal" / "n0.png", 40)
  _png(root / "test" / "normal" / "t0.png", 50)
  _png(root / "test" / "abnormal" / "a0.png", 200)
  _png(root / "test" / "masks" / "a0_mask.png", 255, mask_size)
  return root


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path):
  """Before, the 10 x 10 mask was stretched to the 20 x 16 image without a word."""
  d = datasets.load_dataset(_folder(tmp_path / "ds", mask_size=(10, 10)))
  with pytest.raises(ValueError, match=r"a0_mask\.png: mask is 10x10 \(width x height\) but its image "
                                       r".*a0\.png is 20x16; a mask must have its image's size"):
    run_data.test_set(d, _data()).arrays()
  images, masks = run_data.test_set(d, _data("off")).arrays()  # no masks read, no check
  assert masks is None and images.shape == (2, 32, 32)
  ok = datasets.load_dataset(_folder(tmp_path / "ok"))
  _, masks = run_data.test_set(ok, _data()).arrays()
  assert masks.shape == (2, 32, 32) and masks[1].all() and not masks[0].any()


# ----------------------------------------------------------------------------- MediCLIP listings


def _mediclip(root: Path, train: list[dict], test: list[dict]) -> Path:
  for name in ("train/normal/a.png", "train/normal/b.png", "test/normal/n.png", "test/abnormal/x.png",
               "test/abnormal/y.png", "test/ground_true/x_mask.png", "test/ground_true/y_mask.png"):
    _png(root / "images" / name, 255 if "mask" in name else 30)
  (root / "samples").mkdir(parents=True, exist_ok=True)
  for split, lines in (("train", train), ("test", test)):
    (root / "samples" / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return root


A = {"filename": "train/normal/a.png", "label": 0, "label_name": "normal", "clsname": "normal"}
B = {"filename": "train/normal/b.png", "label": 0, "label_name": "normal", "clsname": "normal"}
N = {"filename": "test/normal/n.png", "label": 0, "label_name": "normal", "clsname": "normal"}
X = {"filename": "test/abnormal/x.png", "label": 1, "label_name": "abnormal", "clsname": "tumor",
     "mask": "test/ground_true/x_mask.png"}
Y = {"filename": "test/abnormal/y.png", "label": 1, "label_name": "abnormal", "clsname": "tumor",
     "mask": "test/ground_true/y_mask.png"}
NO_MASK = lambda r: {k: v for k, v in r.items() if k != "mask"}


def test_mediclip_abnormal_image_without_mask_refused_when_others_have_one(tmp_path):
  """Before, y.png scored against an all-zero mask. Datasets where no sample has a mask keep working."""
  d = datasets.load_dataset(_mediclip(tmp_path / "m", [A], [N, X, NO_MASK(Y)]))
  for pm in ("auto", "on"):
    with pytest.raises(DatasetError, match=r"samples/test\.json:3: abnormal test image 'test/abnormal/y\.png' "
                                           r"has no 'mask', while 1 test images .* have one"):
      run_data.test_set(d, _data(pm))
  assert run_data.test_set(d, _data("off")).arrays()[1] is None
  none = datasets.load_dataset(_mediclip(tmp_path / "n", [A], [N, NO_MASK(X), NO_MASK(Y)]))
  test = run_data.test_set(none, _data())
  assert test.arrays()[1] is None and test.labels.tolist() == [0, 1, 1]
  full = datasets.load_dataset(_mediclip(tmp_path / "f", [A], [N, X, Y]))
  assert run_data.test_set(full, _data()).arrays()[1].shape == (3, 32, 32)


# (name, train lines, test lines, error pattern)
LISTING_ERRORS = [
    ("same train line twice", [A, B, A], [N, X],
     r"train\.json:3: image 'train/normal/a\.png' is listed twice; it is already at .*train\.json:1$"),
    ("same file by another name", [A, dict(A, filename="./train/normal/a.png")], [N, X],
     r"train\.json:2: image '\./train/normal/a\.png' is listed twice; it is already at .*train\.json:1 as "
     r"'train/normal/a\.png'"),
    ("same test line twice", [A], [N, X, Y, X],
     r"test\.json:4: image 'test/abnormal/x\.png' is listed twice; it is already at .*test\.json:2$"),
    ("a training image in the test list", [A, B], [N, dict(N, filename="train/normal/b.png")],
     r"test\.json:2: image 'train/normal/b\.png' is listed twice; it is already at .*train\.json:2 in the "
     r"train split"),
    ("parent path", [A, dict(A, filename="../../../etc/hostname")], [N],
     r"train\.json:2: image '\.\./\.\./\.\./etc/hostname' is not inside the image folder .*images"),
    ("absolute path", [A], [N, dict(N, filename="/etc/hostname")],
     r"test\.json:2: image '/etc/hostname' is not inside the image folder"),
    ("into the samples folder", [dict(A, filename="train/../../samples/train.json")], [N],
     r"train\.json:1: image 'train/\.\./\.\./samples/train\.json' is not inside the image folder"),
    ("the image folder itself", [dict(A, filename=".")], [N],
     r"train\.json:1: image '\.' is not inside the image folder"),
    ("mask outside", [A], [N, dict(X, mask="../../samples/test.json")],
     r"test\.json:2: mask '\.\./\.\./samples/test\.json' is not inside the image folder"),
    ("misspelt mask key", [A], [N, NO_MASK(dict(X, Mask="test/ground_true/x_mask.png"))],
     r"test\.json:2: unknown key 'Mask'; a sample's mask is read from 'mask' only"),
    ("plural mask key", [A], [N, NO_MASK(dict(X, masks=["test/ground_true/x_mask.png"]))],
     r"test\.json:2: unknown key 'masks'"),
    ("class name null", [A], [N, dict(X, clsname=None)],
     r"test\.json:2: 'clsname' must be a string, got None"),
    ("class name a number", [A], [N, dict(X, label_name=3)],
     r"test\.json:2: 'label_name' must be a string, got 3"),
]


@pytest.mark.parametrize("name,train,test,expect", LISTING_ERRORS, ids=[c[0] for c in LISTING_ERRORS])
def test_mediclip_listing_errors_name_file_and_line(tmp_path, name, train, test, expect):
  root = _mediclip(tmp_path / "m", train, test)
  with pytest.raises(DatasetError, match=expect):
    datasets.load_dataset(root)


def test_mediclip_samples_record_their_listing_line(tmp_path):
  d = datasets.load_dataset(_mediclip(tmp_path / "m", [A, B], [N, X]))
  assert d.test[1].source == f"{tmp_path / 'm' / 'samples' / 'test.json'}:2"
  assert d.test[1].clsname == "tumor" and d.test[1].name == "test/abnormal/x.png"


def test_mediclip_image_folder_may_hold_symbolic_links(tmp_path):
  """The containment check is on names, not resolved paths: linked storage stays readable."""
  store = tmp_path / "store"
  _png(store / "c.png", 10)
  root = _mediclip(tmp_path / "m", [A, dict(A, filename="linked/c.png")], [N, X])
  (root / "images" / "linked").symlink_to(store, target_is_directory=True)
  assert [s.name for s in datasets.load_dataset(root).train] == ["train/normal/a.png", "linked/c.png"]


# ----------------------------------------------------------------------------- folder layouts


def _mvtec(root: Path) -> Path:
  _png(root / "train" / "good" / "000.png", 40)
  _png(root / "test" / "good" / "000.png", 50)
  _png(root / "test" / "crack" / "000.png", 200)
  _png(root / "ground_truth" / "crack" / "000_mask.png", 255)
  return root


def _link(link: Path, target: Path):
  link.parent.mkdir(parents=True, exist_ok=True)
  link.symlink_to(target)


# (name, layout builder, change, error pattern)
FOLDER_ERRORS = [
    ("folder: a test image linked into train", _folder,
     lambda r: _link(r / "train" / "normal" / "n1.png", r / "test" / "normal" / "t0.png"),
     r"test/normal/t0\.png: image 'test/normal/t0\.png' is listed twice; it is already at .*train/normal/n1\.png "
     r"as 'train/normal/n1\.png' \(both are .*t0\.png\) in the train split"),
    ("folder: a misnamed mask folder", _folder,
     lambda r: _png(r / "test" / "mask" / "a0.png", 255),
     r"/test: holds \['mask'\] besides normal/, abnormal/, masks/"),
    ("folder: an abnormal folder in train", _folder,
     lambda r: _png(r / "train" / "abnormal" / "z.png", 255),
     r"/train: holds \['abnormal'\] besides normal/ \(the train split is normal images only\)"),
    ("folder: a broken link", _folder,
     lambda r: _link(r / "test" / "normal" / "t1.png", r / "nowhere.png"),
     r"test/normal/t1\.png: not a readable file \(a broken symbolic link\?\)"),
    ("mvtec: two masks for one image", _mvtec,
     lambda r: _png(r / "ground_truth" / "crack" / "000.png", 255),
     r"ground_truth/crack/000_mask\.png: a second mask for image stem '000'"),
    ("mvtec: a mask folder with no defect folder", _mvtec,
     lambda r: _png(r / "ground_truth" / "crak" / "001_mask.png", 255),
     r"ground_truth: holds \['crak'\] besides .*crack/"),
    ("mvtec: a test image linked twice", _mvtec,
     lambda r: _link(r / "test" / "crack" / "001.png", r / "test" / "crack" / "000.png")
     or _png(r / "ground_truth" / "crack" / "001_mask.png", 255),
     r"crack/001\.png: image 'test/crack/001\.png' is listed twice; it is already at .*crack/000\.png"),
]


@pytest.mark.parametrize("name,build,change,expect", FOLDER_ERRORS, ids=[c[0] for c in FOLDER_ERRORS])
def test_folder_layout_errors_name_the_file(tmp_path, name, build, change, expect):
  root = build(tmp_path / "ds")
  datasets.load_dataset(root)  # valid before the change
  change(root)
  with pytest.raises(DatasetError, match=expect):
    datasets.load_dataset(root)


def test_mvtec_ground_truth_good_is_allowed(tmp_path):
  root = _mvtec(tmp_path / "ds")
  _png(root / "ground_truth" / "good" / "000_mask.png", 0)
  d = datasets.load_dataset(root)
  assert [s.mask_path is None for s in d.test] == [True, False]


def test_real_datasets_still_load(shared_dir):
  for name, n in (("brainmri", 220), ("busi", 748)):
    d = datasets.load_dataset(shared_dir / "data" / name)
    assert len(d.test) == n and all(s.source and os.path.basename(s.source).startswith("test.json:") for s in d.test)
    datasets.check_masks_complete(d)


def test_a_test_set_of_one_class_is_refused_before_metrics_turn_nan(tmp_path):
  root = tmp_path / "one_class"
  for split in ("train/normal", "test/normal"):
    (root / split).mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(root / split / "a.png")
  (root / "test" / "abnormal").mkdir()
  data = ml_collections.ConfigDict({"pixel_metrics": "auto", "image_size": 8, "color": "grey", "workers": 0})
  with pytest.raises(datasets.DatasetError, match="holds only normal images; AUROC"):
    run_data.test_set(datasets.load_dataset(root), data)
