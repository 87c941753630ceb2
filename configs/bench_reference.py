"""Benchmark workload: the MediCLIP reference step at scale.

ViT-L/14 at 224², taps (12, 18, 24), 21 learnable prompts x 77 tokens, batch 64 per device,
the reference's four pixel tasks (0.25 each), bf16 compute with fp32 parameters, host mode with
8 CPU workers. The backbone is randomly initialised unless a checkpoint is given (FLOPs and
timings do not depend on it).

  python launch/benchmark.py --config configs/bench_reference.py --out bench_reference.json
  python launch/benchmark.py --config configs/bench_reference.py --config.bench.batch_per_device=8 \
      --config.model.clip.dtype=float32 --out parity_b8_fp32.json   # the reference's own B = 8, fp32

Arguments: preset=reference|improved, variant=ViT-L-14 (any CLIP variant name).
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, mediclip_config
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, preset="reference", variant="ViT-L-14")
  c = mediclip_config(a.preset, a.variant)
  c.data.image_size = 224
  c.model.clip.dtype = "bfloat16"
  c.data.k_shot = 16
  c.bench = bench_section(batch_per_device=64, warmup_steps=3, steps=50, modes="fused,host,synthetic",
                          host_workers=8)
  return c
