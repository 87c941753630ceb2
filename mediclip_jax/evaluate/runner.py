"""Runs a detector over a set of images in fixed-size batches and computes the metrics.

Text features are computed once per evaluation (they do not depend on the image). Batches are
padded to a fixed size so evaluation compiles once; padded rows are dropped before the metrics.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.models.clip import clip_normalize
from mediclip_jax.evaluate import metrics as metrics_lib


def make_predict_fn(graphdef) -> tuple[Callable, Callable]:
  """(text_fn(params, frozen) -> T, maps_fn(params, frozen, images01 (B,H,W), T) -> (maps, scores)), jitted."""

  @jax.jit
  def text_fn(params, frozen):
    return nnx.merge(graphdef, params, frozen).text_features()

  @jax.jit
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
