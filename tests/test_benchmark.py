"""launch/benchmark.py on the tiny CPU workload: every documented JSON field, sane values, analytic FLOPs.

One benchmark run (all three modes, stage breakdown, a one-step profiler window, a peak given by
flag) is shared by the field tests; the expected FLOPs are recomputed here from the tiny
architecture's numbers, independently of mediclip_jax/flops.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = 1.0
XLA_FLAGS = "--xla_backend_optimization_level=0"

TOP_FIELDS = ("schema", "config_name", "config", "timing", "step_program", "device", "versions", "xla_flags",
              "dtype_policy", "batch", "image_size", "model", "synthesis", "peak_flops_per_device", "peak_source",
              "mfu_note", "analytic_flops", "xla_flops_note", "modes", "ratios_images_per_s", "stages",
              "profile_steps", "wall_s")
MODE_FIELDS = ("trace_s", "lower_s", "compile_s", "first_steps_s", "warmup_steps", "timed_steps", "step_time_s",
               "images_per_s", "images_per_s_per_device", "images_per_s_mean", "model_flops_per_step", "xla_flops",
               "model_tflops_per_s_per_device", "mfu", "peak_memory_bytes", "peak_memory_note", "memory_analysis",
               "final_loss", "profile_dir", "input")
HOST_FIELDS = ("host_workers", "host_batches_in_flight", "host_wall_s_incl_pool_start", "host_wait_s",
               "host_worker_s_per_batch", "host_worker_samples_per_s_per_worker")
STAGE_FIELDS = ("trace_s", "lower_s", "compile_s", "step_time_s", "images_per_s", "model_flops", "xla_flops", "mfu")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  out = tmp / "result.json"
  # Low XLA backend optimisation: compiles ~1/3 faster; this run checks the fields, not the speed.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS,
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(REPO, "launch", "benchmark.py"), "--config",
         os.path.join(REPO, "configs", "bench_tiny.py"), "--out", str(out), "--workdir", str(tmp / "work"),
         "--modes", "fused,host,synthetic", "--config.bench.steps=2", "--config.bench.warmup_steps=1",
         "--profile_steps", "1", "--peak_tflops", str(PEAK_TFLOPS)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "fused_over_host" in proc.stdout
  with open(out) as f:
    return json.load(f)


def _tiny_expected_flops(batch: int = 8, size: int = 64) -> float:
  """The step's matmul FLOPs from the tiny architecture (CLIPConfig(32, 32, 8, 64, 4, 4, 32, 2, 4)), by hand."""
  patch, vw, vlayers, tw, tlayers, embed = 8, 64, 4, 32, 2, 32
  taps = 3                              # (2, 3, 4): every block runs
  prompts, ctx = 10 + 11, 77            # normal + abnormal words, CLIP context length
  g = size // patch
  t = g * g + 1
  mac = 2
  per_image = mac * g * g * (3 * patch * patch) * vw                          # patch embedding
  per_image += vlayers * mac * (t * (3 * vw * vw + vw * vw + 8 * vw * vw)     # qkv, out, mlp
                                + t * t * vw * 2)                           # QK^T, PV
  vision = batch * per_image
  tlin = mac * ctx * 12 * tw * tw
  tatt = mac * 2 * ctx * ctx * tw
  proj = mac * prompts * tw * embed
  text = prompts * tlayers * (tlin + tatt) + proj + prompts * tlayers * (tlin + 2 * tatt) + proj
  adapters = 2 * mac * batch * taps * g * g * vw * embed                      # forward + weight gradients
  sims = mac * batch * taps * g * g * embed * 2
  upsample = mac * batch * 2 * (size * g * g + size * size * g)
  return float(vision + text + adapters + 3 * sims + 2 * upsample)


def test_top_level_fields(result):
  for k in TOP_FIELDS:
    assert k in result, k
  d = result["device"]
  assert d["platform"] == "cpu" and d["count"] >= 1 and d["process_count"] == 1
  assert set(result["versions"]) >= {"jax", "jaxlib", "flax", "optax", "numpy", "opencv", "python"}
  assert result["versions"]["jax"] == jax.__version__
  assert result["xla_flags"] == XLA_FLAGS
  assert result["dtype_policy"]["params"] == "float32" and result["dtype_policy"]["clip_compute"] == "float32"
  assert result["batch"] == {"global": 8 * d["count"], "per_device": 8, "per_process": 8 * d["count"]}
  assert result["image_size"] == 64
  assert result["model"]["clip_variant"] == "tiny" and result["model"]["tap_layers"] == [2, 3, 4]
  assert result["synthesis"]["latent_tasks"] is False and result["synthesis"]["vae"] is None
  assert result["peak_flops_per_device"] == pytest.approx(PEAK_TFLOPS * 1e12)
  assert result["peak_source"] == "--peak_tflops"
  assert result["config"]["bench"]["steps"] == 2
  assert result["wall_s"] > 0


@pytest.mark.parametrize("mode", ["fused", "host", "synthetic"])
def test_mode_fields_and_values(result, mode):
  r = result["modes"][mode]
  for k in MODE_FIELDS + (HOST_FIELDS if mode == "host" else ()):
    assert k in r, (mode, k)
  assert r["trace_s"] > 0 and r["lower_s"] > 0 and r["compile_s"] > 0
  st = r["step_time_s"]
  assert st["n"] == r["timed_steps"] == 2 and r["warmup_steps"] == 1
  assert 0 < st["min"] <= st["median"] <= st["p90"] <= st["max"]
  n_dev = result["device"]["count"]
  assert r["images_per_s"] == pytest.approx(result["batch"]["global"] / st["median"])
  assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / n_dev)
  achieved = r["model_flops_per_step"] / st["median"] / n_dev
  assert r["model_tflops_per_s_per_device"] == pytest.approx(achieved / 1e12)
  assert 0 < r["mfu"] <= 1 and r["mfu"] == pytest.approx(achieved / (PEAK_TFLOPS * 1e12))
  assert r["peak_memory_bytes"] is None and "cpu" in r["peak_memory_note"]  # CPU has no memory_stats()
  assert r["memory_analysis"]["temp_size_in_bytes"] >= 0 and r["memory_analysis"]["argument_size_in_bytes"] > 0
  assert math.isfinite(r["final_loss"])
  assert os.path.isdir(r["profile_dir"]) and any(files for _, _, files in os.walk(r["profile_dir"]))
  # XLA counts elementwise work too, so it sits at or somewhat above the matmul-only analytic count.
  assert 0.9 * r["model_flops_per_step"] <= r["xla_flops"] <= 3.0 * r["model_flops_per_step"]


def test_host_mode_pipeline(result):
  r = result["modes"]["host"]
  assert r["host_workers"] == 2 and r["host_batches_in_flight"] == 4
  assert r["host_worker_s_per_batch"]["median"] > 0 and r["host_worker_samples_per_s_per_worker"] > 0
  assert r["host_wait_s"]["min"] >= 0


def test_ratios(result):
  ips = {m: r["images_per_s"] for m, r in result["modes"].items()}
  ratios = result["ratios_images_per_s"]
  assert ratios["fused_over_host"] == pytest.approx(ips["fused"] / ips["host"])
  assert ratios["fused_over_synthetic"] == pytest.approx(ips["fused"] / ips["synthetic"])


def test_stages(result):
  s = result["stages"]
  assert s["vae_encode_decode"] is None  # pixel tasks only: no VAE in this workload
  for name in ("synthesis", "clip_forward"):
    for k in STAGE_FIELDS:
      assert k in s[name], (name, k)
    assert s[name]["compile_s"] > 0 and s[name]["step_time_s"]["median"] > 0
  vision = result["analytic_flops"]["fused_step"]["vision_forward"]
  assert s["clip_forward"]["model_flops"] == vision
  assert 0.9 * vision <= s["clip_forward"]["xla_flops"] <= 3.0 * vision
  assert s["full_step"]["step_time_s"] == result["modes"]["fused"]["step_time_s"]


def test_analytic_flops_match_formula(result):
  expected = _tiny_expected_flops()
  fused = result["analytic_flops"]["fused_step"]
  assert fused["total"] == pytest.approx(expected, rel=1e-12)
  assert fused["vae_encode"] == fused["vae_decode"] == 0.0
  assert result["analytic_flops"]["fed_step"]["total"] == pytest.approx(expected, rel=1e-12)
  for mode in ("fused", "host", "synthetic"):
    assert result["modes"][mode]["model_flops_per_step"] == pytest.approx(expected, rel=1e-12)


def test_vae_flops_match_published_figures():
  """LATENT.md §4: SD kl-f8 208 / 476 GFLOP (224²), 273 / 622 (256²); TAEF2 ≈23.6 / 27.2 (224²)."""
  from mediclip_jax import flops
  sd = flops.autoencoder_kl_flops(224, (128, 256, 512, 512))
  assert sd["encode"] / 1e9 == pytest.approx(208, rel=0.01) and sd["decode"] / 1e9 == pytest.approx(476, rel=0.01)
  sd = flops.autoencoder_kl_flops(256, (128, 256, 512, 512))
  assert sd["encode"] / 1e9 == pytest.approx(273, rel=0.01) and sd["decode"] / 1e9 == pytest.approx(622, rel=0.01)
  tae = flops.taef2_flops(224)
  assert tae["encode"] / 1e9 == pytest.approx(23.6, rel=0.01) and tae["decode"] / 1e9 == pytest.approx(27.2, rel=0.01)
  # MEDICLIP.md §6.1: ≈ 81 GMAC per ViT-L/14 image at 224², text ≈ 140 GMAC forward.
  assert flops.vision_forward_flops(224, 14, 1024, 24) / 2e9 == pytest.approx(81, rel=0.01)
  assert flops.text_flops(21, 77, 768, 12, 768)["forward"] / 2e9 == pytest.approx(140, rel=0.01)


def test_peak_table_and_override():
  sys.path.insert(0, REPO)
  from launch import benchmark
  assert benchmark.peak_flops_per_device("NVIDIA H100 80GB HBM3", None) == (989e12, "table: 'h100' (dense bf16)")
  assert benchmark.peak_flops_per_device("NVIDIA H100 PCIe", None)[0] == 756e12
  assert benchmark.peak_flops_per_device("TPU v5p", None)[0] == 459e12
  assert benchmark.peak_flops_per_device("cpu", None) == (None, None)
  assert benchmark.peak_flops_per_device("cpu", 2.5) == (2.5e12, "--peak_tflops")
  with pytest.raises(ValueError, match="--peak_tflops"):
    benchmark.peak_flops_per_device("cpu", -1.0)


def test_host_mode_rejects_latent_tasks():
  from mediclip_jax.config_defaults import LATENT_MIX, base_config
  from mediclip_jax.train import bench_steps
  c = base_config("reference", "tiny")
  c.synthesis.probs = ml_collections.ConfigDict(dict(LATENT_MIX))
  with pytest.raises(ValueError, match="mode 'host'.*latent_deviation"):
    bench_steps.host_pixel_config(c.synthesis)


def test_fed_step_equals_fused_step_on_the_same_data():
  """The host/synthetic step is the fused step minus synthesis: same loss, metrics and updated parameters."""
  from mediclip_jax import parallel
  from mediclip_jax.config_defaults import base_config
  from mediclip_jax.train import bench_steps, loop, step as step_lib
  c = base_config("reference", "tiny")
  model = loop.build_detector(c)
  graphdef, params, frozen_model = step_lib.split_model(model)
  opt = step_lib.make_optimizer(c.train)
  mesh = parallel.make_mesh()
  loss_cfg = ml_collections.ConfigDict({"truncate_labels": True, "focal_gamma": 2.0})
  b = jax.device_count() * 2
  rng = np.random.default_rng(0)
  support = rng.random((b, 32, 32), dtype=np.float32)
  masks = (rng.random((b, 32, 32)) < 0.2).astype(np.float32)

  def given(key, step, images, sample_index, aux):  # "synthesis" that hands back known images and masks
    del key, step
    return {"image": images, "mask": aux["masks"][sample_index], "task": jnp.zeros(images.shape[:1], jnp.int32)}

  fused = step_lib.make_train_step(graphdef, opt, given, mesh, loss_cfg)
  fed = bench_steps.make_fed_train_step(graphdef, opt, mesh, loss_cfg)
  idx = np.arange(b, dtype=np.int32)
  s1, m1 = fused(parallel.replicate(step_lib.init_state(params, opt, 0), mesh),
                 parallel.replicate({"model": frozen_model, "aux": {"masks": masks}, "support": support}, mesh),
                 {"support_index": parallel.global_array(idx, mesh), "sample_index": parallel.global_array(idx, mesh)})
  s2, m2 = fed(parallel.replicate(step_lib.init_state(params, opt, 0), mesh),
               parallel.replicate({"model": frozen_model}, mesh),
               {"image": parallel.global_array(support, mesh), "mask": parallel.global_array(masks, mesh)})
  assert set(m1) == set(m2)
  for k in m1:
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m2[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-6, atol=1e-7),
               s1["params"], s2["params"])


def test_vae_flops_match_xla_on_a_small_autoencoder():
  """The AutoencoderKL formula against XLA's count on a small, non-SD shape (1 ResNet per block, 2 levels)."""
  from flax import nnx
  from mediclip_jax import flops
  from mediclip_jax.models import vae as vae_lib
  cfg = vae_lib.default_config()
  cfg.kind, cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels = "autoencoder_kl", (32, 64), 1, 4
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae_lib.build_vae(cfg)))  # shapes only: no init work
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  z = jnp.zeros((1, 32, 32, 4), jnp.float32)
  xla = {name: jax.jit(lambda s, a, f=name: getattr(nnx.merge(graphdef, s), f)(a)).lower(state, arg).compile()
         .cost_analysis()["flops"] for name, arg in (("encode", x), ("decode", z))}
  expected = flops.autoencoder_kl_flops(64, (32, 64), layers_per_block=1, latent_channels=4)
  for name in ("encode", "decode"):  # XLA skips the zero-padded taps at the borders: a few % below
    assert 0.95 * expected[name] <= xla[name] <= 1.05 * expected[name], name
