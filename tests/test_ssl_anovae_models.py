"""SSL-AnoVAE networks: shapes per channels/latents, float32 heads under bf16 compute, spectral normalisation
against np.linalg.svd, the split/merge plumbing of the BYOL EMA target, config validation, clamped GroupNorm."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mediclip_jax.models import ssl_anovae as S

B = 2


def _tiny(**kw):
  c = S.default_config()
  c.image_size = 32
  c.encoder_widths = (8, 16)
  c.decoder_widths = (16, 8)
  c.resnet_widths = (8, 16)
  c.resnet_blocks = (1, 1)
  c.latent_image = 8
  c.latent_ssl = 6
  c.projector_hidden = 32
  c.projector_out = 16
  c.disc_widths = (8, 16)
  c.groups = 4
  for k, v in kw.items():
    c[k] = v
  return c


def _rngs(seed: int) -> nnx.Rngs:
  """unsafe_rbg keys: their initialisers compile several times faster on CPU than threefry's."""
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _images(channels: int, size: int = 32, seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (B, size, size, channels), jnp.float32)


@pytest.mark.parametrize("channels,latents", [(1, "both"), (3, "both"), (1, "image"), (3, "ssl")])
def test_shapes_per_channels_and_latents(channels, latents):
  cfg = _tiny(channels=channels, latents=latents)
  m = S.SSLAnoVAE(cfg, rngs=_rngs(0))
  d = S.PatchDiscriminator(cfg, rngs=_rngs(1))
  # A scaled-up last conv drives the pre-sigmoid output far outside [0, 1]: only a sigmoid keeps it in range.
  m.decoder.out.kernel[...] = 1000.0 * m.decoder.out.kernel[...]
  x = _images(channels)

  @nnx.jit
  def run(m, d, x):
    mu_i, lv_i, mu_s, lv_s = m.encode(x)
    y = m.features(x)
    p = m.project(y)
    return (mu_i, lv_i, mu_s, lv_s), m.decode(m.join(mu_i, mu_s)), m.reconstruct(x), y, p, m.predict(p), d(x, False)

  (mu_i, lv_i, mu_s, lv_s), x_hat, rec, y, p, q, logits = run(m, d, x)
  n_i = 8 if latents != "ssl" else 0
  n_s = 6 if latents != "image" else 0
  assert mu_i.shape == lv_i.shape == (B, n_i) and mu_s.shape == lv_s.shape == (B, n_s)
  assert all(a.dtype == jnp.float32 for a in (mu_i, lv_i, mu_s, lv_s, x_hat, y, p, q, logits))
  assert (m.image_encoder is None) == (latents == "ssl") and (m.ssl_head is None) == (latents == "image")
  assert m.decoder.fc.in_features == n_i + n_s
  assert x_hat.shape == x.shape
  assert float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0
  assert float(x_hat.min()) < 0.05 and float(x_hat.max()) > 0.95
  np.testing.assert_array_equal(np.asarray(rec), np.asarray(x_hat))
  assert y.shape == (B, 16) and p.shape == (B, 16) and q.shape == (B, 16)
  # 32 -> 16 (stride 2) -> 15 (stride 1) -> 14 (the 1-channel conv)
  assert logits.shape == (B, 14, 14, 1) == (B, S.disc_output_size(32, 2), S.disc_output_size(32, 2), 1)


def test_bfloat16_compute_keeps_float32_params_and_heads():
  x = _images(1)
  m32 = S.SSLAnoVAE(_tiny(), rngs=_rngs(0))
  m16 = S.SSLAnoVAE(_tiny(dtype="bfloat16"), rngs=_rngs(0))
  d16 = S.PatchDiscriminator(_tiny(dtype="bfloat16"), rngs=_rngs(0))
  for mod in (m16, d16):
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(mod))}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes

  @nnx.jit
  def run(m, d, x):
    return m.encode(x), m.reconstruct(x), m.project(m.features(x)), d(x, False)

  (out16, rec16, p16, logits16), (out32, *_) = run(m16, d16, x), run(m32, d16, x)
  for a, b in zip(out16, out32):
    assert a.dtype == jnp.float32
    # bf16 compute is really used (not identical) and stays close to float32 (same initial params).
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1, rtol=0.1)
  assert rec16.dtype == p16.dtype == logits16.dtype == jnp.float32


def _spectral_layers(d: S.PatchDiscriminator) -> list[S.SpectralConv]:
  return list(d.convs) + [d.out]


def test_spectral_norm_power_iteration_matches_svd():
  d = S.PatchDiscriminator(_tiny(channels=3, disc_widths=(8, 16, 16)), rngs=_rngs(3))
  graphdef, params, spectral = nnx.split(d, nnx.Param, S.SPECTRAL_STATE)
  x = _images(3)

  @jax.jit
  def iterate(params, spectral, n):
    def body(_, s):
      disc = nnx.merge(graphdef, params, s)
      disc(x, update_stats=True)
      return nnx.state(disc, S.SPECTRAL_STATE)
    return jax.lax.fori_loop(0, n, body, spectral)

  spectral_1 = iterate(params, spectral, 1)
  spectral_n = iterate(params, spectral, 300)
  # The params are never written by forward passes, only the power-iteration state.
  _, params_after, _ = nnx.split(nnx.merge(graphdef, params, spectral_n), nnx.Param, S.SPECTRAL_STATE)
  jax.tree.map(np.testing.assert_array_equal, params, params_after)
  d_n = nnx.merge(graphdef, params, spectral_n)
  d_1 = nnx.merge(graphdef, params, spectral_1)
  for layer, layer_1 in zip(_spectral_layers(d_n), _spectral_layers(d_1)):
    k = np.asarray(layer.kernel[...])
    true_sigma = np.linalg.svd(k.reshape(-1, k.shape[-1]), compute_uv=False)[0]
    np.testing.assert_allclose(float(layer.sigma[...]), true_sigma, rtol=1e-3)
    kn = np.asarray(layer.normalized_kernel(update_stats=False))
    np.testing.assert_allclose(np.linalg.svd(kn.reshape(-1, kn.shape[-1]), compute_uv=False)[0], 1.0, rtol=1e-3)
    assert float(layer_1.sigma[...]) != float(layer.sigma[...]) or k.shape[-1] == 1
  # update_stats=False reads the state but leaves it exactly as it was.
  before = jax.tree.map(np.asarray, nnx.state(d_1, S.SPECTRAL_STATE))
  d_1(x, update_stats=False)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(d_1, S.SPECTRAL_STATE)))
  d_1(x, update_stats=True)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, nnx.state(d_1, S.SPECTRAL_STATE))
  assert any(jax.tree.leaves(changed))


def test_spectral_state_is_all_non_param_state_and_gradients_flow():
  d = S.PatchDiscriminator(_tiny(), rngs=_rngs(0))
  graphdef, params, spectral = nnx.split(d, nnx.Param, S.SPECTRAL_STATE)  # raises if a third kind existed
  assert len(jax.tree.leaves(spectral)) == 2 * len(_spectral_layers(d))
  assert S.count_params(d) == sum(int(p.size) for p in jax.tree.leaves(params))
  x = _images(1)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p, spectral)(x, update_stats=False))

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))


def test_ema_target_split_merge_of_backbone_and_projector():
  m = S.SSLAnoVAE(_tiny(), rngs=_rngs(0))
  gd_b, p_b = nnx.split(m.backbone)
  gd_g, p_g = nnx.split(m.projector)
  # Nothing but Params: the target is exactly the params pytree.
  assert not jax.tree.leaves(nnx.state(m.backbone, nnx.Not(nnx.Param)))
  assert not jax.tree.leaves(nnx.state(m.projector, nnx.Not(nnx.Param)))
  x = _images(1)

  @jax.jit
  def target(tb, tg, x):
    return nnx.merge(gd_g, tg)(nnx.merge(gd_b, tb)(x))

  online = np.asarray(m.project(m.features(x)))
  np.testing.assert_allclose(np.asarray(target(p_b, p_g, x)), online, rtol=1e-5, atol=1e-6)
  # Eager and with the same ops: merging the split params reproduces the online branch bit for bit.
  np.testing.assert_array_equal(np.asarray(nnx.merge(gd_g, p_g)(nnx.merge(gd_b, p_b)(x))), online)
  tb = jax.tree.map(lambda a: a + 0.05 * jnp.ones_like(a), p_b)
  tg = jax.tree.map(lambda a: 0.99 * a, p_g)  # an EMA-style update is a tree map over the same structure
  moved = np.asarray(target(tb, tg, x))
  assert np.abs(moved - online).max() > 1e-4
  # The same from the whole model's params: its "backbone"/"projector" subtrees fit the submodules' graphdefs.
  _, params = nnx.split(m, nnx.Param)
  np.testing.assert_array_equal(np.asarray(target(params["backbone"], params["projector"], x)),
                                np.asarray(target(p_b, p_g, x)))
  # The online model is untouched by the target's params.
  np.testing.assert_array_equal(np.asarray(m.project(m.features(x))), online)


@pytest.mark.parametrize("field,value", [
    ("image_size", 34), ("channels", 2), ("latents", "pixels"), ("dtype", "float16"),
    ("resnet_blocks", (1,)), ("encoder_widths", (8, 0)), ("groups", 0), ("disc_widths", (8, 8, 8, 8, 8, 8))])
def test_validate_config_names_the_field(field, value):
  S.validate_config(_tiny())
  S.validate_config(S.default_config())
  cfg = _tiny(**{field: value})
  with pytest.raises(ValueError, match=re.escape(f"config.model.{field}")):
    S.validate_config(cfg)
  with pytest.raises(ValueError, match=re.escape(f"config.model.{field}")):
    S.SSLAnoVAE(cfg, rngs=_rngs(0))


def test_image_size_must_divide_the_decoder_downsampling():
  with pytest.raises(ValueError, match=re.escape("config.model.decoder_widths")):
    S.validate_config(_tiny(image_size=36, encoder_widths=(8, 16), decoder_widths=(16, 8, 8)))


def test_groupnorm_groups_clamped_for_widths_not_divisible():
  cfg = _tiny(groups=32, encoder_widths=(24, 12), decoder_widths=(12, 6), resnet_widths=(12, 20))
  m = nnx.eval_shape(lambda: S.SSLAnoVAE(cfg, rngs=_rngs(0)))  # structure only: no initialiser compiles
  assert m.image_encoder.norms[0].num_groups == 8 and m.image_encoder.norms[1].num_groups == 4
  assert m.backbone.blocks[-1].norm1.num_groups == 4 and m.decoder.norms[-1].num_groups == 2
  graphdef, state = nnx.split(m)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).reconstruct(x), state, _images(1))
  assert out.shape == (B, 32, 32, 1)
  # Each of the gcd(32, 24) = 8 groups of 3 channels is normalised on its own.
  gn = S._gn(24, 32, rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (B, 5, 5, 24)) + jnp.arange(24.0) ** 1.5
  out = np.asarray(gn(h)).reshape(B, 25, 8, 3)
  np.testing.assert_allclose(out.mean(axis=(1, 3)), 0.0, atol=1e-4)
  np.testing.assert_allclose(out.var(axis=(1, 3)), 1.0, rtol=1e-2)


def test_count_params():
  head = S.GaussianHead(10, 3, rngs=_rngs(0))
  assert S.count_params(head) == 2 * (10 * 3 + 3)
  m = S.SSLAnoVAE(_tiny(), rngs=_rngs(0))
  parts = ("image_encoder", "backbone", "ssl_head", "projector", "predictor", "decoder")
  assert S.count_params(m) == sum(S.count_params(getattr(m, p)) for p in parts)
