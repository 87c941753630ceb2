"""SSL-AnoVAE's losses, EMA and scoring as pure functions, and its step built through the method interface."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mediclip_jax.methods import ssl_anovae as method


def test_closed_form_kl_equals_a_monte_carlo_estimate():
  rng = np.random.default_rng(0)
  mu = jnp.asarray(rng.normal(0, 0.7, (3, 5)), jnp.float32)
  logvar = jnp.asarray(rng.normal(0, 0.5, (3, 5)), jnp.float32)
  closed = float(method.kl_to_standard_normal(mu, logvar))
  n = 400_000
  eps = rng.standard_normal((n, 3, 5))
  sd = np.exp(0.5 * np.asarray(logvar))
  z = np.asarray(mu) + sd * eps
  log_q = -0.5 * (eps ** 2 + np.log(2 * np.pi) + np.asarray(logvar))
  log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
  mc = float(np.mean(np.sum(log_q - log_p, axis=-1)))
  assert closed > 0.1
  assert abs(closed - mc) < 0.01 * closed + 5e-3, (closed, mc)


def test_byol_loss_is_symmetric_and_equals_four_minus_two_cosines():
  rng = np.random.default_rng(1)
  p1, p2, k1, k2 = (jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) for _ in range(4))
  loss = float(method.byol_loss(p1, p2, k1, k2))
  swapped = float(method.byol_loss(p2, p1, k2, k1))

  def cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  expected = float(np.mean(4 - 2 * cos(p1, k2) - 2 * cos(p2, k1)))
  assert loss == pytest.approx(swapped, abs=1e-6)
  assert loss == pytest.approx(expected, abs=1e-5)
  assert float(method.byol_loss(p1, p2, p2 * 3.0, p1 * 0.5)) == pytest.approx(0.0, abs=1e-5)  # aligned: zero


def test_the_target_gets_no_gradient_from_the_byol_loss():
  rng = np.random.default_rng(2)
  p1, p2, k1, k2 = (jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(4))
  g_k = jax.grad(lambda k1, k2: method.byol_loss(p1, p2, k1, k2), argnums=(0, 1))(k1, k2)
  g_p = jax.grad(lambda p1: method.byol_loss(p1, p2, k1, k2))(p1)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_k)
  assert float(jnp.abs(g_p).max()) > 0


def test_ema_with_tau_one_keeps_the_target_and_tau_zero_copies_the_online_weights():
  target = {"a": jnp.ones((3,)), "b": {"c": jnp.full((2, 2), 2.0)}}
  online = {"a": jnp.zeros((3,)), "b": {"c": jnp.full((2, 2), -1.0)}}
  kept = method.ema_update(target, online, jnp.float32(1.0))
  copied = method.ema_update(target, online, jnp.float32(0.0))
  half = method.ema_update(target, online, jnp.float32(0.5))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), kept, target))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), copied, online))
  np.testing.assert_allclose(half["b"]["c"], 0.5)


def test_ema_tau_ramps_from_base_to_one_along_a_cosine():
  taus = [float(method.ema_tau(jnp.int32(k), 100, 0.996)) for k in (0, 50, 100, 150)]
  assert taus[0] == pytest.approx(0.996, abs=1e-7)
  assert taus[1] == pytest.approx(0.998, abs=1e-6)
  assert taus[2] == pytest.approx(1.0) and taus[3] == pytest.approx(1.0)


def test_anomaly_score_is_zero_when_the_decoder_returns_the_input():
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 16, 16, 1)), jnp.float32)
  maps, scores = method.residual_scores(x, x, sigma=2.0)
  assert float(jnp.abs(maps).max()) == 0.0 and float(jnp.abs(scores).max()) == 0.0
  x_hat = x.at[0, 4:8, 4:8].set(0.0)
  maps, scores = method.residual_scores(x, x_hat, sigma=0.0)
  assert float(scores[0]) == pytest.approx(float(jnp.abs(x - x_hat)[0].mean()), rel=1e-6)
  assert float(scores[1]) == 0.0 and float(maps[0, 5, 5]) > 0


def test_gan_losses_push_the_right_way():
  real, fake = jnp.full((2, 3, 3, 1), 2.0), jnp.full((2, 3, 3, 1), -2.0)
  for kind in method.GAN_LOSSES:
    good = float(method.discriminator_loss(real, fake, kind))
    bad = float(method.discriminator_loss(fake, real, kind))
    assert good < bad, kind
    assert float(method.generator_gan_loss(real, kind)) < float(method.generator_gan_loss(fake, kind)), kind
