"""MediCLIP's benchmark parts: what launch/benchmark.py times beside the method's own fused step.

`bench_parts(config, mesh, trainable)` is MediCLIP's benchmark hook, registered in
`mediclip_jax.methods.BENCH_PARTS`; launch/benchmark.py runs only a method's own fused step when it
has none. It gives
- the fed step: the train step without synthesis, on ready images and masks. Its body is
  `mediclip.update_on_batch`, the fused step's own loss and update, so fused and fed steps
  differ only in where the anomalies come from;
- the batch sources of the fed modes: `host` (the pixel tasks per sample in numpy/OpenCV in
  spawned CPU worker processes, as the PyTorch original's DataLoader workers) and `synthetic`
  (device-resident random images and masks);
- the stage breakdown: synthesis alone, VAE encode/decode alone, the CLIP vision forward alone,
  each jitted on its own over the same `data` mesh;
- analytic model FLOPs of the fused and fed steps (`mediclip_jax.flops`), and the facts the
  result JSON records (architecture, task mix, dtype policy).
Host mode needs OpenCV and scipy (the `bench` extra); without them it is reported unavailable.
"""
from __future__ import annotations

import collections
import importlib
import multiprocessing
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mediclip_jax import flops, parallel
from mediclip_jax.methods import mediclip
from mediclip_jax.methods.base import Trainable, keep_finite
from mediclip_jax.methods.bench import BenchParts, Stage
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.synthesis import mix


# ----------------------------------------------------------------------------------------------
# Programs
# ----------------------------------------------------------------------------------------------

def make_fed_train_step(graphdef, optimizer: optax.GradientTransformation, mesh: Mesh,
                        train_cfg: ml_collections.ConfigDict) -> Callable:
  """Jitted `step(state, frozen, batch) -> (state, metrics)` on ready data; `state` is donated.

  frozen = {"model": frozen model state}; batch = {"image": (B,H,W) in [0,1], "mask": (B,H,W)},
  split over `data`. The body is the fused step's own update (`mediclip.update_on_batch`).
  """

  def step(state: dict, frozen: dict, batch: dict):
    return mediclip.update_on_batch(graphdef, optimizer, train_cfg, state, frozen["model"], batch["image"],
                                    batch["mask"])

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(keep_finite(step), donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


def make_synthesis_stage(synthesize: mix.SynthFn, mesh: Mesh) -> Callable:
  """Jitted `f(rng_data, step, support, support_index, sample_index, pools) -> dict(image, mask, task)`:
  the fused step's shard_mapped synthesis, the gather from the support set included."""
  synth = mediclip.shard_synthesis(synthesize, mesh)

  def run(rng, step, support, support_index, sample_index, pools):
    images = jnp.take(support, support_index, axis=0)
    return synth(jax.random.wrap_key_data(rng), step, images, sample_index, pools)

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, rep, rep, data, data, rep), out_shardings=data)


def make_vae_stage(codec: mix.Codec, mesh: Mesh) -> Callable:
  """Jitted `f(vae_state, images (B,H,W)) -> (B,H,W)`: encode B images, decode 2B latents, as the latent tasks do."""

  def run(vae_state, images):
    z = codec.encode(vae_state, images)
    decoded = codec.decode(vae_state, jnp.concatenate([z, z * 0.5], axis=0))
    b = images.shape[0]
    return decoded[:b] - decoded[b:]

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, data), out_shardings=data)


def make_clip_forward_stage(graphdef, mesh: Mesh, tap_layers: tuple[int, ...]) -> Callable:
  """Jitted `f(params, frozen_model, images (B,H,W)) -> taps`: the frozen vision tower to the last tap."""

  def run(params, frozen_model, images):
    model = nnx.merge(graphdef, params, frozen_model)
    return model.clip.visual(mediclip.clip_input(images), tap_layers=tap_layers).taps

  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, rep, data), out_shardings=data)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------

def vae_flops_per_image(vae: vae_lib.Vae, image_size: int) -> dict[str, float]:
  """Per-image {"encode", "decode"} FLOPs read off the built VAE (so a converted checkpoint's architecture counts)."""
  if isinstance(vae, vae_lib.TAEF2):
    return flops.taef2_flops(image_size, int(vae.encoder.layers[0].out_features), int(vae.latent_channels))
  enc = vae.encoder
  boc = [int(b.resnets[-1].conv2.out_features) for b in enc.down_blocks]
  return flops.autoencoder_kl_flops(
      image_size, boc, layers_per_block=len(enc.down_blocks[0].resnets), latent_channels=int(vae.latent_channels),
      in_channels=int(vae.in_channels), out_channels=int(vae.out_channels),
      mid_attention=len(enc.mid_block.attentions) > 0, quant_conv=vae.quant_conv is not None,
      post_quant_conv=vae.post_quant_conv is not None)


def step_flops(model, batch: int, image_size: int, vae_per_image: dict[str, float] | None) -> dict[str, float]:
  """Analytic FLOPs of one step of `model` (a MediCLIP detector) on a global batch, by component."""
  c = model.clip.cfg
  n_prompts, context_length = (int(n) for n in model.prompts.token_ids.get_value().shape)
  return flops.step_flops(batch=batch, image_size=image_size, patch_size=c.patch_size, vision_width=c.vision_width,
                          tap_layers=model.tap_layers, text_width=c.text_width, text_layers=c.text_layers,
                          embed_dim=c.embed_dim, n_prompts=n_prompts, context_length=context_length,
                          mlp_ratio=c.mlp_ratio, vae=vae_per_image)


# ----------------------------------------------------------------------------------------------
# Host mode: per-sample numpy/OpenCV synthesis in CPU worker processes
# ----------------------------------------------------------------------------------------------

def host_pixel_config(synthesis_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `mix` config the numpy implementation reads; raises ValueError when latent tasks are enabled."""
  probs = {k: float(v) for k, v in dict(synthesis_cfg.probs).items()}
  latent = sorted(k for k, v in probs.items() if k not in mix.PIXEL_TASKS and v > 0)
  if latent:
    raise ValueError(f"mode 'host' runs the pixel tasks in numpy/OpenCV only; synthesis.probs enables latent "
                     f"tasks {latent} (they need the VAE on the device)")
  c = mix.default_config()
  c.dispatch = synthesis_cfg.dispatch
  c.pixel = synthesis_cfg.pixel.copy_and_resolve_references()
  c.probs = ml_collections.ConfigDict({t: probs.get(t, 0.0) for t in mix.TASKS})
  mix.validate_config(c)
  return c


def host_unavailable(config: ml_collections.ConfigDict) -> str | None:
  """Why host mode cannot run this config here, or None."""
  try:
    host_pixel_config(config.synthesis)
  except ValueError as e:
    return str(e)
  try:
    importlib.import_module("mediclip_jax.synthesis.reference_numpy")
  except ImportError as e:
    return f"host mode needs OpenCV and scipy (pip install -e '.[bench]'): {e}"
  return None


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


def _summary(times: list[float]) -> dict:
  t = np.asarray(times, np.float64)
  return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "mean": float(t.mean()),
          "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


class HostFeed:
  """`bench.host_workers` spawned processes synthesise whole batches; up to workers x `bench.host_prefetch`
  batches are in flight (the DataLoader's prefetch); each batch is copied to the device when the step asks."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, support: np.ndarray,
               local_batch: Callable[[int], dict], total: int):
    bench = config.bench
    self.n_workers = int(bench.host_workers)
    if self.n_workers < 1:
      raise ValueError(f"bench.host_workers must be >= 1, got {self.n_workers}")
    self.in_flight = max(1, self.n_workers * int(bench.host_prefetch))
    self.mesh, self.local_batch, self.total, self.seed = mesh, local_batch, total, int(config.seed)
    self.t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe after the JAX runtime has started threads
    self.pool = ctx.Pool(self.n_workers, initializer=host_worker_init,
                         initargs=(support, host_pixel_config(config.synthesis)))
    self.pending: collections.deque = collections.deque()
    self.submitted = 0
    self.waits: list[float] = []
    self.worker_s: list[float] = []
    self.rows = 0

  def _submit_until(self, step: int) -> None:
    while self.submitted < min(self.total, step + self.in_flight):
      local = self.local_batch(self.submitted)
      self.pending.append(self.pool.apply_async(host_batch, (self.seed, self.submitted, local["support_index"],
                                                             local["sample_index"])))
      self.submitted += 1

  def __call__(self, step: int, warm: bool) -> dict:
    self._submit_until(step)
    t = time.perf_counter()
    images, masks, secs = self.pending.popleft().get()
    if not warm:
      self.waits.append(time.perf_counter() - t)
      self.worker_s.append(secs)
    self.rows = images.shape[0]
    return {"image": parallel.global_array(images, self.mesh), "mask": parallel.global_array(masks, self.mesh)}

  def fields(self) -> dict:
    return {
        "input": f"{self.n_workers} spawned CPU worker processes, per-sample numpy/OpenCV synthesis "
                 f"(synthesis.reference_numpy), up to {self.in_flight} batches in flight, host->device copy each step",
        "host_workers": self.n_workers, "host_batches_in_flight": self.in_flight,
        "host_wall_s_incl_pool_start": time.perf_counter() - self.t0,
        "host_wait_s": _summary(self.waits), "host_worker_s_per_batch": _summary(self.worker_s),
        "host_worker_samples_per_s_per_worker": self.rows / float(np.median(self.worker_s)),
    }

  def close(self) -> None:
    self.pool.terminate()
    self.pool.join()


class SyntheticFeed:
  """Device-resident random images and masks (10 % of pixels anomalous), created once."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    size = int(config.data.image_size)
    rows = int(config.train.batch_size) // jax.process_count()
    rng = np.random.default_rng([int(config.seed), jax.process_index()])
    self.batch = {"image": parallel.global_array(rng.random((rows, size, size), dtype=np.float32), mesh),
                  "mask": parallel.global_array((rng.random((rows, size, size)) < 0.1).astype(np.float32), mesh)}

  def __call__(self, step: int, warm: bool) -> dict:
    return self.batch

  def fields(self) -> dict:
    return {"input": "device-resident random images + masks, created once; no synthesis"}

  def close(self) -> None:
    self.batch = None


# ----------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------

def bench_parts(config: ml_collections.ConfigDict, mesh: Mesh, trainable: Trainable) -> BenchParts:
  """MediCLIP's benchmark parts for a `Trainable` that `mediclip.build(config, ...)` returned.

  The detector, optimizer, VAE and synthesis are built again from `config` (deterministic in the
  seeds, so the same weights); the support set is the trainable's (its calibration images) and the
  fed modes draw their batch indices from `trainable.local_batch`.
  """
  size, batch, seed = int(config.data.image_size), int(config.train.batch_size), int(config.seed)
  model = mediclip.build_detector(config)
  graphdef, params, frozen_model = mediclip.split_model(model)
  optimizer = mediclip.make_optimizer(config.train)
  latent = mix.uses_latent(config.synthesis)
  vae = vae_lib.load_vae(config.vae) if latent else None
  vae_per_image = vae_flops_per_image(vae, size) if latent else None
  support = np.asarray(trainable.calibration_images, np.float32)

  fed = make_fed_train_step(graphdef, optimizer, mesh, config.train)
  fed_frozen = {"model": parallel.replicate(frozen_model, mesh)}

  def fed_step(state, batch_):
    return fed(state, fed_frozen, batch_)

  unavailable = {}
  reason = host_unavailable(config)
  if reason:
    unavailable["host"] = reason
  feeds = {"synthetic": lambda total: SyntheticFeed(config, mesh)}
  if "host" not in unavailable:
    feeds["host"] = lambda total: HostFeed(config, mesh, support, trainable.local_batch, total)

  fused_flops = step_flops(model, batch, size, vae_per_image)
  fed_flops = step_flops(model, batch, size, None)

  def stages() -> list[Stage]:
    codec = vae_lib.codec(vae) if latent else None
    synthesize, make_pools = mix.build_synthesis(config.synthesis, codec)
    pools = parallel.replicate(make_pools(support), mesh)
    support_dev = parallel.replicate(support, mesh)
    idx = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(0).items()}
    rng = parallel.replicate(jax.random.key_data(jax.random.key(seed)), mesh)
    steps: dict[int, jax.Array] = {}

    def synthesis_args(i: int) -> tuple:  # each iteration synthesises another step's samples
      if i not in steps:
        steps[i] = parallel.replicate(np.int32(i), mesh)
      return (rng, steps[i], support_dev, idx["support_index"], idx["sample_index"], pools)

    images = jax.device_put(jnp.take(support_dev, idx["support_index"], axis=0), parallel.batch_sharding(mesh))
    vae_flops = fused_flops["vae_encode"] + fused_flops["vae_decode"]
    out = [Stage("synthesis", lambda: make_synthesis_stage(synthesize, mesh), synthesis_args, vae_flops,
                 "pixel tasks (+ latent tasks with VAE encode/decode when enabled); model_flops counts only "
                 "the VAE part")]
    if latent:
      vae_state = parallel.replicate(codec.state, mesh)
      out.append(Stage("vae_encode_decode", lambda: make_vae_stage(codec, mesh), lambda i: (vae_state, images),
                       vae_flops, "encode B images, decode 2B latents (as the latent tasks per step)"))
    else:
      out.append(Stage("vae_encode_decode", None, lambda i: (), None, "no latent tasks: no VAE"))
    params_dev, frozen_dev = parallel.replicate(params, mesh), fed_frozen["model"]
    out.append(Stage("clip_forward", lambda: make_clip_forward_stage(graphdef, mesh, model.tap_layers),
                     lambda i: (params_dev, frozen_dev, images), fused_flops["vision_forward"],
                     f"vision tower to the last tap (blocks 1..{max(model.tap_layers)}), no gradient"))
    return out

  c, cc = config, model.clip.cfg
  info = {
      "step_program": "functional split/merge step (methods.mediclip.make_train_step; the fed step of host and "
                      "synthetic modes in methods.mediclip_bench), jax.jit over a 1-D 'data' mesh",
      "dtype_policy": {"params": "float32", "clip_compute": c.model.clip.dtype,
                       "vae_compute": c.vae.dtype if latent else None,
                       "default_matmul_precision": jax.config.jax_default_matmul_precision,
                       "losses_and_maps": "float32"},
      "model": {"clip_variant": c.model.clip.variant, "checkpoint": c.model.clip.checkpoint,
                "tap_layers": list(model.tap_layers), "vision_width": cc.vision_width,
                "vision_layers": cc.vision_layers, "patch_size": cc.patch_size, "text_width": cc.text_width,
                "text_layers": cc.text_layers, "embed_dim": cc.embed_dim,
                "n_prompts": int(model.prompts.token_ids.get_value().shape[0]),
                "context_length": int(model.prompts.token_ids.get_value().shape[1])},
      "synthesis": {"probs": {k: float(v) for k, v in dict(c.synthesis.probs).items()}, "latent_tasks": latent,
                    "vae": ({"kind": c.vae.kind, "path": c.vae.path, "flops_per_image": vae_per_image}
                            if latent else None), "k_shot": int(support.shape[0])},
  }
  return BenchParts(fed_step=fed_step, feeds=feeds, unavailable=unavailable, stages=stages,
                    flops={"fused_step": fused_flops, "fed_step": fed_flops}, info=info)
