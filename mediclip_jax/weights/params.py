"""Flat, dotted-name views of NNX parameters, for checkpoint conversion and I/O."""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.weights.io import check_tensors


def _name(path) -> str:
  return ".".join(str(p) for p in path)


def flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """{"visual.blocks.0.attn.qkv.kernel": array, ...} for every nnx.Param of `module`."""
  return {_name(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assign_flat_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                       allow_extra: tuple[str, ...] = ()) -> None:
  """Loads `tensors` (our dotted names) into `module` in place, after checking names and shapes.

  Values are cast to each parameter's dtype (fp16/bf16 checkpoints become fp32 params).
  Raises CheckpointError naming every missing, unexpected or mis-shaped tensor.
  """
  state = nnx.state(module, nnx.Param)
  flat = list(nnx.to_flat_state(state))
  check_tensors(source, tensors, {_name(p): tuple(v[...].shape) for p, v in flat}, allow_extra)
  for path, var in flat:
    var.set_value(jnp.asarray(np.asarray(tensors[_name(path)], np.float32), dtype=var[...].dtype))
  nnx.update(module, state)
