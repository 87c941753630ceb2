"""Benchmark workload: the reference step plus latent tasks through an SD-VAE-size AutoencoderKL.

ViT-L/14 at 224², batch 64 per device, bf16 compute; a randomly initialised AutoencoderKL with
block_out_channels (128, 256, 512, 512) and 4 latent channels (SD kl-f8 size: 205 GFLOP encode,
469 GFLOP decode per 224² image); task mix 0.2 per pixel task, 0.1 per latent task. Each step
encodes the batch and decodes twice the batch (anomalous + round-trip latents). Host mode does
not apply (the latent tasks need the VAE on the device).

  python launch/benchmark.py --config configs/bench_latent.py --out bench_latent.json

Arguments: preset=reference|improved, variant=ViT-L-14.
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, mediclip_config, use_latent_tasks
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, preset="reference", variant="ViT-L-14")
  c = mediclip_config(a.preset, a.variant)
  c.data.image_size = 224
  c.model.clip.dtype = "bfloat16"
  c.data.k_shot = 16
  c.vae.kind = "autoencoder_kl"
  c.vae.path = None
  c.vae.dtype = "bfloat16"
  c.vae.block_out_channels = (128, 256, 512, 512)
  c.vae.latent_channels = 4
  use_latent_tasks(c)  # after the VAE: patch sizes for its latent grid
  c.bench = bench_section(batch_per_device=64, warmup_steps=3, steps=50, modes="fused,synthetic")
  return c
