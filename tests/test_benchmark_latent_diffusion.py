"""The latent diffusion baseline's benchmark hook: analytic FLOPs of the train step and of the scoring loop (how they
follow the batch, the DDIM steps, the t* values and the draws), the configs' sizes, and launch/benchmark.py's JSON
for configs/bench_latent_diffusion.py:tiny (train step and stages: images/s, compile time, XLA / analytic, MFU;
scoring images/s against the number of DDIM steps).

XLA's `cost_analysis()["flops"]` counts every multiply-add of a dot or convolution as 2 FLOPs, as the analytic
count does, plus elementwise work, which the analytic count leaves out, so XLA / analytic is at least 1; XLA counts
a `lax.scan` body once, so a scoring program is compared with the count at one DDIM step ("as_xla_counts").
"""
from __future__ import annotations

import importlib.util
import json
import math

import ml_collections
import pytest

from mediclip_jax import flops, methods
from mediclip_jax.config_defaults import latent_diffusion_config
from mediclip_jax.methods import latent_diffusion as ld, latent_diffusion_bench as lb
from mediclip_jax.models import dit
from tests.conftest import REPO
from tests.test_benchmark import MODE_FIELDS, STAGE_FIELDS, TOP_FIELDS, run_benchmark

BENCH_CONFIG = REPO / "configs" / "bench_latent_diffusion.py"
TAEF2_64 = flops.taef2_flops(64)  # random-init TAEF2 (64 channels, 32 latent channels) at the tiny size


def bench_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("bench_latent_diffusion", BENCH_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_hook_is_registered():
  assert methods.BENCH_PARTS[ld.NAME] is lb.bench_parts


def test_train_step_flops_are_the_encode_and_three_dit_forwards_per_sample():
  c = bench_config()
  geometry = (8, 32)
  per_dit = dit.forward_flops(c.model, *geometry)
  f4, f8 = lb.train_step_flops(c, geometry, TAEF2_64, 4), lb.train_step_flops(c, geometry, TAEF2_64, 8)
  assert f4["vae_encode"] == 4 * TAEF2_64["encode"]
  assert f4["denoiser_forward"] == 4 * per_dit and f4["denoiser_backward"] == 8 * per_dit
  assert f4["total"] == pytest.approx(4 * (TAEF2_64["encode"] + 3 * per_dit), rel=1e-12)
  for k in f4:
    assert f8[k] == pytest.approx(2 * f4[k], rel=1e-12), k


def test_score_flops_follow_the_ddim_steps_the_t_stars_and_the_draws():
  """Per image: one encode, then per t* and draw n(t*, r) DiT calls and one decode; n = r, or t* when t* < r.
  XLA's view (the scan body once) does not depend on r."""
  c = bench_config()
  geometry, b = (8, 32), 4
  per_dit = dit.forward_flops(c.model, *geometry)
  one, ten = lb.score_flops(c, geometry, TAEF2_64, b, 1), lb.score_flops(c, geometry, TAEF2_64, b, 10)
  assert ten["total"] == pytest.approx(b * (TAEF2_64["encode"] + 10 * per_dit + TAEF2_64["decode"]), rel=1e-12)
  assert ten["denoiser_forward"] == pytest.approx(10 * one["denoiser_forward"], rel=1e-12)
  assert ten["vae_encode"] == one["vae_encode"] and ten["vae_decode"] == one["vae_decode"]
  assert one["as_xla_counts"] == one["total"] and ten["as_xla_counts"] == pytest.approx(one["total"], rel=1e-12)
  c.score.t_stars, c.score.draws = (5, 250), 2  # t* = 5 < r = 10: 5 DDIM steps
  two = lb.score_flops(c, geometry, TAEF2_64, b, 10)
  assert two["vae_encode"] == ten["vae_encode"]  # the images are encoded once
  assert two["denoiser_forward"] == pytest.approx(b * 2 * (5 + 10) * per_dit, rel=1e-12)
  assert two["vae_decode"] == pytest.approx(4 * ten["vae_decode"], rel=1e-12)
  assert two["as_xla_counts"] == pytest.approx(two["vae_encode"] + b * 4 * (per_dit + TAEF2_64["decode"]), rel=1e-12)


@pytest.mark.parametrize("value", [(), (0, 5), (5, 5), (2.5,)])
def test_bad_score_steps_are_named(value):
  c = bench_config()
  c.bench.score_steps = value
  with pytest.raises(ValueError, match="config.bench.score_steps"):
    lb.score_steps(c)


def test_the_configs_sizes():
  """GPU size: 256 px, TAEF2 latents 32 x 32 x 32, DiT-B/2 (256 tokens), bf16, batch 256, 10 DDIM steps; tiny: the
  DiT of configs/latent_diffusion.py:tiny at 64 px."""
  gpu = bench_config(None)
  m = gpu.model
  assert gpu.data.image_size == 256 and ld.latent_geometry(gpu) == (32, 32)
  assert (m.patch_size, m.width, m.depth, m.heads) == (2, 768, 12, 12)
  assert m.dtype == gpu.vae.dtype == "bfloat16" and gpu.vae.path is None
  assert gpu.bench.batch_per_device == 256 and gpu.score.reverse_steps == 10 and gpu.bench.modes == "fused"
  assert tuple(gpu.bench.score_steps) == (1, 5, 10, 25)
  tiny = bench_config()
  assert tiny.data.image_size == 64 and ld.latent_geometry(tiny) == (8, 32)
  assert tiny.model.to_dict() == latent_diffusion_config("tiny").model.to_dict()
  assert tiny.bench.batch_per_device == 8
  assert bench_config("tiny,vae_path=/w/taef2").vae.path == "/w/taef2"


@pytest.mark.slow
def test_benchmark_json_of_the_latent_diffusion_config(tmp_path):
  """configs/bench_latent_diffusion.py:tiny through launch/benchmark.py at batch 4, 1 + 2 steps, scoring timed at
  1, 16 and 64 DDIM steps (synthetic asked for and skipped with the reason).

  XLA / analytic, measured on this config (64 px, B = 4, float32): train step 1.016 (the encode is 85 % of it and
  XLA counts its convolutions as the analytic count does: 1.003; the tiny DiT's LayerNorms, GELUs and softmaxes
  put its forward + backward at 1.048), scoring 1.003 against the one-step count at every r. Bounds: 1.05, 1.02,
  1.08, 1.02. A train step without the DiT's backward would be 1.13, one that also decoded 0.51; scoring without
  the decode 2.1, without the encode 1.8."""
  out = tmp_path / "ldm.json"
  steps = (1, 16, 64)
  proc = run_benchmark("--config", f"{BENCH_CONFIG}:tiny", "--out", str(out), "--workdir", str(tmp_path / "work"),
                       "--modes", "fused,synthetic", "--config.bench.batch_per_device=4", "--config.bench.steps=2",
                       "--config.bench.warmup_steps=1", f"--config.bench.score_steps={steps}", "--peak_tflops", "1.0")
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(out.read_text())
  for k in TOP_FIELDS:
    assert k in r, k
  assert r["method"] == "latent_diffusion" and r["config_name"] == "bench_latent_diffusion" and r["errors"] == {}
  assert r["image_size"] == 64 and r["batch"]["per_device"] == 4 and r["support"]["kind"] == "phantom"
  assert "device-resident" in r["skipped"]["synthetic"] and set(r["modes"]) == {"fused"}
  assert r["model"]["architecture"] == "DiT" and r["model"]["latent"] == {"side": 8, "channels": 32}
  assert r["model"]["scoring"]["reverse_steps_timed"] == list(steps) and r["dtype_policy"]["dit_compute"] == "float32"
  b, n_dev = r["batch"]["global"], r["device"]["count"]
  c = bench_config()
  expected = lb.train_step_flops(c, (8, 32), TAEF2_64, b)
  assert r["analytic_flops"]["fused_step"] == pytest.approx(expected)

  f = r["modes"]["fused"]
  for k in MODE_FIELDS:
    assert k in f, k
  assert f["compile_s"] > 0 and f["trace_s"] > 0 and f["step_time_s"]["n"] == 2 and math.isfinite(f["final_loss"])
  assert f["images_per_s"] == pytest.approx(b / f["step_time_s"]["median"]) and f["images_per_s"] > 0
  assert f["model_flops_per_step"] == expected["total"]
  assert f["xla_over_model_flops"] == pytest.approx(f["xla_flops"] * n_dev / expected["total"])
  assert 1.0 <= f["xla_over_model_flops"] <= 1.05
  assert 0 < f["mfu"] == pytest.approx(expected["total"] / f["step_time_s"]["median"] / n_dev / 1e12)

  s = r["stages"]
  names = [lb.score_stage_name(n) for n in steps]
  assert set(s) == {"vae_encode", "denoiser_forward_backward", "full_step", *names}
  assert s["full_step"]["step_time_s"] == f["step_time_s"]
  bounds = {"vae_encode": 1.02, "denoiser_forward_backward": 1.08}
  assert s["vae_encode"]["model_flops"] == expected["vae_encode"]
  assert s["denoiser_forward_backward"]["model_flops"] == expected["denoiser_forward"] + expected["denoiser_backward"]
  for name in bounds:
    assert 1.0 <= s[name]["xla_over_model_flops"] <= bounds[name], (name, s[name]["xla_over_model_flops"])
  for name, n in zip(names, steps):
    st, counted = s[name], r["analytic_flops"][name]
    for k in STAGE_FIELDS:
      assert k in st, (name, k)
    assert st["compile_s"] > 0 and st["step_time_s"]["n"] == 2 and st["images_per_s"] > 0
    assert st["images_per_s"] == pytest.approx(b / st["step_time_s"]["median"])
    assert counted == pytest.approx(lb.score_flops(c, (8, 32), TAEF2_64, b, n))
    assert st["model_flops"] == counted["total"]
    assert 1.0 <= st["xla_flops"] * n_dev / counted["as_xla_counts"] <= 1.02, (name, st["xla_flops"])
    assert st["mfu"] == pytest.approx(counted["total"] / st["step_time_s"]["median"] / n_dev / 1e12)
  times = [s[name]["step_time_s"]["median"] for name in names]
  assert all(a < b for a, b in zip(times, times[1:])), times  # more DDIM steps, more time per batch
