"""Benchmark workload: the MIRAGE train step (both CLIP towers, the MIRAGE loss over the text bank, AdamW, the
bank enqueue: one program).

GPU size (default): ViT-B/16 towers at 224 px, random init, both towers trained in full (`mirage.trainable=
"full"`), the MIRAGE loss with a 65,536 x 512 text bank (128 MiB float32), global batch 256 on one device
(`bench.batch_per_device`), bf16 compute with fp32 parameters; 400 generated phantom report pairs (320 in the
training split, enough for one global batch), generated at 64 px and resized to 224. `tiny`: the tiny random
CLIP at 64 px, batch 16 per device, bank 1,024 x 32, fp32, 40 pairs (32 training) (CPU, a fraction of a second
per step). The step reads its own pairs (`data.pairs`, generated under the benchmark's build folder): no
anomaly support dataset, the fused mode only (no synthesis to feed from elsewhere).

  python launch/benchmark.py --config configs/bench_mirage.py:tiny --out bench_mirage_tiny.json  # CPU
  python launch/benchmark.py --config configs/bench_mirage.py --out bench_mirage.json            # GPU
  python launch/benchmark.py --config configs/bench_mirage.py:variant=ViT-L-14 --out bench_mirage_l14.json
  python launch/benchmark.py --config configs/bench_mirage.py:dtype=float32 --config.mirage.trainable=last_blocks

Arguments: tiny, dtype=bfloat16|float32 (default: bfloat16 at GPU size, float32 with tiny), variant=<CLIP name>
(random init; default ViT-B-16; ViT-L-14 gives 768-d embeddings, a 192 MiB bank).
"""
import ml_collections

from mediclip_jax.config_defaults import bench_section, mirage_config
from mediclip_jax.config_utils import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, tiny=False, dtype=None, variant="ViT-B-16")
  c = mirage_config(f"source=phantom_reports,trainable=full,variant={a.variant}" + (",tiny" if a.tiny else ""))
  c.model.clip.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
  c.data.pairs.phantom_size = 64
  c.data.pairs.n = 40 if a.tiny else 400
  c.mirage.bank_size = 1024 if a.tiny else 65536
  c.bench = bench_section(batch_per_device=16 if a.tiny else 256, warmup_steps=2 if a.tiny else 3,
                          steps=10 if a.tiny else 30, modes="fused")
  for unused in ("host_workers", "host_prefetch", "support"):  # host mode and the anomaly support set: not MIRAGE's
    del c.bench[unused]
  return c
