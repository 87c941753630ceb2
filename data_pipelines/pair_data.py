"""A run's image-text pairs as the config's `data.pairs` section describes them (MIRAGE's data).

The source is a built-in generator, whose pairs are written into `workdir/pairs_data` on first use
(`phantom_reports`: chest phantoms with findings reports from their ground truth; `busi_captions`,
`brainmri_captions`: class captions for every image of those datasets, which are read in place), or a
user's pairs file (JSONL or CSV, `records.read_pairs`). The pairs are split into train / val / test by
seed (stratified by class); false positives are injected into the training split only, with the truth
kept for analysis (`noisy`); validation and test keep their clean captions.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import ml_collections
import numpy as np

from data_pipelines import captions, datasets, preprocess, records
from mediclip_jax import parallel

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class PairSplits:
  """Images (n, S, S) float32 grey in [0, 1], texts, class indices and names per split.

  `texts["train"]` are the captions as trained (false positives injected), `clean_train_texts` the
  originals; `noisy` flags the injected pairs (analysis only: nothing in training reads it).
  """
  images: dict[str, np.ndarray]
  texts: dict[str, list[str]]
  labels: dict[str, np.ndarray]
  names: dict[str, list[str]]
  clean_train_texts: list[str]
  noisy: np.ndarray
  classes: tuple[str, ...]
  prompts: dict[str, tuple[str, ...]]
  pairs_file: str


def default_config() -> ml_collections.ConfigDict:
  """The `data.pairs` section."""
  c = ml_collections.ConfigDict()
  c.source = "phantom_reports"   # phantom_reports | busi_captions | brainmri_captions | a .jsonl/.json/.csv path
  # *_captions: the MediCLIP-layout dataset whose images are captioned (read in place)
  c.dataset_root = ml_collections.FieldReference(None, field_type=str)
  c.n = 2000                     # phantom_reports: pairs generated (normal and three anomaly kinds in balance)
  c.phantom_size = 64            # phantom_reports: generated image size (64..224)
  c.fp_rate = 0.0                # fraction of training captions replaced by another pair's (false positives)
  c.split = (0.8, 0.1, 0.1)      # train / val / test fractions, stratified by class, drawn from the seed
  # a user pairs file: class names by label index, for zero-shot evaluation (label 0 = normal); prompts are
  # "a medical image showing {name}" variants
  c.classes = ()
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `data.pairs` field that cannot work."""
  if c.source not in captions.SOURCES and not str(c.source).lower().endswith(records.PAIR_SUFFIXES):
    raise ValueError(f"config.data.pairs.source must be one of {captions.SOURCES} or a pairs file ending in "
                     f"{', '.join(records.PAIR_SUFFIXES)}, got {c.source!r}")
  if c.source in ("busi_captions", "brainmri_captions") and not c.dataset_root:
    raise ValueError(f"config.data.pairs.source={c.source!r} needs config.data.pairs.dataset_root, the dataset "
                     "folder (MediCLIP layout) whose images are captioned")
  if c.source not in captions.SOURCES and len(c.classes) < 2:
    raise ValueError("config.data.pairs.classes must name at least two classes (by label index, 0 = normal) for "
                     f"a user pairs file, got {tuple(c.classes)!r}")
  if not 0.0 <= c.fp_rate < 1.0:
    raise ValueError(f"config.data.pairs.fp_rate must lie in [0, 1), got {c.fp_rate}")
  split = tuple(c.split)
  if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-6:
    raise ValueError(f"config.data.pairs.split must be three positive fractions summing to 1, got {split}")
  if c.source == "phantom_reports" and (c.n < 8 or not 64 <= c.phantom_size <= 224):
    raise ValueError(f"config.data.pairs.n must be >= 8 and phantom_size in [64, 224], got {c.n}, {c.phantom_size}")


def pairs_file(c: ml_collections.ConfigDict, workdir: str, seed: int) -> str:
  """The pairs file of `c.source`, generating a built-in source into `workdir/pairs_data` first (process 0
  writes; the others wait, and write their own copy only without a shared disk)."""
  if c.source not in captions.SOURCES:
    return os.fspath(c.source)
  out = os.path.join(workdir, "pairs_data")

  def make() -> str:
    if c.source == "phantom_reports":
      return captions.make_phantom_pairs(out, n=int(c.n), size=int(c.phantom_size), seed=int(seed))
    return captions.make_caption_pairs(c.dataset_root, c.source, out, seed=int(seed))

  path = None
  for turn in ("main", "others"):
    if (turn == "main") == parallel.is_main_process():
      path = make()  # reuses an identical earlier generation; refuses one made with other settings
    parallel.sync(f"pairs_data_{turn}")
  return path


def class_prompts(c: ml_collections.ConfigDict) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
  """(class names by label index, zero-shot prompt ensemble per class)."""
  if c.source in captions.SOURCES:
    return captions.CLASSES[c.source], captions.CLASS_PROMPTS[c.source]
  names = tuple(str(n) for n in c.classes)
  templates = ("a medical image showing {}.", "an image of {}.", "a scan with {}.")
  return names, {n: tuple(t.format(n) for t in templates) for n in names}


def open_pairs(c: ml_collections.ConfigDict, image_size: int, workdir: str, seed: int) -> PairSplits:
  """Reads (generating if needed), splits, loads and noises the run's pairs."""
  validate(c)
  path = pairs_file(c, workdir, seed)
  pairs = records.read_pairs(path)
  classes, prompts = class_prompts(c)
  labels = np.asarray([p.label for p in pairs], np.int64)
  bad = [p for p in pairs if not 0 <= p.label < len(classes)]
  if bad:
    raise datasets.DatasetError(f"{bad[0].source}: label {bad[0].label} is not a class index of {classes} "
                                "(config.data.pairs.classes names the classes by label index)")
  split = captions.split_indices(labels, seed, tuple(c.split))
  for name in SPLITS:
    if len(split[name]) == 0:
      raise datasets.DatasetError(f"{path}: {len(pairs)} pairs leave the {name} split empty "
                                  f"(config.data.pairs.split={tuple(c.split)})")
  images, texts, labs, names = {}, {}, {}, {}
  for name in SPLITS:
    chosen = [pairs[i] for i in split[name]]
    images[name] = np.stack([preprocess.load_train_image(p.path, image_size) for p in chosen]).astype(np.float32)
    texts[name] = [p.text for p in chosen]
    labs[name] = labels[split[name]]
    names[name] = [p.name for p in chosen]
  if parallel.is_main_process():  # which pair went where, and which captions were replaced: for analysis
    with open(os.path.join(workdir, "pairs_split.json"), "w", encoding="utf-8") as f:
      json.dump({"pairs_file": path, **{n: names[n] for n in SPLITS}}, f)
  clean = list(texts["train"])
  # the replacement caption comes from another class: a real mismatch, not a rephrasing of the same finding
  texts["train"], noisy = captions.inject_false_positives(clean, float(c.fp_rate), seed, labels=labs["train"])
  return PairSplits(images=images, texts=texts, labels=labs, names=names, clean_train_texts=clean,
                    noisy=np.asarray(noisy, bool), classes=tuple(classes), prompts=dict(prompts), pairs_file=path)


def write_heldout_listing(dataset_root: str, keep: set[str], out: str) -> str:
  """A MediCLIP-layout dataset at `out` whose test listing holds only the test images of `dataset_root` named in
  `keep` (the pairs an image-text run never trained on), its train listing unchanged; `out/images` links to the
  original images (nothing copied). A detector trained on towers adapted on the other pairs is then evaluated on
  images whose captions it never saw. Returns `out`."""
  dataset = datasets.load_dataset(dataset_root)
  if dataset.layout != datasets.MEDICLIP:
    raise datasets.DatasetError(f"{dataset_root}: a held-out listing needs the MediCLIP layout "
                                "(images/ and samples/{train,test}.json)")
  root, dst = Path(dataset.root), Path(out)
  if dst.exists():
    raise datasets.DatasetError(f"{out} exists; refusing to overwrite it")
  (dst / "samples").mkdir(parents=True)
  (dst / "images").symlink_to((root / "images").resolve(), target_is_directory=True)
  for split in ("train", "test"):
    lines = (root / "samples" / f"{split}.json").read_text(encoding="utf-8").splitlines()
    if split == "test":
      lines = [line for line in lines if line.strip() and json.loads(line)["filename"] in keep]
    (dst / "samples" / f"{split}.json").write_text("".join(line + "\n" for line in lines if line.strip()),
                                                 encoding="utf-8")
  return str(dst)
