"""Benchmark workload for CPU: tiny random CLIP at 64 px, batch 8 per device, pixel tasks (fp32).

Finishes every mode in seconds on two CPU cores; used by tests/test_benchmark.py.

  python launch/benchmark.py --config configs/bench_tiny.py --out bench_tiny.json
  python launch/benchmark.py --config configs/bench_tiny.py:latent --out bench_tiny_latent.json  # + small KL VAE

Arguments: latent (mix in the latent tasks with a small random AutoencoderKL; fused and synthetic modes).
"""
import ml_collections

from mediclip_jax.config_defaults import LATENT_MIX, base_config
from mediclip_jax.config_utils import parse_arg
from mediclip_jax.synthesis import latent
from mediclip_jax.train.bench_steps import bench_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, latent=False)
  c = base_config("reference", "tiny")
  c.data.image_size = 64
  c.model.clip.image_size = 64
  c.data.k_shot = 16
  c.bench = bench_config(batch_per_device=8, warmup_steps=2, steps=10,
                         modes="fused,synthetic" if a.latent else "fused,host,synthetic")
  if a.latent:
    c.synthesis.probs = ml_collections.ConfigDict(dict(LATENT_MIX))
    c.vae.kind = "autoencoder_kl"
    c.vae.block_out_channels = (32, 64)
    c.vae.norm_num_groups = 32
    c.vae.latent_channels = 4
    c.vae.layers_per_block = 1
    c.synthesis.latent.patch_sizes = latent.patch_size_choices(32)
    c.synthesis.latent.patch_probs = tuple(1.0 / len(c.synthesis.latent.patch_sizes)
                                           for _ in c.synthesis.latent.patch_sizes)
  return c
