"""The one synthesis entry point: a task per sample, pixel or latent, applied on device.

`build_synthesis(cfg, codec)` returns the function the train step runs per device under
`jax.shard_map`; the synthesis tests and `launch/bench_synthesis.py` call the same function.
Every sample draws one task from one table (`cfg.probs` over TASKS: the pixel tasks, then the
latent tasks) with its own key fold_in(fold_in(key, step), global sample index), split into
(choice, pixel, latent) keys. So a sample's result does not depend on how the batch is split
over devices; cut-paste sources and latent patches come from the few-shot support set
(the "pools"), replicated on every device.

Dispatch of the pixel tasks (`cfg.dispatch`, static): "switch" vmaps a `lax.switch` over the
batch, which XLA turns into a select, so every task is computed for every sample (best on
GPU/TPU: one wide kernel per op); "map" runs samples one after another with `lax.map`,
where the switch is a real branch and only the chosen task runs (best on CPU). Both draw the
same tasks and masks; images agree to about 2e-5 (XLA fuses the Gaussian filters differently).
"auto" (the default) picks "map" on CPU and "switch" elsewhere.

Latent tasks need a frozen VAE, given as a `Codec` (its state and pure encode/decode
functions of the state): the support latents are encoded once by `make_pools`, and per step
the batch is encoded and the anomalous latents decoded on device.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mediclip_jax.synthesis import latent, pixel

PIXEL_TASKS: tuple[str, ...] = ("cutpaste", "gauss_intensity", "deformation", "identity")
LATENT_TASKS: tuple[str, ...] = ("latent_deviation", "latent_shuffle")
TASKS: tuple[str, ...] = PIXEL_TASKS + LATENT_TASKS
IDENTITY = PIXEL_TASKS.index("identity")
DISPATCH_MODES = ("auto", "switch", "map")

TaskFn = Callable[[jax.Array, jax.Array, jax.Array, ml_collections.ConfigDict], tuple[jax.Array, jax.Array]]

PIXEL_TASK_FNS: dict[str, TaskFn] = {
    "cutpaste": lambda key, image, support, cfg: pixel.cutpaste(key, image, support, cfg),
    "gauss_intensity": lambda key, image, support, cfg: pixel.gauss_intensity(key, image, cfg),
    "deformation": lambda key, image, support, cfg: pixel.deformation(key, image, cfg),
    "identity": lambda key, image, support, cfg: pixel.identity(key, image, cfg),
}


class Codec(NamedTuple):
  """A frozen VAE as pure functions of its state: encode(state, (B,H,W)) -> (B,L,L,C) scaled latents,
  decode(state, latents) -> (B,H,W) in [0, 1]."""
  state: Any
  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]


def default_config() -> ml_collections.ConfigDict:
  """Task probabilities (reference: the four pixel tasks at 0.25, no latent task), dispatch, task knobs."""
  c = ml_collections.ConfigDict()
  c.probs = ml_collections.ConfigDict({t: 0.25 if t in PIXEL_TASKS else 0.0 for t in TASKS})
  c.dispatch = "auto"
  c.pixel = pixel.default_config()
  c.latent = latent.default_config()
  return c


def task_probs(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(len(TASKS),) probabilities in TASKS order; validates names, signs and the sum."""
  probs = dict(cfg.probs)
  unknown = sorted(set(probs) - set(TASKS))
  if unknown:
    raise ValueError(f"synthesis.probs has unknown task names {unknown}; expected names from {TASKS}")
  p = np.array([float(probs.get(t, 0.0)) for t in TASKS], np.float64)
  if np.any(p < 0):
    raise ValueError(f"synthesis.probs must be non-negative, got {probs}")
  if abs(p.sum() - 1.0) > 1e-6:
    raise ValueError(f"synthesis.probs must sum to 1 (as the reference asserts), got sum {p.sum():.6f} for {probs}")
  return p.astype(np.float32)


def uses_latent(cfg: ml_collections.ConfigDict) -> bool:
  """Whether any latent task has a positive probability (then a VAE is needed)."""
  return bool(task_probs(cfg)[len(PIXEL_TASKS):].sum() > 0)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when the config is inconsistent."""
  task_probs(cfg)
  if cfg.dispatch not in DISPATCH_MODES:
    raise ValueError(f"synthesis.dispatch must be one of {DISPATCH_MODES}, got {cfg.dispatch!r}")
  pixel.validate_config(cfg.pixel)


def resolve_dispatch(mode: str) -> str:
  """"switch" or "map" for a configured dispatch mode ("auto": map on CPU, switch elsewhere)."""
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "switch"
  if mode not in DISPATCH_MODES:
    raise ValueError(f"synthesis.dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
  return mode


def sample_keys(base_key: jax.Array, step: jax.Array | int, sample_index: jax.Array) -> jax.Array:
  """key_i = fold_in(fold_in(base_key, step), sample_index[i]) for every sample."""
  k = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.asarray(sample_index, jnp.int32))


def choose_tasks(keys: jax.Array, probs: jax.Array) -> jax.Array:
  """(B,) int32 task ids drawn independently per key with the given (T,) probabilities."""
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  return jax.vmap(lambda k: jax.random.categorical(k, logp))(keys).astype(jnp.int32)


def apply_pixel_tasks(tasks: jax.Array, keys: jax.Array, images: jax.Array, support: jax.Array,
                      cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Runs each sample's pixel task (index into PIXEL_TASKS) with its key; returns (images, masks)."""
  branches = [functools.partial(PIXEL_TASK_FNS[t], cfg=cfg.pixel) for t in PIXEL_TASKS]
  one = lambda t, k, im: jax.lax.switch(t, branches, k, im, support)
  if resolve_dispatch(cfg.dispatch) == "switch":
    return jax.vmap(one)(tasks, keys, images)
  return jax.lax.map(lambda a: one(*a), (tasks, keys, images))


SynthFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, dict], dict]


def build_synthesis(cfg: ml_collections.ConfigDict, codec: Codec | None = None
                    ) -> tuple[SynthFn, Callable[[np.ndarray], dict]]:
  """Returns (synthesize, make_pools).

  synthesize(key, step, images (B,H,W) in [0,1], sample_index (B,), pools) ->
    dict(image (B,H,W), mask (B,H,W), task (B,) int32 index into TASKS);
  make_pools(support (K,H,W)) -> the replicated pytree synthesis draws from (support images,
    and with latent tasks the VAE state, the support latents and their per-channel statistics).
  """
  validate_config(cfg)
  probs = task_probs(cfg)
  n_pixel = len(PIXEL_TASKS)
  use_latent = uses_latent(cfg)
  if use_latent and codec is None:
    raise ValueError("synthesis.probs gives latent tasks a positive probability, but no VAE was given "
                     "(set vae.kind / vae.path)")

  def make_pools(support: np.ndarray) -> dict:
    pools = {"support": jnp.asarray(support, jnp.float32)}
    if use_latent:
      z = jax.jit(codec.encode)(codec.state, pools["support"])
      mean, std = latent.latent_stats(z)
      pools.update(vae=codec.state, support_latents=z, latent_mean=mean, latent_std=std)
    return pools

  def synthesize(key, step, images, sample_index, pools):
    images = jnp.asarray(images, jnp.float32)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(sample_keys(key, step, sample_index))
    choice_keys, pixel_keys, latent_keys = keys[:, 0], keys[:, 1], keys[:, 2]
    tasks = choose_tasks(choice_keys, probs)
    # Latent samples run the (cheap) identity pixel task; their result is replaced below.
    pixel_task = jnp.where(tasks >= n_pixel, IDENTITY, tasks)
    image, mask = apply_pixel_tasks(pixel_task, pixel_keys, images, pools["support"], cfg)
    if not use_latent:
      return {"image": image, "mask": mask, "task": tasks}
    latent_task = jnp.where(tasks == n_pixel, latent.TASK_DEVIATION,
                            jnp.where(tasks == n_pixel + 1, latent.TASK_SHUFFLE, latent.TASK_IDENTITY))
    lat = latent.latent_synthesize(
        latent_keys, images, pools["support_latents"],
        (functools.partial(codec.encode, pools["vae"]), functools.partial(codec.decode, pools["vae"])),
        cfg.latent, tasks=latent_task, stats=(pools["latent_mean"], pools["latent_std"]))
    is_latent = (tasks >= n_pixel)[:, None, None]
    image = jnp.where(is_latent, lat["image"], image)
    if cfg.latent.roundtrip_normals:  # normals see the same VAE blur as latent anomalies
      image = jnp.where((tasks == IDENTITY)[:, None, None], lat["recon"], image)
    mask = jnp.where(is_latent, lat["mask"], mask)
    return {"image": image, "mask": mask, "task": tasks}

  return synthesize, make_pools
