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
Also errors: the same image listed twice (or reachable twice through a symbolic link), in one
split or across train and test; a MediCLIP file name that leaves root/images (absolute, or
`..` past it); a MediCLIP key that looks like a misspelt "mask" (it would be ignored); a
non-string class name; an unexpected folder beside the expected ones. Image contents are not
opened here (that is `preprocess`'s job), so reading a listing stays cheap.
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
  in support-set files), label 0 normal / 1 abnormal, `mask_path` or None, `source`
  where it is listed ("listing:line" in the MediCLIP layout; None in folder layouts, where the path says it)."""
  path: str
  name: str
  label: int
  clsname: str
  mask_path: str | None = None
  source: str | None = None

  @property
  def where(self) -> str:
    """What an error message names for this sample: its listing line, else its path."""
    return self.source or self.path


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


_KEYS = ("filename", "label", "label_name", "clsname", "mask")


def _inside(images: Path, name: str, where: str, what: str) -> Path:
  """images / name, refused when the name leaves `images` (absolute, or `..` past it). Checked on the
  names, not on resolved paths, so an image folder may hold symbolic links to storage elsewhere."""
  base = os.path.normpath(os.path.abspath(images))
  full = os.path.normpath(os.path.join(base, name))
  if os.path.isabs(name) or not Path(full).is_relative_to(base) or full == base:
    raise DatasetError(f"{where}: {what} {name!r} is not inside the image folder {images} "
                       f"(names must be relative to it, without leaving it through '..')")
  return images / name


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
      odd = [k for k in rec if k not in _KEYS and "mask" in k.lower()]
      if odd:
        raise DatasetError(f"{where}: unknown key {odd[0]!r}; a sample's mask is read from 'mask' only "
                           f"(keys read: {', '.join(_KEYS)})")
      fn = rec.get("filename")
      if not isinstance(fn, str) or not fn:
        raise DatasetError(f"{where}: missing or non-string 'filename'")
      label = rec.get("label")
      if label not in (0, 1) or isinstance(label, bool):
        raise DatasetError(f"{where}: 'label' must be 0 or 1, got {label!r}")
      if split == "train" and label != 0:
        raise DatasetError(f"{where}: the train split must hold normal images only (label 0), got label 1")
      img = _inside(images, fn, where, "image")
      if not img.is_file():
        raise DatasetError(f"{where}: image {img} does not exist")
      mask = rec.get("mask")
      mask_path = None
      if mask is not None:
        if not isinstance(mask, str) or not mask:
          raise DatasetError(f"{where}: 'mask' must be a file name, got {mask!r}")
        mp = _inside(images, mask, where, "mask")
        if not mp.is_file():
          raise DatasetError(f"{where}: mask {mp} does not exist")
        mask_path = str(mp)
      for key in ("clsname", "label_name"):
        if key in rec and not isinstance(rec[key], str):
          raise DatasetError(f"{where}: {key!r} must be a string, got {rec[key]!r}")
      clsname = rec.get("clsname", rec.get("label_name", "abnormal" if label else "normal"))
      out.append(Sample(path=str(img), name=fn, label=int(label), clsname=clsname, mask_path=mask_path,
                        source=where))
  if not out:
    raise DatasetError(f"{path}: no samples (expected one JSON object per line)")
  return out


def _check_unique(train: list[Sample], test: list[Sample]) -> None:
  """Refuses an image listed twice, by the file it resolves to (so `a.png`, `./a.png` and a symbolic link
  to it are the same image), within a split or across train and test."""
  seen: dict[str, tuple[str, Sample]] = {}
  for split, samples in (("train", train), ("test", test)):
    for s in samples:
      key = os.path.realpath(s.path)
      if key in seen:
        first_split, first = seen[key]
        same = "" if first.name == s.name else f" as {first.name!r} (both are {key})"
        leak = (" in the train split: a test image among the training images inflates the scores"
                if first_split != split else "")
        raise DatasetError(f"{s.where}: image {s.name!r} is listed twice; it is already at {first.where}{same}"
                           f"{leak}")
      seen[key] = (split, s)


def check_masks_complete(dataset: Dataset) -> None:
  """When any test sample has a mask (pixel metrics apply), every abnormal test sample must have one: a
  missing mask would score as an all-normal lesion map. Refuses naming where the first one is listed."""
  if not dataset.has_masks:
    return
  missing = [s for s in dataset.test if s.label == 1 and s.mask_path is None]
  if missing:
    n = sum(s.mask_path is not None for s in dataset.test)
    raise DatasetError(
        f"{missing[0].where}: abnormal test image {missing[0].name!r} has no 'mask', while {n} test images of "
        f"{dataset.root} have one ({len(missing)} abnormal images lack it); pixel metrics need a mask for "
        f"every abnormal image: add them, or set config.data.pixel_metrics='off' for image metrics only")


def read_mediclip(root: str | os.PathLike) -> Dataset:
  """Reads root/samples/{train,test}.json; image and mask names are relative to root/images."""
  root = Path(root)
  images = root / "images"
  train = _read_json_lines(root / "samples" / "train.json", images, "train")
  test = _read_json_lines(root / "samples" / "test.json", images, "test")
  _check_unique(train, test)
  return Dataset(root=str(root), layout=MEDICLIP, train=tuple(train), test=tuple(test))


def _list_images(folder: Path) -> list[Path]:
  files = []
  for p in sorted(folder.iterdir()):
    if p.name.startswith("."):
      continue  # hidden files (.DS_Store, editor swap files) are not data
    if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
      raise DatasetError(f"{p}: unexpected entry in an image folder (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    if not p.is_file():
      raise DatasetError(f"{p}: not a readable file (a broken symbolic link?)")
    files.append(p)
  return files


def _only(folder: Path, expected: tuple[str, ...], what: str) -> None:
  """Refuses entries of `folder` other than `expected` (hidden ones aside): a misnamed folder
  (test/mask, train/normals) would otherwise be ignored without a word."""
  stray = sorted(p.name for p in folder.iterdir() if p.name not in expected and not p.name.startswith("."))
  if stray:
    raise DatasetError(f"{folder}: holds {stray[:5]} besides {', '.join(e + '/' for e in expected)} ({what})")


def _masks_by_stem(folder: Path) -> dict[str, Path]:
  """The masks of `folder` by the stem of the image each belongs to (`<stem>` or `<stem>_mask`); a second
  mask for one stem is refused."""
  masks: dict[str, Path] = {}
  for m in _list_images(folder):
    stem = m.stem[:-5] if m.stem.endswith("_mask") else m.stem
    if stem in masks:
      raise DatasetError(f"{m}: a second mask for image stem {stem!r} (first: {masks[stem]})")
    masks[stem] = m
  return masks


def read_folder(root: str | os.PathLike) -> Dataset:
  """Reads root/{train/normal, test/normal, test/abnormal, [test/masks]}."""
  root = Path(root)
  rel = lambda p: p.relative_to(root).as_posix()
  _only(root / "train", ("normal",), "the train split is normal images only")
  _only(root / "test", ("normal", "abnormal", "masks"), "the plain folder layout")
  train = [Sample(str(p), rel(p), 0, "normal") for p in _list_images(root / "train" / "normal")]
  if not train:
    raise DatasetError(f"{root / 'train' / 'normal'}: no images")
  test = [Sample(str(p), rel(p), 0, "normal") for p in _list_images(root / "test" / "normal")]
  abnormal = _list_images(root / "test" / "abnormal")
  mask_dir = root / "test" / "masks"
  masks = _masks_by_stem(mask_dir) if mask_dir.is_dir() else {}
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
  _check_unique(train, test)
  return Dataset(root=str(root), layout=FOLDER, train=tuple(train), test=tuple(test))


def read_mvtec(root: str | os.PathLike) -> Dataset:
  """Reads root/{train/good, test/good, test/<defect>/, [ground_truth/<defect>/<stem>_mask.*]}."""
  root = Path(root)
  rel = lambda p: p.relative_to(root).as_posix()
  train = [Sample(str(p), rel(p), 0, "good") for p in _list_images(root / "train" / "good")]
  if not train:
    raise DatasetError(f"{root / 'train' / 'good'}: no images")
  _only(root / "train", ("good",), "the train split is normal images only")
  test = [Sample(str(p), rel(p), 0, "good") for p in _list_images(root / "test" / "good")]
  gt_root = root / "ground_truth"
  if gt_root.is_dir():  # ground_truth/good (empty masks of normal images) is allowed and not read
    defects = [p.name for p in (root / "test").iterdir() if p.is_dir()]
    _only(gt_root, tuple(defects), "one mask folder per defect folder of test/")
  for d in sorted((root / "test").iterdir()):
    if d.name == "good" or d.name.startswith("."):
      continue
    if not d.is_dir():
      raise DatasetError(f"{d}: unexpected file in {root / 'test'} (expected good/ and one folder per defect type)")
    masks = {}
    if gt_root.is_dir():
      if not (gt_root / d.name).is_dir():
        raise DatasetError(f"{d}: no mask folder {gt_root / d.name} (ground_truth/ has masks for other defects)")
      masks = _masks_by_stem(gt_root / d.name)
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
  _check_unique(train, test)
  return Dataset(root=str(root), layout=MVTEC, train=tuple(train), test=tuple(test))


def load_dataset(root: str | os.PathLike) -> Dataset:
  """Reads a dataset in whichever accepted layout `root` has (see detect_layout)."""
  readers = {MEDICLIP: read_mediclip, FOLDER: read_folder, MVTEC: read_mvtec}
  return readers[detect_layout(root)](root)
