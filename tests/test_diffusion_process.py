"""The diffusion process (mediclip_jax/methods/diffusion_process.py): schedules, closed-form vs iterative
forward noising, DDIM at t* = 0, and DDIM with a perfect ε-oracle recovering the clean sample."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mediclip_jax.methods import diffusion_process as dp


@pytest.mark.parametrize("kind", dp.SCHEDULES)
def test_schedules_decrease_from_one(kind):
  s = dp.make_schedule(kind, 1000)
  assert s.steps == 1000 and s.alpha_bar[0] == 1.0 and s.betas[0] == 0.0
  assert np.all(np.diff(s.alpha_bar) < 0) and 0 < s.alpha_bar[-1] < 1e-2
  with pytest.raises(ValueError, match="schedule must be one of"):
    dp.make_schedule("quadratic", 10)


@pytest.mark.parametrize("kind", dp.SCHEDULES)
def test_closed_form_noising_equals_the_iterative_one(kind):
  """x_t after t single steps is sqrt(ᾱ_t) x0 plus a combination of the step noises whose coefficients'
  squares sum to 1 - ᾱ_t: the same distribution as q_sample. Both parts are checked exactly (the process is
  linear): the signal with zero noise, each noise coefficient with x0 = 0 and one unit noise at one step."""
  s = dp.make_schedule(kind, 200)
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  zero = jnp.zeros_like(x0)
  for t in (1, 17, 200):
    x = x0
    for k in range(1, t + 1):
      x = dp.q_step(s, x, k, zero)
    closed = dp.q_sample(s, x0, jnp.full((2,), t), zero)
    np.testing.assert_allclose(x, closed, rtol=2e-5, atol=1e-6)
    coeffs = []
    for j in range(1, t + 1):  # coefficient of step j's noise in x_t
      x = jnp.zeros((1,))
      for k in range(1, t + 1):
        x = dp.q_step(s, x, k, jnp.ones((1,)) if k == j else jnp.zeros((1,)))
      coeffs.append(float(x[0]))
    np.testing.assert_allclose(np.sum(np.square(coeffs)), 1.0 - s.alpha_bar[t], rtol=1e-4)
    unit = dp.q_sample(s, jnp.zeros((1,)), jnp.asarray([t]), jnp.ones((1,)))
    np.testing.assert_allclose(float(unit[0]) ** 2, 1.0 - s.alpha_bar[t], rtol=1e-4, atol=1e-7)  # float32


def test_ddim_at_t_star_zero_returns_the_input():
  s = dp.make_schedule("linear", 1000)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 4)), jnp.float32)
  out = dp.ddim_reverse(lambda z, t: jnp.ones_like(z), s, x, 0, 50)
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("kind,t_star,n_steps", [("linear", 250, 10), ("cosine", 600, 25), ("linear", 7, 50)])
def test_ddim_with_a_perfect_noise_oracle_recovers_the_clean_latent(kind, t_star, n_steps):
  s = dp.make_schedule(kind, 1000)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  x_t = dp.q_sample(s, x0, jnp.full((2,), t_star), noise)
  ab = jnp.asarray(s.alpha_bar, jnp.float32)

  def oracle(x, t):  # the ε that x carries relative to the known clean sample
    a = ab[t].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

  out = jax.jit(lambda x: dp.ddim_reverse(oracle, s, x, t_star, n_steps))(x_t)
  np.testing.assert_allclose(out, x0, atol=1e-4)
  ts = dp.ddim_timesteps(t_star, n_steps)
  assert ts[0] == t_star and ts[-1] == 0 and np.all(np.diff(ts) < 0) and len(ts) == min(n_steps, t_star) + 1
