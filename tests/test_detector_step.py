"""The detector head, the losses and the fused train step on a tiny CLIP."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from mediclip_jax.models.clip import create_clip, get_variant
from mediclip_jax.models.mediclip import MediCLIP, align_corners_matrix, upsample_align_corners
from mediclip_jax.models.prompts import ABNORMAL_WORDS, NORMAL_WORDS
from mediclip_jax.parallel import make_mesh, replicate
from mediclip_jax.methods import mediclip as step_lib
from mediclip_jax.methods.losses import dice_loss, focal_loss
from mediclip_jax.weights.params import flat_params
from mediclip_jax.weights.tokenizer import tokenizer_for

SIZE = 32


def _detector(**kw) -> MediCLIP:
  clip = create_clip(get_variant("tiny"), seed=0)
  return MediCLIP(clip, tokenizer_for(), tap_layers=(2, 3, 4), rngs=nnx.Rngs(1), **kw)


def test_trainable_parameters_are_prompts_and_adapters():
  model = _detector()
  _, params, frozen = step_lib.split_model(model)
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert names == {"prompts.ctx"} | {f"adapters.layers.{i}.{w}" for i in range(3) for w in ("kernel", "bias")}
  ctx = params["prompts"]["ctx"][...]
  assert ctx.shape == (len(NORMAL_WORDS) + len(ABNORMAL_WORDS), 8, 32)
  assert 0.015 < float(jnp.std(ctx)) < 0.025  # N(0, 0.02) init
  k = params["adapters"]["layers"][0]["kernel"][...]
  assert k.shape == (64, 32) and float(jnp.abs(k).max()) <= 1 / 8 + 1e-6  # U(+-1/sqrt(64)) as PyTorch
  assert any("visual" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen))


def test_align_corners_matrix_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(13, 13), mode="bilinear",
                                        align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(upsample_align_corners(jnp.asarray(x), 13)), ref, atol=1e-6)
  assert np.allclose(align_corners_matrix(16, 224).sum(1), 1)


def test_maps_are_softmax_of_upsampled_similarities_without_logit_scale():
  model = _detector()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  t = model.text_features()
  assert t.shape == (32, 2) and np.allclose(np.linalg.norm(np.asarray(t), axis=0), 1, atol=1e-5)
  out = model(images)
  sims = upsample_align_corners(model.patch_similarities(images, t), SIZE)
  expected = jax.nn.softmax(sims, axis=-1)[..., 1]
  np.testing.assert_allclose(np.asarray(out.prob_abnormal), np.asarray(expected), atol=1e-6)
  assert float(out.prob_abnormal.min()) >= 0.119 and float(out.prob_abnormal.max()) <= 0.881  # sigmoid(+-2)
  np.testing.assert_allclose(np.asarray(out.score), np.asarray(out.prob_abnormal).max(axis=(1, 2)))


def test_causal_mask_flag_changes_text_features():
  a, b = _detector(), _detector(causal_text_mask=True)
  assert not np.allclose(np.asarray(a.text_features()), np.asarray(b.text_features()))


def test_focal_and_dice_match_reference_formulas():
  rng = np.random.default_rng(0)
  p1 = rng.uniform(0.12, 0.88, (2, 8, 8)).astype(np.float32)
  mask = (rng.uniform(size=(2, 8, 8)) > 0.7).astype(np.float32)
  mask[0, 0, 0] = 0.9999963  # a soft CutPaste label: truncated to class 0 by the reference
  # Reference focal loss written out with torch: one-hot of the truncated label, clamped, p_t + smooth.
  prob = torch.from_numpy(np.stack([1 - p1, p1], 1)).permute(0, 2, 3, 1).reshape(-1, 2)
  target = torch.from_numpy(mask).reshape(-1, 1).long()
  one_hot = torch.zeros(prob.shape).scatter_(1, target, 1).clamp(1e-5, 1 - 1e-5)
  pt = (one_hot * prob).sum(1) + 1e-5
  ref_focal = (-(1 - pt) ** 2 * pt.log()).mean().item()
  assert abs(float(focal_loss(jnp.asarray(p1), jnp.asarray(mask))) - ref_focal) < 1e-6
  inter = (p1 * mask).reshape(2, -1).sum(1)
  ref_dice = 1 - np.mean((2 * inter + 1) / (p1.reshape(2, -1).sum(1) + mask.reshape(2, -1).sum(1) + 1))
  assert abs(float(dice_loss(jnp.asarray(p1), jnp.asarray(mask))) - ref_dice) < 1e-6
  assert float(focal_loss(jnp.asarray(p1), jnp.asarray(mask), truncate_labels=False)) != pytest.approx(ref_focal)


def _fixed_batch_synth(key, step, images, sample_index, pools):
  """Synthesis stand-in that returns the images unchanged with fixed masks: a fixed batch."""
  del key, step
  return {"image": images, "mask": jnp.take(pools["masks"], sample_index % pools["masks"].shape[0], axis=0),
          "task": jnp.zeros(images.shape[0], jnp.int32)}


def test_step_updates_only_trainables_and_loss_decreases_on_fixed_batch():
  model = _detector()
  before = flat_params(model)
  graphdef, params, frozen_model = step_lib.split_model(model)
  mesh = make_mesh(jax.devices()[:1])
  opt = step_lib.make_optimizer(ml_collections.ConfigDict({"lr": 1e-2, "b1": 0.5, "b2": 0.999, "eps": 1e-8,
                                                           "grad_clip_norm": 0.0}))
  train_step = step_lib.make_train_step(graphdef, opt, _fixed_batch_synth, mesh,
                                        ml_collections.ConfigDict({"truncate_labels": True, "focal_gamma": 2.0}))
  rng = np.random.default_rng(0)
  support = rng.uniform(size=(4, SIZE, SIZE)).astype(np.float32)
  masks = np.zeros((4, SIZE, SIZE), np.float32)
  masks[:2, 8:20, 10:24] = 1
  frozen = replicate({"model": frozen_model, "pools": {"masks": masks}, "support": support}, mesh)
  state = replicate(step_lib.init_state(params, opt, 0), mesh)
  batch = {"support_index": jnp.arange(4, dtype=jnp.int32), "sample_index": jnp.arange(4, dtype=jnp.int32)}
  losses = []
  for _ in range(8):
    state, m = train_step(state, frozen, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.01, losses
  nnx.update(model, state["params"])
  after = flat_params(model)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"prompts.ctx"} | {f"adapters.layers.{i}.{w}" for i in range(3) for w in ("kernel", "bias")}
  frozen_names = [k for k in before if k.startswith("clip.")]
  assert frozen_names and all(np.array_equal(before[k], after[k]) for k in frozen_names)  # bit-identical
