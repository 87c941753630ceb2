"""The fused training step: synthesis -> CLIP -> anomaly maps -> loss -> optax update, one jitted program.

The model is split once into (graphdef, trainable params, frozen state); the step is a pure
function of arrays, jitted over the `data` mesh. Per-device synthesis runs under
`jax.shard_map` with per-sample keys folded from (step, global sample index), so results do
not depend on the device count. Gradients of the data-sharded loss w.r.t. replicated
parameters are all-reduced by XLA.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from mediclip_jax.models.clip import clip_normalize
from mediclip_jax.models.mediclip import TRAINABLE, MediCLIP
from mediclip_jax.parallel import DATA, batch_sharding, replicated
from mediclip_jax.train.losses import mediclip_loss

TrainState = dict  # {"step": int32, "params": trainable State, "opt_state": optax state, "rng": key}


def split_model(model: MediCLIP):
  """(graphdef, trainable params, frozen rest); only prompts and adapters are trainable."""
  return nnx.split(model, TRAINABLE, ...)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam as the reference: lr 1e-3, betas (0.5, 0.999), no schedule, no clipping (by default)."""
  opt = optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.get("grad_clip_norm"):
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "rng": jax.random.key_data(jax.random.key(seed))}


def make_synthesizer(synth_fn: Callable, mesh: Mesh) -> Callable:
  """Wraps `synth_fn(key, step, images, sample_index, aux) -> dict` to run per device under shard_map.

  images and sample_index are split over `data`; key, step and aux (support pools, VAE
  weights) are replicated. Synthesis is independent per sample (no collectives), so the
  varying-manual-axes check is off: it rejects `lax.switch` over mixed replicated/per-device
  operands, which is what the per-sample task dispatch is.
  """
  return jax.shard_map(synth_fn, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA), P()), out_specs=P(DATA),
                       check_vma=False)


def update_on_batch(graphdef, optimizer: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    state: TrainState, frozen_model, images: jax.Array, masks: jax.Array):
  """Loss, gradients (prompts and adapters only) and the optax update on ready images and masks.

  The part of the step after synthesis; `images` are (B,H,W) grayscale in [0,1].
  Returns (new state, metrics).
  """
  x = clip_normalize(images)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, frozen_model)
    out = model(x)
    return mediclip_loss(out.prob_abnormal, masks, truncate_labels=loss_cfg.truncate_labels,
                         gamma=loss_cfg.focal_gamma)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
             "mask_fraction": jnp.mean(masks)}
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
  return new_state, metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, synth_fn: Callable, mesh: Mesh,
                    loss_cfg: ml_collections.ConfigDict) -> Callable:
  """Returns jitted `step(state, frozen, batch) -> (state, metrics)`; `state` is donated.

  frozen = {"model": frozen model state, "aux": synthesis pools/VAE, "support": (K,H,W) images};
  batch = {"support_index": (B,) int32, "sample_index": (B,) int32}, both split over `data`.
  """
  synthesize = make_synthesizer(synth_fn, mesh)

  def step(state: TrainState, frozen: dict, batch: dict):
    key = jax.random.wrap_key_data(state["rng"])
    images = jnp.take(frozen["support"], batch["support_index"], axis=0)
    syn = synthesize(key, state["step"], images, batch["sample_index"], frozen["aux"])
    return update_on_batch(graphdef, optimizer, loss_cfg, state, frozen["model"], syn["image"], syn["mask"])

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))
