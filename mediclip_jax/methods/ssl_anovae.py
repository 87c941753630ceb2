"""SSL-AnoVAE: a VAE whose second latent comes from a BYOL-trained encoder; the reconstruction residual scores.

The image encoder E_I and the online SSL encoder E_S both encode the un-augmented image x; the decoder
reconstructs x from [z_I ; z_S]. E_S is shared with a BYOL module that sees two views T1(x), T2(x)
(`synthesis.ssl_views`) and matches them against an EMA target (backbone + projector, no gradient),
so z_S learns what the transformation leaves invariant. A spectrally normalised PatchGAN sharpens the
reconstructions. One jitted step on the mesh: views and reparameterisation noise per device under
`jax.shard_map` with keys folded from (step, global sample index), the generator's and the
discriminator's Adam updates, the EMA with a cosine-ramped tau. Scoring: A(x) = mean |x - x_hat| with
x_hat decoded from the means (deterministic); the residual map, optionally smoothed, is the anomaly map.
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

from data_pipelines import batches, datasets, preprocess, records, run_data, support as support_lib
from mediclip_jax import filters, parallel, rngs
from mediclip_jax.methods.base import Trainable, keep_finite, quantile_threshold
from mediclip_jax.models import ssl_anovae as nets
from mediclip_jax.synthesis import ssl_views

NAME = "ssl_anovae"
GAN_LOSSES = ("nonsaturating", "lsgan")
SSL_MODES = ("joint", "pretrain_frozen")
VIEWS = "ssl_views"   # named random streams of the step
NOISE = "vae_noise"


def default_config() -> ml_collections.ConfigDict:
  """SSL-AnoVAE's sections; sizes and weights are the project's defaults (the paper's are not published)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.k_shot = -1   # normal training images: -1 = all of the train split, k = k drawn by seed (few-shot)
  c.data.support_file = ml_collections.FieldReference(None, field_type=str)  # a fixed training set (JSON)
  c.model = nets.default_config()
  c.ssl = ml_collections.ConfigDict()
  c.ssl.views = ssl_views.default_config()
  c.ssl.ema_base = 0.996       # target EMA: tau ramps from this to 1 along a cosine over training
  c.loss = ml_collections.ConfigDict()
  c.loss.ssl = 1.0             # lambda_1: symmetric BYOL (normalised MSE)
  c.loss.rec = 1.0             # lambda_2: L1 reconstruction
  c.loss.kl = 1e-3             # lambda_3: prior, on kl_image * KL_I + kl_ssl * KL_S
  c.loss.kl_image = 1.0
  c.loss.kl_ssl = 1.0
  c.loss.adv = 0.01            # lambda_4: adversarial (0: no discriminator)
  c.loss.gan = "nonsaturating"  # nonsaturating | lsgan
  c.train = ml_collections.ConfigDict()
  c.train.lr = 1e-4
  c.train.disc_lr = 1e-4
  c.train.b1 = 0.5
  c.train.b2 = 0.999
  # joint: everything trains together (the paper's end-to-end model); pretrain_frozen: BYOL alone for
  # ssl_pretrain_epochs, then E_S (backbone) is frozen and the VAE trains on its features.
  c.train.ssl_mode = "joint"
  c.train.ssl_pretrain_epochs = 0
  c.score = ml_collections.ConfigDict()
  c.score.residual_sigma = 4.0  # Gaussian smoothing of the residual map in pixels (0 = raw); A(x) uses the raw map
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for values SSL-AnoVAE cannot run with."""
  if config.data.k_shot != -1 and config.data.k_shot < 1:
    raise ValueError(f"config.data.k_shot must be -1 (all) or >= 1, got {config.data.k_shot}")
  if config.model.image_size != config.data.image_size:
    raise ValueError(f"config.model.image_size ({config.model.image_size}) must equal config.data.image_size "
                     f"({config.data.image_size})")
  nets.validate_config(config.model)
  ssl_views.validate_config(config.ssl.views)
  if config.model.channels == 3 and config.data.color != "rgb":
    raise ValueError("config.model.channels=3 needs config.data.color='rgb' (test images are read in that colour)")
  if not 0.0 <= config.ssl.ema_base <= 1.0:
    raise ValueError(f"config.ssl.ema_base must lie in [0, 1], got {config.ssl.ema_base}")
  for name in ("ssl", "rec", "kl", "kl_image", "kl_ssl", "adv"):
    if config.loss[name] < 0:
      raise ValueError(f"config.loss.{name} must be >= 0, got {config.loss[name]}")
  if config.loss.gan not in GAN_LOSSES:
    raise ValueError(f"config.loss.gan must be one of {GAN_LOSSES}, got {config.loss.gan!r}")
  for name in ("lr", "disc_lr"):
    if not config.train[name] > 0:
      raise ValueError(f"config.train.{name} must be > 0, got {config.train[name]}")
  if config.train.ssl_mode not in SSL_MODES:
    raise ValueError(f"config.train.ssl_mode must be one of {SSL_MODES}, got {config.train.ssl_mode!r}")
  if config.train.ssl_mode == "pretrain_frozen":
    if config.model.latents == "image":
      raise ValueError("config.train.ssl_mode='pretrain_frozen' needs z_S (config.model.latents 'both' or 'ssl')")
    if not 1 <= config.train.ssl_pretrain_epochs < config.train.epochs:
      raise ValueError(f"config.train.ssl_pretrain_epochs must lie in [1, train.epochs) with ssl_mode="
                       f"'pretrain_frozen', got {config.train.ssl_pretrain_epochs}")
  if config.score.residual_sigma < 0:
    raise ValueError(f"config.score.residual_sigma must be >= 0 (0 = raw), got {config.score.residual_sigma}")


# ----------------------------------------------------------------------------------------------
# Losses and the EMA (pure functions of arrays)
# ----------------------------------------------------------------------------------------------

def kl_to_standard_normal(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over latent dims, averaged over the batch."""
  mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
  return jnp.mean(0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - logvar - 1.0, axis=-1))


def byol_loss(p1: jax.Array, p2: jax.Array, k1: jax.Array, k2: jax.Array) -> jax.Array:
  """Symmetric BYOL loss |p1' - k2'|^2 + |p2' - k1'|^2 of unit-normalised vectors (= 4 - 2cos - 2cos), batch mean.

  p = online predictions of views 1 and 2, k = the target's projections; the targets get no gradient."""
  def term(p, k):
    p = p.astype(jnp.float32) / jnp.maximum(jnp.linalg.norm(p.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    k = jax.lax.stop_gradient(k.astype(jnp.float32))
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    return jnp.sum((p - k) ** 2, axis=-1)
  return jnp.mean(term(p1, k2) + term(p2, k1))


def generator_gan_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
  """The generator's adversarial loss on the discriminator's logits of reconstructions."""
  f = fake_logits.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(-f)) if kind == "nonsaturating" else jnp.mean((f - 1.0) ** 2)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """The discriminator's loss: real images vs reconstructions (non-saturating GAN or LSGAN)."""
  r, f = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if kind == "nonsaturating":
    return jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))
  return jnp.mean((r - 1.0) ** 2) + jnp.mean(f ** 2)


def ema_tau(step: jax.Array, total_steps: int, base: float) -> jax.Array:
  """BYOL's cosine ramp: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from `base` at step 0 to 1 at K."""
  k = jnp.minimum(jnp.asarray(step, jnp.float32), float(max(total_steps, 1)))
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * k / max(total_steps, 1)) + 1.0) / 2.0


def ema_update(target, online, tau: jax.Array):
  """target <- tau * target + (1 - tau) * online, leaf by leaf (tau = 1 keeps the target, 0 copies)."""
  return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


# ----------------------------------------------------------------------------------------------
# Model, state, step
# ----------------------------------------------------------------------------------------------

def build_networks(config: ml_collections.ConfigDict) -> tuple[nets.SSLAnoVAE, nets.PatchDiscriminator]:
  """The generator (encoders, BYOL heads, decoder) and the discriminator, initialised from the "init" stream."""
  key = rngs.stream(config.seed, rngs.INIT)
  model = nets.SSLAnoVAE(config.model, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
  disc = nets.PatchDiscriminator(config.model, rngs=nnx.Rngs(jax.random.fold_in(key, 1)))
  return model, disc


def target_of(params) -> dict:
  """The EMA target's parameters: copies of the online backbone's and projector's."""
  return {"backbone": jax.tree.map(jnp.array, params["backbone"]),
          "projector": jax.tree.map(jnp.array, params["projector"])}


def init_state(model, disc, opt_g, opt_d, seed: int) -> tuple[dict, tuple]:
  """(state, graphdefs). state = {"step", "params", "disc", "disc_power", "target", "opt_g", "opt_d", "rng"}."""
  graphdef, params = nnx.split(model, nnx.Param)
  disc_def, disc_params, power = nnx.split(disc, nnx.Param, nets.SPECTRAL_STATE)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "disc": disc_params, "disc_power": power,
           "target": target_of(params), "opt_g": opt_g.init(params), "opt_d": opt_d.init(disc_params),
           "rng": jax.random.key_data(rngs.stream(seed, VIEWS))}
  target_defs = (nnx.graphdef(model.backbone), nnx.graphdef(model.projector))
  return state, (graphdef, disc_def, target_defs)


def model_input(images: jax.Array, channels: int) -> jax.Array:
  """(B,H,W) grey or (B,H,W,3) RGB in [0, 1] -> (B,H,W,channels) float32."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] != channels:
    x = jnp.repeat(x, channels, axis=-1) if channels == 3 else jnp.mean(x, axis=-1, keepdims=True)
  return x


def _update_mask(params, frozen_backbone: jax.Array):
  """1 for every parameter, 0 for the SSL backbone and its BYOL heads while they are frozen."""
  def mask(path, leaf):
    return jnp.where(frozen_backbone, 0.0, 1.0) if path[0].key in ("backbone", "projector", "predictor") else 1.0
  return jax.tree_util.tree_map_with_path(mask, params)


def make_train_step(defs: tuple, config: ml_collections.ConfigDict, opt_g, opt_d, mesh: Mesh,
                    total_steps: int, pretrain_steps: int) -> Callable:
  """Jitted `step(state, train_images, batch) -> (state, metrics)`, `state` donated, non-finite updates refused.

  train_images: (N,H,W[,C]) replicated; batch = {"image_index", "sample_index"} (B,) split over `data`.
  """
  graphdef, disc_def, (backbone_def, projector_def) = defs
  m, lw, channels = config.model, config.loss, int(config.model.channels)
  use_ssl = m.latents != "image" and lw.ssl > 0
  use_adv = lw.adv > 0
  make_views = ssl_views.make_views(config.ssl.views)
  latent_i = m.latent_image if m.latents in ("both", "image") else 0
  latent_s = m.latent_ssl if m.latents in ("both", "ssl") else 0

  def per_device(key, step, x, sample_index):
    v1, v2 = make_views(jax.random.fold_in(key, 0), step, x, sample_index)
    noise_key = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), (latent_i + latent_s,)))(sample_index)
    return v1, v2, eps

  per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(parallel.DATA), P(parallel.DATA)),
                             out_specs=P(parallel.DATA), check_vma=False)

  def generator_loss(params, state, x, v1, v2, eps, weights):
    model = nnx.merge(graphdef, params)
    mu_i, lv_i, mu_s, lv_s = model.encode(x)
    mu = jnp.concatenate([a for a in (mu_i, mu_s) if a.shape[-1]], -1)
    lv = jnp.concatenate([a for a in (lv_i, lv_s) if a.shape[-1]], -1)
    z = mu + jnp.exp(0.5 * lv) * eps
    x_hat = model.decode(z)
    parts = {"rec": jnp.mean(jnp.abs(x - x_hat.astype(jnp.float32)))}
    parts["kl_image"] = kl_to_standard_normal(mu_i, lv_i) if latent_i else jnp.zeros(())
    parts["kl_ssl"] = kl_to_standard_normal(mu_s, lv_s) if latent_s else jnp.zeros(())
    total = weights["rec"] * lw.rec * parts["rec"] + weights["rec"] * lw.kl * (
        lw.kl_image * parts["kl_image"] + lw.kl_ssl * parts["kl_ssl"])
    if use_ssl:
      target_backbone = nnx.merge(backbone_def, state["target"]["backbone"])
      target_projector = nnx.merge(projector_def, state["target"]["projector"])
      p1, p2 = (model.predict(model.project(model.features(v))) for v in (v1, v2))
      k1, k2 = (target_projector(target_backbone(v)) for v in (v1, v2))
      parts["ssl"] = byol_loss(p1, p2, k1, k2)
      total += weights["ssl"] * lw.ssl * parts["ssl"]
    if use_adv:
      disc = nnx.merge(disc_def, state["disc"], state["disc_power"])
      parts["adv"] = generator_gan_loss(disc(x_hat, update_stats=False), lw.gan)
      total += weights["rec"] * lw.adv * parts["adv"]
    return total, (parts, x_hat)

  def disc_loss(disc_params, power, x, x_hat):
    disc = nnx.merge(disc_def, disc_params, power)
    real = disc(x, update_stats=False)
    fake = disc(jax.lax.stop_gradient(x_hat), update_stats=False)
    return discriminator_loss(real, fake, lw.gan)

  def power_step(disc_params, power):
    """The power iteration's new state: the same iteration the loss's forward ran (no data needed)."""
    disc = nnx.merge(disc_def, disc_params, power)
    disc.update_power_iteration()
    return nnx.state(disc, nets.SPECTRAL_STATE)

  def step(state, train_images, batch):
    key = jax.random.wrap_key_data(state["rng"])
    x = model_input(jnp.take(train_images, batch["image_index"], axis=0), channels)
    v1, v2, eps = per_device(key, state["step"], x, batch["sample_index"])
    pre = state["step"] < pretrain_steps  # pretrain_frozen: BYOL alone first, then E_S frozen
    weights = {"ssl": jnp.where(pre | (pretrain_steps == 0), 1.0, 0.0),
               "rec": jnp.where(pre, 0.0, 1.0)}
    (loss, (parts, x_hat)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state["params"], state, x, v1, v2, eps, weights)
    updates, opt_g_state = opt_g.update(grads, state["opt_g"], state["params"])
    if pretrain_steps:
      updates = jax.tree.map(lambda u, k: u * k, updates, _update_mask(updates, ~pre))
    params = optax.apply_updates(state["params"], updates)
    new = {**state, "step": state["step"] + 1, "params": params, "opt_g": opt_g_state}
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    if use_adv:
      d_loss, d_grads = jax.value_and_grad(disc_loss)(state["disc"], state["disc_power"], x, x_hat)
      power = power_step(state["disc"], state["disc_power"])
      d_updates, opt_d_state = opt_d.update(d_grads, state["opt_d"], state["disc"])
      d_updates = jax.tree.map(lambda u: u * weights["rec"], d_updates)  # no discriminator before the VAE trains
      new.update(disc=optax.apply_updates(state["disc"], d_updates), disc_power=power, opt_d=opt_d_state)
      metrics["disc"] = d_loss
    if use_ssl:
      tau = ema_tau(state["step"], total_steps, config.ssl.ema_base)
      online = {"backbone": params["backbone"], "projector": params["projector"]}
      new["target"] = ema_update(state["target"], online, tau)
      metrics["tau"] = tau
    return new, metrics

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(keep_finite(step), donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


def residual_scores(x: jax.Array, x_hat: jax.Array, sigma: float) -> tuple[jax.Array, jax.Array]:
  """(anomaly maps (B,H,W), A(x) (B,)) of images x and reconstructions x_hat (B,H,W,C): the map is |x - x_hat|
  averaged over channels, Gaussian-smoothed with `sigma` pixels (0 = raw); A(x) is the mean of the raw map."""
  residual = jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)), axis=-1)
  maps = filters.gaussian_smooth(residual, sigma=sigma) if sigma else residual
  return maps, jnp.mean(residual, axis=(1, 2))


def make_scorer(graphdef, mesh: Mesh, channels: int, sigma: float) -> Callable:
  """state -> (images (B,H,W[,3]) in [0,1] -> (residual maps (B,H,W), A(x) (B,))), split over `data`.

  x_hat is decoded from the means (deterministic); the map is |x - x_hat| averaged over channels and,
  with `sigma`, Gaussian-smoothed for localisation; the score A(x) is the mean of the raw map."""
  data = parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=(data, data))
  def score_fn(params, images):
    x = model_input(images, channels)
    return residual_scores(x, nnx.merge(graphdef, params).reconstruct(x), sigma)

  return lambda state: functools.partial(score_fn, state["params"])


def make_reconstructor(graphdef, mesh: Mesh, channels: int) -> Callable:
  """state -> (images -> pseudo-healthy reconstructions (B,H,W), channel mean), split over `data`."""
  data = parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=data)
  def recon_fn(params, images):
    x = model_input(images, channels)
    return jnp.mean(nnx.merge(graphdef, params).reconstruct(x).astype(jnp.float32), axis=-1)

  return lambda state: functools.partial(recon_fn, state["params"])


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def load_training_images(dataset: datasets.Dataset, samples, size: int, channels: int) -> np.ndarray:
  """(n, size, size) grey (the reference's training read) or (n, size, size, 3) RGB float32 in [0, 1]."""
  if channels == 1:
    return run_data.load_train_images(dataset, samples, size)
  if dataset.layout == records.TFDS:
    source, where = records.open_tfds(dataset.root, "train"), {id(s): i for i, s in enumerate(dataset.train)}
    natives = [source[where[id(s)]]["image"] for s in samples]
  else:
    natives = [preprocess.load_native(s.path) for s in samples]
  return np.stack([preprocess.test_array(n, size, "rgb") for n in natives]).astype(np.float32)


def build(config: ml_collections.ConfigDict, dataset: datasets.Dataset | None, workdir: str, mesh: Mesh, *,
          train: bool = True) -> Trainable:
  """SSL-AnoVAE as a `Trainable` on `mesh`; with `train=False` no step is built and nothing is written."""
  validate(config)
  if dataset is None and train:
    raise ValueError("SSL-AnoVAE training needs a dataset")
  chosen = [] if dataset is None else support_lib.choose_support(config.data, config.seed, dataset, workdir, train)
  size, channels, seed = int(config.data.image_size), int(config.model.channels), int(config.seed)
  empty = (0, size, size) if channels == 1 else (0, size, size, 3)
  images = load_training_images(dataset, chosen, size, channels) if chosen else np.zeros(empty, np.float32)
  n, bs = max(images.shape[0], 1), int(config.train.batch_size)
  spe = batches.steps_per_epoch(n, bs)
  pretrain_epochs = int(config.train.ssl_pretrain_epochs) * (config.train.ssl_mode == "pretrain_frozen")
  total, pretrain = int(config.train.epochs) * spe, pretrain_epochs * spe

  model, disc = build_networks(config)
  opt_g = optax.adam(config.train.lr, b1=config.train.b1, b2=config.train.b2)
  opt_d = optax.adam(config.train.disc_lr, b1=config.train.b1, b2=config.train.b2)
  state, defs = init_state(model, disc, opt_g, opt_d, seed)
  state = parallel.replicate(state, mesh)

  train_step = None
  if train:
    step = make_train_step(defs, config, opt_g, opt_d, mesh, total, pretrain)
    on_device = parallel.replicate(images, mesh)
    train_step = lambda state, batch: step(state, on_device, batch)

  local_batch = batches.local_index_batches(n, bs, seed)
  m = config.model
  counts = {"generator": nets.count_params(model), "discriminator": nets.count_params(disc)}
  notes = [f"SSL-AnoVAE {size} px x {channels} ch, latents {m.latents} (z_I {m.latent_image}, z_S {m.latent_ssl}), "
           f"{counts['generator']:,} generator + {counts['discriminator']:,} discriminator parameters, "
           f"{len(chosen)} normal training images, views preset {config.ssl.views.preset!r}, ssl_mode "
           f"{config.train.ssl_mode}, {m.dtype}"]
  info = {"notes": notes, "preprocessing": {"image_size": size, "color": config.data.color, "channels": channels,
                                            "train_color": "grey" if channels == 1 else "rgb",
                                            "resize": "PIL bilinear", "range": "[0, 1]"},
          "support": [s.name for s in chosen], "data_root": dataset.root if dataset else None,
          "backbone": {"architecture": "SSL-AnoVAE", "parameters": counts, "weights": "trained from scratch"}}
  graphdef = defs[0]
  return Trainable(state=state, train_step=train_step, local_batch=local_batch, steps_per_epoch=spe,
                   scorer=make_scorer(graphdef, mesh, channels, float(config.score.residual_sigma)),
                   calibration_images=images, threshold=quantile_threshold(config.eval.threshold_quantile),
                   info=info, reconstructor=make_reconstructor(graphdef, mesh, channels))

