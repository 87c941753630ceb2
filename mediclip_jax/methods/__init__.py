"""The methods the trainer serves, by `config.method` name (see `base.py` for the interface)."""
from __future__ import annotations

import types

from collections.abc import Callable

from mediclip_jax.methods import (latent_diffusion, latent_diffusion_bench, mediclip, mediclip_bench, mirage,
                                  mirage_bench, ssl_anovae, ssl_anovae_bench)

METHODS: dict[str, types.ModuleType] = {mediclip.NAME: mediclip, ssl_anovae.NAME: ssl_anovae, mirage.NAME: mirage,
                                        latent_diffusion.NAME: latent_diffusion}
# Optional benchmark hooks, (config, mesh, trainable) -> BenchParts: the fed step, host/synthetic feeds and
# stage programs of `launch/benchmark.py`. A method without one is benchmarked in the fused mode only.
BENCH_PARTS: dict[str, Callable] = {mediclip.NAME: mediclip_bench.bench_parts,
                                    ssl_anovae.NAME: ssl_anovae_bench.bench_parts,
                                    mirage.NAME: mirage_bench.bench_parts,
                                    latent_diffusion.NAME: latent_diffusion_bench.bench_parts}


def get(name: str) -> types.ModuleType:
  """The method module registered as `name`."""
  if name not in METHODS:
    raise ValueError(f"config.method must be one of {sorted(METHODS)}, got {name!r}")
  return METHODS[name]
