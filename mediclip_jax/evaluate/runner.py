"""Runs a detector over a set of images in fixed-size batches and computes the metrics.

Text features are computed once per evaluation (they do not depend on the image). Batches are
padded to a fixed size so evaluation compiles once; padded rows are dropped before the metrics.
`predict` runs on one device; `predict_sharded` splits each batch over the `data` axis of a
mesh that may span several processes, each feeding and getting back only its own rows.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh

from mediclip_jax import parallel
from mediclip_jax.models.clip import clip_normalize
from mediclip_jax.evaluate import metrics as metrics_lib


def make_predict_fn(graphdef, mesh: Mesh | None = None) -> tuple[Callable, Callable]:
  """(text_fn(params, frozen) -> T, maps_fn(params, frozen, images01 (B,H,W), T) -> (maps, scores)), jitted.

  With a mesh, maps and scores come out split over `data` like the images (never gathered on device).
  """
  out_shardings = None if mesh is None else (parallel.batch_sharding(mesh),) * 2

  @jax.jit
  def text_fn(params, frozen):
    return nnx.merge(graphdef, params, frozen).text_features()

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def maps_fn(params, frozen, images, text_features):
    out = nnx.merge(graphdef, params, frozen)(clip_normalize(images), text_features)
    return out.prob_abnormal, out.score

  return text_fn, maps_fn


def predict(graphdef, params, frozen, images: np.ndarray, batch_size: int,
            fns: tuple[Callable, Callable] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(maps (N,H,W) float32, scores (N,)) for grayscale [0,1] images (N,H,W)."""
  text_fn, maps_fn = fns or make_predict_fn(graphdef)
  t = text_fn(params, frozen)
  n = images.shape[0]
  maps, scores = [], []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    m, s = maps_fn(params, frozen, jnp.asarray(chunk), t)
    keep = batch_size - pad
    maps.append(np.asarray(m)[:keep])
    scores.append(np.asarray(s)[:keep])
  return np.concatenate(maps), np.concatenate(scores)


def predict_sharded(graphdef, params, frozen, local_images: np.ndarray, batch_size: int, mesh: Mesh,
                    fns: tuple[Callable, Callable] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's (maps (n,H,W), scores (n,)) for its share `local_images` (n,H,W) of an image set.

  `params`/`frozen` are replicated on `mesh`. Every process must pass the same n (pad its share;
  see `data_pipelines.batches.process_eval_indices`): each batch is one collective program.
  The global batch is `batch_size` rounded up to a multiple of the device count.
  """
  text_fn, maps_fn = fns or make_predict_fn(graphdef, mesh)
  _, local_bs = parallel.eval_batch_sizes(batch_size, mesh)
  t = text_fn(params, frozen)
  n = local_images.shape[0]
  maps, scores = [], []
  for start in range(0, n, local_bs):
    chunk = local_images[start:start + local_bs]
    keep = chunk.shape[0]
    if keep < local_bs:
      chunk = np.concatenate([chunk, np.zeros((local_bs - keep,) + chunk.shape[1:], chunk.dtype)])
    m, s = maps_fn(params, frozen, parallel.global_array(chunk, mesh), t)
    maps.append(parallel.local_rows(m)[:keep])
    scores.append(parallel.local_rows(s)[:keep])
  if not maps:
    return np.zeros((0,) + local_images.shape[1:], np.float32), np.zeros((0,), np.float32)
  return np.concatenate(maps), np.concatenate(scores)


def compute_metrics(maps: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                    smoothing_sigma: float = 0.0, aupro_max_fpr: float = 0.3) -> dict[str, float]:
  """Image AUROC/AP/F1-max from scores (max of the map, raw or smoothed), pixel metrics when masks exist."""
  if smoothing_sigma:
    maps = np.asarray(metrics_lib.gaussian_smooth(jnp.asarray(maps), sigma=smoothing_sigma))
    scores = maps.reshape(maps.shape[0], -1).max(1)
  out = {f"image_{k}": v for k, v in metrics_lib.image_metrics(scores, labels).items()}
  if masks is not None:
    px = metrics_lib.pixel_metrics(maps, masks, fpr_limit=aupro_max_fpr)
    out.update({f"pixel_{k}": v for k, v in px.items()})
  return out
