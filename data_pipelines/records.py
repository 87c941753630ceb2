"""Dataset records, and random-access sources of them over files or over TFDS ArrayRecord builds.

A record is what `source[i]` returns. Anomaly-detection records (`RECORD_KEYS`):
  "image"       np.uint8 (H, W, C), C = 1 or 3, at the file's own resolution: `preprocess.load_native`
                with a channel axis. A TFDS build stores one C for the whole dataset (`dataset_channels`):
                1 when every image is grey, else 3, grey images then stored with R = G = B (exact: PIL's
                RGB -> "L" of equal channels gives the value back, so `preprocess.train_array`/`test_array`
                give identical model input either way).
  "mask"        np.uint8 (H, W, 1) in {0, 1} (`preprocess.load_native_mask`); all zero without a mask.
                Same H, W as the image, refused otherwise (`preprocess.check_mask_size`).
  "has_mask"    bool
  "label"       int, 0 normal, 1 abnormal
  "class_name"  str, the listing's class (BUSI benign/malignant, an MVTec defect type, "normal"/"good")
  "name"        str, `datasets.Sample.name`: the stable id support-set files use
Image-text pair records (`PAIR_KEYS`): "image" (as above), "text" str, "name" str (the image path relative
to the pairs file's image root: its folder, or an `image_root`, see `read_pairs`), "label" int (0 when the
file has none).

Sources (`len(source)`, `source[i]`, picklable for grain's worker processes):
  FileSource(samples)            decodes the files of `datasets.Sample`s (`dataset.train`, `dataset.test`)
  PairFileSource(pairs)          decodes the files of an image-text pair listing (`read_pairs`)
  open_tfds(directory, split)    reads a TFDS build (`launch/prepare_data.py`; builders in
                                 `data_pipelines/tfds_builders.py`) by random access, without TensorFlow
Each has `scalars()`: every record's name, label, class name (text) and has_mask without decoding an image.
`tfds_dataset(directory)` turns a build into a `datasets.Dataset` (layout `TFDS`) whose samples are the
records in record order, so code written for listings (support sets, labels) works on a build unchanged.

This module imports only numpy and PIL (and the package's readers); `tensorflow_datasets` is imported
inside the functions that read builds, so the package works without the `tfds` extra.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines import datasets, preprocess

RECORD_KEYS = ("image", "mask", "has_mask", "label", "class_name", "name")
PAIR_KEYS = ("image", "text", "name", "label")
TFDS = "tfds"
"""`datasets.Dataset.layout` of a dataset read from a TFDS build (`tfds_dataset`)."""
ANOMALY, PAIRS = "anomaly", "pairs"
PAIR_SUFFIXES = (".jsonl", ".json", ".csv")

# PIL modes that `preprocess.load_native` returns as 2-D grey arrays; every other mode it reads is colour.
_GREY_MODES = ("L",) + preprocess._TO_L + preprocess._HIGH_DEPTH  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------- channels


def native_channels(path: str | os.PathLike) -> int:
  """1 when `preprocess.load_native(path)` gives a grey (H, W) array, 3 when colour. Reads the file's
  header only (PIL opens lazily); a mode `preprocess` does not read, or a file PIL cannot open, is decoded
  so that the error is `preprocess`'s, naming the file."""
  try:
    with Image.open(path) as im:
      mode = im.mode
  except (OSError, ValueError, SyntaxError, EOFError):
    mode = None
  if mode in _GREY_MODES:
    return 1
  if mode in preprocess.MODES:
    return 3
  return 1 if preprocess.load_native(path).ndim == 2 else 3  # raises for unreadable files and unknown modes


def dataset_channels(paths, progress=None) -> int:
  """The C a build stores: 1 when every image is grey, else 3. One header read per file (no pixel
  decoding: about 0.1 ms a file on local disk), stopping at the first colour file. `progress(n)`, if given,
  is called with the number of files read so far now and then."""
  n = 0
  for n, path in enumerate(paths, 1):
    if native_channels(path) == 3:
      return 3
    if progress is not None and n % 1000 == 0:
      progress(n)
  return 1


def _with_channels(native: np.ndarray, channels: int | None, path) -> np.ndarray:
  """`load_native` output as (H, W, C): C native when `channels` is None, else exactly `channels`."""
  a = native[..., None] if native.ndim == 2 else native
  if channels is None or a.shape[-1] == channels:
    return np.ascontiguousarray(a, np.uint8)
  if channels == 3 and a.shape[-1] == 1:
    return np.ascontiguousarray(np.repeat(a, 3, axis=-1), np.uint8)
  raise ValueError(f"{path}: a colour image, but this dataset stores {channels} channel(s) (decided from the "
                   f"listing before the build: was the file replaced meanwhile?)")


def _check_channels(channels: int | None) -> None:
  if channels not in (None, 1, 3):
    raise ValueError(f"channels must be None (as stored), 1 or 3, got {channels!r}")


# ------------------------------------------------------------------------------------------ file sources


def file_record(sample: datasets.Sample, channels: int | None = None) -> dict:
  """The record of one listed sample, read from its files (module docstring). Errors name the file."""
  native = preprocess.load_native(sample.path)
  image = _with_channels(native, channels, sample.path)
  if sample.mask_path is None:
    mask = np.zeros(image.shape[:2] + (1,), np.uint8)
  else:
    m = preprocess.load_native_mask(sample.mask_path)
    preprocess.check_mask_size(native, m, sample.path, sample.mask_path)
    mask = np.ascontiguousarray(m[..., None], np.uint8)
  return {"image": image, "mask": mask, "has_mask": sample.mask_path is not None, "label": int(sample.label),
          "class_name": str(sample.clsname), "name": str(sample.name)}


def _index(i, n: int) -> int:
  i = int(np.asarray(i).item()) if not isinstance(i, int) else i
  if not -n <= i < n:
    raise IndexError(f"record index {i} out of range for {n} records")
  return i % n


class FileSource:
  """Random access to the records of listed samples (`dataset.train`, `dataset.test`), decoded from their
  files on each access. `channels=None` gives each image its native C (1 grey, 3 colour); 1 or 3 gives
  every record that C, as a TFDS build of the same listing stores it (grey repeated to R = G = B)."""

  def __init__(self, samples, channels: int | None = None):
    _check_channels(channels)
    self.samples = tuple(samples)
    self.channels = channels

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, i) -> dict:
    return file_record(self.samples[_index(i, len(self.samples))], self.channels)

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def scalars(self) -> dict:
    """name, label, class_name, has_mask of every record, from the listing (no file is opened)."""
    return {"name": [s.name for s in self.samples], "label": np.asarray([s.label for s in self.samples], np.int64),
            "class_name": [s.clsname for s in self.samples],
            "has_mask": np.asarray([s.mask_path is not None for s in self.samples], bool)}

  def __repr__(self) -> str:
    return f"FileSource({len(self.samples)} samples, channels={self.channels})"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One image-text pair of a pairs file: `path` absolute, `name` the image path as listed (relative to the
  image root: the file's folder, or the `image_root` `read_pairs` was given or found), `source` "file:line",
  `class_name` the line's optional "class" ("" without one)."""
  path: str
  name: str
  text: str
  label: int
  source: str
  class_name: str = ""


def _pair(raw: dict, folder: Path, where: str) -> Pair:
  missing = [k for k in ("image", "text") if k not in raw or raw[k] is None]
  if missing:
    raise datasets.DatasetError(f"{where}: missing {', '.join(repr(k) for k in missing)} (a pair needs 'image', "
                                f"a path relative to {folder}, and 'text'; 'label' is optional)")
  image, text = raw["image"], raw["text"]
  if not isinstance(image, str) or not image.strip():
    raise datasets.DatasetError(f"{where}: 'image' must be a non-empty path, got {image!r}")
  if not isinstance(text, str) or not text.strip():
    raise datasets.DatasetError(f"{where}: empty 'text' for image {image!r}")
  label = raw.get("label")
  if label is None or label == "":
    label = 0
  elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
    label = int(label)
  if not isinstance(label, int) or isinstance(label, bool):
    raise datasets.DatasetError(f"{where}: 'label' must be an integer, got {label!r}")
  class_name = raw.get("class")
  if class_name is None:
    class_name = ""
  if not isinstance(class_name, str):
    raise datasets.DatasetError(f"{where}: 'class' must be a string (a class name), got {class_name!r}")
  path = datasets._inside(folder, image, where, "image")  # pylint: disable=protected-access
  if not path.is_file():
    raise datasets.DatasetError(f"{where}: image {path} does not exist")
  return Pair(path=str(path), name=Path(image).as_posix(), text=text, label=label, source=where,
              class_name=class_name)


PAIRS_META = "pairs_meta.json"
"""Sidecar of a pairs file (`data_pipelines/captions.py` writes it): its "image_root", if any, is the
absolute folder the file's images are relative to."""


def _image_root(path: Path, image_root) -> Path:
  """Where the images of pairs file `path` are: `image_root` if given, else the "image_root" of
  <its folder>/pairs_meta.json if that names one, else the file's folder."""
  if image_root is not None:
    root = Path(image_root)
    if not root.is_dir():
      raise datasets.DatasetError(f"{path}: image_root {root} is not a directory")
    return root
  meta_path = path.parent / PAIRS_META
  if not meta_path.is_file():
    return path.parent
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise datasets.DatasetError(f"{meta_path}: unreadable ({e}); expected a JSON object, optionally with "
                                f"'image_root' (the absolute image folder of {path.name})") from e
  if not isinstance(meta, dict):
    raise datasets.DatasetError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
  if "image_root" not in meta:
    return path.parent
  root = meta["image_root"]
  if not isinstance(root, str) or not os.path.isabs(root):
    raise datasets.DatasetError(f"{meta_path}: 'image_root' must be an absolute path, got {root!r}")
  if not Path(root).is_dir():
    raise datasets.DatasetError(f"{meta_path}: 'image_root' {root} is not a directory")
  return Path(root)


def read_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> tuple[Pair, ...]:
  """Reads an image-text pairs file: JSON lines (`.jsonl`/`.json`, one object per line) or CSV with a header
  row, with keys/columns "image" (relative to the image root), "text", optional "label" (int, default 0) and
  optional "class" (`Pair.class_name`); other keys are ignored. The image root is `image_root` when given,
  else the "image_root" recorded in a `pairs_meta.json` beside the file (`data_pipelines/captions.py`
  writes one to caption a dataset where it lies), else the file's folder; images must lie inside it.
  Missing columns, missing images, empty text and malformed lines are refused naming file:line."""
  path = Path(path)
  if not path.is_file():
    raise datasets.DatasetError(f"{path}: pairs file does not exist")
  if path.suffix.lower() not in PAIR_SUFFIXES:
    raise datasets.DatasetError(f"{path}: expected a pairs file ending in {', '.join(PAIR_SUFFIXES)}")
  folder, out = _image_root(path, image_root), []
  with open(path, encoding="utf-8", newline="") as f:
    if path.suffix.lower() == ".csv":
      reader = csv.DictReader(f)
      if reader.fieldnames is None or not {"image", "text"} <= set(reader.fieldnames):
        raise datasets.DatasetError(f"{path}:1: the header must name the columns 'image' and 'text' (and optionally "
                                    f"'label'), got {reader.fieldnames}")
      for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
          continue
        out.append(_pair(row, folder, f"{path}:{reader.line_num}"))
    else:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          raw = json.loads(line)
        except json.JSONDecodeError as e:
          raise datasets.DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(raw, dict):
          raise datasets.DatasetError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        out.append(_pair(raw, folder, where))
  if not out:
    raise datasets.DatasetError(f"{path}: no pairs")
  return tuple(out)


class PairFileSource:
  """Random access to image-text pair records decoded from files (`read_pairs`); `channels` as FileSource."""

  def __init__(self, pairs, channels: int | None = None):
    _check_channels(channels)
    self.pairs = tuple(pairs)
    self.channels = channels

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i) -> dict:
    p = self.pairs[_index(i, len(self.pairs))]
    image = _with_channels(preprocess.load_native(p.path), self.channels, p.path)
    return {"image": image, "text": p.text, "name": p.name, "label": int(p.label)}

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def scalars(self) -> dict:
    return {"name": [p.name for p in self.pairs], "label": np.asarray([p.label for p in self.pairs], np.int64),
            "text": [p.text for p in self.pairs]}

  def __repr__(self) -> str:
    return f"PairFileSource({len(self.pairs)} pairs, channels={self.channels})"


# ------------------------------------------------------------------------------------------- TFDS builds


def _is_version_dir(p: Path) -> bool:
  return (p / "dataset_info.json").is_file() and (p / "features.json").is_file()


def _built_under(root: Path) -> list[Path]:
  """Version directories of built datasets at `root`: root itself, or root/<version>, root/<builder>/<version>
  or root/<builder>/<config>/<version> (TFDS's temporary `incomplete.*` folders of a running build, hidden
  folders and `downloads` excluded). Only directories are listed, so a folder of many images is cheap."""
  if _is_version_dir(root):
    return [root]
  found, level = [], [root]
  for _ in range(3):
    nxt = []
    for d in level:
      try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
      except OSError:
        continue
      for e in entries:
        if e.name.startswith(("incomplete", ".")) or e.name == "downloads" or not e.is_dir():
          continue
        (found if _is_version_dir(Path(e.path)) else nxt).append(Path(e.path))
    level = nxt
  return found


def is_tfds_dir(path: str | os.PathLike) -> bool:
  """True when `path` is a built TFDS dataset (its version directory) or holds one or more below it
  (a data_dir: <builder>/[<config>/]<version>). `open_tfds` then opens it, or names the choices."""
  p = Path(path)
  return p.is_dir() and bool(_built_under(p))


def resolve_tfds_dir(directory: str | os.PathLike) -> str:
  """The version directory of a build: `directory` itself, or the one build under a data_dir. Errors
  (ValueError) say what is there instead."""
  root = Path(directory)
  if not root.is_dir():
    raise ValueError(f"{root}: no such directory (expected a TFDS build from launch/prepare_data.py: the "
                     f"directory it prints, or the --out data_dir holding exactly one build)")
  found = _built_under(root)
  if not found:
    raise ValueError(f"{root}: holds no TFDS build (no dataset_info.json + features.json here or at "
                     f"<builder>/[<config>/]<version> below; build one with launch/prepare_data.py)")
  if len(found) > 1:
    listing = "\n  ".join(str(p) for p in found)
    raise ValueError(f"{root}: holds {len(found)} TFDS builds; pass one of them:\n  {listing}")
  return str(found[0])


def _read_only_builder(version_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.builder_from_directory(version_dir)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _kind(features) -> str:
  return PAIRS if "text" in features.keys() else ANOMALY


def tfds_info(directory: str | os.PathLike) -> dict:
  """What a build holds, for logging: {"directory" (the version dir), "builder", "config", "version",
  "kind" ("anomaly" or "pairs"), "splits" {split: examples}, "channels", "masks" {split: images with a mask}
  (anomaly builds), "has_masks", "metadata" (what the builder recorded: source, fingerprint, ...)}."""
  version_dir = resolve_tfds_dir(directory)
  info = _read_only_builder(version_dir).info
  meta = dict(info.metadata or {})
  masks = {k: int(v) for k, v in (meta.get("masks") or {}).items()}
  return {"directory": version_dir, "builder": info.name, "config": info.config_name, "version": str(info.version),
          "kind": _kind(info.features), "splits": {k: int(v.num_examples) for k, v in info.splits.items()},
          "channels": int(info.features["image"].shape[-1]), "masks": masks, "has_masks": any(masks.values()),
          "metadata": meta}


class TfdsSource:
  """Random access to the records of one split of a TFDS build (ArrayRecord files), as numpy, without
  TensorFlow. Opens the files on first use; pickles as (directory, split), so each grain worker opens
  its own readers."""

  def __init__(self, directory: str | os.PathLike, split: str):
    self.directory = resolve_tfds_dir(directory)
    self.split = split
    self._source = None
    self._kind = None
    self._open()  # fail now, naming the splits, rather than in a worker

  def _open(self, skip_images: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = _read_only_builder(self.directory)
    if self.split not in builder.info.splits:
      raise ValueError(f"{self.directory}: no split {self.split!r}; it has {sorted(builder.info.splits)}")
    decoders = None
    if skip_images:
      decoders = {k: tfds.decode.SkipDecoding() for k in ("image", "mask") if k in builder.info.features.keys()}
    source = builder.as_data_source(split=self.split, decoders=decoders)
    if not skip_images:
      self._source, self._kind = source, _kind(builder.info.features)
    return source

  @property
  def kind(self) -> str:
    if self._kind is None:
      self._open()
    return self._kind

  def __getstate__(self):
    return {"directory": self.directory, "split": self.split}

  def __setstate__(self, state):
    self.directory, self.split = state["directory"], state["split"]
    self._source = self._kind = None

  def __len__(self) -> int:
    if self._source is None:
      self._open()
    return len(self._source)

  def _record(self, ex: dict, i: int) -> dict:
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if self._kind == PAIRS:
      return {"image": image, "text": _text(ex["text"]), "name": _text(ex["name"]), "label": int(ex["label"])}
    mask = np.asarray(ex["mask"], np.uint8)
    if mask.ndim == 2:
      mask = mask[..., None]
    if mask.shape[:2] != image.shape[:2]:
      raise ValueError(f"{self.directory} {self.split}[{i}] ({_text(ex['name'])}): mask {mask.shape[:2]} differs "
                       f"from its image {image.shape[:2]}")
    return {"image": image, "mask": mask, "has_mask": bool(ex["has_mask"]), "label": int(ex["label"]),
            "class_name": _text(ex["class_name"]), "name": _text(ex["name"])}

  def __getitem__(self, i) -> dict:
    if self._source is None:
      self._open()
    i = _index(i, len(self._source))
    return self._record(self._source[i], i)

  def __getitems__(self, indices) -> list[dict]:
    if self._source is None:
      self._open()
    idx = [_index(i, len(self._source)) for i in indices]
    return [self._record(ex, i) for ex, i in zip(self._source.__getitems__(idx), idx)]

  def scalars(self, chunk: int = 1024) -> dict:
    """Every record's name, label, class_name and has_mask (pairs: name, label, text) in record order,
    without decoding an image: the image and mask PNGs are skipped (`tfds.decode.SkipDecoding`). Each
    record's bytes are still read and parsed, so this costs about one sequential read of the split."""
    source = self._open(skip_images=True)
    kind = self.kind
    keys = ("name", "label", "text") if kind == PAIRS else ("name", "label", "class_name", "has_mask")
    out = {k: [] for k in keys}
    for start in range(0, len(source), chunk):
      for ex in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
        for k in keys:
          out[k].append(ex[k])
    res = {k: [_text(v) for v in out[k]] for k in keys if k in ("name", "class_name", "text")}
    res["label"] = np.asarray(out["label"], np.int64)
    if "has_mask" in out:
      res["has_mask"] = np.asarray(out["has_mask"], bool)
    return {k: res[k] for k in keys}

  def __repr__(self) -> str:
    return f"TfdsSource({self.directory!r}, split={self.split!r})"


def open_tfds(directory: str | os.PathLike, split: str) -> TfdsSource:
  """Random-access source over split `split` of a TFDS build: `directory` is the version directory (what
  launch/prepare_data.py prints) or a data_dir holding exactly one build. Records as the module docstring."""
  return TfdsSource(directory, split)


def record_ref(version_dir: str, split: str, i: int) -> str:
  """How a record of a build is named where a file path would be (`Sample.path`, error messages)."""
  return f"{version_dir}::{split}[{i}]"


def tfds_dataset(directory: str | os.PathLike) -> datasets.Dataset:
  """An anomaly build as a `datasets.Dataset` (layout `TFDS`, root the version directory): train and test
  samples in record order (`dataset.test[i]` is `open_tfds(root, "test")[i]`), read from the records' scalar
  features without decoding images (`TfdsSource.scalars`). `Sample.path` and `mask_path` are record
  references (`record_ref`), not files; `mask_path` is None for records without a mask, so `has_masks`
  and `datasets.check_masks_complete` work as on a listing."""
  version_dir = resolve_tfds_dir(directory)
  splits = {}
  for split in ("train", "test"):
    source = TfdsSource(version_dir, split)
    if source.kind != ANOMALY:
      raise ValueError(f"{version_dir}: an image-text pair build, not an anomaly dataset (train/test with labels)")
    sc = source.scalars()
    splits[split] = tuple(
        datasets.Sample(path=record_ref(version_dir, split, i), name=sc["name"][i], label=int(sc["label"][i]),
                        clsname=sc["class_name"][i],
                        mask_path=record_ref(version_dir, split, i) + "/mask" if sc["has_mask"][i] else None,
                        source=record_ref(version_dir, split, i) + f" ({sc['name'][i]})")
        for i in range(len(sc["name"])))
  return datasets.Dataset(root=version_dir, layout=TFDS, train=splits["train"], test=splits["test"])
