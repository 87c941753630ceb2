"""MediCLIP: a frozen CLIP adapted with learnable prompts and per-layer adapters, trained on synthesised anomalies.

The few-shot support set (k normal images) is decoded once and kept on every device; each step
the host sends only (support index, global sample index) pairs, and synthesis (pixel and latent
tasks), CLIP, loss and the Adam update run in one jitted program. Per-device synthesis runs
under `jax.shard_map` with per-sample keys folded from (step, global sample index), so results
do not depend on the device count; gradients of the data-sharded loss w.r.t. replicated
parameters are all-reduced by XLA. The batch order is a pure function of (seed, epoch).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from data_pipelines import batches, datasets, grain_input, run_data, support as support_lib
from mediclip_jax import parallel, rngs
from mediclip_jax.methods import losses
from mediclip_jax.methods.base import Trainable, keep_finite, quantile_threshold
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import CLIP_MEAN, CLIP_STD, clip_from_config
from mediclip_jax.models.mediclip import TRAINABLE, MediCLIP
from mediclip_jax.synthesis import latent, mix
from mediclip_jax.weights.tokenizer import tokenizer_for

NAME = "mediclip"
RANDOM_INIT_VARIANT = "ViT-L-14"  # the reference's backbone: what random init builds when no variant is named


def default_config() -> ml_collections.ConfigDict:
  """MediCLIP's sections with the reference's defaults (ViT-L/14 @ 224, k = 16, Adam 1e-3, 0.25 per pixel task).

  The `reference`/`improved` presets of the config files change some of these defaults; an
  explicit `--config.x=y` always wins.
  """
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.k_shot = 16
  c.data.support_file = ml_collections.FieldReference(None, field_type=str)  # fixed support set (JSON)
  # True: each step's images are every normal training image in turn, streamed by grain (shuffled by seed, the
  # iterator's position saved in checkpoints); the k-shot support set still feeds cut-paste and calibration.
  c.data.train_stream = False
  c.model = ml_collections.ConfigDict()
  c.model.clip = ml_collections.ConfigDict({
      # A named architecture (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, tiny): built at random init, or checked
      # against the checkpoint. None: the checkpoint's own architecture, or ViT-L-14 without a checkpoint.
      "variant": ml_collections.FieldReference(None, field_type=str),
      "checkpoint": ml_collections.FieldReference(None, field_type=str),  # None = random init
      "act": ml_collections.FieldReference(None, field_type=str),         # quick_gelu | gelu; None = the checkpoint's
      # 1-based blocks whose residual stream feeds the adapters; () = half, three quarters and the last block of
      # the backbone (12, 18, 24 for ViT-L/14, as the reference)
      "tap_layers": (),
      "dtype": "float32",           # compute dtype: float32 | bfloat16; parameters stay float32
      "random_init_seed": 0,        # backbone init without a checkpoint
  })
  c.model.n_ctx = 8
  c.model.ctx_init_std = 0.02
  c.model.bpe_path = ml_collections.FieldReference(None, field_type=str)  # default: packaged vocabulary
  c.model.causal_text_mask = False   # reference: the prompt path runs the text tower unmasked
  c.model.logit_scale = ml_collections.FieldReference(None, field_type=float)  # reference: raw cosine softmax
  c.synthesis = mix.default_config()
  c.vae = vae_lib.default_config()
  c.train = ml_collections.ConfigDict()
  c.train.lr = 1e-3
  c.train.b1 = 0.5
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip_norm = 0.0
  c.train.focal_gamma = 2.0
  c.train.truncate_labels = True     # reference: focal targets cast to int
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for values MediCLIP cannot run with."""
  if config.data.k_shot != -1 and config.data.k_shot < 1:
    raise ValueError(f"config.data.k_shot must be -1 (all) or >= 1, got {config.data.k_shot}")
  for name in ("lr", "eps"):
    if not config.train[name] > 0:
      raise ValueError(f"config.train.{name} must be > 0, got {config.train[name]}")
  if config.train.grad_clip_norm < 0:
    raise ValueError(f"config.train.grad_clip_norm must be >= 0 (0 = off), got {config.train.grad_clip_norm}")
  if config.model.clip.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.clip.dtype must be float32 or bfloat16, got {config.model.clip.dtype!r}")
  mix.validate_config(config.synthesis)
  factor = vae_lib.downscale_factor(config.vae)
  if mix.uses_latent(config.synthesis) and factor:  # a VAE file's own architecture is checked when traced
    if config.data.image_size % factor:
      raise ValueError(f"latent tasks need config.data.image_size divisible by the VAE's downscale factor {factor}, "
                       f"got {config.data.image_size}")
    latent.validate_config(config.synthesis.latent, config.data.image_size // factor)


# ----------------------------------------------------------------------------------------------
# Model, optimiser, step
# ----------------------------------------------------------------------------------------------

def default_taps(n_layers: int) -> tuple[int, ...]:
  """Half, three quarters and the last block: the reference's (12, 18, 24) for a 24-block ViT-L/14."""
  return tuple(sorted({max(1, n_layers // 2), max(1, 3 * n_layers // 4), n_layers}))


def backbone_section(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model.clip` with the variant resolved: without a checkpoint and a name, the reference's ViT-L/14."""
  if c.variant or c.checkpoint:
    return c
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.variant = RANDOM_INIT_VARIANT
  return c


def build_detector(config: ml_collections.ConfigDict) -> MediCLIP:
  """The detector: backbone from `model.clip`, prompts and adapters initialised from the "init" stream."""
  clip = clip_from_config(backbone_section(config.model.clip))
  tok = tokenizer_for(config.model.clip.checkpoint, config.model.bpe_path)
  taps = tuple(config.model.clip.tap_layers) or default_taps(clip.cfg.vision_layers)
  return MediCLIP(clip, tok, tap_layers=taps, n_ctx=config.model.n_ctx,
                  ctx_init_std=config.model.ctx_init_std, causal_text_mask=config.model.causal_text_mask,
                  logit_scale=config.model.logit_scale, rngs=nnx.Rngs(rngs.stream(config.seed, rngs.INIT)))


def split_model(model: MediCLIP):
  """(graphdef, trainable params, frozen rest); only prompts and adapters are trainable."""
  return nnx.split(model, TRAINABLE, ...)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam as the reference: lr 1e-3, betas (0.5, 0.999), no schedule, no clipping (by default)."""
  opt = optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
  """{"step", "params" (prompts + adapters), "opt_state", "rng" (key data of the synthesis stream)}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "rng": jax.random.key_data(rngs.stream(seed, rngs.SYNTHESIS))}


def clip_input(images01: jax.Array) -> jax.Array:
  """(B,H,W) grey or (B,H,W,3) RGB in [0, 1] -> (B,H,W,3) CLIP input (OpenAI mean/std)."""
  x = jnp.asarray(images01, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def update_on_batch(graphdef, optimizer: optax.GradientTransformation, train_cfg: ml_collections.ConfigDict,
                    state: dict, frozen_model, images: jax.Array, masks: jax.Array):
  """Loss, gradients (prompts and adapters only) and the optax update on ready images and masks.

  The part of the step after synthesis (the benchmark's host and synthetic modes feed it
  directly). Returns (new state, metrics).
  """
  x = clip_input(images)

  def loss_fn(params):
    out = nnx.merge(graphdef, params, frozen_model)(x)
    return losses.mediclip_loss(out.prob_abnormal, masks, truncate_labels=train_cfg.truncate_labels,
                                gamma=train_cfg.focal_gamma)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
             "mask_fraction": jnp.mean(masks)}
  return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def shard_synthesis(synthesize: mix.SynthFn, mesh: Mesh) -> Callable:
  """`synthesize` per device under shard_map: images and sample indices split over `data`; key, step, pools
  replicated. Synthesis is per sample (no collectives), so the varying-manual-axes check is off: it
  rejects `lax.switch` over mixed replicated/per-device operands, which the task dispatch is."""
  return jax.shard_map(synthesize, mesh=mesh, in_specs=(P(), P(), P(parallel.DATA), P(parallel.DATA), P()),
                       out_specs=P(parallel.DATA), check_vma=False)


def make_train_step(graphdef, optimizer, synthesize: mix.SynthFn, mesh: Mesh,
                    train_cfg: ml_collections.ConfigDict) -> Callable:
  """Jitted `step(state, frozen, batch) -> (state, metrics)`, `state` donated, non-finite updates refused
  (`base.keep_finite`).

  frozen = {"model": frozen model state, "pools": synthesis pools, "support": (K,H,W) images};
  batch = {"support_index": (B,) int32, "sample_index": (B,) int32}, both split over `data`; or, streaming
  training images (`data.train_stream`), {"image": (B,H,W) float32, "sample_index"}.
  """
  synthesize = shard_synthesis(synthesize, mesh)

  def step(state, frozen, batch):
    key = jax.random.wrap_key_data(state["rng"])
    images = batch["image"] if "image" in batch else jnp.take(frozen["support"], batch["support_index"], axis=0)
    syn = synthesize(key, state["step"], images, batch["sample_index"], frozen["pools"])
    return update_on_batch(graphdef, optimizer, train_cfg, state, frozen["model"], syn["image"], syn["mask"])

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(keep_finite(step), donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


def make_scorer(graphdef, frozen_model, mesh: Mesh) -> Callable:
  """state -> (global images (B,H,W[,3]) in [0,1] -> (maps (B,H,W), scores (B,)), split over `data`).

  Text features do not depend on the image: they are computed once per call of the outer function.
  """
  data = parallel.batch_sharding(mesh)

  @jax.jit
  def text_fn(params, frozen):
    return nnx.merge(graphdef, params, frozen).text_features()

  @functools.partial(jax.jit, out_shardings=(data, data))
  def maps_fn(params, frozen, images, text_features):
    out = nnx.merge(graphdef, params, frozen)(clip_input(images), text_features)
    return out.prob_abnormal, out.score

  def scorer(state):
    t = text_fn(state["params"], frozen_model)
    return lambda images: maps_fn(state["params"], frozen_model, images, t)

  return scorer


def build(config: ml_collections.ConfigDict, dataset: datasets.Dataset | None, workdir: str, mesh: Mesh, *,
          train: bool = True) -> Trainable:
  """MediCLIP as a `Trainable` on `mesh`. With `train=False` (evaluation, prediction) no VAE is loaded
  and nothing is written; without a dataset (scoring new images) there is no support set."""
  validate(config)
  if dataset is None and train:
    raise ValueError("MediCLIP training needs a dataset")
  chosen = [] if dataset is None else support_lib.choose_support(config.data, config.seed, dataset, workdir, train)
  size = int(config.data.image_size)
  support = run_data.load_train_images(dataset, chosen, size) if chosen else np.zeros((0, size, size), np.float32)
  k, bs, seed = max(support.shape[0], 1), int(config.train.batch_size), int(config.seed)

  model = build_detector(config)
  graphdef, params, frozen_model = split_model(model)
  optimizer = make_optimizer(config.train)
  state = parallel.replicate(init_state(params, optimizer, seed), mesh)
  frozen_model = parallel.replicate(frozen_model, mesh)

  train_step = None
  if train:
    codec = vae_lib.codec(vae_lib.load_vae(config.vae)) if mix.uses_latent(config.synthesis) else None
    synthesize, make_pools = mix.build_synthesis(config.synthesis, codec)
    step = make_train_step(graphdef, optimizer, synthesize, mesh, config.train)
    frozen = parallel.replicate({"model": frozen_model, "pools": make_pools(support), "support": support}, mesh)
    train_step = lambda state, batch: step(state, frozen, batch)

  sl = batches.process_slice(bs)
  stream = None
  spe = batches.steps_per_epoch(k, bs)
  if train and config.data.train_stream:
    source = run_data.train_source(dataset)
    if len(source) < bs:
      raise ValueError(f"config.data.train_stream: {dataset.root} has {len(source)} training images, fewer than "
                       f"one global batch (config.train.batch_size={bs})")
    stream = grain_input.train_batches(source, global_batch_size=bs, seed=rngs.numpy_seed(seed, rngs.DATA)[0],
                                       transform=grain_input.TrainImage(size), worker_count=int(config.data.workers))
    spe = len(source) // bs  # the remainder of each epoch's permutation is dropped: every batch has one size

  def local_batch(step: int) -> dict[str, np.ndarray]:
    if stream is not None:  # the next batch of the stream (the loop asks for steps in order)
      b = next(stream)
      return {"image": b["image"], "sample_index": b["sample_index"].astype(np.int32)}
    sup, idx = batches.epoch_batch(step, k, bs, seed)
    return {"support_index": sup[sl], "sample_index": idx[sl]}

  clip_cfg = config.model.clip
  arch = model.clip.cfg
  backbone = (f"backbone: CLIP ViT {arch.vision_width}w x {arch.vision_layers} layers, patch {arch.patch_size}, "
              f"taps {model.tap_layers}, {clip_cfg.dtype}; weights: ")
  notes = [backbone + (clip_cfg.checkpoint or "NONE")]
  if not clip_cfg.checkpoint:
    notes.append("WARNING: the CLIP backbone is randomly initialised (no model.clip.checkpoint): the numbers test the "
                 "pipeline, not the method. Convert pretrained weights with launch/convert_weights.py and pass "
                 "--config.model.clip.checkpoint=DIR.")
  info = {"notes": notes, "preprocessing": {"image_size": size, "color": config.data.color, "train_color": "grey",
                            "clip_mean": list(CLIP_MEAN), "clip_std": list(CLIP_STD), "resize": "PIL bilinear"},
          "support": [s.name for s in chosen], "data_root": dataset.root if dataset else None,
          "backbone": {"architecture": model.clip.cfg.to_dict(),
                       "weights": clip_cfg.checkpoint or "random init (no checkpoint given)"}}
  return Trainable(state=state, train_step=train_step, local_batch=local_batch, data_iterator=stream,
                   steps_per_epoch=spe,
                   scorer=make_scorer(graphdef, frozen_model, mesh), calibration_images=support,
                   threshold=quantile_threshold(config.eval.threshold_quantile), info=info)
