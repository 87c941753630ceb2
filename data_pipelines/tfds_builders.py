"""TFDS builders: every data source we read, as ArrayRecord files readable by random access without TensorFlow.

  AnomalyDataset(root, name=...)    a dataset folder in any layout `datasets.load_dataset` reads (MediCLIP,
                                    plain folders, MVTec), splits "train" and "test"
  PhantomChest(n_train, n_test_normal, n_test_abnormal, size, seed)
                                    generated chest phantoms with ground truth (`phantom.py`), generated one
                                    example at a time, so 20,000 images never sit in memory together
  ImageTextPairs(pairs_file, name=...)
                                    image-text pairs from a JSONL or CSV file, split "train"

Every builder writes `file_format="array_record"`, features as `records.RECORD_KEYS` (pairs:
`records.PAIR_KEYS`) with images and masks stored as PNG: lossless, so a record read back is the file's
decoded pixels exactly (`records.FileSource` gives the same dict from the files). The examples are what
`records.FileSource`/`PairFileSource` return, encoded to PNG (in `workers` processes when > 1). TFDS stores
examples in the order of a hash of their keys (deterministic; the keys are the sample names), not in
listing order: `records.tfds_dataset` reads the order back.

Each builder takes `name` (its BuilderConfig: several datasets live in one data_dir as
<data_dir>/<builder>/<name>/1.0.0) and records in the build's metadata a fingerprint of its inputs (names,
labels, classes, file sizes and modification times; phantom parameters and the generator's source).
`build()` uses it: a second build into the same directory reuses the data when the fingerprint matches
and is refused when it does not (TFDS alone would reuse stale data silently), unless `overwrite=True`.

Bad inputs are refused naming the file, before anything is kept (TFDS writes into a temporary folder
and moves it into place only when the build is complete): unreadable or corrupt images and masks, a
mask whose size differs from its image's, an abnormal test image without a mask when others have one
(`datasets.check_masks_complete`), and everything `datasets.load_dataset` / `records.read_pairs` refuse.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from data_pipelines import datasets, phantom, records

VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "First release: PNG images at the files' own resolution (C = 1 when every image is grey, "
                          "else 3), masks in {0, 1}, labels, class names and sample names."}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 16  # examples per task sent to a worker process


def _png(a: np.ndarray) -> bytes:
  """(H, W, 1) or (H, W, 3) uint8 as PNG bytes (lossless; zlib level 3: 2.7x faster to encode than PIL's default
  6 on BUSI images, and no larger)."""
  im = Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
  buf = io.BytesIO()
  im.save(buf, format="png", compress_level=3)
  return buf.getvalue()


def _encoded(record: dict) -> dict:
  """A record with its image (and mask) as PNG bytes: the example TFDS stores."""
  out = dict(record)
  out["image"] = _png(record["image"])
  if "mask" in record:
    out["mask"] = _png(record["mask"])
  return out


def anomaly_features(channels: int):
  """Features of an anomaly-detection record (`records.RECORD_KEYS`)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
      "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "has_mask": tfds.features.Scalar(np.bool_),
      "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
      "class_name": tfds.features.Text(),
      "name": tfds.features.Text(),
  })


def pair_features(channels: int):
  """Features of an image-text pair record (`records.PAIR_KEYS`)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
      "text": tfds.features.Text(),
      "name": tfds.features.Text(),
      "label": tfds.features.Scalar(np.int64),
  })


# -------------------------------------------------------------------------------- progress and workers


class _Progress:
  """Progress of one split: a tqdm bar on a terminal; into a log file or pipe a plain line every 30 s and at
  the end (as the training progress does). Counts examples handed to TFDS, with the known total."""

  def __init__(self, desc: str, total: int, enabled: bool, stream=sys.stderr, every_s: float = 30.0):
    self.desc, self.total, self.stream, self.every_s = desc, int(total), stream, every_s
    self.enabled = enabled
    tty = hasattr(stream, "isatty") and stream.isatty()
    self.lines = enabled and not tty
    self.bar = tqdm(total=self.total, desc=desc, file=stream, disable=not (enabled and tty), unit="img",
                    mininterval=0.2, dynamic_ncols=True)
    self.t0 = self.last = time.perf_counter()
    self.n = 0

  def update(self, k: int = 1) -> None:
    self.n += k
    self.bar.update(k)
    now = time.perf_counter()
    if self.lines and (now - self.last >= self.every_s or self.n == self.total):
      self.last = now
      rate = self.n / max(now - self.t0, 1e-9)
      eta = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
      print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), {rate:.1f} img/s, "
            f"ETA {eta}", file=self.stream, flush=True)

  def close(self) -> None:
    self.bar.close()


def _run_chunk(fn, items):
  return [fn(x) for x in items]


def _ordered_map(fn, items, executor):
  """fn over items in order; in the executor's worker processes when given, with at most 2 chunks per worker
  in flight, so memory stays bounded whatever the number of items."""
  if executor is None:
    yield from map(fn, items)
    return
  it = iter(items)
  chunks = iter(lambda: list(itertools.islice(it, _CHUNK)), [])  # lists of _CHUNK items until exhausted
  pending = collections.deque(executor.submit(_run_chunk, fn, c)
                              for c in itertools.islice(chunks, 2 * executor._max_workers))  # pylint: disable=protected-access
  while pending:
    done = pending.popleft().result()
    nxt = next(chunks, None)
    if nxt is not None:
      pending.append(executor.submit(_run_chunk, fn, nxt))
    yield from done


@dataclasses.dataclass(frozen=True)
class _FileExample:
  """A listed sample -> (key, encoded example); picklable for worker processes."""
  channels: int

  def __call__(self, sample: datasets.Sample):
    return sample.name, _encoded(records.file_record(sample, self.channels))


@dataclasses.dataclass(frozen=True)
class _PairExample:
  channels: int

  def __call__(self, item):
    key, pair = item
    return key, _encoded(records.PairFileSource([pair], self.channels)[0])


@dataclasses.dataclass(frozen=True)
class _PhantomExample:
  size: int

  def __call__(self, item):
    name, seed, kind, label = item
    im, m = phantom.phantom(self.size, seed, kind)
    image = np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)[..., None]  # as phantom.make_phantom_dataset
    mask = (m != 0).astype(np.uint8)[..., None]
    return name, _encoded({"image": image, "mask": mask, "has_mask": kind is not None, "label": label,
                           "class_name": kind or "normal", "name": name})


def _stat(path: str | None):
  if path is None:
    return None
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS's warning for a BuilderConfig made at run time, and its INFO lines, off while a builder is made."""
  logger = logging.getLogger("absl")
  old = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(old)


# ------------------------------------------------------------------------------------------------ builders


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the builders share: a named config, ArrayRecord files, the input fingerprint, progress, workers."""
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = "The builders of data_pipelines/tfds_builders.py take their input as arguments."
  kind = records.ANOMALY

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    """None: no download checksums file to find next to this module. TFDS 4.9's own lookup for a builder
    defined inside a package touches `importlib_resources`, which it declares only for Python < 3.9, so it
    fails in a fresh environment (ModuleNotFoundError)."""
    return None

  def __init__(self, *, name: str, data_dir: str | os.PathLike, description: str, workers: int = 0,
               progress: bool = True):
    if not _NAME.match(name or ""):
      raise ValueError(f"dataset name {name!r}: use letters, digits, '_', '-' and '.' (starting with a letter or "
                       f"digit); it names the folder <data_dir>/{self.name}/<name>")
    if workers < 0:
      raise ValueError(f"workers must be >= 0 (0 = in this process), got {workers}")
    self.workers, self.progress = int(workers), bool(progress)
    self._description = description
    config = tfds.core.BuilderConfig(name=name, description=description)
    with _quiet_tfds():
      super().__init__(data_dir=os.fspath(data_dir), config=config, file_format="array_record")

  # Subclasses: channels, split sizes, masks per split, the fingerprint's inputs, the examples.
  channels: int

  def _split_items(self) -> dict[str, list]:
    raise NotImplementedError

  def _example_fn(self):
    raise NotImplementedError

  def _masks(self) -> dict[str, int]:
    return {}

  def _fingerprint_inputs(self) -> dict:
    raise NotImplementedError

  def _source(self) -> str:
    raise NotImplementedError

  @property
  def fingerprint(self) -> str:
    """sha256 of what the build is made from (see the module docstring); stored in the build's metadata."""
    if not hasattr(self, "_fingerprint"):
      self._fingerprint = _digest({"builder": self.name, "version": str(self.VERSION), "channels": self.channels,
                                   "inputs": self._fingerprint_inputs()})
    return self._fingerprint

  def _info(self):
    features = pair_features(self.channels) if self.kind == records.PAIRS else anomaly_features(self.channels)
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=features,
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.metadata.update(kind=self.kind, channels=self.channels, fingerprint=self.fingerprint,
                              source=self._source(), masks=self._masks(), builder_version=str(self.VERSION))
    return {split: self._generate_examples(split, items) for split, items in self._split_items().items()}

  def _executor(self):
    """The worker processes (spawned once per build, on first use; `close_workers` ends them), or None."""
    if self.workers <= 1:
      return None
    if getattr(self, "_pool", None) is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(self.workers,
                                                          mp_context=multiprocessing.get_context("spawn"))
    return self._pool

  def close_workers(self) -> None:
    if getattr(self, "_pool", None) is not None:
      self._pool.shutdown(cancel_futures=True)
      self._pool = None

  def _generate_examples(self, split: str, items):
    bar = _Progress(f"{self.name}/{self.builder_config.name} {split}", len(items), self.progress)
    try:
      for key, example in _ordered_map(self._example_fn(), items, self._executor()):
        yield key, example
        bar.update()
    finally:
      bar.close()
    if self.progress:  # TFDS now orders the examples by key hash and writes the files: no progress of its own
      print(f"{bar.desc}: writing {len(items)} records", file=bar.stream, flush=True)


class AnomalyDataset(_Builder, skip_registration=True):
  """A dataset folder (any layout `datasets.load_dataset` reads, with all its checks) as splits "train" and
  "test" of anomaly records. `name` defaults to the folder's name. The channel count is decided before the
  build by one header read per image (`records.dataset_channels`)."""
  name = "anomaly_dataset"

  def __init__(self, root: str | os.PathLike, *, data_dir: str | os.PathLike, name: str | None = None,
               workers: int = 0, progress: bool = True):
    self.dataset = datasets.load_dataset(root)
    datasets.check_masks_complete(self.dataset)
    samples = self.dataset.train + self.dataset.test
    self.channels = records.dataset_channels(s.path for s in samples)
    root_name = Path(os.path.abspath(root)).name
    super().__init__(name=name or root_name, data_dir=data_dir, workers=workers, progress=progress,
                     description=f"{self.dataset.layout} dataset {os.path.abspath(root)}: "
                                 f"{len(self.dataset.train)} train, {len(self.dataset.test)} test images")

  def _split_items(self):
    return {"train": list(self.dataset.train), "test": list(self.dataset.test)}

  def _example_fn(self):
    return _FileExample(self.channels)

  def _masks(self):
    return {"train": sum(s.mask_path is not None for s in self.dataset.train),
            "test": sum(s.mask_path is not None for s in self.dataset.test)}

  def _fingerprint_inputs(self):
    return {"layout": self.dataset.layout,
            **{split: [[s.name, s.label, s.clsname, _stat(s.path), s.mask_path and os.path.relpath(
                s.mask_path, self.dataset.root), _stat(s.mask_path)] for s in samples]
               for split, samples in (("train", self.dataset.train), ("test", self.dataset.test))}}

  def _source(self):
    return os.path.abspath(self.dataset.root)


class PhantomChest(_Builder, skip_registration=True):
  """Generated chest phantoms (`phantom.phantom`) with ground-truth masks: train normals, test normals, then
  test abnormals cycling through `phantom.ANOMALIES`, the same images and names as
  `phantom.make_phantom_dataset(n_train, n_test_normal, n_test_abnormal, size, seed)` writes. Grey, C = 1.
  `name` defaults to phantom_<n_train>-<n_test_normal>-<n_test_abnormal>_<size>px_seed<seed>."""
  name = "phantom_chest"
  channels = 1

  def __init__(self, n_train: int = 16, n_test_normal: int = 24, n_test_abnormal: int = 24, size: int = 224,
               seed: int = 0, *, data_dir: str | os.PathLike, name: str | None = None, workers: int = 0,
               progress: bool = True):
    for what, n in (("n_train", n_train), ("n_test_normal", n_test_normal), ("n_test_abnormal", n_test_abnormal)):
      if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    if n_train == 0 or n_test_normal + n_test_abnormal == 0:
      raise ValueError("a phantom dataset needs training images and test images")
    if not 64 <= size <= 224:
      raise ValueError(f"phantom size must be in [64, 224], got {size}")
    self.params = {"n_train": int(n_train), "n_test_normal": int(n_test_normal),
                   "n_test_abnormal": int(n_test_abnormal), "size": int(size), "seed": int(seed)}
    default = f"phantom_{n_train}-{n_test_normal}-{n_test_abnormal}_{size}px_seed{seed}"
    super().__init__(name=name or default, data_dir=data_dir, workers=workers, progress=progress,
                     description=f"chest phantoms {self.params}")

  def _split_items(self):
    p = self.params
    seed = lambda split, i: phantom._image_seed(p["seed"], split, i)  # pylint: disable=protected-access
    train = [(f"train/normal/phantom_{i:04d}.png", seed("train", i), None, 0) for i in range(p["n_train"])]
    test = [(f"test/normal/phantom_{i:04d}.png", seed("test_normal", i), None, 0) for i in range(p["n_test_normal"])]
    for j in range(p["n_test_abnormal"]):
      kind, i = phantom.ANOMALIES[j % len(phantom.ANOMALIES)], p["n_test_normal"] + j
      test.append((f"test/abnormal/{kind}_{i:04d}.png", seed("test_abnormal", j), kind, 1))
    return {"train": train, "test": test}

  def _example_fn(self):
    return _PhantomExample(self.params["size"])

  def _masks(self):
    return {"train": 0, "test": self.params["n_test_abnormal"]}

  def _fingerprint_inputs(self):
    return {**self.params, "generator": hashlib.sha256(Path(phantom.__file__).read_bytes()).hexdigest()}

  def _source(self):
    return f"phantom.phantom {self.params}"


class ImageTextPairs(_Builder, skip_registration=True):
  """Image-text pairs from a JSONL or CSV file (`records.read_pairs`: "image" relative to the file's folder,
  "text", optional "label"), split "train". `name` defaults to the file's stem."""
  name = "image_text_pairs"
  kind = records.PAIRS

  def __init__(self, pairs_file: str | os.PathLike, *, data_dir: str | os.PathLike, name: str | None = None,
               workers: int = 0, progress: bool = True):
    self.pairs_file = os.path.abspath(pairs_file)
    self.pairs = records.read_pairs(pairs_file)
    self.channels = records.dataset_channels(p.path for p in self.pairs)
    super().__init__(name=name or Path(pairs_file).stem, data_dir=data_dir, workers=workers, progress=progress,
                     description=f"image-text pairs {self.pairs_file}: {len(self.pairs)} pairs")

  def _split_items(self):
    return {"train": [(f"{i:09d}", p) for i, p in enumerate(self.pairs)]}  # keys: the line order

  def _example_fn(self):
    return _PairExample(self.channels)

  def _fingerprint_inputs(self):
    return {"file": hashlib.sha256(Path(self.pairs_file).read_bytes()).hexdigest(),
            "images": [[p.name, _stat(p.path)] for p in self.pairs]}

  def _source(self):
    return self.pairs_file


# --------------------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class BuildResult:
  """Where a build went (the version directory: pass it as config.data.tfds_dir), its examples per split,
  bytes on disk, seconds the build took, and whether an existing build of the same inputs was reused."""
  directory: str
  splits: dict
  bytes: int
  seconds: float
  reused: bool


def disk_bytes(directory: str | os.PathLike) -> int:
  return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def stored_fingerprint(version_dir: str | os.PathLike) -> str | None:
  """The input fingerprint recorded in a build's metadata.json (None if it has none)."""
  path = Path(version_dir) / "metadata.json"
  try:
    return json.loads(path.read_text()).get("fingerprint")
  except (OSError, ValueError):
    return None


def build(builder: _Builder, overwrite: bool = False) -> BuildResult:
  """Builds `builder` into <data_dir>/<builder>/<name>/<version>, refusing to silently keep a stale build:

  - nothing there: builds it;
  - a complete build of the same inputs (same fingerprint): reuses it (`reused=True`), writes nothing;
  - a build of other inputs, or without our fingerprint, or a leftover folder: ValueError naming both sources,
    unless `overwrite`, which deletes it first and builds anew.
  TFDS's own progress bars are replaced by ours (known totals) for the duration of the build."""
  target = Path(builder.data_dir)
  if target.exists():
    if overwrite:
      shutil.rmtree(target)
    elif records._is_version_dir(target) and stored_fingerprint(target) == builder.fingerprint:  # pylint: disable=protected-access
      return BuildResult(str(target), _splits(target), disk_bytes(target), 0.0, reused=True)
    else:
      meta = {}
      with contextlib.suppress(OSError, ValueError):
        meta = json.loads((target / "metadata.json").read_text())
      was = f"built from {meta.get('source')!r}" if meta.get("source") else "not a complete build of ours"
      raise ValueError(f"{target}: already exists ({was}) and differs from these inputs ({builder._source()!r}, "
                       f"fingerprint {builder.fingerprint[:12]} vs {str(meta.get('fingerprint'))[:12]}); pass "
                       f"--overwrite (overwrite=True) to replace it, or give another --name / --out")
  active = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.disable_progress_bar()
  t0 = time.perf_counter()
  try:
    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent calls will reuse
    # this data." to stdout: noise here, and the second is not our policy (above).
    with tempfile.TemporaryDirectory(prefix="tfds_downloads_") as downloads, _quiet_tfds(), \
        contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_dir=downloads)
  finally:
    builder.close_workers()
    if active:
      tfds.enable_progress_bar()
  seconds = time.perf_counter() - t0
  return BuildResult(str(target), _splits(target), disk_bytes(target), seconds, reused=False)


def _splits(version_dir: Path) -> dict:
  info = json.loads((Path(version_dir) / "dataset_info.json").read_text())
  return {s["name"]: int(sum(int(n) for n in s.get("shardLengths", []))) for s in info.get("splits", [])}
