"""Dataset readers for the two accepted on-disk layouts.

MediCLIP layout (the authors' release; BrainMRI, BUSI, CheXpert):
  root/samples/train.json, root/samples/test.json   one JSON object per line:
      {"filename", "label", "label_name", "clsname", optional "mask"}
  root/images/...                                    paths in the JSON are relative to root/images
Plain folder layout:
  root/train/normal, root/test/normal, root/test/abnormal, optional root/test/masks
  (masks matched to abnormal images by file stem, `<stem>` or `<stem>_mask`)
MVTec AD layout (one object category):
  root/train/good, root/test/good, root/test/<defect>/ (every other folder is a defect type,
  its name the sample's class), optional root/ground_truth/<defect>/<stem>_mask.png

Every referenced file is checked to exist; malformed lines and stray files are
errors, never skipped, so a run never trains or scores on a silently smaller set.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MEDICLIP = "mediclip"
FOLDER = "folder"
MVTEC = "mvtec"


class DatasetError(ValueError):
  """The dataset folder or one of its lists does not match an accepted layout."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image: `path` absolute, `name` relative to the image root (stable id used
  in support-set files), label 0 normal / 1 abnormal, `mask_path` or None."""
  path: str
  name: str
  label: int
  clsname: str
  mask_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset read from disk: its root, layout and train (normal) / test samples."""
  root: str
  layout: str
  train: tuple[Sample, ...]
  test: tuple[Sample, ...]

  @property
  def has_masks(self) -> bool:
    """True when abnormal test images carry pixel masks (pixel metrics apply)."""
    return any(s.mask_path is not None for s in self.test)

  def train_by_name(self) -> dict[str, Sample]:
    return {s.name: s for s in self.train}


def _layout_help(root: Path) -> str:
  return (f"accepted layouts:\n"
          f"  (a) MediCLIP: {root / 'samples' / 'train.json'} and {root / 'samples' / 'test.json'} "
          f"(JSON lines, file names relative to {root / 'images'})\n"
          f"  (b) plain folders: {root / 'train' / 'normal'}, {root / 'test' / 'normal'}, "
          f"{root / 'test' / 'abnormal'} and optionally {root / 'test' / 'masks'}\n"
          f"  (c) MVTec AD: {root / 'train' / 'good'}, {root / 'test' / 'good'}, {root / 'test'}/<defect>/ "
          f"and optionally {root / 'ground_truth'}/<defect>/<stem>_mask.png")


def detect_layout(root: str | os.PathLike) -> str:
  """Returns "mediclip", "folder" or "mvtec"; raises DatasetError naming the expected paths."""
  root = Path(root)
  if not root.is_dir():
    raise DatasetError(f"dataset root {root} is not a directory; {_layout_help(root)}")
  if (root / "samples" / "train.json").is_file() and (root / "samples" / "test.json").is_file():
    return MEDICLIP
  if all((root / d).is_dir() for d in ("train/normal", "test/normal", "test/abnormal")):
    return FOLDER
  if (root / "train" / "good").is_dir() and (root / "test" / "good").is_dir():
    return MVTEC
  raise DatasetError(f"{root} matches neither dataset layout; {_layout_help(root)}")


def _read_json_lines(path: Path, images: Path, split: str) -> list[Sample]:
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue  # blank lines (e.g. a trailing newline) hold no record
      where = f"{path}:{lineno}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
      fn = rec.get("filename")
      if not isinstance(fn, str) or not fn:
        raise DatasetError(f"{where}: missing or non-string 'filename'")
      label = rec.get("label")
      if label not in (0, 1) or isinstance(label, bool):
        raise DatasetError(f"{where}: 'label' must be 0 or 1, got {label!r}")
      if split == "train" and label != 0:
        raise DatasetError(f"{where}: the train split must hold normal images only (label 0), got label 1")
      img = images / fn
      if not img.is_file():
        raise DatasetError(f"{where}: image {img} does not exist")
      mask = rec.get("mask")
      mask_path = None
      if mask is not None:
        if not isinstance(mask, str) or not mask:
          raise DatasetError(f"{where}: 'mask' must be a file name, got {mask!r}")
        mp = images / mask
        if not mp.is_file():
          raise DatasetError(f"{where}: mask {mp} does not exist")
        mask_path = str(mp)
      clsname = rec.get("clsname", rec.get("label_name", "abnormal" if label else "normal"))
      out.append(Sample(path=str(img), name=fn, label=int(label), clsname=str(clsname), mask_path=mask_path))
  if not out:
    raise DatasetError(f"{path}: no samples (expected one JSON object per line)")
  return out


def read_mediclip(root: str | os.PathLike) -> Dataset:
  """Reads root/samples/{train,test}.json; image and mask names are relative to root/images."""
  root = Path(root)
  images = root / "images"
  train = _read_json_lines(root / "samples" / "train.json", images, "train")
  test = _read_json_lines(root / "samples" / "test.json", images, "test")
  return Dataset(root=str(root), layout=MEDICLIP, train=tuple(train), test=tuple(test))


def _list_images(folder: Path) -> list[Path]:
  files = []
  for p in sorted(folder.iterdir()):
    if p.name.startswith("."):
      continue  # hidden files (.DS_Store, editor swap files) are not data
    if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
      raise DatasetError(f"{p}: unexpected entry in an image folder (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    files.append(p)
  return files


def read_folder(root: str | os.PathLike) -> Dataset:
  """Reads root/{train/normal, test/normal, test/abnormal, [test/masks]}."""
  root = Path(root)
  rel = lambda p: p.relative_to(root).as_posix()
  train = [Sample(str(p), rel(p), 0, "normal") for p in _list_images(root / "train" / "normal")]
  if not train:
    raise DatasetError(f"{root / 'train' / 'normal'}: no images")
  test = [Sample(str(p), rel(p), 0, "normal") for p in _list_images(root / "test" / "normal")]
  abnormal = _list_images(root / "test" / "abnormal")
  mask_dir = root / "test" / "masks"
  masks: dict[str, Path] = {}
  if mask_dir.is_dir():
    for m in _list_images(mask_dir):
      stem = m.stem[:-5] if m.stem.endswith("_mask") else m.stem
      if stem in masks:
        raise DatasetError(f"{m}: a second mask for image stem {stem!r} (first: {masks[stem]})")
      masks[stem] = m
  stems = set()
  for p in abnormal:
    if p.stem in stems:
      raise DatasetError(f"{p}: two abnormal images share the stem {p.stem!r}, so masks cannot be matched")
    stems.add(p.stem)
    mask_path = None
    if mask_dir.is_dir():
      if p.stem not in masks:
        raise DatasetError(f"{p}: no mask named {p.stem}.* or {p.stem}_mask.* in {mask_dir}")
      mask_path = str(masks[p.stem])
    test.append(Sample(str(p), rel(p), 1, "abnormal", mask_path))
  unmatched = sorted(set(masks) - stems)
  if unmatched:
    raise DatasetError(f"{mask_dir}: masks with no abnormal image of the same stem: {unmatched[:5]}")
  if not abnormal and not test:
    raise DatasetError(f"{root / 'test'}: no test images")
  return Dataset(root=str(root), layout=FOLDER, train=tuple(train), test=tuple(test))


def read_mvtec(root: str | os.PathLike) -> Dataset:
  """Reads root/{train/good, test/good, test/<defect>/, [ground_truth/<defect>/<stem>_mask.*]}."""
  root = Path(root)
  rel = lambda p: p.relative_to(root).as_posix()
  train = [Sample(str(p), rel(p), 0, "good") for p in _list_images(root / "train" / "good")]
  if not train:
    raise DatasetError(f"{root / 'train' / 'good'}: no images")
  stray = sorted(p.name for p in (root / "train").iterdir() if p.name != "good" and not p.name.startswith("."))
  if stray:
    raise DatasetError(f"{root / 'train'}: holds {stray[:5]} besides good/ (the train split is normal images only)")
  test = [Sample(str(p), rel(p), 0, "good") for p in _list_images(root / "test" / "good")]
  gt_root = root / "ground_truth"
  for d in sorted((root / "test").iterdir()):
    if d.name == "good" or d.name.startswith("."):
      continue
    if not d.is_dir():
      raise DatasetError(f"{d}: unexpected file in {root / 'test'} (expected good/ and one folder per defect type)")
    masks = {}
    if gt_root.is_dir():
      if not (gt_root / d.name).is_dir():
        raise DatasetError(f"{d}: no mask folder {gt_root / d.name} (ground_truth/ has masks for other defects)")
      for m in _list_images(gt_root / d.name):
        masks[m.stem[:-5] if m.stem.endswith("_mask") else m.stem] = m
    images = _list_images(d)
    for p in images:
      if gt_root.is_dir() and p.stem not in masks:
        raise DatasetError(f"{p}: no mask named {p.stem}_mask.* or {p.stem}.* in {gt_root / d.name}")
      test.append(Sample(str(p), rel(p), 1, d.name, str(masks[p.stem]) if masks else None))
    extra = sorted(set(masks) - {p.stem for p in images})
    if extra:
      raise DatasetError(f"{gt_root / d.name}: masks with no image of the same stem in {d}: {extra[:5]}")
  if not test:
    raise DatasetError(f"{root / 'test'}: no test images")
  return Dataset(root=str(root), layout=MVTEC, train=tuple(train), test=tuple(test))


def load_dataset(root: str | os.PathLike) -> Dataset:
  """Reads a dataset in whichever accepted layout `root` has (see detect_layout)."""
  readers = {MEDICLIP: read_mediclip, FOLDER: read_folder, MVTEC: read_mvtec}
  return readers[detect_layout(root)](root)
