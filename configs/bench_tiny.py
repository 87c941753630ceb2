"""Benchmark workload for CPU: tiny random CLIP at 64 px, batch 8 per device, pixel tasks (fp32).

Finishes every mode in seconds on two CPU cores; used by tests/test_benchmark.py and the suite's tiny scale.

  python launch/benchmark.py --config configs/bench_tiny.py --out bench_tiny.json
  python launch/benchmark.py --config configs/bench_tiny.py:latent --out bench_tiny_latent.json  # + small KL VAE

Arguments: latent (mix in the latent tasks with a small random AutoencoderKL; fused and synthetic modes).
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, mediclip_config, use_latent_tasks
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, latent=False)
  c = mediclip_config("reference", "tiny")
  c.data.image_size = 64
  c.data.k_shot = 16
  c.bench = bench_section(batch_per_device=8, warmup_steps=2, steps=10,
                          modes="fused,synthetic" if a.latent else "fused,host,synthetic")
  if a.latent:
    c.vae.kind = "autoencoder_kl"
    c.vae.block_out_channels = (32, 64)
    c.vae.norm_num_groups = 32
    c.vae.latent_channels = 4
    c.vae.layers_per_block = 1
    use_latent_tasks(c)  # after the VAE: patch sizes for its latent grid
  return c
