"""The latent diffusion baseline's parts: the DiT, Perlin noise, the ε/v algebra, config validation, the residual
maps, and the training step on a fixed batch (its loss falls); the scorer and reconstructor on the real TAEF2."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_pipelines import datasets, phantom
from mediclip_jax import parallel
from mediclip_jax.config_defaults import latent_diffusion_config
from mediclip_jax.methods import diffusion_process as dp, latent_diffusion as ld
from mediclip_jax.models import dit


def _tiny_dit() -> ml_collections.ConfigDict:
  c = dit.default_config()
  c.patch_size, c.width, c.depth, c.heads = 2, 32, 2, 4
  return c


def test_dit_maps_latents_to_their_shape_starts_at_zero_and_is_conditioned_on_t():
  model = dit.DiT(_tiny_dit(), 8, 4, rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  out = model(z, jnp.array([1, 500, 999]))
  assert out.shape == z.shape and float(jnp.abs(out).max()) == 0.0  # adaLN-Zero: the output layer starts at 0
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)  # off the zero init: every weight a little random
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  m = nnx.merge(graphdef, params)
  a, b = m(z, jnp.array([1, 1, 1])), m(z, jnp.array([900, 900, 900]))
  assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(a - b).max()) > 1e-4  # the timestep conditions the output
  # Tokens are patches: without the blocks (no attention), a latent pixel changes only its own patch's output.
  flat = dit.DiT(_tiny_dit(), 8, 4, rngs=nnx.Rngs(0))
  flat.blocks = nnx.List([])
  g2, p2 = nnx.split(flat, nnx.Param)
  p2 = jax.tree.map(lambda x: x + 0.01, p2)
  f = nnx.merge(g2, p2)
  dz = z.at[0, 0, 0, 0].add(1.0)
  changed = np.abs(np.asarray(f(dz, jnp.ones(3, jnp.int32)) - f(z, jnp.ones(3, jnp.int32))))[0].max(-1) > 0
  assert changed[:2, :2].all() and changed.sum() == 4  # the 2x2 patch of pixel (0, 0), nothing else


def test_dit_flops_count_matches_xla_within_ten_percent():
  cfg = _tiny_dit()
  model = dit.DiT(cfg, 8, 4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  fn = jax.jit(lambda p, z, t: nnx.merge(graphdef, p)(z, t))
  cost = fn.lower(params, jnp.zeros((2, 8, 8, 4)), jnp.ones(2, jnp.int32)).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  ours = 2 * dit.forward_flops(cfg, 8, 4)
  assert 0.9 * xla <= ours <= 1.0 * xla, (ours, xla)  # matmuls only: at or below XLA's count


def test_dit_validation_names_the_field():
  with pytest.raises(ValueError, match="config.model.patch_size"):
    dit.validate_config(ml_collections.ConfigDict({**_tiny_dit(), "patch_size": 3}), 8)
  with pytest.raises(ValueError, match=r"config.model.width \(32\) must be divisible by config.model.heads"):
    dit.validate_config(ml_collections.ConfigDict({**_tiny_dit(), "heads": 5}), 8)


def test_perlin_noise_is_standardised_smooth_and_seeded():
  n = dp.perlin_noise(jax.random.key(0), (4, 16, 16, 3), 2, 3)
  assert n.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(n.mean(axis=(1, 2))), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(n.std(axis=(1, 2))), 1.0, atol=1e-4)
  g = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  neighbour = lambda x: float(jnp.mean(x[:, 1:] * x[:, :-1]))  # lag-1 autocorrelation (unit variance)
  assert neighbour(n) > 0.5 and abs(neighbour(g)) < 0.1  # spatially correlated, unlike white noise
  np.testing.assert_array_equal(n, dp.perlin_noise(jax.random.key(0), (4, 16, 16, 3), 2, 3))
  assert float(jnp.abs(n - dp.perlin_noise(jax.random.key(1), (4, 16, 16, 3), 2, 3)).max()) > 0.5
  with pytest.raises(ValueError, match="latent side"):
    dp.perlin_noise(jax.random.key(0), (1, 8, 8, 1), 2, 4)  # 2 x 2^3 = 16 cells on 8 pixels


@pytest.mark.parametrize("prediction", ld.PREDICTIONS)
def test_the_target_read_back_as_eps_is_the_noise(prediction):
  """A network that outputs its target exactly gives back ε, for ε- and v-prediction alike."""
  s = dp.make_schedule("cosine", 1000)
  rng = np.random.default_rng(0)
  z0, noise = (jnp.asarray(rng.normal(size=(5, 4, 4, 2)), jnp.float32) for _ in range(2))
  t = jnp.array([1, 10, 300, 700, 1000])
  z_t = dp.q_sample(s, z0, t, noise)
  target = ld.diffusion_target(s, z0, t, noise, prediction)
  np.testing.assert_allclose(ld.eps_from_output(s, z_t, t, target, prediction), noise, atol=2e-4)
  if prediction == "v":
    assert float(jnp.abs(target - noise).max()) > 0.1


def test_residual_maps_average_over_t_and_draws_and_combine_pixel_and_latent():
  x = jnp.zeros((2, 8, 8))
  x_hat = jnp.stack([jnp.full((3, 2, 8, 8), 0.2), jnp.full((3, 2, 8, 8), 0.4)])  # 2 t*, 3 draws
  z, z_hat = jnp.zeros((2, 2, 2, 4)), jnp.full((2, 3, 2, 2, 2, 4), 0.5)
  np.testing.assert_allclose(ld.residual_maps(x, x_hat, z, z_hat, "pixel"), 0.3, atol=1e-6)
  np.testing.assert_allclose(ld.residual_maps(x, x_hat, z, z_hat, "latent"), 0.5, atol=1e-6)
  np.testing.assert_allclose(ld.residual_maps(x, x_hat, z, z_hat, "both"), np.sqrt(0.15), atol=1e-6)


def test_ema_decay_warms_up_to_its_value():
  assert float(ld.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
  assert float(ld.ema_decay_at(10 ** 6, 0.999)) == pytest.approx(0.999)


@pytest.mark.parametrize("field,value,match", [
    ("diffusion.schedule", "quadratic", "config.diffusion.schedule"),
    ("diffusion.prediction", "x0", "config.diffusion.prediction"),
    ("diffusion.noise", "simplex", "config.diffusion.noise"),
    ("diffusion.perlin_octaves", 5, "config.diffusion.perlin_res"),
    ("score.t_stars", (0,), "config.score.t_stars"),
    ("score.t_stars", (1001,), "config.score.t_stars"),
    ("score.t_stars", (), "config.score.t_stars"),
    ("score.reverse_steps", 0, "config.score.reverse_steps"),
    ("score.residual", "ssim", "config.score.residual"),
    ("score.image_score", "median", "config.score.image_score"),
    ("train.ema_decay", 1.0, "config.train.ema_decay"),
    ("model.patch_size", 3, "config.model.patch_size"),
    ("augment.hflip_p", 2.0, "config.augment.hflip_p"),
    ("data.image_size", 60, "downscale factor"),
])
def test_validate_names_each_bad_field(field, value, match):
  c = latent_diffusion_config("dataset=phantom,tiny,noise=perlin")  # perlin: its lattice is checked too
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    ld.validate(c)


def test_config_arguments():
  c = latent_diffusion_config("dataset=busi,tiny,t_star=100;400,steps=25,draws=3,noise=perlin,residual=both,prediction=v")
  assert c.score.t_stars == (100, 400) and c.score.reverse_steps == 25 and c.score.draws == 3
  assert (c.diffusion.noise, c.score.residual, c.diffusion.prediction) == ("perlin", "both", "v")
  assert c.data.root.endswith("busi") and not c.data.phantom and c.data.image_size == 64
  assert latent_diffusion_config("dataset=oct_phantom").data.phantom_kind == "oct"
  with pytest.raises(ValueError, match="t_star='1;a'"):
    latent_diffusion_config("dataset=phantom,t_star=1;a")
  with pytest.raises(ValueError, match="dataset='mnist'"):
    latent_diffusion_config("dataset=mnist")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, shared_dir):
  """A chest-phantom dataset (16 normal training images) read at 32 px and the tiny config with the real TAEF2."""
  root = tmp_path_factory.mktemp("ld")
  data = phantom.make_phantom_dataset(str(root / "data"), n_train=16, n_test_normal=2, n_test_abnormal=2, size=64,
                                      seed=0)
  c = latent_diffusion_config(f"dataset=phantom,tiny,vae_path={shared_dir / 'weights' / 'taef2'}")
  c.data.phantom, c.data.root, c.data.image_size = False, data, 32
  c.train.batch_size, c.train.warmup_steps, c.train.lr = 8, 0, 3e-3
  c.score.t_stars, c.score.reverse_steps, c.score.draws = (100, 300), 4, 2
  return c, datasets.load_dataset(data), root


@pytest.mark.slow  # 60 steps: ~20 s
def test_the_loss_falls_on_a_fixed_batch(small_run):
  config, dataset, root = small_run
  mesh = parallel.make_mesh(jax.devices()[:1])
  trainable = ld.build(config, dataset, str(root / "w_fixed"), mesh)
  batch = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(0).items()}
  state, losses = trainable.state, []
  for _ in range(60):
    state, m = trainable.train_step(state, batch)
    assert bool(m["finite"])
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  print(f"loss, mean of the first 10 steps {first:.3f}, of the last 10 {last:.3f}")
  assert first > 0.6 and last < 0.75 * first  # the untrained net predicts 0 (loss E[ε²] = 1); measured 0.81 -> 0.47


def test_scorer_and_reconstructor_return_maps_scores_and_pseudo_healthy_images(small_run):
  config, dataset, root = small_run
  mesh = parallel.make_mesh(jax.devices()[:1])
  trainable = ld.build(config, dataset, str(root / "w_score"), mesh)
  images = jnp.asarray(trainable.calibration_images[:4])
  maps, scores = trainable.scorer(trainable.state)(images)
  recon = trainable.reconstructor(trainable.state)(images)
  assert maps.shape == (4, 32, 32) and scores.shape == (4,) and recon.shape == (4, 32, 32)
  assert np.isfinite(np.asarray(maps)).all() and float(recon.min()) >= 0 and float(recon.max()) <= 1
  # The score is a function of the image alone: the same image scores the same in any batch position.
  maps2, scores2 = trainable.scorer(trainable.state)(images[::-1])
  np.testing.assert_allclose(np.asarray(scores2)[::-1], scores, rtol=1e-5, atol=1e-6)
  norm = trainable.state["latent_norm"]
  assert norm["mean"].shape == (32,) and float(norm["std"].min()) > 0
