"""Programs the benchmark times beside the fused step (launch/benchmark.py, DESIGN §12).

- `make_fed_train_step`: the train step without synthesis; it receives ready images and masks
  (the host pipeline's output, or device-resident random data). Model, loss, metrics and optax
  update are those of `step.make_train_step`, so fused and fed steps differ only in where the
  anomalies come from.
- Stage programs (synthesis alone, VAE encode/decode alone, CLIP vision forward alone), each
  jitted on its own over the same `data` mesh.
- The host pipeline's worker side: per-sample numpy/OpenCV synthesis
  (`synthesis.reference_numpy`) of whole batches in CPU worker processes, as the PyTorch
  original's DataLoader workers do.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import clip_normalize
from mediclip_jax.parallel import batch_sharding, replicated
from mediclip_jax.train.step import update_on_batch


MODES = ("fused", "host", "synthetic")


def bench_config(*, batch_per_device: int, warmup_steps: int = 2, steps: int = 20,
                 modes: str = "fused,host,synthetic", host_workers: int = 2) -> ml_collections.ConfigDict:
  """The `bench` section of a benchmark config (configs/bench_*.py); every field can be overridden by flag."""
  c = ml_collections.ConfigDict()
  c.batch_per_device = batch_per_device  # global batch = this x jax.device_count()
  c.warmup_steps = warmup_steps          # untimed steps after compilation (>= 1)
  c.steps = steps                        # timed steps per mode and per stage
  c.modes = modes                        # comma-separated subset of MODES
  c.stages = True                        # per-stage breakdown (synthesis, VAE, CLIP forward, full step)
  c.host_workers = host_workers          # host mode: CPU worker processes (the reference uses 2)
  c.host_prefetch = 2                    # host mode: batches in flight per worker (DataLoader prefetch_factor)
  c.support = "phantom"                  # few-shot support images: "phantom" (64..224 px) | "random"
  c.peak_tflops = ml_collections.FieldReference(None, field_type=float)  # per-device peak; None = table
  return c


def make_fed_train_step(graphdef, optimizer: optax.GradientTransformation, mesh: Mesh,
                        loss_cfg: ml_collections.ConfigDict) -> Callable:
  """Jitted `step(state, frozen, batch) -> (state, metrics)` on ready data; `state` is donated.

  frozen = {"model": frozen model state}; batch = {"image": (B,H,W) in [0,1], "mask": (B,H,W)},
  split over `data`. The body is the fused step's own update (`step.update_on_batch`).
  """

  def step(state: dict, frozen: dict, batch: dict):
    return update_on_batch(graphdef, optimizer, loss_cfg, state, frozen["model"], batch["image"], batch["mask"])

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


def make_synthesis_stage(synthesize: Callable, mesh: Mesh) -> Callable:
  """Jitted `f(rng_data, step, support, support_index, sample_index, aux) -> dict(image, mask, task)`.

  `synthesize` is the shard_mapped synthesis of the fused step (`step.make_synthesizer`); the
  gather from the support set is included, as in the step.
  """

  def run(rng, step, support, support_index, sample_index, aux):
    images = jnp.take(support, support_index, axis=0)
    return synthesize(jax.random.wrap_key_data(rng), step, images, sample_index, aux)

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, rep, rep, data, data, rep), out_shardings=data)


def make_vae_stage(vae_graphdef, mesh: Mesh) -> Callable:
  """Jitted `f(vae_state, images (B,H,W)) -> (B,H,W)`: encode B images, decode 2B latents, as the latent tasks do."""

  def run(vae_state, images):
    model = nnx.merge(vae_graphdef, vae_state)
    z = vae_lib.encode_gray(model, images)
    decoded = vae_lib.decode_gray(model, jnp.concatenate([z, z * 0.5], axis=0))
    b = images.shape[0]
    return decoded[:b] - decoded[b:]

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, data), out_shardings=data)


def make_clip_forward_stage(graphdef, mesh: Mesh, tap_layers: tuple[int, ...]) -> Callable:
  """Jitted `f(params, frozen_model, images (B,H,W)) -> taps`: the frozen vision tower to the last tap."""

  def run(params, frozen_model, images):
    model = nnx.merge(graphdef, params, frozen_model)
    return model.clip.visual(clip_normalize(images), tap_layers=tap_layers).taps

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, rep, data), out_shardings=data)


def host_pixel_config(synthesis_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `mix` config the numpy implementation reads; raises when latent tasks are enabled."""
  from mediclip_jax.synthesis import mix  # pylint: disable=import-outside-toplevel
  probs = {k: float(v) for k, v in dict(synthesis_cfg.probs).items()}
  latent = {k: v for k, v in probs.items() if k not in mix.TASKS and v > 0}
  if latent:
    raise ValueError(f"mode 'host' runs the pixel tasks in numpy/OpenCV only; synthesis.probs enables latent "
                     f"tasks {sorted(latent)} (use --modes fused,synthetic for this config)")
  c = mix.default_config()
  c.dispatch = synthesis_cfg.dispatch
  c.pixel = synthesis_cfg.pixel.copy_and_resolve_references()
  c.probs = ml_collections.ConfigDict({t: probs.get(t, 0.0) for t in mix.TASKS})
  mix.validate_config(c)
  return c


_WORKER: dict = {}


def host_worker_init(support: np.ndarray, pixel_cfg: ml_collections.ConfigDict) -> None:
  """Pool initializer: keeps the support set and config in the worker (sent once, not per batch)."""
  _WORKER["support"] = np.asarray(support, np.float32)
  _WORKER["cfg"] = pixel_cfg


def host_batch(seed: int, step: int, support_index: np.ndarray, sample_index: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, float]:
  """One batch synthesised sample by sample on the CPU: (images, masks) float32 (B,H,W), and the seconds it took.

  Sample i of step s draws from numpy's generator seeded by (seed, s, global index i).
  """
  from mediclip_jax.synthesis.reference_numpy import synthesize_sample_numpy  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  support, cfg = _WORKER["support"], _WORKER["cfg"]
  images, masks = [], []
  for si, gi in zip(support_index.tolist(), sample_index.tolist()):
    rng = np.random.default_rng([seed, step, gi])
    im, m = synthesize_sample_numpy(rng, support[si], support, cfg)
    images.append(im)
    masks.append(m)
  return np.stack(images).astype(np.float32), np.stack(masks).astype(np.float32), time.perf_counter() - t0

