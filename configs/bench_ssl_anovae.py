"""Benchmark workload: the SSL-AnoVAE train step (generator + BYOL + PatchGAN updates and the EMA, one program).

Reference size (default): 256 px grey, the default networks of mediclip_jax/models/ssl_anovae.py (E_I widths
32..512, ResNet-18-style E_S, 4096-wide BYOL MLPs, decoder 512..32, PatchGAN 64..512; about 40 M generator
parameters), both latents, BYOL and adversarial terms on, batch 32 per device, bf16 compute with fp32
parameters. `tiny`: 64 px, the tiny networks of configs/ssl_anovae.py:tiny, batch 8 per device, fp32 (CPU,
seconds per step). Training images: 16 generated OCT phantoms (`bench.support`), resized to the image size;
the fused mode only (no synthesis to feed from elsewhere).

  python launch/benchmark.py --config configs/bench_ssl_anovae.py:tiny --out bench_ssl_anovae_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_ssl_anovae.py --out bench_ssl_anovae.json            # GPU
  python launch/benchmark.py --config configs/bench_ssl_anovae.py:dtype=float32 --config.loss.adv=0 ...

Arguments: tiny, dtype=bfloat16|float32 (default: bfloat16 at the reference size, float32 with tiny).
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, ssl_anovae_config
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, tiny=False, dtype=None)
  c = ssl_anovae_config("tiny" if a.tiny else None)  # the OCT phantom, oct views, 256 or 64 px
  c.model.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
  c.data.phantom_n_train = 16
  c.bench = bench_section(batch_per_device=8 if a.tiny else 32, warmup_steps=2 if a.tiny else 3,
                          steps=10 if a.tiny else 50, modes="fused")
  return c
