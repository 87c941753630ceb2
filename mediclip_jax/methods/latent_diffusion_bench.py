"""The latent diffusion baseline's benchmark hook: the train step's parts timed alone, the scoring loop at several
numbers of DDIM steps, and the analytic FLOPs behind launch/benchmark.py's MFU.

`bench_parts(config, mesh, trainable)` is registered in `mediclip_jax.methods.BENCH_PARTS`. As SSL-AnoVAE's, the
fused step synthesises no anomalies (it gathers device-resident training images by index and augments and noises
them on the device), so the host and synthetic modes do not apply. Unlike it, the hook gives stages, each jitted
alone on the benchmark's mesh and global batch B:

- `vae_encode`: the frozen VAE's encoding of B training images (the step's only VAE work);
- `denoiser_forward_backward`: the DiT's loss and its gradients to the weights on B noised latents;
- `score_<r>_reverse_steps`, one per `bench.score_steps` value r: the trainable's scorer (`latent_diffusion.
  make_scorer` with `score.reverse_steps = r`) on B training images: encode, noise to each t*, DDIM back in r
  steps (one `lax.scan`), decode, residual maps and scores. images/s against r is the scoring cost curve;
- the full train step is the fused mode (`full_step` in the JSON).

FLOPs follow `mediclip_jax.flops` (matmul and convolution work only, a multiply-add = 2 FLOPs): the VAE's from
`mediclip_bench.vae_flops_per_image` (read off the built VAE), the DiT's forward F per latent from
`dit.forward_flops`. One train step: B encodes + 3 B F (forward, weight gradients, input gradients; the input
gradients of the patch embedding and the timestep MLP's first layer are not needed: an over-count of 0.04 % of
the DiT's share at DiT-B/2, 0.2 % for the tiny DiT). Scoring one image: one encode, then per t* and per noise draw n(t*, r) F +
one decode, n(t*, r) the DDIM steps `diffusion_process.ddim_timesteps` gives (r, or t* when t* < r).

XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count, so the XLA count of a scoring
program with r >= 2 is that of one DDIM step (equal to the r = 1 program's, where XLA removes the loop): its
analytic figure is each scoring entry's "as_xla_counts". Left out: normalisations, activations, softmaxes, the
diffusion algebra, AdamW, the EMA, the augmentation (its blur is two small matrix products per image) and the
residual maps and their smoothing.

Checked against XLA's count of the compiled programs (tests/test_benchmark_latent_diffusion.py; CPU), XLA / analytic:
  configs/bench_latent_diffusion.py:tiny (64 px, tiny DiT, B = 4 and 8, fp32): train step 1.016 / 1.013, VAE encode
    1.003, DiT forward + backward 1.048, scoring 1.003 (against "as_xla_counts", at every r)
  configs/bench_latent_diffusion.py (256 px, DiT-B/2, B = 256, bf16; compiled, not run): train step 1.010 (43.21
    TFLOP analytic), DiT forward + backward 1.009, scoring 1.009
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mediclip_jax import parallel
from mediclip_jax.methods import diffusion_process as dp, latent_diffusion as ld
from mediclip_jax.methods.base import Trainable
from mediclip_jax.methods.bench import BenchParts, Stage
from mediclip_jax.methods.mediclip_bench import vae_flops_per_image
from mediclip_jax.models import dit, vae as vae_lib

NOT_APPLICABLE = ("the latent diffusion baseline has no anomaly synthesis to feed from elsewhere: its fused step "
                  "gathers device-resident training images by index and augments, encodes and noises them on the "
                  "device")


def score_stage_name(reverse_steps: int) -> str:
  return f"score_{reverse_steps}_reverse_steps"


def score_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`bench.score_steps`: the numbers of DDIM steps the scoring loop is timed at; ValueError naming the field."""
  steps = tuple(config.bench.score_steps)
  if not steps or any(not isinstance(r, int) or r < 1 for r in steps) or len(set(steps)) != len(steps):
    raise ValueError(f"config.bench.score_steps must be a non-empty tuple of distinct integers >= 1, "
                     f"got {config.bench.score_steps!r}")
  return steps


def train_step_flops(config: ml_collections.ConfigDict, geometry: tuple[int, int], vae_per_image: dict[str, float],
                     batch: int) -> dict[str, float]:
  """Analytic FLOPs of one train step on a global batch, by component, with their sum in "total"."""
  forward = dit.forward_flops(config.model, *geometry)
  f = {"vae_encode": batch * vae_per_image["encode"], "denoiser_forward": batch * forward,
       "denoiser_backward": 2 * batch * forward}
  f["total"] = float(sum(f.values()))
  return f


def score_flops(config: ml_collections.ConfigDict, geometry: tuple[int, int], vae_per_image: dict[str, float],
                batch: int, reverse_steps: int) -> dict[str, float]:
  """Analytic FLOPs of scoring a batch with `reverse_steps` DDIM steps per t*, by component, with their sum in
  "total"; "as_xla_counts" is the same with one DiT call per t* and draw, what XLA's cost analysis counts (it
  holds each DDIM `lax.scan` body once), the figure to compare `xla_flops` with."""
  s = config.score
  forward = dit.forward_flops(config.model, *geometry)
  evaluations = sum(len(dp.ddim_timesteps(int(t), reverse_steps)) - 1 for t in s.t_stars)  # DiT calls per draw
  draws, n_t = int(s.draws), len(s.t_stars)
  f = {"vae_encode": batch * vae_per_image["encode"],
       "denoiser_forward": batch * draws * evaluations * forward,
       "vae_decode": batch * draws * n_t * vae_per_image["decode"]}
  f["total"] = float(sum(f.values()))
  f["as_xla_counts"] = f["total"] - f["denoiser_forward"] + batch * draws * n_t * forward
  return f


def make_encode_stage(codec, mesh: Mesh):
  """Jitted `f(vae_state, images (B,H,W)) -> latents`: the step's VAE encoding alone."""
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(codec.encode, in_shardings=(rep, data), out_shardings=data)


def make_denoiser_stage(graphdef, mesh: Mesh):
  """Jitted `f(params, z_t, t, target) -> (loss, grads)`: the DiT's mean squared error and its weight gradients,
  as the step computes them (no optimizer update)."""

  loss_and_grads = functools.partial(jax.value_and_grad(ld.denoiser_loss, argnums=1), graphdef)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(loss_and_grads, in_shardings=(rep, data, data, data), out_shardings=(rep, rep))


def bench_parts(config: ml_collections.ConfigDict, mesh: Mesh, trainable: Trainable) -> BenchParts:
  """The baseline's benchmark parts: train-step and scoring FLOPs, the stages, the JSON facts; no fed modes.

  The VAE, the DiT's graph, the schedule and the scoring noise are built again from `config` (deterministic in
  the seeds, so the trainable's); the weights and latent statistics are the trainable's state, the images its
  training images."""
  steps = score_steps(config)
  batch, size, seed = int(config.train.batch_size), int(config.data.image_size), int(config.seed)
  vae = vae_lib.load_vae(config.vae)
  geometry = side, channels = ld.latent_geometry(config, vae)
  vae_per_image = vae_flops_per_image(vae, size)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: ld.build_model(config, geometry)), nnx.Param)
  flops = {"fused_step": train_step_flops(config, geometry, vae_per_image, batch)}
  for r in steps:
    flops[score_stage_name(r)] = score_flops(config, geometry, vae_per_image, batch, r)

  def stages() -> list[Stage]:
    codec = vae_lib.codec(vae)
    vae_state = parallel.replicate(codec.state, mesh)
    codec = codec._replace(state=vae_state)
    data = parallel.batch_sharding(mesh)
    train_images = parallel.replicate(np.asarray(trainable.calibration_images, np.float32), mesh)
    index = parallel.global_array(trainable.local_batch(0)["image_index"], mesh)
    images = jax.jit(lambda x, i: jnp.take(x, i, axis=0), out_shardings=data)(train_images, index)
    key = jax.random.key(seed)

    def noised_latents(k):  # random stand-ins of the step's z_t, t and target (the DiT's cost is data-independent)
      kz, kt, ke = jax.random.split(k, 3)
      shape = (batch, side, side, channels)
      return (jax.random.normal(kz, shape), jax.random.randint(kt, (batch,), 1, int(config.diffusion.steps) + 1),
              jax.random.normal(ke, shape))

    z_t, t, target = jax.jit(noised_latents, out_shardings=data)(key)
    state = trainable.state
    schedule = dp.make_schedule(config.diffusion.schedule, int(config.diffusion.steps))
    noise_fields = parallel.replicate(ld.score_noise_fields(config, geometry), mesh)
    fwd = flops["fused_step"]
    out = [Stage("vae_encode", lambda: make_encode_stage(codec, mesh), lambda i: (vae_state, images),
                 fwd["vae_encode"], f"{config.vae.kind} encode of B training images, no gradient"),
           Stage("denoiser_forward_backward", lambda: make_denoiser_stage(graphdef, mesh),
                 lambda i: (state["params"], z_t, t, target), fwd["denoiser_forward"] + fwd["denoiser_backward"],
                 "DiT loss and weight gradients on B noised latents (no optimizer update)")]
    for r in steps:
      scored = config.copy_and_resolve_references()
      scored.score.reverse_steps = r
      build = lambda scored=scored: ld.make_scorer(graphdef, codec, scored, schedule, mesh, vae_state,
                                                   noise_fields)(state)
      out.append(Stage(score_stage_name(r), build, lambda i: (images,), flops[score_stage_name(r)]["total"],
                       f"the scorer on B images: encode, noise to t* {tuple(config.score.t_stars)}, {r} DDIM steps, "
                       f"decode, residual maps. xla_flops holds each DDIM loop's body once (XLA's cost analysis "
                       f"ignores trip counts): compare it with analytic_flops.{score_stage_name(r)}.as_xla_counts"))
    return out

  m, s, d = config.model, config.score, config.diffusion
  info = {
      "step_program": "one jitted data-parallel step (methods.latent_diffusion.make_train_step): per-sample "
                      "augmentation, timesteps and noise under shard_map, frozen VAE encode, DiT eps/v loss, AdamW "
                      "and the EMA, over a 1-D 'data' mesh; scoring: methods.latent_diffusion.make_scorer",
      "dtype_policy": {"params": "float32", "dit_compute": m.dtype, "vae_compute": config.vae.dtype,
                       "default_matmul_precision": jax.config.jax_default_matmul_precision,
                       "layernorm_softmax_diffusion_losses": "float32"},
      "model": {"architecture": "DiT", "parameters": trainable.info["backbone"]["parameters"],
                "patch_size": int(m.patch_size), "width": int(m.width), "depth": int(m.depth),
                "heads": int(m.heads), "mlp_ratio": float(m.mlp_ratio), "tokens": (side // int(m.patch_size)) ** 2,
                "latent": {"side": side, "channels": channels},
                "dit_forward_flops_per_latent": dit.forward_flops(m, side, channels),
                "vae": {"kind": config.vae.kind, "path": config.vae.path, "flops_per_image": vae_per_image},
                "diffusion": {"schedule": d.schedule, "steps": int(d.steps), "prediction": d.prediction,
                              "noise": d.noise},
                "scoring": {"t_stars": list(s.t_stars), "draws": int(s.draws), "reverse_steps": int(s.reverse_steps),
                            "reverse_steps_timed": list(steps), "residual": s.residual,
                            "image_score": s.image_score}},
      "synthesis": {"anomaly_synthesis": None, "augment": config.augment.preset,
                    "note": "per-sample augmentation and diffusion noise on the device; not in the model FLOPs"},
  }
  unavailable = {mode: NOT_APPLICABLE for mode in ("host", "synthetic")}
  return BenchParts(fed_step=None, feeds={}, unavailable=unavailable, stages=stages, flops=flops, info=info)
