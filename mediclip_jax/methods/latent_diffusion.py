"""Latent diffusion anomaly detection: a DiT denoiser trained on the VAE latents of normal images; anomalies are
what partial noising and a deterministic reverse process do not bring back.

Training (one jitted, data-parallel step): the batch's training images are augmented per sample on device
(`synthesis.ssl_views`, keys folded from the step and the global sample index under `jax.shard_map`),
encoded by the frozen VAE (TAEF2 by default), standardised per channel with statistics of the training
latents (held in the state), noised in closed form at t ~ U{1..T} with Gaussian or fractal Perlin noise,
and the DiT learns ε (or v) by mean squared error; AdamW, an EMA of the weights.

Scoring (Pinaya et al. 2022; AnoDDPM for the Perlin noise): each image's latent is noised to t* with noise
fields drawn once per evaluation (shared by all images, so a score does not depend on the batch or the
device count), taken back to t = 0 by DDIM in `score.reverse_steps` (one `lax.scan`) and decoded to a
pseudo-healthy image. The anomaly map is the pixel residual |x − x̂|, the latent residual (channel mean of
|z − ẑ|, bilinearly upsampled), or their geometric mean; maps are averaged over the t* values and the noise
draws, optionally smoothed; the image score is the map's mean (raw) or maximum (smoothed).
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

from data_pipelines import batches, datasets, run_data, support as support_lib
from mediclip_jax import filters, parallel, rngs
from mediclip_jax.methods import diffusion_process as dp
from mediclip_jax.methods.base import Trainable, keep_finite, quantile_threshold
from mediclip_jax.models import dit, vae as vae_lib
from mediclip_jax.synthesis import mix, ssl_views

NAME = "latent_diffusion"
PREDICTIONS = ("eps", "v")
RESIDUALS = ("pixel", "latent", "both")
IMAGE_SCORES = ("mean", "max")
AUGMENT = "diffusion_augment"   # named random streams
NOISE = "diffusion_noise"
SCORE_NOISE = "diffusion_score_noise"
AUGMENT_SECTION = "config.augment"


def default_config() -> ml_collections.ConfigDict:
  """The method's sections: VAE, DiT, diffusion process, augmentation, optimiser, scoring."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.k_shot = -1   # normal training images: -1 = all of the train split, k = k drawn by seed
  c.data.support_file = ml_collections.FieldReference(None, field_type=str)  # a fixed training set (JSON)
  c.vae = vae_lib.default_config()
  c.model = dit.default_config()
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"    # linear | cosine
  c.diffusion.steps = 1000           # T
  c.diffusion.prediction = "eps"     # eps | v (the network's target)
  c.diffusion.noise = "gaussian"     # gaussian | perlin (AnoDDPM-style structured noise, training and scoring)
  c.diffusion.perlin_res = 2         # perlin: lattice cells across the latent at the coarsest octave
  c.diffusion.perlin_octaves = 3
  c.diffusion.perlin_persistence = 0.5
  c.diffusion.latent_stats_images = 64  # training images whose latents set the per-channel standardisation
  c.augment = ssl_views.default_config("none")  # on-device augmentation of the training images (ssl_views presets)
  c.train = ml_collections.ConfigDict()
  c.train.lr = 1e-4
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 100
  c.train.grad_clip_norm = 1.0         # global gradient norm clip (0 = off)
  c.train.ema_decay = 0.999          # EMA of the weights used for scoring (0 = score the raw weights); warmed up
  c.score = ml_collections.ConfigDict()
  c.score.t_stars = (250,)           # noising depths (timesteps of T); maps are averaged over them
  c.score.reverse_steps = 10         # DDIM steps from each t* back to 0
  c.score.draws = 1                  # noise draws per t*, averaged
  c.score.residual = "pixel"         # pixel | latent | both (geometric mean)
  c.score.residual_sigma = 4.0       # Gaussian smoothing of the map in pixels (0 = raw)
  c.score.image_score = "mean"       # mean of the raw map | max of the smoothed map
  return c


def latent_geometry(config: ml_collections.ConfigDict, vae: vae_lib.Vae | None = None) -> tuple[int, int] | None:
  """(latent side, latent channels) of the VAE at data.image_size: from `vae` when given (a loaded file's own
  architecture), else from the config; None when only the file can tell (an AutoencoderKL path)."""
  size = int(config.data.image_size)
  if vae is not None:
    z = jax.eval_shape(vae.encode, jax.ShapeDtypeStruct((1, size, size, vae.in_channels), jnp.float32))
    return int(z.shape[1]), int(z.shape[-1])
  factor = vae_lib.downscale_factor(config.vae)
  if factor is None:
    return None
  if size % factor:
    raise ValueError(f"config.data.image_size ({size}) must be divisible by the VAE's downscale factor {factor}")
  channels = config.vae.taef2_latent_channels if config.vae.kind == vae_lib.KIND_TAEF2 else config.vae.latent_channels
  return size // factor, int(channels)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for values the baseline cannot run with."""
  if config.data.k_shot != -1 and config.data.k_shot < 1:
    raise ValueError(f"config.data.k_shot must be -1 (all) or >= 1, got {config.data.k_shot}")
  d, s, t = config.diffusion, config.score, config.train
  if d.schedule not in dp.SCHEDULES:
    raise ValueError(f"config.diffusion.schedule must be one of {dp.SCHEDULES}, got {d.schedule!r}")
  if not isinstance(d.steps, int) or d.steps < 1:
    raise ValueError(f"config.diffusion.steps must be a positive integer, got {d.steps!r}")
  if d.prediction not in PREDICTIONS:
    raise ValueError(f"config.diffusion.prediction must be one of {PREDICTIONS}, got {d.prediction!r}")
  if d.noise not in dp.NOISES:
    raise ValueError(f"config.diffusion.noise must be one of {dp.NOISES}, got {d.noise!r}")
  if d.latent_stats_images < 1:
    raise ValueError(f"config.diffusion.latent_stats_images must be >= 1, got {d.latent_stats_images}")
  geometry = latent_geometry(config)
  side = geometry[0] if geometry else 2 ** 30  # an AutoencoderKL file: the sizes are checked once it is loaded
  dit.validate_config(config.model, side)
  check_perlin_lattice(d, side)
  ssl_views.validate_config(config.augment, AUGMENT_SECTION)
  if not t.lr > 0:
    raise ValueError(f"config.train.lr must be > 0, got {t.lr}")
  for name in ("weight_decay", "warmup_steps", "grad_clip_norm"):
    if t[name] < 0:
      raise ValueError(f"config.train.{name} must be >= 0, got {t[name]}")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"config.train.ema_decay must lie in [0, 1), got {t.ema_decay}")
  t_stars = tuple(s.t_stars)
  if not t_stars or any(not isinstance(x, int) or not 1 <= x <= d.steps for x in t_stars):
    raise ValueError(f"config.score.t_stars must be a non-empty tuple of integers in [1, diffusion.steps="
                     f"{d.steps}], got {s.t_stars!r}")
  for name in ("reverse_steps", "draws"):
    if s[name] < 1:
      raise ValueError(f"config.score.{name} must be >= 1, got {s[name]}")
  if s.residual not in RESIDUALS:
    raise ValueError(f"config.score.residual must be one of {RESIDUALS}, got {s.residual!r}")
  if s.image_score not in IMAGE_SCORES:
    raise ValueError(f"config.score.image_score must be one of {IMAGE_SCORES}, got {s.image_score!r}")
  if s.residual_sigma < 0:
    raise ValueError(f"config.score.residual_sigma must be >= 0 (0 = raw), got {s.residual_sigma}")


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------

def grey(images: jax.Array) -> jax.Array:
  """(B,H,W) or (B,H,W,3) in [0, 1] -> (B,H,W) float32 (channel mean)."""
  x = jnp.asarray(images, jnp.float32)
  return jnp.mean(x, axis=-1) if x.ndim == 4 else x


def standardise(z: jax.Array, norm: dict) -> jax.Array:
  return (z - norm["mean"]) / norm["std"]


def unstandardise(z: jax.Array, norm: dict) -> jax.Array:
  return z * norm["std"] + norm["mean"]


def diffusion_target(s: dp.Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
  """What the network learns: ε, or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) z0 (Salimans & Ho)."""
  if prediction == "eps":
    return noise
  ab = jnp.asarray(s.alpha_bar, jnp.float32)[t].reshape((-1,) + (1,) * (z0.ndim - 1))
  return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * z0


def eps_from_output(s: dp.Schedule, z_t: jax.Array, t: jax.Array, out: jax.Array, prediction: str) -> jax.Array:
  """The network output as an ε estimate (v: ε = sqrt(ᾱ_t) v + sqrt(1 − ᾱ_t) z_t)."""
  if prediction == "eps":
    return out
  ab = jnp.asarray(s.alpha_bar, jnp.float32)[t].reshape((-1,) + (1,) * (z_t.ndim - 1))
  return jnp.sqrt(ab) * out + jnp.sqrt(1.0 - ab) * z_t


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA's warmed-up decay min(decay, (1 + k) / (10 + k)): early weights are not held for long."""
  k = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + k) / (10.0 + k))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with a linear warm-up to train.lr, then constant (as DiT), after an optional global-norm clip."""
  t = config.train
  lr = optax.linear_schedule(0.0, t.lr, int(t.warmup_steps)) if t.warmup_steps else t.lr
  chain = [optax.clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm else []
  return optax.chain(*chain, optax.adamw(lr, weight_decay=t.weight_decay))


def denoiser_loss(graphdef, params, z_t: jax.Array, t: jax.Array, target: jax.Array) -> jax.Array:
  """The DiT's mean squared error against its target (ε or v) on noised latents."""
  return jnp.mean(jnp.square(nnx.merge(graphdef, params)(z_t, t) - target))


def check_perlin_lattice(d: ml_collections.ConfigDict, side: int) -> None:
  """Perlin noise's finest lattice, perlin_res x 2^(perlin_octaves - 1) cells, must fit the latent side."""
  if d.noise == "perlin" and not 1 <= d.perlin_res * 2 ** (d.perlin_octaves - 1) <= side:
    raise ValueError(f"config.diffusion.perlin_res x 2^(perlin_octaves - 1) must lie in [1, {side}] (the latent "
                     f"side), got perlin_res={d.perlin_res}, perlin_octaves={d.perlin_octaves}")


def score_weights(state: dict, ema: bool):
  return state["ema"] if ema else state["params"]


# ----------------------------------------------------------------------------------------------
# Step
# ----------------------------------------------------------------------------------------------

def make_train_step(graphdef, codec: mix.Codec, config: ml_collections.ConfigDict, optimizer, mesh: Mesh,
                    schedule: dp.Schedule, geometry: tuple[int, int]) -> Callable:
  """Jitted `step(state, frozen, batch) -> (state, metrics)`, `state` donated, non-finite updates refused.

  frozen = {"vae": the VAE's state, "images": (N,H,W) training images}, replicated; batch = {"image_index",
  "sample_index"} (B,) split over `data`.
  """
  d, seed = config.diffusion, int(config.seed)
  view = ssl_views.make_view(config.augment, AUGMENT_SECTION)
  augment_key, noise_key = rngs.stream(seed, AUGMENT), rngs.stream(seed, NOISE)
  side, channels = geometry
  T, ema = int(d.steps), float(config.train.ema_decay)

  def per_device(step, x, sample_index):
    """Per-sample views, timesteps and noise from keys of (step, global sample index): independent of the split."""
    x = jax.vmap(view)(mix.sample_keys(augment_key, step, sample_index), x[..., None])[..., 0]
    keys = mix.sample_keys(noise_key, step, sample_index)
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 1, T + 1))(keys)
    noise = jax.vmap(lambda k: dp.sample_noise(jax.random.fold_in(k, 1), (1, side, side, channels), d.noise,
                                               d.perlin_res, d.perlin_octaves, d.perlin_persistence)[0])(keys)
    return x, t, noise

  per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA), P(parallel.DATA)),
                             out_specs=P(parallel.DATA), check_vma=False)

  def step(state, frozen, batch):
    x = jnp.take(frozen["images"], batch["image_index"], axis=0)
    x, t, noise = per_device(state["step"], x, batch["sample_index"])
    z0 = jax.lax.stop_gradient(standardise(codec.encode(frozen["vae"], x), state["latent_norm"]))
    z_t = dp.q_sample(schedule, z0, t, noise)
    target = diffusion_target(schedule, z0, t, noise, d.prediction)
    loss, grads = jax.value_and_grad(denoiser_loss, argnums=1)(graphdef, state["params"], z_t, t, target)
    updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {**state, "step": state["step"] + 1, "params": params, "opt": opt_state}
    if ema:
      decay = ema_decay_at(state["step"], ema)
      new["ema"] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               "t_mean": jnp.mean(t.astype(jnp.float32))}
    return new, metrics

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(keep_finite(step), donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def score_noise_fields(config: ml_collections.ConfigDict, geometry: tuple[int, int]) -> jax.Array:
  """(len(t_stars), draws, L, L, C) noise fields of an evaluation, from the run's "score noise" stream."""
  d, s = config.diffusion, config.score
  side, channels = geometry
  key = rngs.stream(int(config.seed), SCORE_NOISE)
  fields = [dp.sample_noise(jax.random.fold_in(key, i), (int(s.draws), side, side, channels), d.noise,
                            d.perlin_res, d.perlin_octaves, d.perlin_persistence) for i in range(len(s.t_stars))]
  return jnp.stack(fields)


def make_pseudo_healthy(graphdef, codec: mix.Codec, config: ml_collections.ConfigDict, schedule: dp.Schedule
                        ) -> Callable:
  """fn(weights, norm, vae_state, noise_fields, x (B,H,W)) -> (x̂ (n_t*, draws, B, H, W), z, ẑ (n_t*, draws, B, ...)):
  the pseudo-healthy reconstructions of every (t*, draw), traced into the caller's jit."""
  s, prediction = config.score, config.diffusion.prediction

  def fn(weights, norm, vae_state, noise_fields, x):
    model = nnx.merge(graphdef, weights)
    eps_fn = lambda z_t, t: eps_from_output(schedule, z_t, t, model(z_t, t), prediction)
    z = standardise(codec.encode(vae_state, x), norm)
    b, draws = z.shape[0], int(s.draws)
    x_hats, z_hats = [], []
    for i, t_star in enumerate(s.t_stars):  # static: each t* has its own DDIM timesteps
      z_rep = jnp.broadcast_to(z[None], (draws,) + z.shape).reshape((draws * b,) + z.shape[1:])
      noise = jnp.broadcast_to(noise_fields[i][:, None], (draws, b) + z.shape[1:]).reshape(z_rep.shape)
      z_t = dp.q_sample(schedule, z_rep, jnp.full((draws * b,), int(t_star), jnp.int32), noise)
      z_hat = dp.ddim_reverse(eps_fn, schedule, z_t, int(t_star), int(s.reverse_steps))
      x_hat = codec.decode(vae_state, unstandardise(z_hat, norm))
      x_hats.append(x_hat.reshape((draws, b) + x.shape[1:]))
      z_hats.append(z_hat.reshape((draws, b) + z.shape[1:]))
    return jnp.stack(x_hats), z, jnp.stack(z_hats)

  return fn


def residual_maps(x: jax.Array, x_hat: jax.Array, z: jax.Array, z_hat: jax.Array, kind: str) -> jax.Array:
  """Anomaly maps (B,H,W) averaged over the leading (t*, draw) axes of x_hat (.., B,H,W) and z_hat (.., B,L,L,C)."""
  pixel = jnp.mean(jnp.abs(x[None, None] - x_hat), axis=(0, 1))
  if kind == "pixel":
    return pixel
  lat = jnp.mean(jnp.abs(z[None, None] - z_hat), axis=(0, 1, -1))
  lat = jax.image.resize(lat, (lat.shape[0],) + x.shape[1:], "bilinear")
  return lat if kind == "latent" else jnp.sqrt(pixel * lat)


def make_scorer(graphdef, codec: mix.Codec, config: ml_collections.ConfigDict, schedule: dp.Schedule, mesh: Mesh,
                vae_state, noise_fields: jax.Array) -> Callable:
  """state -> (images (B,H,W[,3]) in [0,1] -> (maps (B,H,W), scores (B,))), split over `data`."""
  s, ema = config.score, config.train.ema_decay > 0
  reconstruct = make_pseudo_healthy(graphdef, codec, config, schedule)
  data = parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=(data, data))
  def score_fn(weights, norm, vae_state, noise_fields, images):
    x = grey(images)
    x_hat, z, z_hat = reconstruct(weights, norm, vae_state, noise_fields, x)
    raw = residual_maps(x, x_hat, z, z_hat, s.residual)
    maps = filters.gaussian_smooth(raw, sigma=float(s.residual_sigma)) if s.residual_sigma else raw
    scores = jnp.mean(raw, axis=(1, 2)) if s.image_score == "mean" else jnp.max(maps, axis=(1, 2))
    return maps, scores

  return lambda state: functools.partial(score_fn, score_weights(state, ema), state["latent_norm"], vae_state,
                                         noise_fields)


def make_reconstructor(graphdef, codec: mix.Codec, config: ml_collections.ConfigDict, schedule: dp.Schedule,
                       mesh: Mesh, vae_state, noise_fields: jax.Array) -> Callable:
  """state -> (images -> the pseudo-healthy images (B,H,W) of the first t* and draw), split over `data`."""
  reconstruct = make_pseudo_healthy(graphdef, codec, config, schedule)
  ema, data = config.train.ema_decay > 0, parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=data)
  def recon_fn(weights, norm, vae_state, noise_fields, images):
    return reconstruct(weights, norm, vae_state, noise_fields, grey(images))[0][0, 0]

  return lambda state: functools.partial(recon_fn, score_weights(state, ema), state["latent_norm"], vae_state,
                                         noise_fields)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def latent_statistics(codec: mix.Codec, images: np.ndarray, count: int, mesh: Mesh) -> dict:
  """Per-channel mean and standard deviation of the latents of the first `count` training images (float32)."""
  x = parallel.replicate(np.asarray(images[:count], np.float32), mesh)
  z = jax.jit(codec.encode)(codec.state, x)
  mean = jnp.mean(z, axis=(0, 1, 2))
  std = jnp.maximum(jnp.std(z, axis=(0, 1, 2)), 1e-3)
  return {"mean": mean, "std": std}


def build_model(config: ml_collections.ConfigDict, geometry: tuple[int, int]) -> dit.DiT:
  side, channels = geometry
  return dit.DiT(config.model, side, channels, rngs=nnx.Rngs(rngs.stream(int(config.seed), rngs.INIT)))


def build(config: ml_collections.ConfigDict, dataset: datasets.Dataset | None, workdir: str, mesh: Mesh, *,
          train: bool = True) -> Trainable:
  """The latent diffusion baseline as a `Trainable` on `mesh`; with `train=False` no step is built."""
  validate(config)
  if dataset is None and train:
    raise ValueError("latent diffusion training needs a dataset")
  chosen = [] if dataset is None else support_lib.choose_support(config.data, config.seed, dataset, workdir, train)
  size, seed = int(config.data.image_size), int(config.seed)
  images = run_data.load_train_images(dataset, chosen, size) if chosen else np.zeros((0, size, size), np.float32)
  n, bs = max(images.shape[0], 1), int(config.train.batch_size)
  spe = batches.steps_per_epoch(n, bs)

  vae = vae_lib.load_vae(config.vae)
  geometry = side, channels = latent_geometry(config, vae)
  check_perlin_lattice(config.diffusion, side)  # validate could not: an AutoencoderKL file sets the side
  codec = vae_lib.codec(vae)
  vae_state = parallel.replicate(codec.state, mesh)
  codec = codec._replace(state=vae_state)
  schedule = dp.make_schedule(config.diffusion.schedule, int(config.diffusion.steps))
  model = build_model(config, geometry)
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = make_optimizer(config)
  if images.shape[0]:
    norm = latent_statistics(codec, images, int(config.diffusion.latent_stats_images), mesh)
  else:  # evaluation without training images: the checkpoint brings the statistics
    norm = {"mean": jnp.zeros((channels,), jnp.float32), "std": jnp.ones((channels,), jnp.float32)}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": optimizer.init(params),
           "latent_norm": norm}
  if config.train.ema_decay > 0:
    state["ema"] = jax.tree.map(jnp.array, params)
  state = parallel.replicate(state, mesh)

  train_step = None
  if train:
    step = make_train_step(graphdef, codec, config, optimizer, mesh, schedule, geometry)
    frozen = {"vae": vae_state, "images": parallel.replicate(images, mesh)}
    train_step = lambda state, batch: step(state, frozen, batch)

  local_batch = batches.local_index_batches(n, bs, seed)
  noise_fields = parallel.replicate(score_noise_fields(config, geometry), mesh)
  s, d = config.score, config.diffusion
  n_params = dit.count_params(model)
  notes = [f"latent diffusion: DiT {config.model.depth} x {config.model.width} (patch {config.model.patch_size}, "
           f"{n_params:,} parameters) on {side} x {side} x {channels} {config.vae.kind} latents of {size} px images, "
           f"{d.schedule} schedule T={d.steps}, {d.prediction}-prediction, {d.noise} noise; {len(chosen)} normal "
           f"training images; scoring t*={tuple(s.t_stars)}, {s.reverse_steps} DDIM steps, {s.draws} draw(s), "
           f"{s.residual} residual"]
  info = {"notes": notes, "preprocessing": {"image_size": size, "color": config.data.color, "train_color": "grey",
                                            "resize": "PIL bilinear", "range": "[0, 1]"},
          "support": [x.name for x in chosen], "data_root": dataset.root if dataset else None,
          "backbone": {"architecture": "DiT", "parameters": n_params, "weights": "trained from scratch",
                       "vae": {"kind": config.vae.kind, "path": config.vae.path}}}
  return Trainable(state=state, train_step=train_step, local_batch=local_batch, steps_per_epoch=spe,
                   scorer=make_scorer(graphdef, codec, config, schedule, mesh, vae_state, noise_fields),
                   calibration_images=images, threshold=quantile_threshold(config.eval.threshold_quantile),
                   info=info,
                   reconstructor=make_reconstructor(graphdef, codec, config, schedule, mesh, vae_state, noise_fields))
