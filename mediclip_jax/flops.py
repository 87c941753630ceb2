"""Analytic model FLOPs of the MediCLIP train step.

Counts matmul-class work only (linear layers, convolutions, attention QK^T and PV), with a
multiply-add counted as 2 FLOPs (the MaxText convention; scenic halves). A convolution counts
only the kernel taps that land on the input, not on its zero padding (as XLA counts them).
Normalisations, activations, softmax and synthesis arithmetic are left out, so XLA's
`cost_analysis()` of a program is at or slightly above the count (tests/test_benchmark.py
bounds the gap per component). What the step computes:

- vision tower forward on B images, blocks 1..max(tap) (later blocks and the pooled head are
  dead code under jit; the taps are stop-gradient, so there is no vision backward);
- text tower forward on the prompt sequences (21 x 77 tokens for MediCLIP) and its backward to
  the learnable contexts: activation gradients only (frozen weights), i.e. 1x the forward for
  linear layers and 2x for the two attention matmuls (both operands are activations);
- adapters forward and backward (weight gradients only: their inputs are stop-gradient);
- head: cosine similarities with the text features and the align-corners upsampling of the
  2-channel map, forward and backward;
- VAE (latent tasks only): encode B images and decode 2B latents (anomalous + round trip).
"""
from __future__ import annotations

from collections.abc import Sequence

MAC = 2  # FLOPs per multiply-add


def transformer_block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> dict[str, float]:
  """Forward FLOPs of one pre-LN block on one sequence: {"linear", "attention"} (QKV, out, MLP; QK^T, PV)."""
  hidden = int(width * mlp_ratio)
  linear = MAC * tokens * (4 * width * width + 2 * width * hidden)
  attention = MAC * 2 * tokens * tokens * width
  return {"linear": float(linear), "attention": float(attention)}


def vision_forward_flops(image_size: int, patch_size: int, width: int, layers_run: int,
                         mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs per image: patch embedding plus `layers_run` blocks on 1 + grid² tokens."""
  grid = image_size // patch_size
  tokens = 1 + grid * grid
  block = transformer_block_flops(tokens, width, mlp_ratio)
  patch = MAC * grid * grid * 3 * patch_size * patch_size * width
  return float(patch + layers_run * (block["linear"] + block["attention"]))


def text_flops(n_seq: int, seq_len: int, width: int, layers: int, embed_dim: int,
               mlp_ratio: float = 4.0) -> dict[str, float]:
  """Prompt path: forward, and the activation-only backward to the input embeddings."""
  block = transformer_block_flops(seq_len, width, mlp_ratio)
  proj = MAC * n_seq * width * embed_dim  # projection at the EOT token
  fwd = n_seq * layers * (block["linear"] + block["attention"]) + proj
  bwd = n_seq * layers * (block["linear"] + 2 * block["attention"]) + proj
  return {"forward": float(fwd), "backward": float(bwd)}


def adapter_flops(batch: int, grid: int, n_taps: int, in_dim: int, out_dim: int) -> dict[str, float]:
  """Per-tap linear maps on the patch tokens (CLS dropped); backward = weight gradients only."""
  fwd = MAC * batch * grid * grid * n_taps * in_dim * out_dim
  return {"forward": float(fwd), "backward": float(fwd)}


def head_flops(batch: int, grid: int, image_size: int, n_taps: int, embed_dim: int, n_classes: int = 2) -> float:
  """Similarities (forward + gradients to both operands) and the separable upsampling (forward + backward)."""
  sims = MAC * batch * n_taps * grid * grid * embed_dim * n_classes
  upsample = MAC * batch * n_classes * image_size * grid * (grid + image_size)
  return float(3 * sims + 2 * upsample)


def _taps_1d(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
  """Kernel taps, summed over the outputs of one spatial axis, that land inside the input (not on padding)."""
  lo, hi = pad
  n_out = (size + lo + hi - k) // stride + 1
  total = 0
  for t in range(k):  # output o reads input o*stride - lo + t; count the o for which that index is valid
    first = max(0, -(-(lo - t) // stride))
    last = min(n_out - 1, (size - 1 + lo - t) // stride)
    total += max(0, last - first + 1)
  return total


def conv_flops(res: int, k: int, cin: int, cout: int, stride: int = 1, pad: tuple[int, int] | None = None) -> float:
  """A k×k convolution on a res×res input (symmetric k//2 zero padding unless `pad` is given)."""
  taps = _taps_1d(res, k, stride, pad if pad is not None else (k // 2, k // 2))
  return float(MAC * taps * taps * cin * cout)


def _resnet(res: int, cin: int, cout: int) -> float:
  f = conv_flops(res, 3, cin, cout) + conv_flops(res, 3, cout, cout)
  return f + (conv_flops(res, 1, cin, cout) if cin != cout else 0.0)


def _spatial_attention(res: int, c: int) -> float:
  n = res * res
  return float(MAC * (4 * n * c * c + 2 * n * n * c))


def autoencoder_kl_flops(image_size: int, block_out_channels: Sequence[int], layers_per_block: int = 2,
                         latent_channels: int = 4, in_channels: int = 3, out_channels: int = 3,
                         mid_attention: bool = True, quant_conv: bool = True,
                         post_quant_conv: bool = True) -> dict[str, float]:
  """Encode and decode FLOPs per image of the diffusers AutoencoderKL (SD kl-f8 at 224²: 205 / 469 GFLOP).

  Downsampling is the stride-2 3×3 convolution with (0, 1) padding, upsampling nearest ×2 then
  a 3×3 convolution, as in diffusers.
  """
  boc = [int(c) for c in block_out_channels]
  n = len(boc)
  s = image_size
  enc = conv_flops(s, 3, in_channels, boc[0])
  cin, res = boc[0], s
  for i, c in enumerate(boc):
    for j in range(layers_per_block):
      enc += _resnet(res, cin if j == 0 else c, c)
    cin = c
    if i < n - 1:
      enc += conv_flops(res, 3, c, c, stride=2, pad=(0, 1))
      res //= 2
  mid = 2 * _resnet(res, boc[-1], boc[-1]) + (_spatial_attention(res, boc[-1]) if mid_attention else 0.0)
  enc += mid + conv_flops(res, 3, boc[-1], 2 * latent_channels)
  if quant_conv:
    enc += conv_flops(res, 1, 2 * latent_channels, 2 * latent_channels)
  dec = conv_flops(res, 1, latent_channels, latent_channels) if post_quant_conv else 0.0
  rev = boc[::-1]
  dec += conv_flops(res, 3, latent_channels, rev[0]) + mid
  cin = rev[0]
  for i, c in enumerate(rev):
    for j in range(layers_per_block + 1):
      dec += _resnet(res, cin if j == 0 else c, c)
    cin = c
    if i < n - 1:
      res *= 2
      dec += conv_flops(res, 3, c, c)
  dec += conv_flops(res, 3, boc[0], out_channels)
  return {"encode": enc, "decode": dec}


def taef2_flops(image_size: int, channels: int = 64, latent_channels: int = 32) -> dict[str, float]:
  """Encode and decode FLOPs per image of TAEF2 (convolutions; 23.3 / 27.0 GFLOP at 224²).

  Every 3×3 convolution pads 1 on both sides, the stride-2 ones included.
  """
  c, s = channels, image_size

  def block(res: int, gn: bool) -> float:
    return 3 * conv_flops(res, 3, c, c) + (conv_flops(res, 1, c, 4 * c) + conv_flops(res, 1, 4 * c, c) if gn else 0.0)

  enc = conv_flops(s, 3, 3, c) + block(s, False)
  res = s
  for stage in range(3):
    enc += conv_flops(res, 3, c, c, stride=2)
    res //= 2
    enc += 3 * block(res, stage == 2)
  enc += conv_flops(res, 3, c, latent_channels)
  dec = conv_flops(res, 3, latent_channels, c) + 3 * block(res, True)
  for stage in range(3):
    res *= 2
    dec += conv_flops(res, 3, c, c) + (3 * block(res, False) if stage < 2 else block(res, False))
  dec += conv_flops(res, 3, c, 3)
  return {"encode": enc, "decode": dec}


def step_flops(*, batch: int, image_size: int, patch_size: int, vision_width: int, tap_layers: Sequence[int],
               text_width: int, text_layers: int, embed_dim: int, n_prompts: int, context_length: int,
               mlp_ratio: float = 4.0, vae: dict[str, float] | None = None) -> dict[str, float]:
  """Analytic FLOPs of one train step on the global batch, by component, with their sum in "total".

  `vae` is the per-image {"encode", "decode"} cost when latent tasks run in the step (encode B,
  decode 2B), else None.
  """
  grid = image_size // patch_size
  taps = tuple(int(t) for t in tap_layers)
  out = {"vision_forward": batch * vision_forward_flops(image_size, patch_size, vision_width, max(taps), mlp_ratio)}
  text = text_flops(n_prompts, context_length, text_width, text_layers, embed_dim, mlp_ratio)
  out["text_forward"], out["text_backward"] = text["forward"], text["backward"]
  ad = adapter_flops(batch, grid, len(taps), vision_width, embed_dim)
  out["adapters_forward"], out["adapters_backward"] = ad["forward"], ad["backward"]
  out["head"] = head_flops(batch, grid, image_size, len(taps), embed_dim)
  out["vae_encode"] = float(batch * vae["encode"]) if vae else 0.0
  out["vae_decode"] = float(2 * batch * vae["decode"]) if vae else 0.0
  out["total"] = float(sum(out.values()))
  return out
