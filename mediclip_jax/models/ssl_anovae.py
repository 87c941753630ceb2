"""The networks of SSL-AnoVAE (a VAE whose decoder also sees a self-supervised latent), in Flax NNX, NHWC.

- `SSLAnoVAE`: image encoder E_I -> (mu_I, logvar_I); ResNet backbone E_S -> pooled feature y -> Gaussian
  head -> (mu_S, logvar_S); decoder [z_I ; z_S] -> x_hat in [0, 1]; BYOL projector g and predictor q.
- `PatchDiscriminator`: a PatchGAN with spectral normalisation on every conv (our own `SpectralConv`).

GroupNorm/LayerNorm only, so nothing depends on batch statistics across devices. Parameters are float32; `dtype`
is the compute dtype; norm statistics, the Gaussian heads (mu, logvar), the pooled feature, the projector/
predictor outputs, the decoder's sigmoid and the discriminator's logits are float32.

The backbone and projector hold nothing but `nnx.Param`s, so the BYOL EMA target is their params pytree:
`gd_b, p_b = nnx.split(model.backbone)`, `gd_g, p_g = nnx.split(model.projector)`, and the target branch is
`nnx.merge(gd_g, tgt_g)(nnx.merge(gd_b, tgt_b)(x))`.

The discriminator's state is `nnx.Param`s (trained by the optimizer) and `SPECTRAL_STATE` variables (the
power-iteration vector `u` and the last `sigma`, written by forward passes with update_stats=True):
`graphdef, params, spectral = nnx.split(disc, nnx.Param, SPECTRAL_STATE)`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

LATENTS = ("both", "image", "ssl")
DTYPES = ("float32", "bfloat16")
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the heads' log-variance, so exp(logvar) stays finite
_LEAK = 0.2


def default_config() -> ml_collections.ConfigDict:
  """The `model` section of an SSL-AnoVAE run (every field is read by this module)."""
  c = ml_collections.ConfigDict()
  c.image_size = 256
  c.channels = 1                                   # 1 (grey) or 3
  c.encoder_widths = (32, 64, 128, 256, 512)       # stride-2 4x4 conv stages of E_I
  c.latent_image = 128                             # size of z_I
  c.resnet_widths = (64, 128, 256, 512)            # ResNet-18-style backbone E_S: stage widths
  c.resnet_blocks = (2, 2, 2, 2)                   # basic blocks per stage
  c.latent_ssl = 128                               # size of z_S
  c.projector_hidden = 4096                        # BYOL projector/predictor MLP hidden width
  c.projector_out = 256                            # BYOL projection size
  c.decoder_widths = (512, 256, 128, 64, 32)       # nearest-x2 + 3x3 conv stages of the decoder
  c.disc_widths = (64, 128, 256, 512)              # PatchGAN 4x4 convs, strides 2, ..., 2, 1
  c.groups = 32                                    # GroupNorm groups, clamped to gcd(groups, width)
  c.dtype = "float32"                              # compute dtype: "float32" | "bfloat16"
  c.latents = "both"                               # what the decoder sees: "both" | "image" | "ssl"
  return c


def _widths(cfg, field: str) -> tuple[int, ...]:
  ws = getattr(cfg, field)
  if isinstance(ws, (int, str)) or not ws or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                                                 for w in ws):
    raise ValueError(f"config.model.{field}: expected a non-empty sequence of positive ints, got {ws!r}")
  return tuple(int(w) for w in ws)


def _positive(cfg, field: str) -> int:
  v = getattr(cfg, field)
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ValueError(f"config.model.{field}: expected a positive int, got {v!r}")
  return int(v)


def disc_output_size(image_size: int, n_widths: int) -> int:
  """Side of the PatchGAN logit map: 4x4 convs with padding 1, strides 2 (n_widths - 1 times), 1, then 1."""
  h = image_size
  for s in [2] * (n_widths - 1) + [1, 1]:
    h = (h + 2 - 4) // s + 1
  return h


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `config.model.<field>` for a config the networks cannot be built from."""
  size = _positive(cfg, "image_size")
  if cfg.channels not in (1, 3):
    raise ValueError(f"config.model.channels: expected 1 or 3, got {cfg.channels!r}")
  for f in ("latent_image", "latent_ssl", "projector_hidden", "projector_out", "groups"):
    _positive(cfg, f)
  for f in ("encoder_widths", "decoder_widths"):
    n = len(_widths(cfg, f))
    if size % 2 ** n:
      raise ValueError(f"config.model.image_size={size} must be divisible by 2**len(config.model.{f}) = {2 ** n}")
  rw, rb = _widths(cfg, "resnet_widths"), _widths(cfg, "resnet_blocks")
  if len(rw) != len(rb):
    raise ValueError(f"config.model.resnet_blocks {rb}: needs one entry per config.model.resnet_widths {rw}")
  dw = _widths(cfg, "disc_widths")
  if disc_output_size(size, len(dw)) < 1:
    raise ValueError(f"config.model.disc_widths: {len(dw)} stages leave no PatchGAN output for "
                     f"config.model.image_size={size}")
  if cfg.latents not in LATENTS:
    raise ValueError(f"config.model.latents: expected one of {LATENTS}, got {cfg.latents!r}")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype: expected one of {DTYPES}, got {cfg.dtype!r}")


def count_params(module: nnx.Module) -> int:
  """Number of scalar `nnx.Param` entries (spectral-norm power-iteration state excluded)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------

def _conv(cin: int, cout: int, k: int, *, stride: int = 1, pad: int, bias: bool = True, dtype,
          rngs: nnx.Rngs) -> nnx.Conv:
  """A k x k conv with explicit symmetric padding `pad` (never 'SAME'), float32 params."""
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=bias,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _gn(channels: int, groups: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm in float32 with gcd(groups, channels) groups, so any width works."""
  return nnx.GroupNorm(channels, math.gcd(groups, channels), epsilon=1e-5, dtype=jnp.float32,
                       param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def _norm(norm: nnx.Module, x: jax.Array, dtype) -> jax.Array:
  return norm(x.astype(jnp.float32)).astype(dtype)


def _lrelu(x: jax.Array) -> jax.Array:
  return nnx.leaky_relu(x, _LEAK)


def _upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of an NHWC tensor."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class GaussianHead(nnx.Module):
  """Two Linear heads feature -> (mu, logvar), computed in float32; logvar clamped to LOGVAR_RANGE."""

  def __init__(self, din: int, latent: int, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.mu = nnx.Linear(din, latent, **kw)
    self.logvar = nnx.Linear(din, latent, **kw)

  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = h.astype(jnp.float32)
    return self.mu(h), jnp.clip(self.logvar(h), *LOGVAR_RANGE)


class ImageEncoder(nnx.Module):
  """E_I: stride-2 4x4 conv, GroupNorm, LeakyReLU per width; the (S/2^n)^2 x C map flattened into a GaussianHead."""

  def __init__(self, channels: int, widths: Sequence[int], image_size: int, latent: int, groups: int, *, dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    convs, norms, cin = [], [], channels
    for w in widths:
      convs.append(_conv(cin, w, 4, stride=2, pad=1, dtype=dtype, rngs=rngs))
      norms.append(_gn(w, groups, rngs=rngs))
      cin = w
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    grid = image_size // 2 ** len(widths)
    self.head = GaussianHead(grid * grid * cin, latent, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x.astype(self.dtype)
    for conv, norm in zip(self.convs, self.norms):
      h = _lrelu(_norm(norm, conv(h), self.dtype))
    return self.head(h.reshape(h.shape[0], -1))


class BasicBlock(nnx.Module):
  """ResNet basic block: conv3x3(stride)-GN-ReLU-conv3x3-GN plus a (1x1 conv-GN) shortcut when the shape changes."""

  def __init__(self, cin: int, cout: int, stride: int, groups: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(bias=False, dtype=dtype, rngs=rngs)
    self.dtype = dtype
    self.conv1 = _conv(cin, cout, 3, stride=stride, pad=1, **kw)
    self.norm1 = _gn(cout, groups, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, pad=1, **kw)
    self.norm2 = _gn(cout, groups, rngs=rngs)
    if stride != 1 or cin != cout:
      self.shortcut = _conv(cin, cout, 1, stride=stride, pad=0, **kw)
      self.shortcut_norm = _gn(cout, groups, rngs=rngs)
    else:
      self.shortcut, self.shortcut_norm = None, None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(_norm(self.norm1, self.conv1(x), self.dtype))
    h = _norm(self.norm2, self.conv2(h), self.dtype)
    if self.shortcut is not None:
      x = _norm(self.shortcut_norm, self.shortcut(x), self.dtype)
    return nnx.relu(x + h)


class ResNetBackbone(nnx.Module):
  """E_S: ResNet-18-style (7x7/2 stem conv, 3x3/2 max pool, basic blocks with GroupNorm, stride 2 between
  stages) -> global average pool -> float32 feature of the last width."""

  def __init__(self, channels: int, widths: Sequence[int], blocks: Sequence[int], groups: int, *, dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.stem = _conv(channels, widths[0], 7, stride=2, pad=3, bias=False, dtype=dtype, rngs=rngs)
    self.stem_norm = _gn(widths[0], groups, rngs=rngs)
    layers, cin = [], widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
      for j in range(n):
        layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1, groups, dtype=dtype, rngs=rngs))
        cin = w
    self.blocks = nnx.List(layers)
    self.out_features = cin

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(_norm(self.stem_norm, self.stem(x.astype(self.dtype)), self.dtype))
    # 3x3/2 max pool with padding 1, written as a -inf pad then a VALID pool (the same values): jax2onnx (0.17)
    # patches nnx.max_pool, keyword-only, and reads any padding other than "SAME" as "VALID" (16x16 -> 15x15).
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    h = nnx.max_pool(h, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    for b in self.blocks:
      h = b(h)
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))


class MLP(nnx.Module):
  """BYOL projector/predictor: Linear-LayerNorm-ReLU-Linear (no batch statistics); float32 output."""

  def __init__(self, din: int, hidden: int, dout: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dtype = dtype
    self.fc1 = nnx.Linear(din, hidden, **kw)
    self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                              use_fast_variance=False, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dout, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(_norm(self.norm, self.fc1(x.astype(self.dtype)), self.dtype))
    return self.fc2(h).astype(jnp.float32)


class Decoder(nnx.Module):
  """z -> Linear to a (S/2^n)^2 x widths[0] map -> per width: nearest x2, 3x3 conv, GroupNorm, LeakyReLU -> 3x3 conv
  to `channels` -> sigmoid (float32). Upsample-then-conv avoids checkerboard artefacts in residual maps."""

  def __init__(self, zdim: int, widths: Sequence[int], channels: int, image_size: int, groups: int, *, dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.grid = image_size // 2 ** len(widths)
    self.fc = nnx.Linear(zdim, self.grid * self.grid * widths[0], dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    convs, norms, cin = [], [], widths[0]
    for w in widths:
      convs.append(_conv(cin, w, 3, pad=1, dtype=dtype, rngs=rngs))
      norms.append(_gn(w, groups, rngs=rngs))
      cin = w
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.out = _conv(cin, channels, 3, pad=1, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = _lrelu(self.fc(z.astype(self.dtype)))
    h = h.reshape(h.shape[0], self.grid, self.grid, -1)
    for conv, norm in zip(self.convs, self.norms):
      h = _lrelu(_norm(norm, conv(_upsample2x(h)), self.dtype))
    return jax.nn.sigmoid(self.out(h).astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# SSL-AnoVAE
# ----------------------------------------------------------------------------------------

class SSLAnoVAE(nnx.Module):
  """Image VAE + self-supervised latent; x is (B, H, W, C) in [0, 1].

  `latents` decides which latents exist: "both" ([z_I ; z_S] to the decoder), "image" (plain VAE ablation:
  `ssl_head` is None and mu_S/logvar_S are (B, 0) arrays) or "ssl" (`image_encoder` is None and mu_I/logvar_I
  are (B, 0) arrays). A missing part costs nothing: its reparameterised sample and its KL summed over the
  latent axis are empty / zero (sum, never mean, over that axis), and `join` concatenates it away. The
  backbone, projector and predictor exist for every choice (the BYOL branch is independent of the decoder).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    dtype = jnp.dtype(cfg.dtype)
    groups, channels, size = int(cfg.groups), int(cfg.channels), int(cfg.image_size)
    self.dtype = dtype
    self.latents = str(cfg.latents)
    self.latent_image = int(cfg.latent_image) if self.latents != "ssl" else 0
    self.latent_ssl = int(cfg.latent_ssl) if self.latents != "image" else 0
    self.image_encoder = (ImageEncoder(channels, tuple(cfg.encoder_widths), size, self.latent_image, groups,
                                       dtype=dtype, rngs=rngs) if self.latent_image else None)
    self.backbone = ResNetBackbone(channels, tuple(cfg.resnet_widths), tuple(cfg.resnet_blocks), groups,
                                   dtype=dtype, rngs=rngs)
    feat = self.backbone.out_features
    self.ssl_head = GaussianHead(feat, self.latent_ssl, rngs=rngs) if self.latent_ssl else None
    hidden, out = int(cfg.projector_hidden), int(cfg.projector_out)
    self.projector = MLP(feat, hidden, out, dtype=dtype, rngs=rngs)
    self.predictor = MLP(out, hidden, out, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(self.latent_image + self.latent_ssl, tuple(cfg.decoder_widths), channels, size,
                           groups, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Backbone E_S: (B, H, W, C) -> pooled float32 feature y (B, resnet_widths[-1])."""
    return self.backbone(x)

  def project(self, y: jax.Array) -> jax.Array:
    """BYOL projector g(y) -> (B, projector_out) float32."""
    return self.projector(y)

  def predict(self, p: jax.Array) -> jax.Array:
    """BYOL predictor q(p) -> (B, projector_out) float32 (online branch only)."""
    return self.predictor(p)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(mu_I, logvar_I, mu_S, logvar_S), float32, (B, latent) each; a part `latents` leaves out is (B, 0)."""
    empty = jnp.zeros((x.shape[0], 0), jnp.float32)
    mu_i, logvar_i = self.image_encoder(x) if self.image_encoder is not None else (empty, empty)
    mu_s, logvar_s = self.ssl_head(self.features(x)) if self.ssl_head is not None else (empty, empty)
    return mu_i, logvar_i, mu_s, logvar_s

  def join(self, z_image: jax.Array, z_ssl: jax.Array) -> jax.Array:
    """The decoder input [z_I ; z_S] (either may be (B, 0))."""
    return jnp.concatenate([z_image, z_ssl], axis=-1)

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, latent_image + latent_ssl) -> x_hat (B, H, W, C) float32 in [0, 1]."""
    return self.decoder(z)

  def reconstruct(self, x: jax.Array) -> jax.Array:
    """Deterministic reconstruction from the posterior means (for anomaly scoring)."""
    mu_i, _, mu_s, _ = self.encode(x)
    return self.decode(self.join(mu_i, mu_s))


# ----------------------------------------------------------------------------------------
# PatchGAN discriminator with spectral normalisation
# ----------------------------------------------------------------------------------------

class SpectralState(nnx.Variable):
  """Spectral-norm power-iteration state (`u`, last `sigma`): written by forward passes, never by the optimizer."""


SPECTRAL_STATE = SpectralState  # the nnx filter the method splits the discriminator's power-iteration state on


def _l2n(v: jax.Array, eps: float) -> jax.Array:
  return v * jax.lax.rsqrt(jnp.sum(v * v) + eps)


class SpectralConv(nnx.Module):
  """A k x k conv whose kernel is divided by its largest singular value (Miyato et al. 2018).

  Our own wrapper rather than `nnx.SpectralNorm`, which writes the normalised kernel back into the Param (the
  optimizer would then step a different tensor than the forward used). The kernel viewed as a
  (k*k*cin, cout) matrix W; each forward does one power iteration from the stored `u` (float32, stop-gradient),
  sigma = v^T W u (differentiable in W, as in the paper). update_stats=True stores the new `u` and `sigma`;
  update_stats=False leaves them untouched (the same iteration runs, so the output is a pure function of state).
  """

  def __init__(self, cin: int, cout: int, k: int, *, stride: int, pad: int, dtype, rngs: nnx.Rngs,
               eps: float = 1e-12):
    self.dtype, self.stride, self.pad, self.eps = dtype, stride, pad, eps
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, cin, cout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.u = SpectralState(_l2n(jax.random.normal(rngs.params(), (cout,), jnp.float32), eps))
    self.sigma = SpectralState(jnp.ones((), jnp.float32))

  def normalized_kernel(self, update_stats: bool) -> jax.Array:
    """kernel / sigma after one power iteration (stored when update_stats)."""
    kernel = self.kernel[...]
    w = kernel.reshape(-1, kernel.shape[-1])
    v = jax.lax.stop_gradient(_l2n(w @ self.u[...], self.eps))
    u = jax.lax.stop_gradient(_l2n(w.T @ v, self.eps))
    sigma = v @ w @ u
    if update_stats:
      self.u[...] = u
      self.sigma[...] = jax.lax.stop_gradient(sigma)
    return kernel / jnp.where(sigma != 0, sigma, 1.0)

  def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
    kernel = self.normalized_kernel(update_stats).astype(self.dtype)
    p = self.pad
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (self.stride, self.stride), ((p, p), (p, p)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class PatchDiscriminator(nnx.Module):
  """PatchGAN: 4x4 spectral-norm convs of `disc_widths` (strides 2, ..., 2, 1, LeakyReLU 0.2), then a 4x4 conv to
  1 channel; no normalisation layers. x in [0, 1] (mapped to [-1, 1] inside) -> (B, h, w, 1) float32 logits,
  h = disc_output_size(image_size, len(disc_widths)) (30 for 256 px and four widths)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    dtype = jnp.dtype(cfg.dtype)
    widths = tuple(cfg.disc_widths)
    self.dtype = dtype
    convs, cin = [], int(cfg.channels)
    for i, w in enumerate(widths):
      convs.append(SpectralConv(cin, w, 4, stride=2 if i < len(widths) - 1 else 1, pad=1, dtype=dtype, rngs=rngs))
      cin = w
    self.convs = nnx.List(convs)
    self.out = SpectralConv(cin, 1, 4, stride=1, pad=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
    h = x.astype(jnp.float32) * 2.0 - 1.0
    for conv in self.convs:
      h = _lrelu(conv(h, update_stats))
    return self.out(h, update_stats).astype(jnp.float32)

  def update_power_iteration(self) -> None:
    """Stores one power-iteration step of every layer, as a forward with update_stats=True does, without data
    (the iteration depends on the kernels only): the training step calls it outside its gradient trace."""
    for conv in (*self.convs, self.out):
      conv.normalized_kernel(update_stats=True)
