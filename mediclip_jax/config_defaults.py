"""Config building blocks for the files in configs/ (each file documents its launch command).

A run config is the loop's sections (seed, method, data, train, eval) merged with the method's
own (`methods.<name>.default_config()`). Presets only change defaults inside `get_config`, so
a `--config.x=y` on the command line, applied afterwards, always wins.
"""
from __future__ import annotations

import ml_collections

from mediclip_jax import methods
from mediclip_jax.config_utils import parse_arg
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import get_variant
from mediclip_jax.synthesis import latent

PRESETS = ("reference", "improved")
SSL_DATASETS = {"busi": "../shared/data/busi", "brainmri": "../shared/data/brainmri", "oct_phantom": None}
LATENT_MIX = {"cutpaste": 0.2, "gauss_intensity": 0.2, "deformation": 0.2, "identity": 0.2,
              "latent_deviation": 0.1, "latent_shuffle": 0.1}
BENCH_MODES = ("fused", "host", "synthetic")


def loop_config() -> ml_collections.ConfigDict:
  """The sections the generic loop reads for every method; anomaly detectors add `anomaly_config()`'s."""
  c = ml_collections.ConfigDict()
  c.method = "mediclip"
  c.seed = 100
  c.data = ml_collections.ConfigDict()
  c.data.image_size = 224           # every image is resized to this square size
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8            # global batch
  c.train.epochs = 200
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 50
  c.train.max_to_keep = 2
  c.train.checkpoint_fallback = True  # a damaged newest checkpoint: resume from / score the one before (else refuse)
  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 10
  c.eval.batch_size = 32
  return c


def anomaly_config() -> ml_collections.ConfigDict:
  """The sections of the anomaly dataset, its readers and the anomaly evaluation (methods with
  `ANOMALY_DATASET`, the default: MediCLIP, SSL-AnoVAE)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.root = ml_collections.FieldReference(None, field_type=str)  # MediCLIP or plain-folder layout
  c.data.source = "files"           # "files": read data.root's files | "tfds": a TFDS build (launch/prepare_data.py)
  c.data.tfds_dir = ml_collections.FieldReference(None, field_type=str)  # with source="tfds": the build's directory
  c.data.workers = 0                # grain worker processes decoding test (and streamed training) images; 0 = inline
  c.data.phantom = False            # generate the embedded phantom chest dataset into the workdir
  c.data.phantom_kind = "chest"     # "chest" | "oct": which generated dataset data.phantom writes
  c.data.phantom_n_train = 16       # normal training images generated (at least data.k_shot when the method has one)
  c.data.phantom_size = 224
  c.data.phantom_n_test = 40        # per class (normal / abnormal)
  c.data.color = "grey"             # test images: "rgb" (as the reference reads them) | "grey"
  c.data.pixel_metrics = "auto"     # "auto" (when the test set has masks) | "on" | "off"
  c.eval = ml_collections.ConfigDict()
  c.eval.smoothing_sigma = 0.0      # reference: raw maps; peers smooth with sigma 4
  c.eval.aupro_max_fpr = 0.3
  c.eval.threshold_quantile = 1.0   # decision threshold: this quantile of the normal calibration scores
  c.eval.streaming = False          # True: re-read the test set per evaluation in bounded memory (histogram pixel metrics)
  c.eval.histogram_bits = 20        # streaming: pixel-metric histogram resolution (bins = 2**bits over float32 order)
  c.eval.figures = True             # per evaluation: ROC/PR/histogram and example panels, in figures/ and TensorBoard
  # Unsupervised staging of the abnormal test images (evaluate/staging.py): K-means on their downsampled maps,
  # clusters ranked by mean score, scored against the grades in the test listing's class names (clsname).
  c.eval.staging = ml_collections.ConfigDict()
  c.eval.staging.k = 0              # clusters; 0 = off
  c.eval.staging.restarts = 10      # k-means++ initialisations
  c.eval.staging.size = 64          # maps are downsampled to size x size before clustering
  c.eval.staging.grade_order = ()   # grades from mild to severe (e.g. benign,malignant): adds the ranked accuracy
  # Segmentation of the maps (evaluate/segmentation.py), Dice/IoU against the lesion masks.
  c.eval.segmentation = ml_collections.ConfigDict()
  c.eval.segmentation.threshold = False  # residual thresholding at a quantile of the normal calibration pixels
  c.eval.segmentation.quantile = 0.995
  c.eval.segmentation.min_size = 50      # connected components smaller than this (pixels) are dropped
  c.eval.segmentation.layers = False     # layer-wise grey-level comparison (reconstruction methods, layered images)
  c.eval.segmentation.boundaries = 8     # layer boundaries the unsupervised extractor traces (8: the OCT phantom)
  c.eval.segmentation.q_low = 0.99       # v_low: this quantile of x_hat - x per layer on normal images
  c.eval.segmentation.q_high = 0.99      # v_high: this quantile of x_hat per layer on normal images
  return c


def _merge(into: ml_collections.ConfigDict, extra: ml_collections.ConfigDict) -> None:
  for key, value in extra.items():
    if isinstance(value, ml_collections.ConfigDict) and key in into:
      _merge(into[key], value)
    else:
      into[key] = extra.get_ref(key) if isinstance(extra._fields[key], ml_collections.FieldReference) else value


def run_config(method: str = "mediclip") -> ml_collections.ConfigDict:
  """The loop's sections, the anomaly data and evaluation sections for a method that reads an anomaly dataset,
  and `method`'s own."""
  c = loop_config()
  c.method = method
  module = methods.get(method)
  if methods.base.reads_anomaly_dataset(module):
    _merge(c, anomaly_config())
  _merge(c, module.default_config())
  return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """MediCLIP's presets, as defaults.

  reference: the reference recipe, quirks included (for comparison with published numbers): the
    prompt path runs the text tower without the causal mask, no logit scale, focal targets cast
    to int, anomalies placed anywhere, hard pastes, RGB test images, evaluation after every epoch.
  improved:  causal text mask (as CLIP was trained), CLIP's logit scale (100), soft focal labels,
    anomalies kept on the body, Poisson-blended pastes, grey test images (no colour leak), an
    evaluation every 10 epochs.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
  ref = preset == "reference"
  c.model.causal_text_mask = not ref
  c.model.logit_scale = None if ref else 100.0
  c.train.truncate_labels = ref
  c.synthesis.pixel.shapes.foreground_only = not ref
  c.synthesis.pixel.cutpaste.paste_mode = "hard" if ref else "poisson"
  c.data.color = "rgb" if ref else "grey"
  c.eval.every_epochs = 1 if ref else 10


def mediclip_config(preset: str = "reference", variant: str | None = None) -> ml_collections.ConfigDict:
  """A MediCLIP run config with the reference's defaults (ViT-L/14 @ 224, k = 16, 200 epochs) and a preset.

  `variant` names the CLIP architecture (checked against a checkpoint when one is given); None means the
  checkpoint's own, or ViT-L/14 at random init. Taps default to half, three quarters and the last block.
  """
  c = run_config("mediclip")
  if variant is not None:
    get_variant(variant)  # an unknown name fails here, naming the known ones
    c.model.clip.variant = variant
  apply_preset(c, preset)
  return c


def use_latent_tasks(c: ml_collections.ConfigDict, vae_path: str | None = None) -> None:
  """Mixes latent tasks in (0.2 per pixel task, 0.1 per latent task) with patch sizes that divide the latent grid."""
  c.synthesis.probs = ml_collections.ConfigDict(dict(LATENT_MIX))
  if vae_path is not None:
    c.vae.kind = "taef2"
    c.vae.path = vae_path
  factor = vae_lib.downscale_factor(c.vae) or 8  # a VAE file's own factor is checked when traced
  if c.data.image_size % factor:
    raise ValueError(f"latent tasks need data.image_size divisible by the VAE's downscale factor {factor}, "
                     f"got {c.data.image_size}")
  sizes = latent.patch_size_choices(c.data.image_size // factor)
  c.synthesis.latent.patch_sizes = sizes
  c.synthesis.latent.patch_probs = tuple(1.0 / len(sizes) for _ in sizes)


def experiment_config(default_root: str, arg: str | None) -> ml_collections.ConfigDict:
  """A dataset's MediCLIP config from its `get_config(arg)` argument.

  arg keys: preset=reference|improved, variant=<CLIP name>, shot=<k>, phantom (the embedded
  phantom chest data), tiny (tiny random CLIP at 112 px, 20 epochs: a CPU smoke run), latent
  (mix latent tasks in: 0.2 per pixel task, 0.1 per latent task, TAEF2 from vae_path).
  """
  a = parse_arg(arg, preset="reference", variant=None, shot=16, phantom=False, tiny=False, latent=False,
                vae_path="../shared/weights/taef2")
  c = mediclip_config(a.preset, "tiny" if a.tiny else a.variant)
  c.data.root = None if a.phantom else default_root
  c.data.phantom = a.phantom
  c.data.k_shot = a.shot
  if a.tiny:
    c.data.image_size = c.data.phantom_size = 112
    c.train.epochs = 20
    c.train.checkpoint_every_steps = 10
    c.train.log_every_steps = 2
    c.eval.every_epochs = 5
  if a.latent:
    use_latent_tasks(c, a.vae_path)
  return c


def bench_section(*, batch_per_device: int, warmup_steps: int = 2, steps: int = 20,
                  modes: str = "fused,host,synthetic", host_workers: int = 2) -> ml_collections.ConfigDict:
  """The `bench` section of a benchmark config (configs/bench_*.py); every field can be overridden by flag."""
  c = ml_collections.ConfigDict()
  c.batch_per_device = batch_per_device  # global batch = this x jax.device_count()
  c.warmup_steps = warmup_steps          # untimed steps after compilation (>= 1)
  c.steps = steps                        # timed steps per mode and per stage
  c.modes = modes                        # comma-separated subset of BENCH_MODES
  c.stages = True                        # per-stage breakdown (synthesis, VAE, CLIP forward, full step)
  c.host_workers = host_workers          # host mode: CPU worker processes (the reference uses 2)
  c.host_prefetch = 2                    # host mode: batches in flight per worker (DataLoader prefetch_factor)
  c.support = "phantom"                  # few-shot support images: "phantom" (64..224 px) | "random"
  c.peak_tflops = ml_collections.FieldReference(None, field_type=float)  # per-device peak; None = table
  return c


def ssl_anovae_config(arg: str | None) -> ml_collections.ConfigDict:
  """An SSL-AnoVAE run config from its `get_config(arg)` argument.

  arg keys: dataset=busi|brainmri|oct_phantom (or path=<dataset folder>), shot=<k> (-1 = every normal
  training image), tiny (64 px, small networks, a CPU smoke run), latents=both|image|ssl, ssl_mode=joint|
  pretrain_frozen, adv=<lambda_4> (0 = no discriminator), views=<preset of synthesis/ssl_views.py>.
  """
  a = parse_arg(arg, dataset="oct_phantom", path=None, shot=-1, tiny=False, latents="both", ssl_mode="joint",
                adv=0.01, views=None)
  c = run_config("ssl_anovae")
  if a.path is None and a.dataset not in SSL_DATASETS:
    raise ValueError(f"config argument dataset={a.dataset!r} is not one of {sorted(SSL_DATASETS)} (or give path=)")
  phantom = a.path is None and a.dataset == "oct_phantom"
  c.data.root = a.path or SSL_DATASETS[a.dataset]
  c.data.phantom = phantom
  c.data.phantom_kind = "oct"
  c.data.color = "grey"
  c.data.k_shot = a.shot
  c.model.latents = a.latents
  c.train.ssl_mode = a.ssl_mode
  c.loss.adv = a.adv
  c.train.batch_size = 32
  c.train.epochs = 100
  c.eval.every_epochs = 20
  c.eval.staging.k = 2
  c.eval.staging.grade_order = ("mild", "severe") if phantom else ("benign", "malignant")
  c.eval.segmentation.threshold = True
  c.eval.segmentation.layers = phantom
  views = a.views or ("oct" if phantom else "grey")
  c.ssl.views.preset = views  # the preset's values apply to every field left at None (overridable one by one)
  size = 256
  if phantom:
    c.data.phantom_n_train = 1000
    c.data.phantom_n_test = 100
  if a.tiny:
    size = 64
    c.model.encoder_widths = (16, 32, 64)
    c.model.resnet_widths = (16, 32, 64)
    c.model.resnet_blocks = (1, 1, 1)
    c.model.decoder_widths = (64, 32, 16)
    c.model.disc_widths = (16, 32, 64)
    c.model.groups = 8
    c.model.latent_image = c.model.latent_ssl = 32
    c.model.projector_hidden = 128
    c.model.projector_out = 64
    c.train.batch_size = 16
    c.train.epochs = 15 if phantom else 60  # 120 steps: 8 per epoch on 128 phantoms, 2 on BUSI's / BrainMRI's 32
    c.train.lr = c.train.disc_lr = 1e-3
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 50
    c.eval.every_epochs = 5 if phantom else 30
    c.eval.segmentation.min_size = 4
    c.score.residual_sigma = 1.0
    if phantom:
      c.data.phantom_n_train = 128
      c.data.phantom_n_test = 40
  c.data.image_size = c.data.phantom_size = c.model.image_size = size
  if a.ssl_mode == "pretrain_frozen":
    c.train.ssl_pretrain_epochs = c.train.epochs // 2
  return c


MIRAGE_SOURCES = {"phantom_reports": None, "busi_captions": "../shared/data/busi",
                  "brainmri_captions": "../shared/data/brainmri"}


def mirage_config(arg: str | None) -> ml_collections.ConfigDict:
  """A MIRAGE run config from its `get_config(arg)` argument.

  arg keys: source=phantom_reports|busi_captions|brainmri_captions (captions of `dataset_root`) or pairs=<a
  .jsonl/.csv pairs file> with classes=<name;name;...> (by label index, 0 = normal), loss=mirage|infonce,
  fp_rate=<injected false-positive fraction>, trainable=projections|last_blocks|full, variant=<CLIP name>
  (random init) and tiny (tiny random CLIP at 64 px on 2,000 phantom pairs / the dataset's captions: a CPU run
  of about two minutes).
  """
  a = parse_arg(arg, source="phantom_reports", pairs=None, classes="", dataset_root=None, loss="mirage",
                fp_rate=0.0, trainable="last_blocks", variant="ViT-B-16", tiny=False)
  c = run_config("mirage")
  if a.pairs is None and a.source not in MIRAGE_SOURCES:
    raise ValueError(f"config argument source={a.source!r} is not one of {sorted(MIRAGE_SOURCES)} (or give pairs=)")
  p = c.data.pairs
  p.source = a.pairs or a.source
  p.dataset_root = a.dataset_root or (None if a.pairs else MIRAGE_SOURCES[a.source])
  p.classes = tuple(n for n in a.classes.split(";") if n)
  p.fp_rate = a.fp_rate
  c.mirage.loss = a.loss
  c.mirage.trainable = a.trainable
  c.model.clip.variant = "tiny" if a.tiny else a.variant
  c.data.image_size = 224
  c.train.batch_size = 64
  c.train.epochs = 20
  c.eval.every_epochs = 5
  c.eval.batch_size = 128
  c.eval.figures = False        # no anomaly maps: the evaluation is retrieval and classification
  if a.tiny:
    c.data.image_size = 64
    c.mirage.trainable = "full" if a.trainable == "last_blocks" else a.trainable  # a 2-4 block model: all of it
    c.mirage.bank_size = 1024
    c.train.batch_size = 32
    c.train.lr = 3e-3               # from random init: 1e-3 had not started matching pairs after 500 steps
    # 510 steps on the 1,600 training phantom pairs; 600 on BUSI's 624, 210 on BrainMRI's 200
    c.train.epochs = 10 if p.source == "phantom_reports" else 30
    c.eval.every_epochs = 5 if p.source == "phantom_reports" else 15
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 50
  return c


DIFFUSION_DATASETS = {"phantom": None, "oct_phantom": None, "busi": "../shared/data/busi",
                      "brainmri": "../shared/data/brainmri"}


def latent_diffusion_config(arg: str | None) -> ml_collections.ConfigDict:
  """A latent diffusion baseline run config from its `get_config(arg)` argument.

  arg keys: dataset=phantom|oct_phantom|busi|brainmri (or path=<dataset folder>), shot=<k> (-1 = every normal
  training image), tiny (64 px, a 4-block DiT: a CPU run of minutes), t_star=<t>[;<t>...] (noising depths of
  T = 1000, averaged), steps=<DDIM steps>, draws=<noise draws per t*>, noise=gaussian|perlin,
  residual=pixel|latent|both, prediction=eps|v, vae_path=<TAEF2 folder>.
  """
  a = parse_arg(arg, dataset="phantom", path=None, shot=-1, tiny=False, t_star="", steps=10, draws=1,
                noise="gaussian", residual="pixel", prediction="eps", vae_path="../shared/weights/taef2")
  c = run_config("latent_diffusion")
  if a.path is None and a.dataset not in DIFFUSION_DATASETS:
    raise ValueError(f"config argument dataset={a.dataset!r} is not one of {sorted(DIFFUSION_DATASETS)} "
                     f"(or give path=)")
  phantom = a.path is None and a.dataset in ("phantom", "oct_phantom")
  c.data.root = a.path or DIFFUSION_DATASETS[a.dataset]
  c.data.phantom = phantom
  c.data.phantom_kind = "oct" if a.dataset == "oct_phantom" else "chest"
  c.data.color = "grey"
  c.data.k_shot = a.shot
  c.vae.kind = vae_lib.KIND_TAEF2
  c.vae.path = a.vae_path
  c.diffusion.noise = a.noise
  c.diffusion.prediction = a.prediction
  c.augment.preset = "oct" if a.dataset == "oct_phantom" else "grey"
  c.score.reverse_steps = a.steps
  c.score.draws = a.draws
  c.score.residual = a.residual
  if a.t_star:
    try:
      c.score.t_stars = tuple(int(t) for t in a.t_star.split(";"))
    except ValueError as e:
      raise ValueError(f"config argument t_star={a.t_star!r}: expected integers separated by ';'") from e
  size = 256
  c.train.batch_size = 32
  c.train.epochs = 500
  c.eval.every_epochs = 100
  if phantom:
    c.data.phantom_n_train = 1000
    c.data.phantom_n_test = 100
  if a.tiny:
    size = 64
    c.model.patch_size = 1
    c.model.width = 128
    c.model.depth = 4
    c.model.heads = 4
    c.train.batch_size = 16        # the frozen TAEF2 encoder is most of a step's work on CPU
    c.train.lr = 1e-3
    c.train.warmup_steps = 50
    c.train.ema_decay = 0.99
    c.score.residual_sigma = 1.0
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 100
    if phantom:   # 400 steps: 16 per epoch on 256 generated normals
      c.data.phantom_n_train = 256
      c.data.phantom_n_test = 40
      c.train.epochs = 25
      c.eval.every_epochs = 5
    else:         # 400 steps: 2 per epoch on the 32 normal training images of BUSI / BrainMRI
      c.train.epochs = 200
      c.eval.every_epochs = 100
  c.data.image_size = c.data.phantom_size = size
  return c
