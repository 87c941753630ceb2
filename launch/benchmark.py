"""Accelerator benchmark of the MediCLIP train step (DESIGN §12): step time, throughput, FLOPs, MFU, memory.

  python launch/benchmark.py --config configs/bench_tiny.py --out bench_tiny.json          # CPU, seconds
  python launch/benchmark.py --config configs/bench_reference.py --out bench_reference.json  # ViT-L/14, B=64/device
  python launch/benchmark.py --config configs/bench_latent.py --out bench_latent.json --profile_steps 5

Modes (--modes, default the config's bench.modes):
  fused      the real step: synthesis + CLIP + loss + update in one jitted program; the host sends indices.
  host       the same pixel tasks per sample in numpy/OpenCV on CPU worker processes (as the PyTorch
             DataLoader), feeding the same step with synthesis removed (it receives images + masks).
  synthetic  device-resident random images + masks: no input pipeline, no synthesis (the device bound).
Each mode AOT-compiles its step (trace, lower and compile timed separately), runs bench.warmup_steps
untimed steps, then times bench.steps steps, each ended by block_until_ready on the step outputs.
A per-stage breakdown (synthesis, VAE encode/decode, CLIP vision forward; each jitted alone) follows
unless --config.bench.stages=false. Any config field can be overridden (--config.bench.steps=100).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from data_pipelines import phantom
from mediclip_jax import flops, parallel
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.train import bench_steps, loop, step as step_lib, synthesis_fn

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config (configs/bench_*.py[:arg]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the result JSON (process 0).")
_MODES = flags.DEFINE_string("modes", None, "Comma-separated subset of fused,host,synthetic "
                             "(default: config.bench.modes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for profiler traces (default: runs/bench_<config>).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 0, "Steps per mode to record with jax.profiler.trace "
                                      "after the timed window, into <workdir>/profile/<mode> (0 = off).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU, overriding the "
                                  "device-kind table (required for MFU on devices missing from it, e.g. CPU).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")

# Dense bf16 peak TFLOP/s per device (one jax device), matched as a substring of device_kind, first
# match wins. TPU figures from the MaxText docs; GPU figures from vendor datasheets (SXM, no sparsity).
PEAK_TFLOPS_BF16 = (
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("h800", 989.0), ("gh200", 989.0),
    ("b200", 2250.0), ("a100", 312.0), ("l4", 121.0), ("a10g", 70.0),
    ("tpu v6", 918.0), ("tpu7x", 2307.0), ("tpu v5p", 459.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),
    ("tpu v4", 275.0), ("tpu v3", 123.0),
)


def peak_flops_per_device(device_kind: str, override_tflops: float | None) -> tuple[float | None, str | None]:
  """(peak FLOP/s per device, where it came from); (None, None) for kinds missing from the table (CPU)."""
  if override_tflops is not None:
    if override_tflops <= 0:
      raise ValueError(f"--peak_tflops must be positive, got {override_tflops}")
    return override_tflops * 1e12, "--peak_tflops"
  kind = device_kind.lower()
  for key, tflops in PEAK_TFLOPS_BF16:
    if key in kind:
      return tflops * 1e12, f"table: {key!r} (dense bf16)"
  return None, None


def summarize(times: list[float]) -> dict:
  """Median, p90, mean, min, max of per-step seconds."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  t = np.asarray(times, np.float64)
  return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "mean": float(t.mean()),
          "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


def _device_info() -> dict:
  devs = jax.devices()
  return {"platform": devs[0].platform, "kind": devs[0].device_kind, "count": jax.device_count(),
          "local_count": jax.local_device_count(), "process_count": jax.process_count()}


def _versions() -> dict:
  import cv2  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "opencv": cv2.__version__, "python": platform.python_version(),
          "platform": platform.platform()}


def _peak_memory() -> tuple[int | None, str]:
  """Max over local devices of memory_stats()["peak_bytes_in_use"] (a running peak since start-up)."""
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
      return None, f"device.memory_stats() gives no peak_bytes_in_use on {d.platform} ({d.device_kind}); recorded null"
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks), "max over local devices of memory_stats()['peak_bytes_in_use'], running peak since start-up"


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _memory_analysis(compiled) -> dict | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def aot_compile(jitted, *args) -> tuple:
  """(compiled, {"trace_s", "lower_s", "compile_s"}): jitted.trace(...).lower().compile(), each timed."""
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return compiled, {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}


def _support_images(bench, k: int, size: int, seed: int) -> np.ndarray:
  if bench.support == "phantom":
    if not 64 <= size <= 224:
      raise ValueError(f"bench.support='phantom' needs 64 <= data.image_size <= 224, got {size}; "
                       "use --config.bench.support=random")
    return phantom.phantom_arrays(n_train=k, n_test_normal=0, n_test_abnormal=0, size=size,
                                  seed=seed)["train_images"].astype(np.float32)
  if bench.support == "random":
    return np.random.default_rng(seed).random((k, size, size), dtype=np.float32)
  raise ValueError(f"bench.support must be 'phantom' or 'random', got {bench.support!r}")


def _vae_arch_flops(vae, image_size: int) -> dict[str, float]:
  """Per-image encode/decode FLOPs read off the built VAE (so converted checkpoints are counted right)."""
  if isinstance(vae, vae_lib.TAEF2):
    return flops.taef2_flops(image_size, int(vae.encoder.layers[0].out_features), int(vae.latent_channels))
  enc = vae.encoder
  boc = [int(b.resnets[-1].conv2.out_features) for b in enc.down_blocks]
  return flops.autoencoder_kl_flops(
      image_size, boc, layers_per_block=len(enc.down_blocks[0].resnets), latent_channels=int(vae.latent_channels),
      in_channels=int(vae.in_channels), out_channels=int(vae.out_channels),
      mid_attention=len(enc.mid_block.attentions) > 0, quant_conv=vae.quant_conv is not None,
      post_quant_conv=vae.post_quant_conv is not None)


class Workload:
  """Everything the modes share: config, mesh, split model, optimizer, synthesis, support set."""

  def __init__(self, config):
    self.config = config = loop.resolve_config(config)
    bench = config.bench
    if int(bench.steps) < 1 or int(bench.warmup_steps) < 1:
      raise ValueError(f"bench.steps and bench.warmup_steps must be >= 1, got {bench.steps}, {bench.warmup_steps}")
    self.mesh = parallel.make_mesh()
    self.n_dev = self.mesh.devices.size
    self.batch = int(bench.batch_per_device) * self.n_dev
    parallel.check_global_batch(self.batch, self.mesh)
    self.size = int(config.data.image_size)
    self.k = int(config.data.k_shot)
    self.seed = int(config.seed)
    model = loop.build_detector(config)
    self.tap_layers = model.tap_layers
    self.n_prompts, self.context_length = (int(n) for n in model.prompts.token_ids[...].shape)
    self.clip_cfg = model.clip.cfg
    self.graphdef, self.params, frozen_model = step_lib.split_model(model)
    self.optimizer = step_lib.make_optimizer(config.train)
    self.latent = synthesis_fn.uses_latent(config.synthesis)
    self.vae = vae_lib.load_vae(config.vae) if self.latent else None
    self.synth, make_aux = synthesis_fn.build_synthesis(config.synthesis, self.vae)
    self.loss_cfg = ml_collections.ConfigDict({"truncate_labels": config.quirks.truncate_labels,
                                               "focal_gamma": config.train.focal_gamma})
    self.support = _support_images(bench, self.k, self.size, self.seed)
    self.frozen_model = parallel.replicate(frozen_model, self.mesh)
    self.aux = parallel.replicate(make_aux(self.support), self.mesh)
    self.support_dev = parallel.replicate(self.support, self.mesh)
    c = self.clip_cfg
    self.vae_per_image = _vae_arch_flops(self.vae, self.size) if self.latent else None
    arch = dict(batch=self.batch, image_size=self.size, patch_size=c.patch_size, vision_width=c.vision_width,
                tap_layers=self.tap_layers, text_width=c.text_width, text_layers=c.text_layers,
                embed_dim=c.embed_dim, n_prompts=self.n_prompts, context_length=self.context_length,
                mlp_ratio=c.mlp_ratio)
    self.flops_fused = flops.step_flops(**arch, vae=self.vae_per_image)
    self.flops_fed = flops.step_flops(**arch, vae=None)

  def fresh_state(self):
    return parallel.replicate(step_lib.init_state(self.params, self.optimizer, self.seed), self.mesh)

  def index_batch(self, step: int) -> dict:
    local = loop.local_batch(step, self.k, self.batch, self.seed)
    return {k: parallel.global_array(v, self.mesh) for k, v in local.items()}


def _time_mode(w: Workload, mode: str, jitted, frozen, next_batch, peak: float | None, profile_steps: int,
               workdir: str, extra_flops: dict) -> dict:
  """AOT-compiles `jitted`, warms up, times steps; next_batch(i, warm) gives step i's batch (timed: it is the input path).

  Batch 0 is fetched once, used to trace the step and then as the first warm-up step's input.
  """
  bench = w.config.bench
  state = w.fresh_state()
  batch0 = next_batch(0, warm=True)
  compiled, comp = aot_compile(jitted, state, frozen, batch0)
  t0 = time.perf_counter()
  for i in range(int(bench.warmup_steps)):
    state, m = compiled(state, frozen, batch0 if i == 0 else next_batch(i, warm=True))
    jax.block_until_ready((state, m))
  warm_s = time.perf_counter() - t0
  times = []
  start = int(bench.warmup_steps)
  for i in range(start, start + int(bench.steps)):
    t = time.perf_counter()
    state, m = compiled(state, frozen, next_batch(i, warm=False))
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  loss = float(jax.device_get(m["loss"]))
  if not np.isfinite(loss):
    raise FloatingPointError(f"mode {mode}: non-finite loss {loss} after {start + len(times)} steps")
  profile_dir = None
  if profile_steps > 0:  # every process runs the steps (collectives); process 0 records them
    trace = contextlib.nullcontext()
    if parallel.is_main_process():
      profile_dir = os.path.abspath(os.path.join(workdir, "profile", mode))
      os.makedirs(profile_dir, exist_ok=True)
      trace = jax.profiler.trace(profile_dir)
    with trace:
      for j in range(profile_steps):
        i = start + len(times) + j
        with jax.profiler.StepTraceAnnotation(f"{mode}_step", step_num=i):
          state, m = compiled(state, frozen, next_batch(i, warm=False))
          jax.block_until_ready((state, m))
  st = summarize(times)
  model_flops = extra_flops["total"]
  per_dev = model_flops / st["median"] / w.n_dev
  mem, mem_note = _peak_memory()
  return {
      **comp, "first_steps_s": warm_s, "warmup_steps": int(bench.warmup_steps), "timed_steps": len(times),
      "step_time_s": st, "images_per_s": w.batch / st["median"], "images_per_s_per_device": w.batch / st["median"] / w.n_dev,
      "images_per_s_mean": w.batch * len(times) / sum(times),
      "model_flops_per_step": model_flops, "xla_flops": _cost_flops(compiled),
      "model_tflops_per_s_per_device": per_dev / 1e12, "mfu": per_dev / peak if peak else None,
      "peak_memory_bytes": mem, "peak_memory_note": mem_note, "memory_analysis": _memory_analysis(compiled),
      "final_loss": loss, "profile_dir": profile_dir,
  }


def run_fused(w: Workload, peak, profile_steps, workdir) -> dict:
  jitted = step_lib.make_train_step(w.graphdef, w.optimizer, w.synth, w.mesh, w.loss_cfg)
  frozen = {"model": w.frozen_model, "aux": w.aux, "support": w.support_dev}
  res = _time_mode(w, "fused", jitted, frozen, lambda i, warm: w.index_batch(i), peak, profile_steps, workdir,
                   w.flops_fused)
  res["input"] = "per step: (support index, sample index) pairs host->device; synthesis inside the step"
  return res


def run_synthetic(w: Workload, peak, profile_steps, workdir) -> dict:
  jitted = bench_steps.make_fed_train_step(w.graphdef, w.optimizer, w.mesh, w.loss_cfg)
  per = w.batch // jax.process_count()
  rng = np.random.default_rng([w.seed, jax.process_index()])
  images = parallel.global_array(rng.random((per, w.size, w.size), dtype=np.float32), w.mesh)
  masks = parallel.global_array((rng.random((per, w.size, w.size)) < 0.1).astype(np.float32), w.mesh)
  batch = {"image": images, "mask": masks}
  res = _time_mode(w, "synthetic", jitted, {"model": w.frozen_model}, lambda i, warm: batch, peak, profile_steps,
                   workdir, w.flops_fed)
  res["input"] = "device-resident random images + masks, created once; no synthesis"
  return res


def run_host(w: Workload, peak, profile_steps, workdir) -> dict:
  """Per-sample numpy/OpenCV synthesis in `bench.host_workers` spawned processes, bounded prefetch."""
  bench = w.config.bench
  pixel_cfg = bench_steps.host_pixel_config(w.config.synthesis)
  n_workers = int(bench.host_workers)
  if n_workers < 1:
    raise ValueError(f"bench.host_workers must be >= 1, got {n_workers}")
  total = int(bench.warmup_steps) + int(bench.steps) + max(profile_steps, 0)
  in_flight = max(1, n_workers * int(bench.host_prefetch))
  jitted = bench_steps.make_fed_train_step(w.graphdef, w.optimizer, w.mesh, w.loss_cfg)
  ctx = multiprocessing.get_context("spawn")  # fork is unsafe after the JAX runtime has started threads
  t0 = time.perf_counter()
  pool = ctx.Pool(n_workers, initializer=bench_steps.host_worker_init, initargs=(w.support, pixel_cfg))
  pending: collections.deque = collections.deque()
  submitted = [0]
  waits, worker_s = [], []

  def submit_until(i: int) -> None:
    while submitted[0] < min(total, i + in_flight):
      s = submitted[0]
      local = loop.local_batch(s, w.k, w.batch, w.seed)
      pending.append(pool.apply_async(bench_steps.host_batch, (w.seed, s, local["support_index"],
                                                                 local["sample_index"])))
      submitted[0] += 1

  def next_batch(i: int, warm: bool) -> dict:
    submit_until(i)
    t = time.perf_counter()
    images, masks, secs = pending.popleft().get()
    if not warm:
      waits.append(time.perf_counter() - t)
      worker_s.append(secs)
    return {"image": parallel.global_array(images, w.mesh), "mask": parallel.global_array(masks, w.mesh)}

  try:
    res = _time_mode(w, "host", jitted, {"model": w.frozen_model}, next_batch, peak, profile_steps, workdir,
                     w.flops_fed)
  finally:
    pool.terminate()
    pool.join()
  wall_s = time.perf_counter() - t0
  per_process_batch = w.batch // jax.process_count()
  res.update({
      "input": f"{n_workers} spawned CPU worker processes, per-sample numpy/OpenCV synthesis "
               f"(synthesis.reference_numpy), up to {in_flight} batches in flight, host->device copy each step",
      "host_workers": n_workers, "host_batches_in_flight": in_flight, "host_wall_s_incl_pool_start": wall_s,
      "host_wait_s": summarize(waits),
      "host_worker_s_per_batch": summarize(worker_s),
      "host_worker_samples_per_s_per_worker": per_process_batch / float(np.median(worker_s)),
  })
  return res


def _time_stage(jitted, args: tuple, steps: int, warmup: int, vary=None) -> dict:
  compiled, comp = aot_compile(jitted, *args)
  for i in range(warmup):
    jax.block_until_ready(compiled(*(vary(i) if vary else args)))
  times = []
  for i in range(warmup, warmup + steps):
    a = vary(i) if vary else args
    t = time.perf_counter()
    jax.block_until_ready(compiled(*a))
    times.append(time.perf_counter() - t)
  return compiled, comp, summarize(times)


def run_stages(w: Workload, modes_res: dict, peak) -> dict:
  """Synthesis alone, VAE encode/decode alone, CLIP vision forward alone, each jitted and timed; plus the full step."""
  bench = w.config.bench
  steps, warm = int(bench.steps), int(bench.warmup_steps)
  out = {}

  def entry(comp, st, model_flops, compiled):
    per_dev = model_flops / st["median"] / w.n_dev if model_flops else None
    return {**comp, "step_time_s": st, "images_per_s": w.batch / st["median"],
            "model_flops": model_flops, "xla_flops": _cost_flops(compiled),
            "mfu": per_dev / peak if (peak and per_dev) else None}

  idx = w.index_batch(0)
  synth = bench_steps.make_synthesis_stage(step_lib.make_synthesizer(w.synth, w.mesh), w.mesh)
  rng = parallel.replicate(jax.random.key_data(jax.random.key(w.seed)), w.mesh)
  steps_dev = [parallel.replicate(np.int32(i), w.mesh) for i in range(warm + steps)]
  args = (rng, steps_dev[0], w.support_dev, idx["support_index"], idx["sample_index"], w.aux)
  compiled, comp, st = _time_stage(synth, args, steps, warm, vary=lambda i: (rng, steps_dev[i]) + args[2:])
  out["synthesis"] = entry(comp, st, w.flops_fused["vae_encode"] + w.flops_fused["vae_decode"], compiled)
  out["synthesis"]["note"] = ("pixel tasks (+ latent tasks with VAE encode/decode when enabled); model_flops "
                              "counts only the VAE part")
  images = jnp.take(w.support_dev, idx["support_index"], axis=0)
  images = jax.device_put(images, parallel.batch_sharding(w.mesh))
  if w.latent:
    vgraph, vstate = nnx.split(w.vae)
    vstate = parallel.replicate(vstate, w.mesh)
    compiled, comp, st = _time_stage(bench_steps.make_vae_stage(vgraph, w.mesh), (vstate, images), steps, warm)
    out["vae_encode_decode"] = entry(comp, st, w.flops_fused["vae_encode"] + w.flops_fused["vae_decode"], compiled)
    out["vae_encode_decode"]["note"] = "encode B images, decode 2B latents (as the latent tasks per step)"
  else:
    out["vae_encode_decode"] = None
  params = parallel.replicate(w.params, w.mesh)
  clip = bench_steps.make_clip_forward_stage(w.graphdef, w.mesh, w.tap_layers)
  compiled, comp, st = _time_stage(clip, (params, w.frozen_model, images), steps, warm)
  out["clip_forward"] = entry(comp, st, w.flops_fused["vision_forward"], compiled)
  out["clip_forward"]["note"] = f"vision tower to the last tap (blocks 1..{max(w.tap_layers)}), no gradient"
  if "fused" in modes_res:
    f = modes_res["fused"]
    out["full_step"] = {"step_time_s": f["step_time_s"], "images_per_s": f["images_per_s"],
                        "model_flops": f["model_flops_per_step"], "xla_flops": f["xla_flops"], "mfu": f["mfu"],
                        "note": "the fused mode's timings"}
  else:
    out["full_step"] = None
  return out


def run(config, name: str, *, modes: str, peak_tflops: float | None, profile_steps: int, workdir: str) -> dict | None:
  """Runs the requested modes and stages; returns the result dict on process 0 (None elsewhere)."""
  wanted = [m.strip() for m in modes.split(",") if m.strip()]
  bad = [m for m in wanted if m not in bench_steps.MODES]
  if not wanted or bad:
    raise ValueError(f"--modes / bench.modes: expected a comma-separated subset of {bench_steps.MODES}, got {modes!r}")
  if profile_steps < 0:
    raise ValueError(f"--profile_steps must be >= 0, got {profile_steps}")
  if "host" in wanted:  # fail before any compilation when host mode cannot run this config
    bench_steps.host_pixel_config(loop.resolve_config(config).synthesis)
  t_start = time.perf_counter()
  w = Workload(config)
  dev = _device_info()
  peak, peak_source = peak_flops_per_device(dev["kind"], peak_tflops)
  runners = {"fused": run_fused, "host": run_host, "synthetic": run_synthetic}
  res_modes = {}
  for m in wanted:
    parallel.log_main("benchmark: mode %s", m)
    res_modes[m] = runners[m](w, peak, profile_steps, workdir)
  stages = run_stages(w, res_modes, peak) if w.config.bench.stages else None
  if not parallel.is_main_process():
    return None
  ips = {m: r["images_per_s"] for m, r in res_modes.items()}
  ratios = {}
  for a, b in (("fused", "host"), ("fused", "synthetic"), ("host", "synthetic")):
    if a in ips and b in ips:
      ratios[f"{a}_over_{b}"] = ips[a] / ips[b]
  c = w.config
  cc = w.clip_cfg
  return {
      "schema": "mediclip_jax.benchmark/1",
      "config_name": name,
      "config": json.loads(c.to_json_best_effort()),
      "timing": "per step: wall clock around the call of the AOT-compiled step and block_until_ready on its "
                "outputs (state and metrics), after untimed warm-up steps; images/s = global batch / median",
      "step_program": "functional split/merge step (train.step.make_train_step; fed variant in "
                      "train.bench_steps), jax.jit over a 1-D 'data' mesh, AOT-compiled and called directly "
                      "(no recompilation possible)",
      "device": dev,
      "versions": _versions(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "dtype_policy": {"params": "float32", "clip_compute": c.model.clip.dtype,
                       "vae_compute": c.vae.dtype if w.latent else None,
                       "default_matmul_precision": jax.config.jax_default_matmul_precision,
                       "losses_and_maps": "float32"},
      "batch": {"global": w.batch, "per_device": w.batch // w.n_dev, "per_process": w.batch // jax.process_count()},
      "image_size": w.size,
      "model": {"clip_variant": c.model.clip.variant, "checkpoint": c.model.clip.checkpoint, "tap_layers":
                list(w.tap_layers), "vision_width": cc.vision_width, "vision_layers": cc.vision_layers,
                "patch_size": cc.patch_size, "text_width": cc.text_width, "text_layers": cc.text_layers,
                "embed_dim": cc.embed_dim, "n_prompts": w.n_prompts, "context_length": w.context_length},
      "synthesis": {"probs": {k: float(v) for k, v in dict(c.synthesis.probs).items()}, "latent_tasks": w.latent,
                    "vae": ({"kind": c.vae.kind, "path": c.vae.path, "flops_per_image": w.vae_per_image}
                            if w.latent else None), "k_shot": w.k, "support": c.bench.support},
      "peak_flops_per_device": peak, "peak_source": peak_source,
      "mfu_note": ("MFU = analytic model FLOPs per step / median step time / device count / peak; "
                   + ("peak from " + peak_source if peak else "no peak known for this device kind: mfu is null "
                      "(pass --peak_tflops)")),
      "analytic_flops": {"fused_step": w.flops_fused, "fed_step": w.flops_fed,
                         "convention": "matmul/conv FLOPs only, multiply-add = 2 FLOPs (mediclip_jax/flops.py)"},
      "xla_flops_note": "Compiled.cost_analysis()['flops'] of each compiled program (the per-device program "
                        "on a multi-device mesh); it also counts elementwise work",
      "modes": res_modes,
      "ratios_images_per_s": ratios,
      "stages": stages,
      "profile_steps": profile_steps,
      "wall_s": time.perf_counter() - t_start,
  }


def format_summary(r: dict) -> str:
  """A few human-readable lines of a result."""
  d = r["device"]
  lines = [f"{r['config_name']}: {d['kind']} x{d['count']} ({d['process_count']} process), batch {r['batch']['global']}, "
           f"{r['image_size']} px, model {r['analytic_flops']['fused_step']['total'] / 1e9:.2f} GFLOP/step (fused)"]
  for m, x in r["modes"].items():
    mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "n/a"
    lines.append(f"  {m:9s} median {1e3 * x['step_time_s']['median']:8.2f} ms  p90 {1e3 * x['step_time_s']['p90']:8.2f} ms"
                 f"  {x['images_per_s']:9.1f} img/s  MFU {mfu}  compile {x['trace_s'] + x['lower_s']:.1f}+"
                 f"{x['compile_s']:.1f} s")
  for k, v in r["ratios_images_per_s"].items():
    lines.append(f"  {k}: {v:.2f}x")
  for k, v in (r["stages"] or {}).items():
    if v is not None:
      lines.append(f"  stage {k:18s} median {1e3 * v['step_time_s']['median']:8.2f} ms")
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/bench_tiny.py", file=sys.stderr)
    return 2
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  modes = _MODES.value or config.bench.modes
  peak = _PEAK_TFLOPS.value if _PEAK_TFLOPS.value is not None else config.bench.peak_tflops
  workdir = _WORKDIR.value or os.path.join("runs", f"bench_{name}")
  result = run(config, name, modes=modes, peak_tflops=peak, profile_steps=_PROFILE_STEPS.value,
                             workdir=workdir)
  if result is None:  # not process 0
    return 0
  text = json.dumps(result, indent=2, allow_nan=False)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  print(format_summary(result))
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
