"""Builds the per-device synthesis function the train step runs under shard_map: pixel + latent tasks.

Every sample draws one task from the combined table (pixel tasks of `synthesis.mix` followed by
the latent tasks) with its own key fold_in(fold_in(key, step), global sample index). Latent
tasks need the frozen VAE: the support set's latents are encoded once on the host side, and
per step the batch is encoded and the anomalous latents decoded on device.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mediclip_jax.models import vae as vae_lib
from mediclip_jax.synthesis import latent, mix

LATENT_TASKS = ("latent_deviation", "latent_shuffle")
ALL_TASKS = mix.TASKS + LATENT_TASKS


def task_table(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(len(ALL_TASKS),) probabilities from `synthesis.probs` (pixel and latent names), summing to 1."""
  probs = dict(cfg.probs)
  unknown = sorted(set(probs) - set(ALL_TASKS))
  if unknown:
    raise ValueError(f"synthesis.probs has unknown tasks {unknown}; expected names from {ALL_TASKS}")
  p = np.array([float(probs.get(t, 0.0)) for t in ALL_TASKS])
  if (p < 0).any() or abs(p.sum() - 1) > 1e-6:
    raise ValueError(f"synthesis.probs must be non-negative and sum to 1, got {probs} (sum {p.sum():.4f})")
  return p.astype(np.float32)


def uses_latent(cfg: ml_collections.ConfigDict) -> bool:
  """Whether any latent task has a positive probability (then a VAE is needed)."""
  return bool(task_table(cfg)[len(mix.TASKS):].sum() > 0)


def _pixel_cfg(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pixel-only mix config (latent probabilities folded out; mix validates its own table)."""
  pc = mix.default_config()
  pc.dispatch = cfg.dispatch
  pc.pixel = cfg.pixel
  p = task_table(cfg)[:len(mix.TASKS)]
  p = p / p.sum() if p.sum() > 0 else np.eye(len(mix.TASKS))[mix.TASKS.index("identity")]
  pc.probs = ml_collections.ConfigDict({t: float(v) for t, v in zip(mix.TASKS, p)})
  return pc


def build_synthesis(cfg: ml_collections.ConfigDict, vae=None) -> tuple[Callable, Callable]:
  """Returns (synth_fn, make_aux).

  synth_fn(key, step, images (B,H,W), sample_index (B,), aux) -> dict(image, mask, task);
  make_aux(support (K,H,W)) -> aux pytree (support images, VAE state, support latents and
  their per-channel statistics), to be replicated on every device.
  """
  probs = task_table(cfg)
  pixel_cfg = _pixel_cfg(cfg)
  mix.validate_config(pixel_cfg)
  n_pixel = len(mix.TASKS)
  use_latent = uses_latent(cfg)
  if use_latent and vae is None:
    raise ValueError("synthesis.probs enables latent tasks but no VAE was given (set vae.kind / vae.path)")
  graphdef = vae_state = None
  if use_latent:
    graphdef, vae_state = nnx.split(vae)

  def make_aux(support: np.ndarray) -> dict:
    aux = {"support": jnp.asarray(support, jnp.float32)}
    if use_latent:
      z = jax.jit(lambda s, x: vae_lib.encode_gray(nnx.merge(graphdef, s), x))(vae_state, aux["support"])
      mean, std = latent.latent_stats(z)
      aux.update(vae=vae_state, support_latents=z, latent_mean=mean, latent_std=std)
    return aux

  def synth_fn(key, step, images, sample_index, aux):
    keys = mix.sample_keys(key, step, sample_index)
    choice_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0x7A5C))(keys)
    tasks = mix.choose_tasks(choice_keys, probs)
    pix = _pixel_tasks(keys, images, aux, tasks)
    if not use_latent:
      return pix
    model = nnx.merge(graphdef, aux["vae"])
    latent_task = jnp.where(tasks == n_pixel, latent.TASK_DEVIATION,
                            jnp.where(tasks == n_pixel + 1, latent.TASK_SHUFFLE, latent.TASK_IDENTITY))
    lat = latent.latent_synthesize(
        jax.vmap(lambda k: jax.random.fold_in(k, 0x1A7E))(keys), images, aux["support_latents"],
        (functools.partial(vae_lib.encode_gray, model), functools.partial(vae_lib.decode_gray, model)),
        cfg.latent, tasks=latent_task, stats=(aux["latent_mean"], aux["latent_std"]))
    is_latent = (tasks >= n_pixel)[:, None, None]
    is_identity = (tasks == mix.TASKS.index("identity"))[:, None, None]
    image = jnp.where(is_latent, lat["image"], pix["image"])
    if cfg.latent.roundtrip_normals:  # normals see the same VAE blur as latent anomalies
      image = jnp.where(is_identity, lat["recon"], image)
    mask = jnp.where(is_latent, lat["mask"], pix["mask"])
    return {"image": image, "mask": mask, "task": tasks}

  def _pixel_tasks(keys, images, aux, tasks):
    # Latent samples run the (cheap) identity pixel task here; their result is replaced later.
    pixel_task = jnp.where(tasks >= n_pixel, mix.TASKS.index("identity"), tasks)
    out, mask = mix.apply_tasks(pixel_task, mix.split_sample_keys(keys)[1], images, aux["support"], pixel_cfg)
    return {"image": out, "mask": mask, "task": tasks}

  return synth_fn, make_aux
