"""Accelerator benchmark of a method's train step (step time, throughput, FLOPs, MFU, memory), and a suite.

  python launch/benchmark.py --config configs/bench_tiny.py --out bench_tiny.json          # CPU, seconds
  python launch/benchmark.py --config configs/bench_reference.py --out bench_reference.json  # ViT-L/14, B=64/device
  python launch/benchmark.py --config configs/bench_latent.py --out bench_latent.json --profile_steps 5
  python launch/benchmark.py --config configs/bench_ssl_anovae.py:tiny --out bench_ssl_anovae_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_ssl_anovae.py --out bench_ssl_anovae.json  # 256 px, B=32/device
  python launch/benchmark.py --config configs/bench_mirage.py:tiny --out bench_mirage_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_mirage.py --out bench_mirage.json  # ViT-B/16, B=256, bank 65,536
  python launch/benchmark.py --config configs/bench_latent_diffusion.py:tiny --out bench_ldm_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_latent_diffusion.py --out bench_ldm.json  # DiT-B/2, 256 px, B=256
  python launch/benchmark.py --suite --out suite.json                         # one GPU, under 8 minutes
  python launch/benchmark.py --suite --suite_scale tiny --out suite_cpu.json  # the same suite at CPU sizes

The method (`config.method`) is built through its interface, `methods.get(name).build(config,
dataset, workdir, mesh, train=True)`, on a generated support dataset (`bench.support`: 16
"phantom" chest images, generated at 64..224 px and resized by the method as any dataset, or
"random" noise images at `data.image_size`). A method whose module sets `ANOMALY_DATASET = False` (MIRAGE) gets
no support dataset (`build` receives None): it reads its own data (MIRAGE: the image-text pairs of `data.pairs`,
generated under the build folder), and a memory bank it keeps in its state (`trainable.info["bank"]`: size, dim,
bytes) is recorded under `bank`. Modes (--modes, default `bench.modes`):
  fused      `trainable.train_step(state, batch)` on `trainable.local_batch(step)`: the real step.
             For MediCLIP: synthesis + CLIP + loss + update in one jitted program; the host sends indices.
  host       the same pixel tasks per sample in numpy/OpenCV on `bench.host_workers` spawned CPU
             processes (`bench.host_prefetch` batches in flight per worker), as the PyTorch
             DataLoader, feeding the step with synthesis removed (it receives images + masks).
  synthetic  device-resident random images + masks: no input pipeline, no synthesis (the device bound).
`host` and `synthetic` come from the method's optional benchmark hook, `bench_parts(config, mesh,
trainable)`, registered in `mediclip_jax.methods.BENCH_PARTS` (MediCLIP's:
mediclip_jax/methods/mediclip_bench.py), which
also gives the stage breakdown (each part jitted alone: synthesis, VAE encode/decode, CLIP vision
forward; off with `--config.bench.stages=false`) and the analytic FLOPs behind MFU. A method without
the hook runs `fused` only, with MFU null. A hook may give FLOPs only (SSL-AnoVAE's,
mediclip_jax/methods/ssl_anovae_bench.py: no feeds, the fed modes `unavailable` with the reason, and
`stages` None: no stage breakdown; MIRAGE's, mediclip_jax/methods/mirage_bench.py, likewise). The latent
diffusion baseline's (mediclip_jax/methods/latent_diffusion_bench.py) has no feeds either, but stages: the VAE
encode, the DiT forward + backward, and its scoring loop at each `bench.score_steps` number of DDIM steps. A
mode that cannot run here (host mode without OpenCV and scipy, the `bench` extra, or with latent tasks) is skipped
with its reason in `skipped`.

Each mode AOT-compiles its step (trace, lower and compile timed separately; arrays the step closes
over become arguments of the compiled program, not constants), runs `bench.warmup_steps` untimed
steps, then times `bench.steps` steps, each ended by block_until_ready on the step outputs. The
global batch is `bench.batch_per_device` x the device count; `bench.peak_tflops` (or --peak_tflops)
sets the per-device peak for MFU. Any config field can be overridden (--config.bench.steps=100).
The JSON is rewritten after every finished part, and written also when a part fails: the error
is recorded under `errors` and the exit status is 1.

The suite runs, in one process: the time to result of a full configs/brainmri.py run (400 steps
and the final evaluation, random-init backbone, evaluation only at the end), the reference-size
step (configs/bench_reference.py: fused vs host vs synthetic), the latent step
(configs/bench_latent.py) and each registered method's step (its own benchmark config where the plan
names one: configs/bench_ssl_anovae.py for SSL-AnoVAE, configs/bench_mirage.py for MIRAGE,
configs/bench_latent_diffusion.py for the latent diffusion baseline); `--suite_scale
tiny` runs it with CPU stand-in sizes.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.extend as jex
import jaxlib
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from data_pipelines import datasets, run_data
from mediclip_jax import config_defaults, config_utils, methods, parallel
from mediclip_jax.methods.base import reads_anomaly_dataset
from mediclip_jax.train import loop, writers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config (configs/bench_*.py[:arg]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the result JSON (process 0).")
_MODES = flags.DEFINE_string("modes", None, "Comma-separated subset of fused,host,synthetic "
                             "(default: config.bench.modes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for profiler traces and the suite's runs "
                               "(default: runs/bench_<config> or runs/bench_suite).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 0, "Steps per mode to record with jax.profiler.trace "
                                      "after the timed window, into <workdir>/profile/<mode> (0 = off).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU, overriding the "
                                  "device-kind table (required for MFU on devices missing from it, e.g. CPU).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
_SUITE = flags.DEFINE_bool("suite", False, "Run the benchmark suite instead of one --config.")
_SUITE_SCALE = flags.DEFINE_enum("suite_scale", "full", ["full", "tiny"], "full: the reference sizes (one GPU, "
                                 "under 8 minutes); tiny: CPU stand-ins (tiny CLIP at 64 px, small KL VAE).")
_SUITE_DATA_ROOT = flags.DEFINE_string("suite_data_root", "../shared/data/brainmri", "BrainMRI dataset of the "
                                       "suite's time-to-result run.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved --config and exit.")

SCHEMA = "mediclip_jax.benchmark/2"
SUITE_SCHEMA = "mediclip_jax.benchmark_suite/1"
MODES = config_defaults.BENCH_MODES
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

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
  t = np.asarray(times, np.float64)
  return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "mean": float(t.mean()),
          "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"


def _device_info() -> dict:
  devs = jax.devices()
  return {"platform": devs[0].platform, "kind": devs[0].device_kind, "count": jax.device_count(),
          "local_count": jax.local_device_count(), "process_count": jax.process_count()}


def _optional_version(module: str) -> str | None:
  """A package's version, None when it is not installed (OpenCV and scipy are the `bench` extra)."""
  try:
    return importlib.import_module(module).__version__
  except ImportError:
    return None


def _versions() -> dict:
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "opencv": _optional_version("cv2"), "scipy": _optional_version("scipy"),
          "python": platform.python_version(), "platform": platform.platform()}


def _compilation_cache() -> str | None:
  """The persistent compilation cache directory, if one is on: then compile times are partly cache reads."""
  return jax.config.jax_compilation_cache_dir


def _peak_memory() -> tuple[int | None, str]:
  """Max over local devices of memory_stats()["peak_bytes_in_use"] (a running peak since start-up)."""
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
      return None, f"device.memory_stats() gives no peak_bytes_in_use on {d.platform} ({d.device_kind}); recorded null"
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks), "max over local devices of memory_stats()['peak_bytes_in_use'], running peak since start-up"


def cost_flops(compiled) -> float | None:
  """XLA's `cost_analysis()["flops"]` of a compiled program (None where the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def xla_over_model_flops(xla_flops: float | None, model_flops: float | None, n_dev: int) -> float | None:
  """XLA's count of a program (per device) times the device count over the analytic model FLOPs; None without
  either. At or a little above 1 (XLA also counts elementwise work); far from 1, the count or the program is off."""
  return xla_flops * n_dev / model_flops if xla_flops and model_flops else None


def _memory_analysis(compiled) -> dict | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


class Program(NamedTuple):
  """An AOT-compiled program: `call(*args)` runs `compiled`; `times` = trace_s, lower_s, compile_s."""
  call: Callable
  compiled: Any
  times: dict


def aot_compile(fn: Callable, *args, donate_argnums: tuple[int, ...] = ()) -> Program:
  """Traces, lowers and compiles `fn` for `args`, timing each phase.

  A jitted `fn` compiles as it is. Any other callable (a `Trainable.train_step` that calls a
  jitted step with frozen arrays it closes over) is traced once under jax.jit; the arrays it
  closes over then become arguments of the compiled program instead of constants baked into it,
  and `donate_argnums` (positions in `args`) are donated.
  """
  t0 = time.perf_counter()
  if hasattr(fn, "trace"):
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return Program(compiled, compiled, {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2})
  traced = jax.jit(fn).trace(*args)
  t1 = time.perf_counter()
  closed, out_tree = traced.jaxpr, jax.tree.structure(traced.out_info)

  def lifted(consts, *a):
    flat = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(closed.jaxpr, consts))(*jax.tree.leaves(a))
    return jax.tree.unflatten(out_tree, flat)

  consts = list(closed.consts)
  donate = tuple(i + 1 for i in donate_argnums)
  lowered = jax.jit(lifted, donate_argnums=donate).trace(consts, *args).lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return Program(lambda *a: compiled(consts, *a), compiled,
                 {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2})


# ----------------------------------------------------------------------------------------------
# The workload: a method built on a generated support dataset
# ----------------------------------------------------------------------------------------------

def _noise_dataset(root: str, n_train: int, size: int, seed: int) -> datasets.Dataset:
  """Uniform-noise grey PNGs in the plain-folder layout (train/normal; one test image per class)."""
  marker = os.path.join(root, "test", "abnormal", "noise_0.png")
  for turn in ("main", "others"):  # process 0 writes; others write their own copy only without a shared disk
    if (turn == "main") == parallel.is_main_process() and not os.path.isfile(marker):
      rng = np.random.default_rng(seed)
      for split, n in (("train/normal", n_train), ("test/normal", 1), ("test/abnormal", 1)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for i in range(n):
          pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
          Image.fromarray(pixels, mode="L").save(os.path.join(root, split, f"noise_{i}.png"))
    parallel.sync(f"noise_data_{turn}")
  return datasets.load_dataset(root)


def support_dataset(config: ml_collections.ConfigDict, root: str) -> tuple[datasets.Dataset, dict]:
  """The dataset the method draws its support set from, written under `root` (`config.data` is pointed at
  it), and a description of it."""
  kind, size, seed = config.bench.support, int(config.data.image_size), int(config.seed)
  n_train = max(int(config.data.k_shot), 16)
  if kind == "phantom":
    config.data.root = None
    config.data.phantom = True
    config.data.phantom_size = min(max(size, 64), 224)  # the phantom's range; the method resizes as for any dataset
    config.data.phantom_n_test = 1
    dataset = run_data.open_dataset(config.data, root, seed)  # max(k_shot, data.phantom_n_train) training images
    return dataset, {"kind": kind, "generated_px": config.data.phantom_size, "image_size": size,
                     "train_images": len(dataset.train)}
  if kind == "random":
    dataset = _noise_dataset(os.path.join(root, "noise_data"), n_train, size, seed)
    return dataset, {"kind": kind, "generated_px": size, "image_size": size, "train_images": len(dataset.train)}
  raise ValueError(f"bench.support must be 'phantom' or 'random', got {kind!r}")


def method_data(config: ml_collections.ConfigDict, trainable) -> dict:
  """The description of a method's own data (a method with `ANOMALY_DATASET = False` gets no support dataset)."""
  pairs = config.data.get("pairs")
  phantom = pairs is not None and pairs.source == "phantom_reports"
  return {"kind": "method_data", "image_size": int(config.data.image_size),
          "source": pairs.source if pairs is not None else None,
          "generated_px": int(pairs.phantom_size) if phantom else None,
          "counts": (trainable.info.get("pairs") or {}).get("counts"),
          "note": "the method reads its own data (MIRAGE: the image-text pairs of data.pairs), generated under the "
                  "build folder; no anomaly support dataset"}


class Workload:
  """A method built for benchmarking: config (global batch set), mesh, `Trainable`, the hook's parts."""

  def __init__(self, config: ml_collections.ConfigDict, build_dir: str):
    config = config.copy_and_resolve_references()
    self.bench = bench = config.bench
    if int(bench.steps) < 1 or int(bench.warmup_steps) < 1:
      raise ValueError(f"bench.steps and bench.warmup_steps must be >= 1, got {bench.steps}, {bench.warmup_steps}")
    self.method = methods.get(config.method)
    self.mesh = parallel.make_mesh()
    self.n_dev = self.mesh.devices.size
    self.batch = int(bench.batch_per_device) * self.n_dev
    parallel.check_global_batch(self.batch, self.mesh)
    with config.unlocked():
      config.train.batch_size = self.batch
    self.method.validate(config)
    dataset = None
    if reads_anomaly_dataset(self.method):
      dataset, self.support = support_dataset(config, build_dir)
    self.config = config
    self.trainable = self.method.build(config, dataset, build_dir, self.mesh, train=True)
    if dataset is None:  # the method reads its own data (MIRAGE: data.pairs), generated under build_dir
      self.support = method_data(config, self.trainable)
    hook = methods.BENCH_PARTS.get(self.config.method)
    self.parts = hook(config, self.mesh, self.trainable) if hook else None
    self.fed_program: tuple[str, Program] | None = None  # (first mode that compiled it, program)

  def fresh_state(self):
    """A copy of the trainable's initial state (every mode starts from it; steps donate their state)."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, self.trainable.state)

  def index_batch(self, step: int) -> dict:
    return {k: parallel.global_array(v, self.mesh) for k, v in self.trainable.local_batch(step).items()}

  def flops(self, program: str) -> dict[str, float] | None:
    return self.parts.flops[program] if self.parts else None

  def unavailable(self, mode: str) -> str | None:
    """Why `mode` cannot run for this method here, or None."""
    if mode == "fused":
      return None
    if self.parts is None:
      return (f"method {self.config.method!r} has no benchmark hook (methods.BENCH_PARTS): "
              "only the fused mode runs")
    if mode in self.parts.unavailable:
      return self.parts.unavailable[mode]
    if mode not in self.parts.feeds:
      return f"method {self.config.method!r} gives no {mode!r} feed"
    return None


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def _time_mode(w: Workload, mode: str, step_fn: Callable | None, next_batch: Callable, model_flops: dict | None,
               peak: float | None, profile_steps: int, workdir: str, program: Program | None = None
               ) -> tuple[dict, Program]:
  """AOT-compiles `step_fn` (unless `program` is given), warms up, times steps; next_batch(i, warm) gives step i's
  batch (timed: it is the input path). Batch 0 is fetched once, used to trace the step and then as the
  first warm-up step's input."""
  bench = w.bench
  state = w.fresh_state()
  batch0 = next_batch(0, warm=True)
  if program is None:
    program = aot_compile(step_fn, state, batch0, donate_argnums=(0,))
  call = program.call
  t0 = time.perf_counter()
  for i in range(int(bench.warmup_steps)):
    state, m = call(state, batch0 if i == 0 else next_batch(i, warm=True))
    jax.block_until_ready((state, m))
  warm_s = time.perf_counter() - t0
  times = []
  start = int(bench.warmup_steps)
  for i in range(start, start + int(bench.steps)):
    t = time.perf_counter()
    state, m = call(state, next_batch(i, warm=False))
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
          state, m = call(state, next_batch(i, warm=False))
          jax.block_until_ready((state, m))
  st = summarize(times)
  total = model_flops["total"] if model_flops else None
  per_dev = total / st["median"] / w.n_dev if total else None
  mem, mem_note = _peak_memory()
  return {
      **program.times, "first_steps_s": warm_s, "warmup_steps": int(bench.warmup_steps), "timed_steps": len(times),
      "step_time_s": st, "images_per_s": w.batch / st["median"],
      "images_per_s_per_device": w.batch / st["median"] / w.n_dev,
      "images_per_s_mean": w.batch * len(times) / sum(times),
      "model_flops_per_step": total, "xla_flops": cost_flops(program.compiled),
      "xla_over_model_flops": xla_over_model_flops(cost_flops(program.compiled), total, w.n_dev),
      "model_tflops_per_s_per_device": per_dev / 1e12 if per_dev else None,
      "mfu": per_dev / peak if (peak and per_dev) else None,
      "peak_memory_bytes": mem, "peak_memory_note": mem_note, "memory_analysis": _memory_analysis(program.compiled),
      "final_loss": loss, "profile_dir": profile_dir,
  }, program


def run_mode(w: Workload, mode: str, peak: float | None, profile_steps: int, workdir: str) -> dict:
  """Times one mode: `fused` through the trainable, `host`/`synthetic` through the hook's fed step and feeds."""
  if mode == "fused":
    res, _ = _time_mode(w, mode, w.trainable.train_step, lambda i, warm: w.index_batch(i), w.flops("fused_step"),
                        peak, profile_steps, workdir)
    res["input"] = ("per step: the method's local batch host->device (MediCLIP: support and sample indices; "
                    "MIRAGE: the images and tokens of the pairs)")
    res["compile_shared_with"] = None
    return res
  total = int(w.bench.warmup_steps) + int(w.bench.steps) + max(profile_steps, 0)
  feed = w.parts.feeds[mode](total)
  shared, program = w.fed_program or (None, None)
  try:
    res, program = _time_mode(w, mode, w.parts.fed_step, feed, w.flops("fed_step"), peak, profile_steps, workdir,
                              program)
    res.update(feed.fields())
  finally:
    feed.close()
  if w.fed_program is None:
    w.fed_program = (mode, program)
  res["compile_shared_with"] = shared  # the fed step compiles once; later fed modes reuse it
  return res


def _time_stage(program: Program, args: Callable[[int], tuple], steps: int, warmup: int) -> dict:
  for i in range(warmup):
    jax.block_until_ready(program.call(*args(i)))
  times = []
  for i in range(warmup, warmup + steps):
    a = args(i)
    t = time.perf_counter()
    jax.block_until_ready(program.call(*a))
    times.append(time.perf_counter() - t)
  return summarize(times)


def run_stages(w: Workload, modes_res: dict, peak: float | None, errors: dict,
               skip: dict[str, str] | None = None) -> dict:
  """Each part of the step jitted alone and timed (the hook's stages); the fused mode's figures as the full step."""
  bench = w.bench
  steps, warm = int(bench.steps), int(bench.warmup_steps)
  skip = skip or {}
  out = {}
  try:
    stages = w.parts.stages()
  except Exception as e:  # pylint: disable=broad-except
    errors["stages"] = _error(e)
    stages = []
  for st in stages:
    if st.name in skip:
      out[st.name] = {"skipped": skip[st.name]}
      continue
    if st.build is None:
      out[st.name] = None
      continue
    try:
      program = aot_compile(st.build(), *st.args(0))
      times = _time_stage(program, st.args, steps, warm)
    except Exception as e:  # pylint: disable=broad-except
      errors[f"stages.{st.name}"] = _error(e)
      continue
    per_dev = st.model_flops / times["median"] / w.n_dev if st.model_flops else None
    xla = cost_flops(program.compiled)
    out[st.name] = {**program.times, "step_time_s": times, "images_per_s": w.batch / times["median"],
                    "model_flops": st.model_flops, "xla_flops": xla,
                    "xla_over_model_flops": xla_over_model_flops(xla, st.model_flops, w.n_dev),
                    "mfu": per_dev / peak if (peak and per_dev) else None, "note": st.note}
  f = modes_res.get("fused")
  out["full_step"] = None if f is None else {
      "step_time_s": f["step_time_s"], "images_per_s": f["images_per_s"], "model_flops": f["model_flops_per_step"],
      "xla_flops": f["xla_flops"], "xla_over_model_flops": f["xla_over_model_flops"], "mfu": f["mfu"],
      "note": "the fused mode's timings"}
  return out


def _ratios(modes_res: dict) -> dict:
  ips = {m: r["images_per_s"] for m, r in modes_res.items()}
  pairs = (("fused", "host"), ("fused", "synthetic"), ("host", "synthetic"))
  return {f"{a}_over_{b}": ips[a] / ips[b] for a, b in pairs if a in ips and b in ips}


def run(config: ml_collections.ConfigDict, name: str, *, modes: str, peak_tflops: float | None, profile_steps: int,
        workdir: str, save: Callable[[dict], None] = lambda r: None, skip_stages: dict[str, str] | None = None
        ) -> dict | None:
  """Runs the requested modes and stages; returns the result dict on process 0 (None elsewhere).

  Failures are recorded under "errors" (the setup's, a mode's, a stage's) and the other parts still
  run; `save(result)` is called after every finished part and at the end.
  """
  t_start = time.perf_counter()
  dev = _device_info()
  result: dict = {
      "schema": SCHEMA, "config_name": name, "method": config.method,
      "config": json.loads(config.to_json_best_effort()),
      "timing": "per step: wall clock around the call of the AOT-compiled step and block_until_ready on its "
                "outputs (state and metrics), after untimed warm-up steps; images/s = global batch / median",
      "step_program": None, "device": dev, "versions": _versions(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "compilation_cache": _compilation_cache(),
      "dtype_policy": None, "batch": None, "image_size": int(config.data.image_size), "support": None,
      "model": None, "synthesis": None, "bank": None, "peak_flops_per_device": None, "peak_source": None,
      "mfu_note": None, "analytic_flops": None,
      "xla_flops_note": "Compiled.cost_analysis()['flops'] of each compiled program (the per-device program "
                        "on a multi-device mesh); it also counts elementwise work",
      "modes": {}, "skipped": {}, "errors": {}, "ratios_images_per_s": {}, "stages": None,
      "profile_steps": profile_steps, "wall_s": None,
  }

  def checkpoint() -> None:
    result["wall_s"] = time.perf_counter() - t_start
    if parallel.is_main_process():
      save(result)

  try:
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MODES]
    if not wanted or bad:
      raise ValueError(f"--modes / bench.modes: expected a comma-separated subset of {MODES}, got {modes!r}")
    if profile_steps < 0:
      raise ValueError(f"--profile_steps must be >= 0, got {profile_steps}")
    peak, peak_source = peak_flops_per_device(dev["kind"], peak_tflops)
    result.update(peak_flops_per_device=peak, peak_source=peak_source)
    with tempfile.TemporaryDirectory(prefix="bench_build_") as build_dir:
      w = Workload(config, build_dir)
      parts = w.parts
      result.update(config=json.loads(w.config.to_json_best_effort()), support=w.support,
                    batch={"global": w.batch, "per_device": w.batch // w.n_dev,
                           "per_process": w.batch // jax.process_count()},
                    bank=w.trainable.info.get("bank"))  # a memory bank in the state (MIRAGE's): size, dim, bytes
      if parts is not None:
        result.update({k: parts.info.get(k) for k in ("step_program", "dtype_policy", "model", "synthesis")})
        result["analytic_flops"] = {**parts.flops, "convention": "matmul/conv FLOPs only, multiply-add = 2 FLOPs "
                                                                 "(mediclip_jax/flops.py)"}
      if parts is None:
        why = "no analytic FLOPs for this method (no benchmark hook): mfu is null"
      elif peak:
        why = f"peak from {peak_source}"
      else:
        why = "no peak known for this device kind: mfu is null (pass --peak_tflops)"
      result["mfu_note"] = f"MFU = analytic model FLOPs per step / median step time / device count / peak; {why}"
      checkpoint()
      for m in wanted:
        reason = w.unavailable(m)
        if reason:
          result["skipped"][m] = reason
          print(f"note: mode {m} skipped: {reason}", file=sys.stderr)
          continue
        parallel.log_main("benchmark: mode %s", m)
        try:
          result["modes"][m] = run_mode(w, m, peak, profile_steps, workdir)
        except Exception as e:  # pylint: disable=broad-except
          result["errors"][f"modes.{m}"] = _error(e)
          logging.exception("benchmark: mode %s failed", m)
        result["ratios_images_per_s"] = _ratios(result["modes"])
        checkpoint()
      if w.bench.stages and parts is not None and parts.stages is not None:
        parallel.log_main("benchmark: stages")
        result["stages"] = run_stages(w, result["modes"], peak, result["errors"], skip_stages)
  except Exception as e:  # pylint: disable=broad-except
    result["errors"]["setup"] = _error(e)
    logging.exception("benchmark: setup failed")
  finally:  # also on KeyboardInterrupt: what was measured is written
    checkpoint()
  return result if parallel.is_main_process() else None


def format_summary(r: dict) -> str:
  """A few human-readable lines of a result."""
  d = r["device"]
  total = (r["analytic_flops"] or {}).get("fused_step", {}).get("total")
  model = f"model {total / 1e9:.2f} GFLOP/step (fused)" if total else "no analytic FLOPs"
  batch = r["batch"]["global"] if r["batch"] else "?"
  lines = [f"{r['config_name']} ({r['method']}): {d['kind']} x{d['count']} ({d['process_count']} process), "
           f"batch {batch}, {r['image_size']} px, {model}"]
  if r.get("bank"):
    b = r["bank"]
    lines.append(f"  bank {b['size']} x {b['dim']} float32: {b['bytes'] / 2**20:.2f} MiB in the train state")
  for m, x in r["modes"].items():
    mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "n/a"
    compile_ = (f"compile {x['trace_s'] + x['lower_s']:.1f}+{x['compile_s']:.1f} s" if not x["compile_shared_with"]
                else f"compile shared with {x['compile_shared_with']}")
    lines.append(f"  {m:9s} median {1e3 * x['step_time_s']['median']:8.2f} ms  p90 "
                 f"{1e3 * x['step_time_s']['p90']:8.2f} ms  {x['images_per_s']:9.1f} img/s  MFU {mfu}  {compile_}")
  for m, why in r["skipped"].items():
    lines.append(f"  {m:9s} skipped: {why}")
  for k, v in r["ratios_images_per_s"].items():
    lines.append(f"  {k}: {v:.2f}x")
  for k, v in (r["stages"] or {}).items():
    if v is not None and "step_time_s" in v:
      lines.append(f"  stage {k:18s} median {1e3 * v['step_time_s']['median']:8.2f} ms")
  for k, v in r["errors"].items():
    lines.append(f"  ERROR {k}: {v}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------

# Per scale: each entry's config file, its argument, the fields set on it and the stages it leaves out
# (with why). The full plan is sized for one H100 in under 8 minutes. Compilation dominates (each
# step program compiles in tens of seconds), so each entry times few steps (a reference step is
# ~30 ms at 40 % MFU, a latent step ~0.25 s) and the stage breakdown keeps only what no mode
# measures: the CLIP forward (reference) and the VAE alone (latent). The synthesis stages are left
# out (fused minus synthetic gives what synthesis costs), so is the latent entry's CLIP forward (the
# reference entry's program). A method with its own benchmark config ("method_configs": file, argument) runs
# that config with the "method_step" fields; any other takes the reference entry's image size and batch.
# The tiny plan is the same at CPU stand-in sizes.
_SYNTHESIS_SKIP = "left out for time: the fused and synthetic modes bracket it"
_REFERENCE_SKIPS = {"synthesis": _SYNTHESIS_SKIP}
_LATENT_SKIPS = {"synthesis": _SYNTHESIS_SKIP + " (entries.latent.stages.vae_encode_decode: its VAE part)",
                 "clip_forward": "the same program as entries.reference.stages.clip_forward"}
SUITE_PLANS = {
    "full": {
        "brainmri": ("brainmri.py", None, {}, {}),
        "reference": ("bench_reference.py", None, {"bench.steps": 20, "bench.warmup_steps": 2,
                                                   "bench.modes": "fused,host,synthetic"}, _REFERENCE_SKIPS),
        "latent": ("bench_latent.py", None, {"bench.steps": 10, "bench.warmup_steps": 2, "bench.modes": "fused"},
                   _LATENT_SKIPS),
        "method_step": {"bench.steps": 20, "bench.warmup_steps": 2, "bench.modes": "fused", "bench.stages": False},
        "method_configs": {"ssl_anovae": ("bench_ssl_anovae.py", None), "mirage": ("bench_mirage.py", None),
                           "latent_diffusion": ("bench_latent_diffusion.py", None)},
    },
    "tiny": {
        "brainmri": ("brainmri.py", "tiny", {"train.epochs": 2}, {}),
        "reference": ("bench_tiny.py", None, {"bench.steps": 2, "bench.warmup_steps": 1,
                                              "bench.modes": "fused,host,synthetic"}, _REFERENCE_SKIPS),
        "latent": ("bench_tiny.py", "latent", {"bench.steps": 2, "bench.warmup_steps": 1, "bench.modes": "fused"},
                   _LATENT_SKIPS),
        "method_step": {"bench.steps": 2, "bench.warmup_steps": 1, "bench.modes": "fused", "bench.stages": False},
        "method_configs": {"ssl_anovae": ("bench_ssl_anovae.py", "tiny"), "mirage": ("bench_mirage.py", "tiny"),
                           "latent_diffusion": ("bench_latent_diffusion.py", "tiny")},
    },
}
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "compile_s"}


def load_config_file(filename: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of configs/<filename>."""
  path = os.path.join(CONFIG_DIR, filename)
  spec = importlib.util.spec_from_file_location(f"suite_config_{os.path.splitext(filename)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _set(c: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  for path, value in fields.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def time_to_result(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """A full training run through `loop.train_and_evaluate`, its wall time split into compile, steps and the rest.

  compile_s sums JAX's own trace, lowering and compilation events of every program the run
  compiles; steps_s sums the train steps after the first (each timed to block_until_ready on its
  outputs; the loop itself syncs only at log steps). other_s = wall_s - compile_s - steps_s: data
  loading, model building, the first step's execution, evaluations, checkpoints.
  """
  method = methods.get(config.method)
  compile_s: dict[str, float] = collections.defaultdict(float)
  step_times: list[float] = []

  def listener(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      compile_s[COMPILE_EVENTS[event]] += duration

  def build(*args, **kwargs):
    trainable = method.build(*args, **kwargs)
    step = trainable.train_step

    def timed_step(state, batch):
      t = time.perf_counter()
      out = jax.block_until_ready(step(state, batch))
      step_times.append(time.perf_counter() - t)
      return out

    return dataclasses.replace(trainable, train_step=timed_step)

  timed_method = types.SimpleNamespace(NAME=method.NAME, default_config=method.default_config,
                                       validate=method.validate, build=build)
  jax.monitoring.register_event_duration_secs_listener(listener)
  t0 = time.perf_counter()
  try:
    results = loop.train_and_evaluate(config, workdir, timed_method)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  wall = time.perf_counter() - t0
  compile_total = sum(compile_s.values())
  steps = sum(step_times[1:])
  last = results["last_epoch"]
  return {
      "config": json.loads(config.to_json_best_effort()), "steps": len(step_times), "wall_s": wall,
      "compile_s": compile_total, "compile_by_phase": dict(compile_s), "first_step_s": step_times[0],
      "steps_s": steps, "step_time_s": summarize(step_times[1:]) if len(step_times) > 1 else None,
      "other_s": wall - compile_total - steps,
      "image_auroc": last.get("image_auroc"), "untrained_image_auroc": (results["untrained"] or {}).get("image_auroc"),
      "note": "random-init backbone (the metrics only show the run completed); evaluation at step 0 (the loop's "
              "untrained baseline) and after the last epoch",
  }


def run_suite(scale: str, data_root: str, workdir: str, *, peak_tflops: float | None, profile_steps: int,
              save: Callable[[dict], None] = lambda r: None) -> dict | None:
  """The suite in one process; returns its result on process 0 (None elsewhere). An entry that fails is
  recorded under "errors" and the others still run."""
  plan = SUITE_PLANS[scale]
  t_start = time.perf_counter()
  suite: dict = {"schema": SUITE_SCHEMA, "scale": scale, "device": _device_info(), "versions": _versions(),
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "compilation_cache": _compilation_cache(),
                 "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()},
                 "entries": {}, "errors": {}, "wall_s": None}

  def checkpoint() -> None:
    suite["wall_s"] = time.perf_counter() - t_start
    if parallel.is_main_process():
      save(suite)

  def entry(key: str, fn: Callable[[], dict | None]) -> None:
    parallel.log_main("suite: %s", key)
    try:
      suite["entries"][key] = fn()
      if suite["entries"][key] and suite["entries"][key].get("errors"):
        suite["errors"][key] = "see entries." + key + ".errors"
    except Exception as e:  # pylint: disable=broad-except
      suite["errors"][key] = _error(e)
      logging.exception("suite: %s failed", key)
    checkpoint()

  def bench(key: str, config: ml_collections.ConfigDict, name: str, skip_stages=None) -> dict | None:
    def save_partial(r):
      suite["entries"][key] = r
      checkpoint()
    return run(config, name, modes=config.bench.modes, peak_tflops=peak_tflops, profile_steps=profile_steps,
               workdir=os.path.join(workdir, key), save=save_partial, skip_stages=skip_stages)

  def brainmri() -> dict:
    filename, arg, fields, _ = plan["brainmri"]
    c = _set(load_config_file(filename, arg), fields)
    c.data.root = data_root
    c.eval.every_epochs = c.train.epochs  # evaluation only at the end
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="brainmri_", dir=workdir) as run_dir:
      return time_to_result(c, run_dir)

  entry("brainmri", brainmri)
  ref_file, ref_arg, ref_fields, ref_skips = plan["reference"]
  reference = _set(load_config_file(ref_file, ref_arg), ref_fields)
  entry("reference", lambda: bench("reference", reference, "reference", ref_skips))
  lat_file, lat_arg, lat_fields, lat_skips = plan["latent"]
  entry("latent", lambda: bench("latent", _set(load_config_file(lat_file, lat_arg), lat_fields), "latent", lat_skips))
  for name in methods.METHODS:
    def method_step(name=name) -> dict | None:
      ref = suite["entries"].get("reference") or {}
      if name == reference.method and "fused" in ref.get("modes", {}):
        return {"same_as": "entries.reference.modes.fused", **{k: ref["modes"]["fused"][k] for k in (
            "step_time_s", "images_per_s", "mfu", "compile_s")}}
      if name in plan["method_configs"]:
        c = load_config_file(*plan["method_configs"][name])
      else:
        c = config_defaults.run_config(name)
        c.data.image_size = reference.data.image_size
        c.bench = config_defaults.bench_section(batch_per_device=int(reference.bench.batch_per_device))
      return bench(f"method_{name}", _set(c, plan["method_step"]), f"method_{name}")
    entry(f"method_{name}", method_step)
  checkpoint()
  return suite if parallel.is_main_process() else None


def format_suite(s: dict) -> str:
  """The suite's short table."""
  d = s["device"]
  lines = [f"suite ({s['scale']}) on {d['kind']} x{d['count']}: {s['wall_s']:.1f} s",
           f"  {'entry':18s} {'mode':10s} {'median ms':>10s} {'img/s':>10s} {'MFU':>7s} {'compile s':>10s}"]
  for key, e in s["entries"].items():
    if e is None:
      continue
    if key == "brainmri":
      st = e["step_time_s"]
      per_step = f" ({e['steps'] - 1} after the first, {1e3 * st['median']:.1f} ms each)" if st else ""
      lines.append(f"  {key:18s} time to result {e['wall_s']:.1f} s = compile {e['compile_s']:.1f} s + steps "
                   f"{e['steps_s']:.1f} s{per_step} + other {e['other_s']:.1f} s")
      continue
    if "same_as" in e:
      lines.append(f"  {key:18s} {'fused':10s} {1e3 * e['step_time_s']['median']:10.2f} {e['images_per_s']:10.1f}"
                   f"  = {e['same_as']}")
      continue
    for m, x in e["modes"].items():
      mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "n/a"
      comp = f"{x['trace_s'] + x['lower_s'] + x['compile_s']:10.1f}" if not x["compile_shared_with"] else \
          f"{'shared':>10s}"
      lines.append(f"  {key:18s} {m:10s} {1e3 * x['step_time_s']['median']:10.2f} {x['images_per_s']:10.1f} "
                   f"{mfu:>7s} {comp}")
    for m, why in e["skipped"].items():
      lines.append(f"  {key:18s} {m:10s} skipped: {why}")
    for k, v in (e["stages"] or {}).items():
      if v is not None and "step_time_s" in v and k != "full_step":
        lines.append(f"  {key:18s} {'stage ' + k:29s} {1e3 * v['step_time_s']['median']:10.2f} ms")
  for k, v in s["errors"].items():
    lines.append(f"  ERROR {k}: {v}")
  return "\n".join(lines)


def _writer(path: str | None) -> Callable[[dict], None]:
  """Writes a result as strict JSON, atomically (a partial result replaces the previous one)."""
  if not path:
    return lambda r: None
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(r: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(json.dumps(r, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)

  return write


def main(argv) -> int:
  del argv
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    if config is None:
      print("error: --print_config needs --config", file=sys.stderr)
      return 2
    print(config)
    return 0
  writers.configure_logging(flags.FLAGS.verbosity)  # -v 1: third-party INFO logs too
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if _SUITE.value:
    if config is not None:
      print("error: --suite runs its own configs; drop --config", file=sys.stderr)
      return 2
    workdir = _WORKDIR.value or os.path.join("runs", "bench_suite")
    result = run_suite(_SUITE_SCALE.value, _SUITE_DATA_ROOT.value, workdir, peak_tflops=_PEAK_TFLOPS.value,
                       profile_steps=_PROFILE_STEPS.value, save=_writer(_OUT.value))
    if result is not None:
      print(format_suite(result))
    return 1 if result and result["errors"] else 0
  if config is None:
    print("error: --config is required (e.g. --config configs/bench_tiny.py), or pass --suite", file=sys.stderr)
    return 2
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  peak = _PEAK_TFLOPS.value if _PEAK_TFLOPS.value is not None else config.bench.peak_tflops
  result = run(config, name, modes=_MODES.value or config.bench.modes, peak_tflops=peak,
               profile_steps=_PROFILE_STEPS.value, workdir=_WORKDIR.value or os.path.join("runs", f"bench_{name}"),
               save=_writer(_OUT.value))
  if result is None:  # not process 0
    return 0
  print(format_summary(result))
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_utils.parse_flags)
