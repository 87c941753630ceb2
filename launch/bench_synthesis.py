"""Synthesis throughput: jitted batched JAX synthesis vs the per-sample numpy/OpenCV/scipy path.

Runs both on the same real images in one process and prints images/s and their
ratio (DESIGN §14 target on CPU: >= 5×). The JAX side is timed after compilation,
with block_until_ready, over several batches; the numpy side runs one sample at a
time, as the PyTorch original's DataLoader workers do (single process here).

  python launch/bench_synthesis.py --data ../shared/data/brainmri --batch 32
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import datasets, preprocess
from mediclip_jax.synthesis import mix, reference_numpy


def read_support(root: str, n: int, size: int = 224) -> np.ndarray:
  """The first n normal training images of a dataset as float32 (n, size, size) in [0, 1]."""
  paths = [s.path for s in datasets.load_dataset(root).train if s.label == 0][:n]
  return np.stack([preprocess.load_train_image(p, size) for p in paths])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default="../shared/data/brainmri", help="dataset root (any layout data_pipelines reads)")
  ap.add_argument("--support", type=int, default=16, help="few-shot support images (cut-paste sources)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=5, help="timed JAX batches")
  ap.add_argument("--numpy-samples", type=int, default=100)
  ap.add_argument("--dispatch", default="both", choices=["switch", "map", "both"])
  ap.add_argument("--paste-mode", default="hard", choices=["hard", "poisson"])
  args = ap.parse_args()

  support = read_support(args.data, args.support)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = args.paste_mode
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch}, "
        f"support {len(support)}, paste_mode {args.paste_mode}")

  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for i in range(args.numpy_samples):
    reference_numpy.synthesize_sample_numpy(rng, support[i % len(support)], support, cfg)
  np_rate = args.numpy_samples / (time.perf_counter() - t0)
  print(f"numpy/OpenCV/scipy, one sample at a time: {np_rate:8.1f} images/s")

  sup = jnp.asarray(support)
  images = jnp.asarray(support[np.arange(args.batch) % len(support)])
  for dispatch in (["switch", "map"] if args.dispatch == "both" else [args.dispatch]):
    c = mix.default_config()
    c.pixel.cutpaste.paste_mode = args.paste_mode
    c.dispatch = dispatch
    fn = jax.jit(lambda key, step, im, idx, s, c=c: mix.synthesize_batch(key, step, im, idx, s, c))
    key = jax.random.key(0)
    idx = jnp.arange(args.batch, dtype=jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(key, 0, images, idx, sup))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
      out = fn(key, step, images, idx + step * args.batch, sup)
    jax.block_until_ready(out)
    rate = args.steps * args.batch / (time.perf_counter() - t0)
    print(f"jax jit batched ({dispatch:6s}): {rate:8.1f} images/s  (compile {compile_s:.1f} s)  "
          f"ratio vs numpy {rate / np_rate:5.2f}x")


if __name__ == "__main__":
  main()
