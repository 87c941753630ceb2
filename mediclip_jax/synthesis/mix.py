"""The synthesis entry point the training step calls: a task per sample, applied on device (DESIGN §6, §9).

Every sample's randomness comes from key_i = fold_in(fold_in(base_key, step),
global_sample_index), so a sample's result does not depend on how the batch is split
over devices; cut-paste sources come from the few-shot support set, replicated on
every device. `synthesize_batch` only uses its arguments (no global-batch
assumptions), so it runs inside `jax.jit` and on a per-device slice under
`jax.shard_map`.

Extending the table (e.g. latent tasks): append a name to TASKS and a function with
the signature (key, image, support, cfg) -> (image, mask) to TASK_FNS, and give it a
probability in cfg.probs. `choose_tasks` is separate so another stage can route
samples itself.

Dispatch (`cfg.dispatch`, static): "switch" vmaps a `lax.switch` over the batch,
which XLA turns into a select, so every task is computed for every sample (best on
GPU/TPU: one wide kernel per op); "map" runs samples one after another with
`lax.map`, where the switch is a real branch and only the chosen task runs (best on
CPU). Both give identical results. "auto" (the default) picks "map" on CPU and
"switch" on accelerators, at trace time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mediclip_jax.synthesis import pixel

TASKS: tuple[str, ...] = ("cutpaste", "gauss_intensity", "deformation", "identity")
DISPATCH_MODES = ("auto", "switch", "map")

TaskFn = Callable[[jax.Array, jax.Array, jax.Array, ml_collections.ConfigDict], tuple[jax.Array, jax.Array]]

TASK_FNS: dict[str, TaskFn] = {
    "cutpaste": lambda key, image, support, cfg: pixel.cutpaste(key, image, support, cfg.pixel),
    "gauss_intensity": lambda key, image, support, cfg: pixel.gauss_intensity(key, image, cfg.pixel),
    "deformation": lambda key, image, support, cfg: pixel.deformation(key, image, cfg.pixel),
    "identity": lambda key, image, support, cfg: pixel.identity(key, image, cfg.pixel),
}


def default_config() -> ml_collections.ConfigDict:
  """Task probabilities (reference: 0.25 each), dispatch mode and the nested pixel/shape knobs."""
  c = ml_collections.ConfigDict()
  c.probs = ml_collections.ConfigDict({t: 0.25 for t in TASKS})
  c.dispatch = "auto"
  c.pixel = pixel.default_config()
  return c


def task_probs(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(len(TASKS),) probabilities in TASKS order; validates names, signs and the sum."""
  probs = dict(cfg.probs)
  unknown = sorted(set(probs) - set(TASKS))
  if unknown:
    raise ValueError(f"probs has unknown task names {unknown}; expected a subset of {TASKS}")
  p = np.array([float(probs.get(t, 0.0)) for t in TASKS], np.float64)
  if np.any(p < 0):
    raise ValueError(f"probs must be non-negative, got {probs}")
  if abs(p.sum() - 1.0) > 1e-6:
    raise ValueError(f"probs must sum to 1 (as the reference asserts), got sum {p.sum():.6f} for {probs}")
  return p.astype(np.float32)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when the config is inconsistent."""
  task_probs(cfg)
  if cfg.dispatch not in DISPATCH_MODES:
    raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {cfg.dispatch!r}")
  pixel.validate_config(cfg.pixel)


def resolve_dispatch(mode: str) -> str:
  """"switch" or "map" for a configured dispatch mode ("auto": map on CPU, switch elsewhere)."""
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "switch"
  if mode not in DISPATCH_MODES:
    raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
  return mode


def sample_keys(base_key: jax.Array, step: jax.Array | int, sample_index: jax.Array) -> jax.Array:
  """key_i = fold_in(fold_in(base_key, step), sample_index[i]) for every sample."""
  k = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.asarray(sample_index, jnp.int32))


def choose_tasks(keys: jax.Array, probs: jax.Array) -> jax.Array:
  """(B,) int32 task ids drawn independently per key with the given (T,) probabilities."""
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  return jax.vmap(lambda k: jax.random.categorical(k, logp))(keys).astype(jnp.int32)


def apply_task(task: jax.Array, key: jax.Array, image: jax.Array, support: jax.Array,
               cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Runs task `task` (an index into TASKS) on one sample with `lax.switch`."""
  branches = [functools.partial(TASK_FNS[t], cfg=cfg) for t in TASKS]
  return jax.lax.switch(task, branches, key, image, support)


def split_sample_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(choice keys, task keys): the two streams a sample's key is split into."""
  split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  return split[:, 0], split[:, 1]


def apply_tasks(tasks: jax.Array, keys: jax.Array, images: jax.Array, support: jax.Array,
                cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Runs each sample's task with its key, dispatched as `cfg.dispatch` says; returns (images, masks)."""
  one = lambda t, k, im: apply_task(t, k, im, support, cfg)
  if resolve_dispatch(cfg.dispatch) == "switch":
    return jax.vmap(one)(tasks, keys, images)
  return jax.lax.map(lambda a: one(*a), (tasks, keys, images))


def synthesize_batch(key: jax.Array, step: jax.Array | int, images: jax.Array, sample_index: jax.Array,
                     support: jax.Array, cfg: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Synthesises anomalies for a batch: returns dict(image (B,H,W), mask (B,H,W), task (B,) int32).

  images are float32 (B, H, W) in [0, 1]; sample_index (B,) are global sample indices;
  support (K, H, W) is the cut-paste source pool.
  """
  validate_config(cfg)
  images = jnp.asarray(images, jnp.float32)
  support = jnp.asarray(support, jnp.float32)
  choice_keys, task_keys = split_sample_keys(sample_keys(key, step, sample_index))
  tasks = choose_tasks(choice_keys, task_probs(cfg))
  out, mask = apply_tasks(tasks, task_keys, images, support, cfg)
  return dict(image=out, mask=mask, task=tasks)
