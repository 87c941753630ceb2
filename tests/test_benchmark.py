"""launch/benchmark.py and MediCLIP's benchmark parts: analytic FLOPs against XLA, the JSON, the suite.

The analytic FLOP counts (mediclip_jax/flops.py) are checked component by component against
XLA's own count (`Compiled.cost_analysis()["flops"]`) of the model code, compiled on abstract
shapes (nothing runs). XLA counts every multiply-add of a dot or convolution as 2 FLOPs, as the
analytic convention does, plus elementwise work (normalisations, activations, residual adds),
which the analytic count leaves out: so XLA / analytic is at least 1 and exceeds 1 by the
elementwise share. At the widths used here (256) that share is about 1 % (measured ratios are in
each test), so the tolerances are a few %: below what any missing or doubled term (a block,
attention, a backward pass, a convolution, a batch multiplicity) moves the ratio.
"""
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
from flax import nnx

from mediclip_jax import config_defaults, flops, parallel
from mediclip_jax.methods import mediclip, mediclip_bench
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import CLIP, CLIPConfig
from mediclip_jax.models.mediclip import MediCLIP, upsample_align_corners
from mediclip_jax.weights.tokenizer import tokenizer_for
from tests.conftest import REPO

PEAK_TFLOPS = 1.0
# Low XLA backend optimisation: compiles ~1/3 faster; the subprocess runs check fields, not speed.
XLA_FLAGS = "--xla_backend_optimization_level=0"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS,
           PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
BENCHMARK = str(REPO / "launch" / "benchmark.py")

# A CLIP wide enough (256) for matmuls to dominate XLA's count, small enough to compile in seconds.
WIDE = CLIPConfig(embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=4, vision_heads=4,
                  text_width=256, text_layers=1, text_heads=4)
WIDE_TAPS = (1, 2)  # blocks 3 and 4 are dead code: the count must stop at the last tap


# XLA's FLOP count is read off the HLO after XLA's own passes, before LLVM generates code: the backend
# optimisation level leaves it unchanged (the same count, to the FLOP, for every program in these tests and
# in tests/test_benchmark_ssl_anovae.py) and at 0 these compiles take about 1/3 less CPU.
FLOP_COUNT_COMPILE = {"xla_backend_optimization_level": 0}


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile(FLOP_COUNT_COMPILE).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def abstract_detector(cfg: CLIPConfig = WIDE, taps=WIDE_TAPS) -> MediCLIP:
  tok = tokenizer_for(None, None)
  return nnx.eval_shape(lambda: MediCLIP(CLIP(cfg, rngs=nnx.Rngs(0)), tok, tap_layers=taps, rngs=nnx.Rngs(1)))


def sds(*shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs against XLA
# ------------------------------------------------------------------------------------------------

def test_vision_forward_flops_match_xla():
  """Measured 1.010 (width 256, 65 tokens); a missing attention term is -4 %, the patch embedding -3 %,
  counting all 4 blocks instead of the 2 up to the last tap +100 %."""
  model = abstract_detector()
  graphdef, state = nnx.split(model.clip)
  xla = xla_flops(lambda s, x: nnx.merge(graphdef, s).visual(x, tap_layers=WIDE_TAPS).taps, state, sds(4, 64, 64, 3))
  analytic = 4 * flops.vision_forward_flops(64, WIDE.patch_size, WIDE.vision_width, max(WIDE_TAPS))
  assert 1.0 <= xla / analytic <= 1.02, xla / analytic


def test_text_forward_and_backward_flops_match_xla():
  """The prompt path forward and its backward to the learnable contexts (activation gradients of frozen
  weights only). Measured 1.011 (21 prompts x 77 tokens, width 256); weight gradients would add +50 %
  of the linear layers, an attention backward counted once instead of twice -2.5 %, no backward -50 %."""
  model = abstract_detector()
  graphdef, params, frozen = mediclip.split_model(model)
  n_prompts, context = model.prompts.token_ids.get_value().shape

  def loss(p, fr, w):  # a weighted sum: the cotangent is an input, so XLA cannot fold the backward
    return jnp.sum(nnx.merge(graphdef, p, fr).text_features() * w)

  xla = xla_flops(jax.grad(loss), params, frozen, sds(WIDE.embed_dim, 2))
  t = flops.text_flops(n_prompts, context, WIDE.text_width, WIDE.text_layers, WIDE.embed_dim)
  assert 1.0 <= xla / (t["forward"] + t["backward"]) <= 1.02, xla / (t["forward"] + t["backward"])


def test_adapter_flops_match_xla():
  """Forward and weight-gradient backward (their inputs are stop-gradient), the model's Adapters on given
  cotangents. Measured 1.014 (the L2 normalisation is elementwise); an input gradient would be +50 %."""
  model = abstract_detector()
  graphdef, state = nnx.split(model.adapters)
  b, n, taps = 4, 64, len(WIDE_TAPS)
  tokens = [sds(b, n, WIDE.vision_width) for _ in range(taps)]
  cotangents = [sds(b, n, WIDE.embed_dim) for _ in range(taps)]

  def fwd_bwd(s, tokens, cotangents):
    out, vjp = jax.vjp(lambda s_: nnx.merge(graphdef, s_)(tokens), s)
    return out, vjp(cotangents)

  xla = xla_flops(fwd_bwd, state, tokens, cotangents)
  a = flops.adapter_flops(b, 8, taps, WIDE.vision_width, WIDE.embed_dim)
  assert 1.0 <= xla / (a["forward"] + a["backward"]) <= 1.02, xla / (a["forward"] + a["backward"])


def test_head_flops_match_xla():
  """Layer-averaged similarities with the text features (forward, gradients to both operands) and the
  align-corners upsampling (forward, backward), on given cotangents, as MediCLIP.__call__ computes them.
  Measured 1.0007; the upsampling backward left out would be -17 %, the text-feature gradient -22 %."""
  b, g, size, taps, e = 4, 8, 64, 3, 256

  def head(feats, text):
    sims = jnp.mean(feats @ text, axis=0).reshape(b, g, g, 2)
    return upsample_align_corners(sims, size)

  def fwd_bwd(feats, text, cotangent):
    out, vjp = jax.vjp(head, feats, text)
    return out, vjp(cotangent)

  xla = xla_flops(fwd_bwd, sds(taps, b, g * g, e), sds(e, 2), sds(b, size, size, 2))
  analytic = flops.head_flops(b, g, size, taps, e)
  assert 1.0 <= xla / analytic <= 1.01, xla / analytic


@pytest.mark.parametrize("kind,arch", [
    ("autoencoder_kl", {"block_out_channels": (64, 128), "layers_per_block": 2}),
    ("autoencoder_kl", {"block_out_channels": (64, 128), "layers_per_block": 1, "latent_channels": 16,
                        "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}),
    ("taef2", {"taef2_channels": 32, "taef2_latent_channels": 16}),
])
def test_vae_flops_match_xla(kind, arch):
  """`mediclip_bench.vae_flops_per_image` (read off the built VAE) against XLA, encode and decode at 64 px.

  Measured 1.005 to 1.009 (GroupNorm, SiLU and residual adds). Convolutions count only the taps that
  land on the image, as XLA does: counting the zero padding too would be -1.5 to -3 % at 64 px; a
  missing ResNet convolution or the mid-block attention moves the ratio by more than 4 %.
  """
  cfg = vae_lib.default_config()
  cfg.kind = kind
  for k, v in arch.items():
    cfg[k] = v
  vae = nnx.eval_shape(lambda: vae_lib.build_vae(cfg))
  graphdef, state = nnx.split(vae)
  latent = 64 // vae.downscale
  xla = {"encode": xla_flops(lambda s, x: nnx.merge(graphdef, s).encode(x), state, sds(1, 64, 64, 3)),
         "decode": xla_flops(lambda s, z: nnx.merge(graphdef, s).decode(z), state,
                             sds(1, latent, latent, vae.latent_channels))}
  analytic = mediclip_bench.vae_flops_per_image(vae, 64)
  for part in ("encode", "decode"):
    assert 1.0 <= xla[part] / analytic[part] <= 1.02, (part, xla[part] / analytic[part])


def test_fed_step_flops_match_xla():
  """The whole step without synthesis (the program of the host and synthetic modes): vision forward for
  B images, text forward and backward, adapters, head, loss and Adam update. Measured 1.013; checks the
  composition (batch multiplicities, which components are in the step)."""
  c = config_defaults.mediclip_config("reference", "tiny")
  model = abstract_detector()
  graphdef, params, frozen = mediclip.split_model(model)
  opt = mediclip.make_optimizer(c.train)
  state = jax.eval_shape(lambda p: mediclip.init_state(p, opt, 0), params)
  step = mediclip_bench.make_fed_train_step(graphdef, opt, parallel.make_mesh(), c.train)
  b = 4 * jax.device_count()
  compiled = step.trace(state, {"model": frozen}, {"image": sds(b, 64, 64), "mask": sds(b, 64, 64)}).lower().compile(
      FLOP_COUNT_COMPILE)
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) * jax.device_count()
  analytic = mediclip_bench.step_flops(model, b, 64, None)
  assert analytic["vae_encode"] == analytic["vae_decode"] == 0.0
  assert 1.0 <= xla / analytic["total"] <= 1.025, xla / analytic["total"]


@pytest.mark.slow
def test_latent_synthesis_runs_the_vae_as_counted():
  """Synthesis with latent tasks encodes the B images and decodes 2B latents per step, as the analytic
  step count assumes: XLA's count of the synthesis program over B * encode + 2B * decode. Measured
  1.008 (the pixel tasks and the latent arithmetic on top); decoding only B would be about -40 %."""
  from mediclip_jax.synthesis import mix
  c = config_defaults.mediclip_config("reference", "tiny")
  c.data.image_size = 64
  config_defaults.use_latent_tasks(c)
  c.synthesis.dispatch = "switch"
  c.vae.kind, c.vae.block_out_channels, c.vae.layers_per_block = "autoencoder_kl", (64, 128), 2
  vae = nnx.eval_shape(lambda: vae_lib.build_vae(c.vae))
  synthesize, make_pools = mix.build_synthesis(c.synthesis, vae_lib.codec(vae))
  pools = jax.eval_shape(make_pools, sds(16, 64, 64))
  b = 4
  xla = xla_flops(synthesize, jax.random.key(0), 0, sds(b, 64, 64), jax.ShapeDtypeStruct((b,), jnp.int32), pools)
  per = mediclip_bench.vae_flops_per_image(vae, 64)
  expected = b * per["encode"] + 2 * b * per["decode"]
  assert 1.0 <= xla / expected <= 1.02, xla / expected


# ------------------------------------------------------------------------------------------------
# Programs and helpers
# ------------------------------------------------------------------------------------------------

def test_aot_compile_turns_closed_over_arrays_into_arguments():
  """A Trainable's train_step closes over its frozen arrays: the compiled program takes them as arguments
  (no constant folded into the executable), gives the eager result, and donates the state."""
  from launch import benchmark
  frozen = jnp.asarray(np.random.default_rng(0).random((256, 256), np.float32))
  inner = jax.jit(lambda s, w, b: (s + b @ w, {"loss": jnp.sum(b @ w)}), donate_argnums=0)
  step = lambda s, b: inner(s, frozen, b)
  s0, batch = jnp.zeros((4, 256)), jnp.ones((4, 256))
  expected = jax.device_get(step(s0.copy(), batch))
  program = benchmark.aot_compile(step, s0, batch, donate_argnums=(0,))
  assert set(program.times) == {"trace_s", "lower_s", "compile_s"}
  assert program.compiled.memory_analysis().argument_size_in_bytes >= frozen.nbytes
  state = s0.copy()
  out = program.call(state, batch)
  assert state.is_deleted()
  jax.tree.map(np.testing.assert_allclose, jax.device_get(out), expected)
  assert benchmark.cost_flops(program.compiled) >= 2 * 4 * 256 * 256


def test_peak_table_and_override():
  from launch import benchmark
  assert benchmark.peak_flops_per_device("NVIDIA H100 80GB HBM3", None) == (989e12, "table: 'h100' (dense bf16)")
  assert benchmark.peak_flops_per_device("NVIDIA H100 PCIe", None)[0] == 756e12
  assert benchmark.peak_flops_per_device("TPU v5p", None)[0] == 459e12
  assert benchmark.peak_flops_per_device("cpu", None) == (None, None)
  assert benchmark.peak_flops_per_device("cpu", 2.5) == (2.5e12, "--peak_tflops")
  with pytest.raises(ValueError, match="--peak_tflops"):
    benchmark.peak_flops_per_device("cpu", -1.0)


def test_host_mode_rejects_latent_tasks():
  c = config_defaults.mediclip_config("reference", "tiny")
  config_defaults.use_latent_tasks(c)
  with pytest.raises(ValueError, match="mode 'host'.*latent_deviation"):
    mediclip_bench.host_pixel_config(c.synthesis)
  assert "latent_deviation" in mediclip_bench.host_unavailable(c)


@pytest.mark.slow
def test_fed_step_equals_fused_step_on_the_same_data():
  """The host/synthetic step is the fused step minus synthesis: same loss, metrics and updated parameters."""
  c = config_defaults.mediclip_config("reference", "tiny")
  model = mediclip.build_detector(c)
  graphdef, params, frozen_model = mediclip.split_model(model)
  opt = mediclip.make_optimizer(c.train)
  mesh = parallel.make_mesh()
  b = jax.device_count() * 2
  rng = np.random.default_rng(0)
  support = rng.random((b, 32, 32), dtype=np.float32)
  masks = (rng.random((b, 32, 32)) < 0.2).astype(np.float32)

  def given(key, step, images, sample_index, pools):  # "synthesis" that hands back known images and masks
    del key, step
    return {"image": images, "mask": pools["masks"][sample_index], "task": jnp.zeros(images.shape[:1], jnp.int32)}

  fused = mediclip.make_train_step(graphdef, opt, given, mesh, c.train)
  fed = mediclip_bench.make_fed_train_step(graphdef, opt, mesh, c.train)
  idx = np.arange(b, dtype=np.int32)
  s1, m1 = fused(parallel.replicate(mediclip.init_state(params, opt, 0), mesh),
                 parallel.replicate({"model": frozen_model, "pools": {"masks": masks}, "support": support}, mesh),
                 {"support_index": parallel.global_array(idx, mesh), "sample_index": parallel.global_array(idx, mesh)})
  s2, m2 = fed(parallel.replicate(mediclip.init_state(params, opt, 0), mesh),
               parallel.replicate({"model": frozen_model}, mesh),
               {"image": parallel.global_array(support, mesh), "mask": parallel.global_array(masks, mesh)})
  assert set(m1) == set(m2)
  for k in m1:
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m2[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-6, atol=1e-7),
               s1["params"], s2["params"])


# ------------------------------------------------------------------------------------------------
# The launcher end to end (subprocesses)
# ------------------------------------------------------------------------------------------------

TOP_FIELDS = ("schema", "config_name", "method", "config", "timing", "step_program", "device", "versions",
              "xla_flags", "compilation_cache", "dtype_policy", "batch", "image_size", "support", "model",
              "synthesis", "peak_flops_per_device", "peak_source", "mfu_note", "analytic_flops", "xla_flops_note",
              "modes", "skipped", "errors", "ratios_images_per_s", "stages", "profile_steps", "wall_s")
MODE_FIELDS = ("trace_s", "lower_s", "compile_s", "first_steps_s", "warmup_steps", "timed_steps", "step_time_s",
               "images_per_s", "images_per_s_per_device", "images_per_s_mean", "model_flops_per_step", "xla_flops",
               "model_tflops_per_s_per_device", "mfu", "peak_memory_bytes", "peak_memory_note", "memory_analysis",
               "final_loss", "profile_dir", "input", "compile_shared_with")
HOST_FIELDS = ("host_workers", "host_batches_in_flight", "host_wall_s_incl_pool_start", "host_wait_s",
               "host_worker_s_per_batch", "host_worker_samples_per_s_per_worker")
STAGE_FIELDS = ("trace_s", "lower_s", "compile_s", "step_time_s", "images_per_s", "model_flops", "xla_flops", "mfu")


def run_benchmark(*args: str, timeout: int = 600, prelude: str = "") -> subprocess.CompletedProcess:
  """launch/benchmark.py in a fresh CPU process; `prelude` runs first (to simulate a missing package)."""
  script = (f"import runpy, sys\n{prelude}\nsys.argv = {[BENCHMARK, *args]!r}\n"
            f"runpy.run_path({BENCHMARK!r}, run_name='__main__')\n")
  return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  """One bench_tiny run: all three modes, the stage breakdown, a one-step profiler window, a peak by flag."""
  tmp = tmp_path_factory.mktemp("bench")
  out = tmp / "result.json"
  proc = run_benchmark("--config", str(REPO / "configs" / "bench_tiny.py"), "--out", str(out), "--workdir",
                       str(tmp / "work"), "--modes", "fused,host,synthetic", "--config.bench.steps=2",
                       "--config.bench.warmup_steps=1", "--profile_steps", "1", "--peak_tflops", str(PEAK_TFLOPS))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "fused_over_host" in proc.stdout
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
def test_top_level_fields(result):
  for k in TOP_FIELDS:
    assert k in result, k
  d = result["device"]
  assert d["platform"] == "cpu" and d["count"] >= 1 and d["process_count"] == 1
  assert set(result["versions"]) >= {"jax", "jaxlib", "flax", "optax", "numpy", "opencv", "scipy", "python"}
  assert result["versions"]["jax"] == jax.__version__ and result["versions"]["opencv"]
  assert result["xla_flags"] == XLA_FLAGS
  assert result["compilation_cache"] == os.environ.get("JAX_COMPILATION_CACHE_DIR")
  assert result["method"] == "mediclip" and result["errors"] == {} and result["skipped"] == {}
  assert result["dtype_policy"]["params"] == "float32" and result["dtype_policy"]["clip_compute"] == "float32"
  assert result["batch"] == {"global": 8 * d["count"], "per_device": 8, "per_process": 8 * d["count"]}
  assert result["image_size"] == 64 and result["support"]["kind"] == "phantom"
  assert result["model"]["clip_variant"] == "tiny" and result["model"]["tap_layers"] == [2, 3, 4]
  assert result["synthesis"]["latent_tasks"] is False and result["synthesis"]["vae"] is None
  assert result["synthesis"]["k_shot"] == 16
  assert result["peak_flops_per_device"] == pytest.approx(PEAK_TFLOPS * 1e12)
  assert result["peak_source"] == "--peak_tflops"
  assert result["config"]["bench"]["steps"] == 2 and result["config"]["train"]["batch_size"] == 8 * d["count"]
  assert result["wall_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fused", "host", "synthetic"])
def test_mode_fields_and_values(result, mode):
  r = result["modes"][mode]
  for k in MODE_FIELDS + (HOST_FIELDS if mode == "host" else ()):
    assert k in r, (mode, k)
  assert r["trace_s"] > 0 and r["lower_s"] > 0 and r["compile_s"] > 0
  assert r["compile_shared_with"] == {"fused": None, "host": None, "synthetic": "host"}[mode]
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


@pytest.mark.slow
def test_xla_flops_of_the_timed_programs(result):
  """The recorded XLA counts against the recorded analytic ones. At the tiny widths (64 vision, 32 text)
  elementwise work is ~8 % of the step (measured 1.077 for the fed step, 1.041 for the CLIP forward), so
  the bound is 1.10 here; the tight per-component checks are the tests above. Fused minus fed is the
  synthesis, which the synthesis stage's program counts on its own (the same to 1 %)."""
  modes, stages = result["modes"], result["stages"]
  fed = result["analytic_flops"]["fed_step"]["total"]
  assert result["analytic_flops"]["fused_step"]["total"] == fed  # no VAE: synthesis has no model FLOPs
  for m in ("host", "synthetic"):
    assert modes[m]["model_flops_per_step"] == fed
    assert 1.0 <= modes[m]["xla_flops"] / fed <= 1.10, (m, modes[m]["xla_flops"] / fed)
  vision = result["analytic_flops"]["fused_step"]["vision_forward"]
  assert stages["clip_forward"]["model_flops"] == vision
  assert 1.0 <= stages["clip_forward"]["xla_flops"] / vision <= 1.06
  synthesis = modes["fused"]["xla_flops"] - modes["synthetic"]["xla_flops"]
  assert synthesis == pytest.approx(stages["synthesis"]["xla_flops"], rel=0.01)


@pytest.mark.slow
def test_host_mode_pipeline(result):
  r = result["modes"]["host"]
  assert r["host_workers"] == 2 and r["host_batches_in_flight"] == 4
  assert r["host_worker_s_per_batch"]["median"] > 0 and r["host_worker_samples_per_s_per_worker"] > 0
  assert r["host_wait_s"]["min"] >= 0


@pytest.mark.slow
def test_ratios_and_stages(result):
  ips = {m: r["images_per_s"] for m, r in result["modes"].items()}
  ratios = result["ratios_images_per_s"]
  assert ratios["fused_over_host"] == pytest.approx(ips["fused"] / ips["host"])
  assert ratios["fused_over_synthetic"] == pytest.approx(ips["fused"] / ips["synthetic"])
  s = result["stages"]
  assert s["vae_encode_decode"] is None  # pixel tasks only: no VAE in this workload
  for name in ("synthesis", "clip_forward"):
    for k in STAGE_FIELDS:
      assert k in s[name], (name, k)
    assert s[name]["compile_s"] > 0 and s[name]["step_time_s"]["median"] > 0
  assert s["full_step"]["step_time_s"] == result["modes"]["fused"]["step_time_s"]


def test_a_failed_setup_still_writes_the_json(tmp_path):
  out = tmp_path / "bad.json"
  proc = run_benchmark("--config", str(REPO / "configs" / "bench_tiny.py"), "--out", str(out),
                       "--modes", "fused,bogus", timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert "bogus" in r["errors"]["setup"] and r["modes"] == {} and r["device"]["platform"] == "cpu"


@pytest.mark.slow
def test_without_opencv_host_mode_is_skipped_and_a_failing_stage_costs_nothing_measured(tmp_path):
  """cv2 made unimportable and the CLIP-forward stage made to fail: host mode is skipped with its reason
  (printed and recorded), the synthetic mode and the synthesis stage are still measured, the failure is
  recorded, the exit status is 1, and the JSON is written."""
  out = tmp_path / "nocv2.json"
  prelude = ("sys.modules['cv2'] = None\n"
             "from mediclip_jax.methods import mediclip_bench\n"
             "def broken(*a, **k):\n  raise RuntimeError('injected stage failure')\n"
             "mediclip_bench.make_clip_forward_stage = broken\n")
  proc = run_benchmark("--config", str(REPO / "configs" / "bench_tiny.py"), "--out", str(out), "--workdir",
                       str(tmp_path / "work"), "--modes", "host,synthetic", "--config.bench.steps=1",
                       "--config.bench.warmup_steps=1", prelude=prelude)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "mode host skipped" in proc.stderr and "OpenCV" in proc.stderr
  r = json.loads(out.read_text())
  assert "OpenCV and scipy" in r["skipped"]["host"] and "[bench]" in r["skipped"]["host"]
  assert r["versions"]["opencv"] is None
  assert set(r["modes"]) == {"synthetic"} and r["modes"]["synthetic"]["step_time_s"]["n"] == 1
  assert r["stages"]["synthesis"]["step_time_s"]["n"] == 1 and "clip_forward" not in r["stages"]
  assert r["errors"] == {"stages.clip_forward": "RuntimeError: injected stage failure"}


@pytest.mark.slow
def test_suite_at_tiny_scale(tmp_path, shared_dir):
  """The whole suite in one CPU process with stand-in sizes: every entry present, one JSON, the table."""
  out = tmp_path / "suite.json"
  proc = run_benchmark("--suite", "--suite_scale", "tiny", "--out", str(out), "--workdir", str(tmp_path / "work"),
                       "--suite_data_root", str(shared_dir / "data" / "brainmri"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  s = json.loads(out.read_text())
  assert s["schema"] == "mediclip_jax.benchmark_suite/1" and s["scale"] == "tiny" and s["errors"] == {}
  assert s["compilation_cache"] == os.environ.get("JAX_COMPILATION_CACHE_DIR")
  e = s["entries"]
  assert set(e) == {"brainmri", "reference", "latent", "method_mediclip", "method_ssl_anovae", "method_mirage",
                    "method_latent_diffusion"}
  for name in ("method_ssl_anovae", "method_mirage", "method_latent_diffusion"):
    assert set(e[name]["modes"]) == {"fused"}
    assert e[name]["analytic_flops"]["fused_step"]["total"] > 0
  assert e["method_mirage"]["bank"]["bytes"] == e["method_mirage"]["bank"]["size"] * e["method_mirage"]["bank"]["dim"] * 4
  assert set(e["reference"]["modes"]) == {"fused", "host", "synthetic"}
  assert set(e["latent"]["modes"]) == {"fused"} and e["latent"]["synthesis"]["latent_tasks"]
  assert e["latent"]["stages"]["vae_encode_decode"]["step_time_s"]["n"] == 2
  assert "skipped" in e["latent"]["stages"]["clip_forward"] and "skipped" in e["latent"]["stages"]["synthesis"]
  assert e["method_mediclip"]["same_as"] == "entries.reference.modes.fused"
  b = e["brainmri"]
  assert b["steps"] == 4 and b["config"]["eval"]["every_epochs"] == b["config"]["train"]["epochs"] == 2
  assert b["compile_s"] > 0 and b["steps_s"] > 0
  assert b["wall_s"] == pytest.approx(b["compile_s"] + b["steps_s"] + b["other_s"])
  assert 0.0 <= b["image_auroc"] <= 1.0
  assert "time to result" in proc.stdout and "reference" in proc.stdout
