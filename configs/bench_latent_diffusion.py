"""Benchmark workload: the latent diffusion baseline's train step (augmentation, frozen TAEF2 encode, DiT loss,
AdamW and the EMA: one program), its parts alone, and its scoring loop at several numbers of DDIM steps.

GPU size (default): 256 px grey, TAEF2 latents 32 x 32 x 32 (random-init TAEF2: timings and FLOPs do not depend
on the weights), a DiT-B/2 denoiser (patch 2, width 768, depth 12, 12 heads: 256 tokens), bf16 compute (DiT and
VAE) with fp32 parameters, global batch 256 on one device (`bench.batch_per_device`), scoring at t* = 250 with
`score.reverse_steps` = 10 and timed at 1, 5, 10 and 25 DDIM steps (`bench.score_steps`); 64 generated phantom
chests as training images (generated at 224 px, resized to 256). `tiny`: 64 px (latents 8 x 8 x 32), the tiny DiT
of configs/latent_diffusion.py:tiny (patch 1, width 128, depth 4), batch 8 per device, fp32, 16 phantoms (CPU,
about a second per step). Stages (`bench.stages`): VAE encode, DiT forward + backward, the scorer per
`bench.score_steps` value; the fused mode is the full step (no synthesis to feed from elsewhere).

  python launch/benchmark.py --config configs/bench_latent_diffusion.py:tiny --out bench_ldm_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_latent_diffusion.py --out bench_ldm.json            # GPU
  python launch/benchmark.py --config configs/bench_latent_diffusion.py:vae_path=../shared/weights/taef2 ...
  python launch/benchmark.py --config configs/bench_latent_diffusion.py --config.bench.score_steps='(10, 50)' ...

Arguments: tiny, dtype=bfloat16|float32 (DiT and VAE compute; default bfloat16 at GPU size, float32 with tiny),
vae_path=<TAEF2 folder> (the real weights instead of random init).
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, latent_diffusion_config
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, tiny=False, dtype=None, vae_path=None)
  c = latent_diffusion_config("dataset=phantom" + (",tiny" if a.tiny else ""))  # 64 px tiny DiT, or 256 px
  c.vae.path = a.vae_path
  c.model.dtype = c.vae.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
  if not a.tiny:  # DiT-B/2
    c.model.patch_size, c.model.width, c.model.depth, c.model.heads = 2, 768, 12, 12
  c.score.reverse_steps = 10
  c.data.phantom_n_train = 16 if a.tiny else 64
  c.bench = bench_section(batch_per_device=8 if a.tiny else 256, warmup_steps=2 if a.tiny else 3,
                          steps=10 if a.tiny else 30, modes="fused")
  c.bench.score_steps = (1, 5, 10, 25)  # DDIM steps the scoring stages are timed at (latent_diffusion_bench)
  for unused in ("host_workers", "host_prefetch"):  # no host mode: nothing to synthesise off the device
    del c.bench[unused]
  return c
