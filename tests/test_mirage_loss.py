"""MIRAGE's loss (mediclip_jax/methods/mirage_loss.py): its limiting cases (s = 1 with a bank of the batch's own captions, cost -I, a sharp queue scale), the stop-gradient on s, the bank's wrap-around, Sinkhorn's marginals, 1 vs 8 devices."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mediclip_jax.methods import mirage_loss as ml
from tests.conftest import REPO

SHARP = math.log(1e4)
TEMP = math.log(1 / 0.07)


def _unit(rng, *shape):
  return np.asarray(ml.normalize(rng.normal(size=shape).astype(np.float32)))


def _scales(queue=TEMP, **kw):
  return {"pcl": kw.get("pcl", TEMP), "rcl": kw.get("rcl", math.log(1 / 0.9)), "otc": kw.get("otc", TEMP),
          "queue": queue}


def test_sharp_queue_scale_gives_the_hard_nearest_bank_row():
  rng = np.random.default_rng(0)
  v, bank = _unit(rng, 8, 16), _unit(rng, 64, 16)
  sim = np.sort(v @ bank.T, axis=1)
  assert (sim[:, -1] - sim[:, -2]).min() > 2e-3  # no near-ties: exp(-1e4 * gap) is negligible
  t_tilde = ml.soft_neighbours(v, bank, ml.logit_scale(SHARP, max_scale=None))
  np.testing.assert_allclose(t_tilde, bank[np.argmax(v @ bank.T, axis=1)], atol=1e-5)
  # At the default temperature it is a blend, not a bank row; the clamp caps a huge scale at 100.
  soft = ml.soft_neighbours(v, bank, ml.logit_scale(TEMP))
  assert np.abs(soft - bank[np.argmax(v @ bank.T, axis=1)]).max() > 1e-2
  assert float(ml.logit_scale(SHARP)) == ml.MAX_LOGIT_SCALE
  np.testing.assert_allclose(ml.logit_scale(SHARP, max_scale=None), 1e4, rtol=1e-5)


@pytest.mark.parametrize("cost", ["principled", "code"])
def test_bank_of_own_captions_reduces_to_twice_infonce_plus_ot(cost):
  rng = np.random.default_rng(1)
  t = rng.normal(size=(8, 16)).astype(np.float32) * 3
  v = t + 2.0 * rng.normal(size=t.shape).astype(np.float32)  # cos(v_i, t_i) ~ 0.8: own caption nearest
  bank = np.asarray(ml.normalize(t))
  weights = (1.0, 0.2, 0.05)
  total, aux = jax.jit(ml.mirage_loss, static_argnames=("cost", "max_scale"))(
      v, t, bank, _scales(queue=SHARP, pcl=math.log(4.0)), weights=weights, cost=cost, max_scale=None)
  np.testing.assert_allclose(aux["s"], 1.0, atol=1e-4)
  assert abs(float(aux["s_mean"]) - 1) < 1e-4
  plain, plain_aux = ml.infonce_loss(v, t, math.log(4.0), max_scale=None)
  otc = ml.ot_loss(ml.normalize(v), bank, bank, 1 / 0.07, cost=cost)
  assert float(plain) > 0.05  # not a degenerate, near-zero InfoNCE
  np.testing.assert_allclose(aux["pcl"], 2 * plain, rtol=1e-4)
  np.testing.assert_allclose(aux["otc"], otc, rtol=1e-5)
  assert abs(float(aux["rcl"])) < 1e-3  # weighted by 1 - s = 0
  np.testing.assert_allclose(total, weights[0] * 2 * plain + weights[1] * 0 + weights[2] * otc, rtol=1e-4)
  assert float(aux["accuracy"]) == float(plain_aux["accuracy"]) == 1.0


def _diag_plan_mean(v, t, scale):
  p = jax.nn.softmax(scale * v @ t.T, axis=-1)
  q = jax.nn.softmax(scale * t @ v.T, axis=-1)
  return (jnp.mean(jnp.diag(p)) + jnp.mean(jnp.diag(q))) / 2


@pytest.mark.parametrize("cost", ["principled", "code"])
def test_identity_cost_gives_minus_mean_diagonal_and_the_identity_plan_minimises_it(cost):
  rng = np.random.default_rng(2)
  t = np.linalg.qr(rng.normal(size=(16, 8)))[0].T.astype(np.float32)  # 8 orthonormal rows: t t^T = I
  np.testing.assert_allclose(t @ t.T, np.eye(8), atol=1e-6)
  v = _unit(rng, 8, 16)
  np.testing.assert_allclose(ml.ot_loss(v, t, t, 10.0, cost=cost), -_diag_plan_mean(v, t, 10.0), rtol=1e-6)
  at_identity = float(ml.ot_loss(t, t, t, ml.MAX_LOGIT_SCALE, cost=cost))
  assert abs(at_identity + 1) < 1e-6  # the lower bound: a plan's entries lie in [0, 1]
  random_v = [float(ml.ot_loss(_unit(rng, 8, 16), t, t, ml.MAX_LOGIT_SCALE, cost=cost)) for _ in range(20)]
  assert at_identity < min(random_v) - 1e-3


@pytest.mark.parametrize("iters", [0, 30])
def test_cost_orientation_code_versus_principled(iters):
  rng = np.random.default_rng(3)
  v, t, t_tilde = _unit(rng, 6, 8), _unit(rng, 6, 8), _unit(rng, 6, 8)
  scale = 1 / 0.07
  p = np.asarray(ml.ot_plan(scale * v @ t.T, iters), np.float64)  # image i -> text j
  q = np.asarray(ml.ot_plan(scale * t @ v.T, iters), np.float64)  # text i -> image j
  c = -(t @ t_tilde.T).astype(np.float64)  # c[i, j] = -t_i . t~_j
  text_term = (q * c).sum(1).mean()
  code = ((p * c).sum(1).mean() + text_term) / 2
  principled = ((p * c.T).sum(1).mean() + text_term) / 2  # image i is charged against its own neighbour t~_i
  assert abs(code - principled) > 1e-3
  np.testing.assert_allclose(ml.ot_loss(v, t, t_tilde, scale, cost="code", sinkhorn_iters=iters), code,
                             rtol=1e-5)
  np.testing.assert_allclose(ml.ot_loss(v, t, t_tilde, scale, sinkhorn_iters=iters), principled, rtol=1e-5)


def test_weighted_infonce_matches_per_sample_formula():
  rng = np.random.default_rng(4)
  v, t = _unit(rng, 5, 8), _unit(rng, 5, 8)
  w = rng.uniform(0, 2, size=5).astype(np.float32)
  logits = 7.0 * (v @ t.T).astype(np.float64)
  ce_i = np.log(np.exp(logits).sum(1)) - np.diag(logits)
  ce_t = np.log(np.exp(logits).sum(0)) - np.diag(logits)
  loss, acc = ml.clip_infonce(v, t, 7.0, weights=w)
  np.testing.assert_allclose(loss, ((ce_i * w).mean() + (ce_t * w).mean()) / 2, rtol=1e-5)
  assert float(acc) == pytest.approx(np.mean(np.argmax(logits, 1) == np.arange(5)))
  assert 0 < float(acc) < 1
  np.testing.assert_allclose(ml.clip_infonce(v, t, 7.0)[0], (ce_i.mean() + ce_t.mean()) / 2, rtol=1e-5)


def test_no_gradient_through_the_cleanliness_score():
  rng = np.random.default_rng(5)
  t, t_tilde = _unit(rng, 6, 8), _unit(rng, 6, 8)
  gt, gtt = jax.grad(lambda a, b: jnp.sum(ml.cleanliness(a, b) ** 2), argnums=(0, 1))(t, t_tilde)
  assert not np.any(np.asarray(gt)) and not np.any(np.asarray(gtt))

  # d total / d t flows only through pcl's logits and otc's plans: s and the OT cost are constants.
  v, traw, bank = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), _unit(rng, 32, 8)
  scales = _scales()
  weights = (1.0, 0.2, 0.05)
  vn = ml.normalize(v)
  t_tilde = ml.soft_neighbours(vn, bank, ml.logit_scale(TEMP))
  s_const = np.asarray(ml.cleanliness(ml.normalize(traw), t_tilde))
  c_const = np.asarray(ml.normalize(traw))

  def through_pcl_and_plans(t_):
    tn = ml.normalize(t_)
    pcl = ml.clip_infonce(vn, tn, 1 / 0.07, weights=1 + s_const)[0]
    p = jax.nn.softmax(vn @ tn.T / 0.07, -1)
    q = jax.nn.softmax(tn @ vn.T / 0.07, -1)
    c = -(c_const @ t_tilde.T)
    otc = (jnp.mean(jnp.sum(p * c.T, -1)) + jnp.mean(jnp.sum(q * c, -1))) / 2
    return weights[0] * pcl + weights[2] * otc

  g = jax.jit(jax.grad(lambda t_: ml.mirage_loss(v, t_, bank, scales, weights=weights)[0]))(traw)
  np.testing.assert_allclose(g, jax.jit(jax.grad(through_pcl_and_plans))(traw), rtol=1e-4, atol=1e-7)


def test_gradients_reach_the_image_and_every_scale():
  rng = np.random.default_rng(6)
  v, t, bank = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), _unit(rng, 32, 8)
  grad = jax.jit(jax.grad(lambda v_, s_: ml.mirage_loss(v_, t, bank, s_)[0], argnums=(0, 1)))
  gv, gs = grad(v, _scales())
  assert np.abs(gv).max() > 0 and all(abs(float(gs[k])) > 0 for k in ("pcl", "rcl", "otc", "queue"))
  # Clamped at 100: no gradient into a log scale above log(100).
  _, gs = grad(v, _scales(pcl=math.log(200.0)))
  assert float(gs["pcl"]) == 0.0 and abs(float(gs["otc"])) > 0


def test_bank_pointer_wraps_around():
  rng = np.random.default_rng(7)
  k, b, d = 10, 4, 3
  bank0 = _unit(rng, k, d)
  batches = [rng.normal(size=(b, d)).astype(np.float32) for _ in range(3)]
  step = jax.jit(ml.enqueue)
  bank, ptr = jnp.asarray(bank0), jnp.int32(0)
  ptrs = []
  for x in batches:
    bank, ptr = step(bank, ptr, x)
    ptrs.append(ptr)
  assert [int(p) for p in ptrs] == [4, 8, 2] and ptr.dtype == jnp.int32 and ptr.shape == ()
  n = [np.asarray(ml.normalize(x)) for x in batches]
  expected = np.concatenate([n[2][2:], n[0][2:], n[1], n[2][:2]])  # rows 0-1 overwritten by the 3rd batch
  np.testing.assert_array_equal(bank, expected)
  g = jax.grad(lambda x: jnp.sum(ml.enqueue(jnp.asarray(bank0), 0, x)[0]))(batches[0])
  assert not np.any(np.asarray(g))


def test_sinkhorn_meets_both_marginals():
  rng = np.random.default_rng(8)
  plan = jax.jit(ml.ot_plan, static_argnums=1)
  for _ in range(5):
    logits = _unit(rng, 16, 64) @ _unit(rng, 16, 64).T / 0.07
    p = plan(logits, 30)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-4)
  one_sided = ml.ot_plan(logits)
  np.testing.assert_allclose(one_sided, jax.nn.softmax(logits, -1), rtol=1e-6)
  assert np.abs(np.asarray(one_sided.sum(0)) - 1).max() > 1e-2  # the released plan is not balanced
  g = jax.jit(jax.grad(lambda x: ml.ot_loss(x, x, x, 10.0, sinkhorn_iters=30)))(_unit(rng, 16, 64))
  assert np.isfinite(g).all()


def test_unknown_cost_and_oversized_batch_are_refused():
  rng = np.random.default_rng(9)
  v = _unit(rng, 4, 8)
  with pytest.raises(ValueError, match="cost='transposed'"):
    ml.ot_loss(v, v, v, 10.0, cost="transposed")
  with pytest.raises(ValueError, match="cost='sinkhorn'"):
    ml.mirage_loss(v, v, _unit(rng, 16, 8), _scales(), cost="sinkhorn")
  with pytest.raises(ValueError, match="batch of 5 rows .* bank of 4 rows"):
    ml.enqueue(jnp.zeros((4, 8)), 0, jnp.ones((5, 8)))


def test_low_precision_inputs_compute_in_float32():
  rng = np.random.default_rng(10)
  v, t, bank = rng.normal(size=(8, 16)), rng.normal(size=(8, 16)), _unit(rng, 32, 16)
  ref, _ = ml.mirage_loss(v.astype(np.float32), t.astype(np.float32), bank, _scales())
  low, aux = ml.mirage_loss(v.astype(jnp.bfloat16), t.astype(jnp.bfloat16), bank.astype(jnp.bfloat16),
                            {k: jnp.asarray(x, jnp.bfloat16) for k, x in _scales().items()})
  assert low.dtype == jnp.float32 and aux["s"].dtype == jnp.float32
  np.testing.assert_allclose(low, ref, rtol=0.05)
  new_bank, _ = ml.enqueue(jnp.asarray(bank, jnp.bfloat16), 0, t.astype(jnp.bfloat16))
  assert new_bank.dtype == jnp.bfloat16


def test_eight_devices_give_the_single_device_loss_and_gradients():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "mirage_loss_multidevice.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  print(res)
  assert res["n_devices"] == 8 and res["sharded_inputs"]
  assert res["cases"] >= 3
  assert res["max_rel_loss_diff"] <= 1e-6, res
  # float32 round-off: the 1-device gradient itself lies ~1.5e-5 (relative to its largest entry) from the
  # float64 one (the raw-embedding gradient is a projection with cancellation); a sharding bug is O(1).
  assert res["max_rel_grad_diff"] <= 1e-4, res
  assert res["max_aux_diff"] <= 1e-6, res
  assert res["bank_diff"] == 0.0 and res["ptr_equal"], res
