"""Config building blocks shared by the files in configs/ (each file documents its launch command)."""
from __future__ import annotations

import ml_collections

from mediclip_jax.config_utils import parse_arg
from mediclip_jax.models.clip import VARIANTS, get_variant

# MediCLIP taps the residual stream after blocks 12, 18, 24 of ViT-L/14 (1-based). For other depths
# we keep the same relative depths: half, three quarters and the last block.
REFERENCE_TAPS = {"ViT-L-14": (12, 18, 24), "ViT-L-14-336": (12, 18, 24)}


def default_taps(variant: str) -> tuple[int, ...]:
  cfg = get_variant(variant)
  if variant in REFERENCE_TAPS:
    return REFERENCE_TAPS[variant]
  n = cfg.vision_layers
  return tuple(sorted({max(1, n // 2), max(1, 3 * n // 4), n}))


def clip_config(variant: str = "ViT-L-14", checkpoint: str | None = None) -> ml_collections.ConfigDict:
  """The backbone section: an architecture by name, optional weights, precision and taps.

  `variant` is one of VARIANTS (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, tiny). With a
  `checkpoint` the architecture comes from the checkpoint and `variant` is checked against it.
  """
  arch = get_variant(variant)
  return ml_collections.ConfigDict({
      "variant": variant,
      "checkpoint": checkpoint,  # HF dir, OpenAI/open_clip file, or our own converted dir; None = random init
      "act": ml_collections.FieldReference(None, field_type=str),  # override (quick_gelu | gelu); None = checkpoint's
      "image_size": arch.image_size,
      "tap_layers": default_taps(variant),
      "dtype": "float32",  # compute dtype: float32 | bfloat16; parameters stay float32
      "random_init_seed": 0,
  })


def variants() -> tuple[str, ...]:
  return tuple(VARIANTS)


PRESETS = ("reference", "improved")


def quirks(preset: str) -> ml_collections.ConfigDict:
  """Each behaviour of the PyTorch reference that we reproduce or fix, as a named flag.

  reference: exactly the reference recipe (for comparison with published numbers).
  improved:  causal text mask (as CLIP was trained), CLIP's logit scale (100) on the similarity
             difference (the reference's maps live in [0.12, 0.88]), soft focal labels, anomalies
             kept on the body (foreground), Poisson-blended pastes.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
  ref = preset == "reference"
  return ml_collections.ConfigDict({
      "causal_text_mask": not ref,      # reference runs the prompt path without the causal mask
      "logit_scale": ml_collections.FieldReference(None if ref else 100.0, field_type=float),
      "truncate_labels": ref,           # reference casts the focal target with .long()
      "foreground_only": not ref,       # reference places anomalies anywhere, background included
      "paste_mode": "hard" if ref else "poisson",
  })


def base_config(preset: str = "reference", variant: str = "ViT-L-14") -> ml_collections.ConfigDict:
  """Everything `launch/train.py` reads, with the reference's defaults (MEDICLIP.md §3)."""
  from mediclip_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
  from mediclip_jax.synthesis import latent, mix  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict()
  c.seed = 100
  c.preset = preset
  c.quirks = quirks(preset)

  c.data = ml_collections.ConfigDict()
  c.data.root = ml_collections.FieldReference(None, field_type=str)  # MediCLIP or plain-folder layout
  c.data.name = "dataset"
  c.data.phantom = False            # generate the embedded phantom chest dataset into the workdir
  c.data.phantom_size = 224
  c.data.phantom_n_test = 40        # per class (normal / abnormal)
  c.data.image_size = 224
  c.data.k_shot = 16
  c.data.support_file = ml_collections.FieldReference(None, field_type=str)  # fixed support set (JSON)
  c.data.pixel_metrics = "auto"     # "auto" (when the test set has masks) | "on" | "off"

  c.model = ml_collections.ConfigDict()
  c.model.clip = clip_config(variant)
  c.model.n_ctx = 8
  c.model.ctx_init_std = 0.02
  c.model.bpe_path = ml_collections.FieldReference(None, field_type=str)  # default: packaged vocabulary

  c.synthesis = mix.default_config()
  c.synthesis.latent = latent.default_config()
  c.vae = vae_lib.default_config()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8
  c.train.epochs = 200
  c.train.lr = 1e-3
  c.train.b1 = 0.5
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip_norm = 0.0
  c.train.focal_gamma = 2.0
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 50
  c.train.max_to_keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 10          # the reference evaluates on test after every epoch
  c.eval.batch_size = 32
  c.eval.smoothing_sigma = 0.0      # reference: raw maps; peers smooth with sigma 4
  c.eval.aupro_max_fpr = 0.3
  c.eval.threshold_quantile = 1.0   # decision threshold: this quantile of the support images' scores
  return c


LATENT_MIX = {"cutpaste": 0.2, "gauss_intensity": 0.2, "deformation": 0.2, "identity": 0.2,
              "latent_deviation": 0.1, "latent_shuffle": 0.1}


def experiment_config(name: str, default_root: str, arg: str | None) -> ml_collections.ConfigDict:
  """A dataset's config from its `get_config(arg)` argument.

  arg keys: preset=reference|improved, variant=<CLIP name>, shot=<k>, phantom (the embedded
  phantom chest data), tiny (tiny random CLIP at 112 px, 20 epochs: a CPU smoke run), latent
  (mix latent tasks in: 0.2 per pixel task, 0.1 per latent task, TAEF2 from vae_path).
  """
  a = parse_arg(arg, preset="reference", variant="ViT-L-14", shot=16, phantom=False, tiny=False, latent=False,
                vae_path="../shared/weights/taef2")
  variant = "tiny" if a.tiny else a.variant
  c = base_config(a.preset, variant)
  c.data.name = "phantom" if a.phantom else name
  c.data.root = None if a.phantom else default_root
  c.data.phantom = a.phantom
  c.data.k_shot = a.shot
  if a.tiny:
    c.data.image_size = c.data.phantom_size = 112
    c.model.clip.image_size = 112
    c.train.epochs = 20
    c.train.checkpoint_every_steps = 10
    c.train.log_every_steps = 2
    c.eval.every_epochs = 5
    c.vae.dtype = "float32"
  if a.latent:
    c.synthesis.probs = ml_collections.ConfigDict(dict(LATENT_MIX))
    c.vae.kind = "taef2"
    c.vae.path = a.vae_path
    if c.data.image_size % 8:
      raise ValueError(f"latent tasks need an image size divisible by 8, got {c.data.image_size}")
    lat = c.data.image_size // 8
    from mediclip_jax.synthesis import latent  # pylint: disable=import-outside-toplevel
    c.synthesis.latent.patch_sizes = latent.patch_size_choices(lat)
    c.synthesis.latent.patch_probs = tuple(1.0 / len(c.synthesis.latent.patch_sizes)
                                           for _ in c.synthesis.latent.patch_sizes)
  return c
