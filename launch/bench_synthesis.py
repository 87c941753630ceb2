"""Synthesis throughput: the training synthesis, jitted, vs the per-sample numpy/OpenCV/scipy reference.

  python launch/bench_synthesis.py --data ../shared/data/brainmri --batch 32
  python launch/bench_synthesis.py --data ../shared/data/busi --paste_mode poisson --dispatch switch

The JAX side is exactly what the train step runs: the function `mix.build_synthesis` returns,
under the train step's `shard_map` over every device (batch split over `data`, support pools
replicated), keyed by the "synthesis" stream with the step and the global sample indices. It is
timed after compilation, with block_until_ready, over several batches. The reference
(`synthesis/reference_numpy.py`) runs one sample at a time, as the PyTorch original's DataLoader
workers do (a single process here). Both draw the same task table (the pixel tasks; on CPU the
target is a JAX rate at least 5× the reference's) and their mean mask fractions are printed
side by side as a check that they synthesise the same distribution.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from data_pipelines import normal_images
from mediclip_jax import parallel, rngs
from mediclip_jax.methods import mediclip
from mediclip_jax.synthesis import mix, reference_numpy

_DATA = flags.DEFINE_string("data", "../shared/data/brainmri", "Dataset root (any layout data_pipelines reads).")
_SUPPORT = flags.DEFINE_integer("support", 16, "Few-shot support images (the images synthesised and the "
                                "cut-paste sources).")
_SIZE = flags.DEFINE_integer("size", 224, "Image side.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch (a multiple of the device count).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed JAX batches.")
_NUMPY_SAMPLES = flags.DEFINE_integer("numpy_samples", 100, "Samples the numpy reference synthesises.")
_DISPATCH = flags.DEFINE_enum("dispatch", "both", ["switch", "map", "both"], "Pixel-task dispatch to time.")
_PASTE_MODE = flags.DEFINE_enum("paste_mode", "hard", ["hard", "poisson"], "Cut-paste blending.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthesis key stream and of the reference's generator.")


def bench_numpy(support: np.ndarray, cfg) -> tuple[float, float]:
  """(images/s, mean mask fraction) of the reference over --numpy_samples samples."""
  rng = np.random.default_rng(_SEED.value)
  fractions = []
  t0 = time.perf_counter()
  for i in range(_NUMPY_SAMPLES.value):
    _, mask = reference_numpy.synthesize_sample_numpy(rng, support[i % len(support)], support, cfg)
    fractions.append(float(mask.mean()))
  return _NUMPY_SAMPLES.value / (time.perf_counter() - t0), float(np.mean(fractions))


def bench_jax(support: np.ndarray, cfg, mesh) -> tuple[float, float, float]:
  """(images/s, compile seconds, mean mask fraction) of the train step's synthesis over --steps batches."""
  synthesize, make_pools = mix.build_synthesis(cfg)
  fn = jax.jit(mediclip.shard_synthesis(synthesize, mesh))
  data = parallel.batch_sharding(mesh)
  pools = parallel.replicate(make_pools(support), mesh)
  b = _BATCH.value
  images = jax.device_put(support[np.arange(b) % len(support)], data)
  index = lambda step: jax.device_put(np.arange(step * b, (step + 1) * b, dtype=np.int32), data)
  key = rngs.stream(_SEED.value, rngs.SYNTHESIS)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(key, jnp.int32(0), images, index(0), pools))
  compile_s = time.perf_counter() - t0
  outs = []
  t0 = time.perf_counter()
  for step in range(1, _STEPS.value + 1):
    outs.append(fn(key, jnp.int32(step), images, index(step), pools))
  jax.block_until_ready(outs)
  rate = _STEPS.value * b / (time.perf_counter() - t0)
  return rate, compile_s, float(np.mean([np.asarray(o["mask"]).mean() for o in outs]))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  mesh = parallel.make_mesh()
  parallel.check_global_batch(_BATCH.value, mesh)
  support, _ = normal_images.load_normal_images(_DATA.value, _SIZE.value, _SUPPORT.value)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = _PASTE_MODE.value
  mix.validate_config(cfg)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {_BATCH.value}, "
        f"support {len(support)} at {_SIZE.value}², paste_mode {_PASTE_MODE.value}")

  np_rate, np_frac = bench_numpy(support, cfg)
  print(f"numpy/OpenCV/scipy, one sample at a time: {np_rate:8.1f} images/s  "
        f"(mean mask fraction {np_frac:.3f} over {_NUMPY_SAMPLES.value})")
  for dispatch in (["switch", "map"] if _DISPATCH.value == "both" else [_DISPATCH.value]):
    c = cfg.copy_and_resolve_references()
    c.dispatch = dispatch
    rate, compile_s, frac = bench_jax(support, c, mesh)
    print(f"jax jit build_synthesis ({dispatch:6s}): {rate:8.1f} images/s  (compile {compile_s:.1f} s)  "
          f"ratio vs numpy {rate / np_rate:5.2f}x  (mean mask fraction {frac:.3f} over "
          f"{_STEPS.value * _BATCH.value})")


if __name__ == "__main__":
  app.run(main)
