"""SSL-AnoVAE's benchmark hook: analytic step FLOPs (scaling, the parts the config switches, XLA's count of each
network and of the compiled step) and launch/benchmark.py's JSON for configs/bench_ssl_anovae.py:tiny.

XLA's `cost_analysis()["flops"]` counts every multiply-add of a dot or convolution as 2 FLOPs, as the analytic
count does, plus elementwise work (GroupNorm, LayerNorm, activations, pooling, losses, Adam), which the
analytic count leaves out: XLA / analytic is at least 1 and exceeds it by the elementwise share, a few % at
the tiny widths used here (measured ratios are in each test).
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx

from mediclip_jax import config_defaults, methods, parallel
from mediclip_jax.methods import ssl_anovae, ssl_anovae_bench as sb
from tests.conftest import REPO
from tests.test_benchmark import FLOP_COUNT_COMPILE, MODE_FIELDS, TOP_FIELDS, run_benchmark

DISC_PARTS = ("disc_generator", "disc_update")
CONV_PARTS = ("image_encoder", "backbone_x", "decoder", "byol_online", "byol_target") + DISC_PARTS


def tiny_config(size: int = 32, **fields) -> ml_collections.ConfigDict:
  """configs/ssl_anovae.py:tiny networks at `size` px; fields as "section.key": value."""
  c = config_defaults.ssl_anovae_config("tiny")
  c.data.image_size = c.model.image_size = size
  for path, value in fields.items():
    section, key = path.split(".")
    c[section][key] = value
  return c


def sds(*shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def xla_flops(fn, *args) -> float:  # FLOP_COUNT_COMPILE: the same count, a third less compile time
  cost = jax.jit(fn).lower(*args).compile(FLOP_COUNT_COMPILE).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_hook_is_registered():
  assert methods.BENCH_PARTS[ssl_anovae.NAME] is sb.bench_parts


def test_flops_are_positive_and_linear_in_the_batch():
  c = tiny_config()
  f4, f8 = sb.step_flops(c, 4), sb.step_flops(c, 8)
  assert all(f4[k] > 0 for k in CONV_PARTS)  # both latents, BYOL and the adversarial term on
  assert f4["total"] == pytest.approx(sum(f4[k] for k in CONV_PARTS), rel=1e-12)
  for k in f4:
    assert f8[k] == pytest.approx(2 * f4[k], rel=1e-12), k


def test_flops_scale_about_4x_per_doubled_side():
  """Conv work grows with the pixel count: 4x per doubled side, a little more on small maps (fewer kernel taps
  land on padding as the maps grow; the stride-1 PatchGAN layers lose 3 rows, not a fixed share). Measured
  4.17 to 4.81 from 32 to 64 px and 4.08 to 4.36 from 64 to 128 px; the BYOL MLPs and heads do not grow."""
  f32, f64, f128 = (sb.step_flops(tiny_config(s), 4) for s in (32, 64, 128))
  for k in CONV_PARTS:
    lo, hi = f64[k] / f32[k], f128[k] / f64[k]
    assert 4.0 < hi < lo < 4.9, (k, lo, hi)


def test_switching_the_adversarial_term_off_removes_the_discriminator_share():
  """loss.adv = 0: no discriminator in the step. Its share is the generator's adversarial term (forward + input
  gradients on x_hat) and its own update on x and x_hat (forward + weight gradients + input gradients below the
  first layer): B (2 F + 2 (3 F - F_first))."""
  b = 4
  on, off = sb.step_flops(tiny_config(), b), sb.step_flops(tiny_config(**{"loss.adv": 0.0}), b)
  assert all(off[k] == 0.0 for k in DISC_PARTS)
  assert all(off[k] == on[k] for k in on if k not in DISC_PARTS + ("total",))
  d = sb.discriminator_flops(tiny_config().model)
  assert on["total"] - off["total"] == pytest.approx(b * (2 * d.forward + 2 * (3 * d.forward - d.first)), rel=1e-12)
  assert 0 < (on["total"] - off["total"]) / on["total"] < 0.5


def test_latents_and_byol_switch_their_parts():
  b = 4
  image = sb.step_flops(tiny_config(**{"model.latents": "image"}), b)
  assert image["backbone_x"] == image["byol_online"] == image["byol_target"] == 0.0 and image["image_encoder"] > 0
  ssl = sb.step_flops(tiny_config(**{"model.latents": "ssl"}), b)
  assert ssl["image_encoder"] == 0.0 and ssl["backbone_x"] > 0 and ssl["byol_online"] > 0
  no_byol = sb.step_flops(tiny_config(**{"loss.ssl": 0.0}), b)
  assert no_byol["byol_online"] == no_byol["byol_target"] == 0.0 and no_byol["backbone_x"] > 0


NETWORKS = {  # name -> (module of (model, disc), call, input shape of one image, analytic NetFlops of the model cfg)
    "image_encoder": (lambda md: md[0].image_encoder, lambda n, x: jnp.concatenate(n(x), -1), "image",
                      sb.image_encoder_flops),
    "backbone": (lambda md: md[0].backbone, lambda n, x: n(x), "image", sb.backbone_flops),
    "decoder": (lambda md: md[0].decoder, lambda n, z: n(z), "latent",
                lambda m: sb.decoder_flops(m, m.latent_image + m.latent_ssl)),
    "projector": (lambda md: md[0].projector, lambda n, y: n(y), "feature",
                  lambda m: sb.mlp_flops(m.resnet_widths[-1], m.projector_hidden, m.projector_out)),
    "discriminator": (lambda md: md[1], lambda n, x: n(x, update_stats=False), "image", sb.discriminator_flops),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_matches_xla(name):
  """Forward, and forward + weight gradients + input gradients below the first layer (the input carries no
  gradient), of each network on abstract shapes. Measured forward 1.016 to 1.054 and trained 1.020 to 1.110
  (tiny widths, 32 px: GroupNorm, the max pool's backward); a count without the backward would give about 3,
  a layer at the wrong stride or padding moves the forward ratio by far more than the bound."""
  c = tiny_config()
  m = c.model
  module_of, call, kind, analytic_of = NETWORKS[name]
  graphdef, state = nnx.split(module_of(nnx.eval_shape(lambda: ssl_anovae.build_networks(c))))
  b = 2
  shape = {"image": (b, 32, 32, 1), "latent": (b, m.latent_image + m.latent_ssl), "feature": (b, m.resnet_widths[-1])}
  x = sds(*shape[kind])
  fwd = lambda s, x_: call(nnx.merge(graphdef, s), x_).astype(jnp.float32)
  w = jax.eval_shape(fwd, state, x)

  def loss(s, x_, w_):  # value and gradient: the last layer's forward is live, as in the step
    return jnp.sum(fwd(s, x_) * w_)

  analytic = analytic_of(m)
  ratio_fwd = xla_flops(fwd, state, x) / (b * analytic.forward)
  ratio_trained = xla_flops(jax.value_and_grad(loss), state, x, sds(*w.shape)) / (b * analytic.trained(False))
  assert 1.0 <= ratio_fwd <= 1.07, ratio_fwd
  assert 1.0 <= ratio_trained <= 1.13, ratio_trained


def _compiled_step_flops(c, b: int) -> float:
  """XLA's count of the real train step (`ssl_anovae.make_train_step`) compiled on abstract shapes.

  The networks and the state are built under `jax.eval_shape` (shapes, no initialisation: running the
  initialisers compiled ~100 small programs, ~15 s of CPU per config); the step is traced on those shapes."""
  opt_g, opt_d = optax.adam(1e-4), optax.adam(1e-4)
  defs = []

  def init():
    state, d = ssl_anovae.init_state(*ssl_anovae.build_networks(c), opt_g, opt_d, 0)
    defs.append(d)
    return state

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jax.eval_shape(init))
  step = ssl_anovae.make_train_step(defs[0], c, opt_g, opt_d, parallel.make_mesh(), 100, 0)
  s = int(c.data.image_size)
  index = jax.ShapeDtypeStruct((b,), jnp.int32)
  compiled = step.trace(abstract, sds(8, s, s), {"image_index": index, "sample_index": index}).lower().compile(
      FLOP_COUNT_COMPILE)
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) * jax.device_count()


@pytest.mark.slow
def test_the_compiled_step_matches_the_count():
  """The whole step (both latents, BYOL with the EMA target, the adversarial term and the discriminator's update,
  two Adam updates): measured 1.040 at 64 px, B = 4 (1.009 for the 256 px reference networks). Without the
  discriminator XLA's count drops by the analytic discriminator share to 1.2 %; counting its update once
  instead of on real and fake would be off by 37 %."""
  b = 4 * jax.device_count()
  c_on, c_off = tiny_config(64), tiny_config(64, **{"loss.adv": 0.0})
  on, off = _compiled_step_flops(c_on, b), _compiled_step_flops(c_off, b)
  a_on, a_off = sb.step_flops(c_on, b)["total"], sb.step_flops(c_off, b)["total"]
  assert 1.0 <= on / a_on <= 1.07, on / a_on
  assert 1.0 <= off / a_off <= 1.08, off / a_off
  assert (on - off) / (a_on - a_off) == pytest.approx(1.0, abs=0.03)


@pytest.mark.slow
def test_benchmark_json_of_the_ssl_anovae_config(tmp_path):
  """configs/bench_ssl_anovae.py:tiny through launch/benchmark.py at 32 px, batch 4, 1 + 2 steps: the fields
  tests/test_benchmark.py checks for MediCLIP, the hook's FLOPs behind MFU, the fed modes skipped with the reason."""
  out = tmp_path / "ssl.json"
  proc = run_benchmark("--config", str(REPO / "configs" / "bench_ssl_anovae.py") + ":tiny", "--out", str(out),
                       "--workdir", str(tmp_path / "work"), "--modes", "fused,synthetic",
                       "--config.data.image_size=32", "--config.model.image_size=32",
                       "--config.bench.batch_per_device=4", "--config.bench.steps=2", "--config.bench.warmup_steps=1",
                       "--peak_tflops", "1.0")
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(out.read_text())
  for k in TOP_FIELDS:
    assert k in r, k
  assert r["method"] == "ssl_anovae" and r["config_name"] == "bench_ssl_anovae" and r["errors"] == {}
  assert r["image_size"] == 32 and r["batch"]["per_device"] == 4 and r["stages"] is None
  assert "device-resident" in r["skipped"]["synthetic"] and set(r["modes"]) == {"fused"}
  assert r["model"]["architecture"] == "SSL-AnoVAE" and r["model"]["parameters"]["generator"] > 0
  assert r["dtype_policy"]["compute"] == "float32"
  f = r["modes"]["fused"]
  for k in MODE_FIELDS:
    assert k in f, k
  assert f["compile_s"] > 0 and f["step_time_s"]["n"] == 2 and math.isfinite(f["final_loss"])
  assert f["images_per_s"] == pytest.approx(r["batch"]["global"] / f["step_time_s"]["median"])
  expected = sb.step_flops(tiny_config(32), r["batch"]["global"])
  assert r["analytic_flops"]["fused_step"] == pytest.approx(expected)
  assert f["model_flops_per_step"] == expected["total"]
  assert 1.0 <= f["xla_flops"] * r["device"]["count"] / expected["total"] <= 1.1
  achieved = expected["total"] / f["step_time_s"]["median"] / r["device"]["count"]
  assert 0 < f["mfu"] == pytest.approx(achieved / 1e12)
