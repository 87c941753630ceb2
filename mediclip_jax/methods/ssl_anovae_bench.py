"""SSL-AnoVAE's benchmark hook: analytic FLOPs of the fused train step for launch/benchmark.py's MFU.

`bench_parts(config, mesh, trainable)` is registered in `mediclip_jax.methods.BENCH_PARTS`. It gives only
what the fused mode needs: the analytic model FLOPs and the facts the result JSON records. There is no
anomaly synthesis to move off the device (the step gathers device-resident training images by index and
draws its two views on the device), so the host and synthetic modes do not apply, and there is no stage
breakdown.

FLOPs follow `mediclip_jax.flops`: matmul and convolution work only, a multiply-add = 2 FLOPs, a convolution
counts only the kernel taps that land on its input. One step, mirroring `ssl_anovae.make_train_step`:

- generator (trained): forward, weight gradients (1x forward) and input gradients (1x forward), less the
  first layer's input gradients where the input carries no gradient (x, the views): image encoder E_I on x,
  backbone E_S on x with its Gaussian head, the decoder (its input z carries one); with the BYOL term,
  backbone, projector and predictor on the two views (online);
- EMA target: backbone + projector on the two views, forward only;
- discriminator, with the adversarial term: on x_hat for the generator's loss (forward + input gradients,
  its weights get none there), and on x and on x_hat for its own update (forward + weight gradients +
  input gradients below the first layer).

Left out: normalisations, activations, pooling, losses, Adam and the EMA (elementwise), the views'
separable Gaussian blur (augmentation, not model: `views_blur_flops`), and the spectral norm's power
iteration (a few matrix-vector products of the kernels per step, independent of the batch: < 0.01 %).
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
from jax.sharding import Mesh

from mediclip_jax import flops
from mediclip_jax.methods.base import Trainable
from mediclip_jax.methods.bench import BenchParts
from mediclip_jax.synthesis import ssl_views

MAC = flops.MAC
_conv = flops.conv_flops
NOT_APPLICABLE = ("SSL-AnoVAE has no anomaly synthesis to feed from elsewhere: its fused step already reads "
                  "device-resident training images by index and draws the views on the device")


@dataclasses.dataclass(frozen=True)
class NetFlops:
  """Forward FLOPs per image of one network: all its layers, and its first layer alone."""
  forward: float
  first: float

  def trained(self, input_has_grad: bool) -> float:
    """Forward + weight gradients + input gradients (the first layer's only when its input carries a gradient)."""
    return 3 * self.forward - (0.0 if input_has_grad else self.first)


def _out(res: int, k: int, stride: int, pad: int) -> int:
  return (res + 2 * pad - k) // stride + 1


def _linear(din: int, dout: int) -> float:
  return float(MAC * din * dout)


def image_encoder_flops(m: ml_collections.ConfigDict) -> NetFlops:
  """E_I: stride-2 4x4 convs (padding 1), then the Gaussian head (mu and logvar) on the flattened map."""
  res, cin, layers = int(m.image_size), int(m.channels), []
  for w in m.encoder_widths:
    layers.append(_conv(res, 4, cin, w, stride=2, pad=(1, 1)))
    res, cin = _out(res, 4, 2, 1), w
  layers.append(2 * _linear(res * res * cin, int(m.latent_image)))
  return NetFlops(float(sum(layers)), layers[0])


def backbone_flops(m: ml_collections.ConfigDict) -> NetFlops:
  """E_S: the 7x7/2 stem, the 3x3/2 max pool (no FLOPs), basic blocks (two 3x3 convs, a 1x1 shortcut where the
  shape changes); the global average pool has no FLOPs."""
  res, w0 = int(m.image_size), int(m.resnet_widths[0])
  stem = _conv(res, 7, int(m.channels), w0, stride=2, pad=(3, 3))
  res = _out(_out(res, 7, 2, 3), 3, 2, 1)
  total, cin = stem, w0
  for i, (w, n) in enumerate(zip(m.resnet_widths, m.resnet_blocks)):
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      total += _conv(res, 3, cin, w, stride=stride, pad=(1, 1))
      if stride != 1 or cin != w:
        total += _conv(res, 1, cin, w, stride=stride, pad=(0, 0))
      res = _out(res, 3, stride, 1)
      total += _conv(res, 3, w, w)
      cin = w
  return NetFlops(float(total), stem)


def mlp_flops(din: int, hidden: int, dout: int) -> NetFlops:
  """BYOL projector / predictor: Linear, LayerNorm, ReLU, Linear."""
  first = _linear(din, hidden)
  return NetFlops(first + _linear(hidden, dout), first)


def decoder_flops(m: ml_collections.ConfigDict, zdim: int) -> NetFlops:
  """Linear z -> (S/2^n)^2 x widths[0] map, per width nearest x2 + 3x3 conv, then a 3x3 conv to the channels."""
  widths = [int(w) for w in m.decoder_widths]
  res = int(m.image_size) // 2 ** len(widths)
  first = _linear(zdim, res * res * widths[0])
  total, cin = first, widths[0]
  for w in widths:
    res *= 2
    total += _conv(res, 3, cin, w)
    cin = w
  total += _conv(res, 3, cin, int(m.channels))
  return NetFlops(float(total), first)


def discriminator_flops(m: ml_collections.ConfigDict) -> NetFlops:
  """PatchGAN: 4x4 convs (padding 1) of `disc_widths` with strides 2, ..., 2, 1, then a 4x4 conv to 1 channel."""
  widths = [int(w) for w in m.disc_widths]
  res, cin, layers = int(m.image_size), int(m.channels), []
  for i, w in enumerate(widths + [1]):
    stride = 2 if i < len(widths) - 1 else 1
    layers.append(_conv(res, 4, cin, w, stride=stride, pad=(1, 1)))
    res, cin = _out(res, 4, stride, 1), w
  return NetFlops(float(sum(layers)), layers[0])


def views_blur_flops(config: ml_collections.ConfigDict) -> float:
  """Per image: the two views' separable Gaussian blur, two (n, n) matrix products per view (augmentation work;
  not in the model count). 0 when the views do not blur."""
  p = ssl_views.resolve(config.ssl.views)
  if not (p.blur_p > 0 and ssl_views.blur_radius(p.blur_sigma) > 0):
    return 0.0
  s, c = int(config.model.image_size), int(config.model.channels)
  return float(2 * 2 * MAC * s * s * s * c)


def step_flops(config: ml_collections.ConfigDict, batch: int) -> dict[str, float]:
  """Analytic FLOPs of one SSL-AnoVAE train step on a global batch, by component, with their sum in "total".

  Which parts run follows `make_train_step`: E_I with z_I (`model.latents` "both" or "image"), E_S on x with z_S
  ("both" or "ssl"), the BYOL branch when z_S exists and `loss.ssl` > 0, the discriminator when `loss.adv` > 0.
  """
  m, lw = config.model, config.loss
  latent_i = int(m.latent_image) if m.latents in ("both", "image") else 0
  latent_s = int(m.latent_ssl) if m.latents in ("both", "ssl") else 0
  use_ssl = m.latents != "image" and lw.ssl > 0
  use_adv = lw.adv > 0
  feat, hidden, out = int(m.resnet_widths[-1]), int(m.projector_hidden), int(m.projector_out)
  bb = backbone_flops(m)
  proj, pred = mlp_flops(feat, hidden, out), mlp_flops(out, hidden, out)
  disc = discriminator_flops(m)
  head_s = NetFlops(2 * _linear(feat, latent_s), 2 * _linear(feat, latent_s))
  f = {
      "image_encoder": batch * image_encoder_flops(m).trained(False) if latent_i else 0.0,
      "backbone_x": batch * (bb.trained(False) + head_s.trained(True)) if latent_s else 0.0,
      "decoder": batch * decoder_flops(m, latent_i + latent_s).trained(True),
      "byol_online": 2 * batch * (bb.trained(False) + proj.trained(True) + pred.trained(True)) if use_ssl else 0.0,
      "byol_target": 2 * batch * (bb.forward + proj.forward) if use_ssl else 0.0,
      # the generator's adversarial term: forward + input gradients, no weight gradients
      "disc_generator": batch * 2 * disc.forward if use_adv else 0.0,
      "disc_update": 2 * batch * disc.trained(False) if use_adv else 0.0,  # real x and stop-gradient x_hat
  }
  f["total"] = float(sum(f.values()))
  return f


def bench_parts(config: ml_collections.ConfigDict, mesh: Mesh, trainable: Trainable) -> BenchParts:
  """SSL-AnoVAE's benchmark parts: fused-step FLOPs and the JSON facts; no fed step, feeds or stages."""
  del mesh
  batch = int(config.train.batch_size)
  m = config.model
  params = trainable.info.get("backbone", {}).get("parameters")
  info = {
      "step_program": "one jitted data-parallel step (methods.ssl_anovae.make_train_step): views and VAE noise per "
                      "device under shard_map, generator and discriminator Adam updates, EMA target, over a 1-D "
                      "'data' mesh",
      "dtype_policy": {"params": "float32", "compute": m.dtype,
                       "default_matmul_precision": jax.config.jax_default_matmul_precision,
                       "norms_heads_losses": "float32"},
      "model": {"architecture": "SSL-AnoVAE", "parameters": params, "image_size": int(m.image_size),
                "channels": int(m.channels), "latents": m.latents, "latent_image": int(m.latent_image),
                "latent_ssl": int(m.latent_ssl), "encoder_widths": list(m.encoder_widths),
                "resnet_widths": list(m.resnet_widths), "resnet_blocks": list(m.resnet_blocks),
                "projector_hidden": int(m.projector_hidden), "projector_out": int(m.projector_out),
                "decoder_widths": list(m.decoder_widths), "disc_widths": list(m.disc_widths),
                "loss": {k: float(config.loss[k]) for k in ("ssl", "adv")}, "gan": config.loss.gan,
                "ssl_mode": config.train.ssl_mode},
      "synthesis": {"anomaly_synthesis": None, "ssl_views": config.ssl.views.preset,
                    "views_blur_flops_per_image": views_blur_flops(config),
                    "note": "two augmented views per image on the device; their blur is not in the model FLOPs"},
  }
  unavailable = {mode: NOT_APPLICABLE for mode in ("host", "synthetic")}
  return BenchParts(fed_step=None, feeds={}, unavailable=unavailable, stages=None,
                    flops={"fused_step": step_flops(config, batch)}, info=info)
