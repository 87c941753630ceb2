"""MIRAGE's benchmark hook: analytic FLOPs of the fused train step for launch/benchmark.py's MFU.

`bench_parts(config, mesh, trainable)` is registered in `mediclip_jax.methods.BENCH_PARTS`. Like SSL-AnoVAE's
hook it gives only what the fused mode needs: the analytic model FLOPs and the facts the result JSON records
(the model, the text bank and its memory, the dtype policy). The step reads host-fed image-text pairs
(`trainable.local_batch`: images and tokens of the global batch) and synthesises nothing, so the host and
synthetic modes do not apply and there is no stage breakdown.

FLOPs follow `mediclip_jax.flops` (matmul work only, a multiply-add = 2 FLOPs) and reuse its CLIP block and
patch-embedding counts. One step of `mirage.make_train_step` on a global batch B:

- vision tower on B images (1 + (S/p)^2 tokens), every block (the pooled embedding needs the last): forward;
  and for the part `mirage.trainable` adapts, weight gradients (1x the linear layers) and input gradients (1x
  the linear layers, 2x the two attention matmuls, whose operands are both activations). A trained block costs
  3x its forward (its ln_1 trains, so even the lowest trained block needs its input gradients); the frozen
  blocks below it cost their forward only. The CLS projection: forward, its weight gradient, and its input
  gradient when ln_post trains (last_blocks, full). The patch embedding: forward, and its weight gradient
  (no input gradient: the images carry none) when it trains (full);
- text tower likewise on B captions of `context_length` tokens (77; causal attention counted as the full
  T x T products, as XLA runs them), projection at the EOT token; the token embedding is a gather (its
  gradient a scatter-add: no matmul);
- distillation (`mirage.distill_weight` > 0): the teacher vision forward up to the last tap, less what XLA
  computes once for teacher and student: the frozen prefix below the lowest trained block gets the same
  inputs and weights in both, so only the blocks from the lowest trained one to the last tap count (all of
  them, and the patch embedding, with `trainable="full"`);
- the loss on the gathered (B, D) embeddings: the soft nearest neighbour over the (K, D) bank, B x K
  similarities (forward + the gradient to the images; the bank gets none) and the (B x K) @ (K x D)
  neighbour sum (forward + the gradient to the attention weights), 4 B K D each; the B x B logits of pair
  InfoNCE (v t^T) and robust InfoNCE (v t~^T) and the OT term's two plans (v t^T again and t v^T), each with
  gradients to both operands, and the OT term's detached cost (t t~^T, forward only). Pair InfoNCE and the OT
  image plan share the product v t^T, which XLA computes once: four B x B forward products and eight gradient
  products, 24 B^2 D. Plain InfoNCE (`mirage.loss="infonce"`) has the pair logits only (6 B^2 D) and never
  reads the bank.

Left out: LayerNorms, activations, softmaxes, the logsumexps and Sinkhorn iterations, normalisations, AdamW,
gradient norms, the finite check, the bank enqueue (elementwise or scatter), and the resampling of the position
embeddings when the image size differs from the architecture's (a (g^2 x g0^2) matrix on the (g0^2, W) table
per step, whatever the batch: a few hundred kFLOP).

Checked against XLA's `cost_analysis()["flops"]` of the compiled step (tests/test_benchmark_mirage.py; CPU,
float32 unless said). XLA is above the count by the elementwise work: per sample the LayerNorms, activations and
softmaxes (about 4 % at the tiny widths, 1 % at width 256, less beyond), and per step, whatever the batch,
AdamW, the gradient norms and the finite check over the trainable parameters, most of them the 49,408-token
embedding table when the text tower trains in full (58 MFLOP for the tiny model's 1.8 M parameters, 0.49 GFLOP at
width 256). Measured XLA / analytic:
  configs/bench_mirage.py:tiny (tiny CLIP, 64 px, B = 16, K = 1024, full)   1.744 GFLOP analytic   1.074
  the same at B = 8                                                        0.872 GFLOP            1.107
  tiny, last_blocks (1 block per tower) / with distillation / projections                         1.051 / 1.050 / 1.051
  tiny, full with distillation / the infonce loss                                                  1.067 / 1.074
  width 256 (4 + 2 blocks), B = 8: full / last_blocks 1 with distillation / projections           1.038 / 1.014 / 1.010
  configs/bench_mirage.py (ViT-B/16, 224 px, B = 256, K = 65,536, full, bf16)  31.56 TFLOP          1.008
The loss alone (B = 64, K = 256, D = 256, gradients to v, t and the scales): 1.019 (mirage), 1.063 (infonce).
"""
from __future__ import annotations

import jax
import ml_collections
from jax.sharding import Mesh

from mediclip_jax import flops
from mediclip_jax.methods import mediclip
from mediclip_jax.methods.base import Trainable
from mediclip_jax.methods.bench import BenchParts
from mediclip_jax.models.clip import CLIPConfig

MAC = flops.MAC
NOT_APPLICABLE = ("MIRAGE has no synthesis to move off the device: its fused step already reads host-fed "
                  "image-text pairs (images and tokens of the global batch, trainable.local_batch), and no "
                  "synthetic variant of that input is provided")


def trained_blocks(m: ml_collections.ConfigDict, layers: int) -> int:
  """How many of a tower's `layers` blocks `mirage.trainable` adapts (the last ones)."""
  if m.trainable == "full":
    return layers
  if m.trainable == "last_blocks":
    return min(int(m.train_blocks), layers)
  return 0


def _block(tokens: int, width: int, mlp_ratio: float) -> float:
  b = flops.transformer_block_flops(tokens, width, mlp_ratio)
  return b["linear"] + b["attention"]


def _tower(m: ml_collections.ConfigDict, layers: int, block: float, head: float, embed: float) -> dict[str, float]:
  """Forward and backward FLOPs per sample of one tower: `embed` (patch embedding, 0 for text), `layers` blocks
  of `block` each, the `head` projection. Backward as the module docstring says."""
  n = trained_blocks(m, layers)
  full = m.trainable == "full"
  forward = embed + layers * block + head
  backward = 2 * n * block + (2 if m.trainable != "projections" else 1) * head + (embed if full else 0.0)
  return {"forward": float(forward), "backward": float(backward)}


def step_flops(config: ml_collections.ConfigDict, arch: CLIPConfig, batch: int) -> dict[str, float]:
  """Analytic FLOPs of one MIRAGE train step of architecture `arch` on a global batch, by component, with their
  sum in "total" (the module docstring lists what each counts)."""
  m = config.mirage
  size, e, r = int(config.data.image_size), int(arch.embed_dim), float(arch.mlp_ratio)
  grid = size // int(arch.patch_size)
  v_block = _block(1 + grid * grid, int(arch.vision_width), r)
  patch = flops.vision_forward_flops(size, int(arch.patch_size), int(arch.vision_width), 0, r)  # 0 blocks: the patches
  vision = _tower(m, int(arch.vision_layers), v_block, MAC * arch.vision_width * e, patch)
  text = _tower(m, int(arch.text_layers), _block(int(arch.context_length), int(arch.text_width), r),
                MAC * arch.text_width * e, 0.0)
  teacher = 0.0
  if m.distill_weight > 0:
    taps = tuple(config.model.clip.tap_layers) or mediclip.default_taps(int(arch.vision_layers))
    lowest = int(arch.vision_layers) - trained_blocks(m, int(arch.vision_layers)) + 1  # 1-based; layers + 1: none
    teacher = max(0, max(taps) - lowest + 1) * v_block + (patch if m.trainable == "full" else 0.0)
  b, k = batch, int(m.bank_size)
  mirage = m.loss == "mirage"
  f = {
      "vision_forward": b * vision["forward"],
      "vision_backward": b * vision["backward"],
      "text_forward": b * text["forward"],
      "text_backward": b * text["backward"],
      "distill_teacher_forward": b * teacher,
      # v @ bank^T forward + its gradient to v; attn @ bank forward + its gradient to attn
      "bank_similarity": 2.0 * MAC * b * k * e if mirage else 0.0,
      "bank_neighbours": 2.0 * MAC * b * k * e if mirage else 0.0,
      # B x B products, forward: v t^T (pair InfoNCE, and the OT image plan: the same product, computed once),
      # v t~^T, t v^T (the OT text plan), the detached OT cost t t~^T; gradients to both operands of the first three
      # (v t^T twice: one per use)
      "pair_logits": float(MAC * b * b * e * (4 + 2 * 4 if mirage else 3)),
  }
  f["total"] = float(sum(f.values()))
  return f


def bench_parts(config: ml_collections.ConfigDict, mesh: Mesh, trainable: Trainable) -> BenchParts:
  """MIRAGE's benchmark parts: fused-step FLOPs and the JSON facts; no fed step, feeds or stages.

  The architecture is read off the built model (`trainable.info["backbone"]`), so a checkpoint's counts."""
  del mesh
  arch = CLIPConfig.from_dict(trainable.info["backbone"]["architecture"])
  m, c = config.mirage, config.model.clip
  batch = int(config.train.batch_size)
  bank = dict(trainable.info["bank"])
  info = {
      "step_program": "one jitted data-parallel step (methods.mirage.make_train_step): both CLIP towers per device "
                      "on images and tokens split over 'data', embeddings gathered for the global-batch loss and "
                      "the bank enqueue, AdamW on the trainable subset, over a 1-D 'data' mesh",
      "dtype_policy": {"params": "float32", "clip_compute": c.dtype,
                       "default_matmul_precision": jax.config.jax_default_matmul_precision,
                       "loss_and_bank": "float32"},
      "model": {"clip_variant": c.variant, "checkpoint": c.checkpoint, "architecture": arch.to_dict(),
                "trainable": m.trainable, "vision_trained_blocks": trained_blocks(m, arch.vision_layers),
                "text_trained_blocks": trained_blocks(m, arch.text_layers),
                "trainable_parameters": trainable.info.get("trainable_parameters"), "loss": m.loss,
                "distill_weight": float(m.distill_weight), "sinkhorn_iters": int(m.sinkhorn_iters)},
      "bank": bank,
      "synthesis": None,
  }
  unavailable = {mode: NOT_APPLICABLE for mode in ("host", "synthetic")}
  return BenchParts(fed_step=None, feeds={}, unavailable=unavailable, stages=None,
                    flops={"fused_step": step_flops(config, arch, batch)}, info=info)
