"""Properties of the latent-space anomaly synthesis (masks, shuffles, DoD identity, two-stage mask, jit/shard_map),
and latent tasks drawn from the one task table of the entry point `mix.build_synthesis` with a VAE codec."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mediclip_jax.synthesis import latent as LT
from mediclip_jax.synthesis import mix


def _cfg(**kw):
  c = LT.default_config()
  c.patch_sizes = (1, 2, 4)
  c.patch_probs = (0.4, 0.3, 0.3)
  for k, v in kw.items():
    c[k] = v
  return c


def test_schedule_matches_reference_table_and_dod_identity():
  s = LT.cosine_schedule(10)
  np.testing.assert_allclose(s["alpha_bar"][[0, 4, 8]], [0.9721, 0.4938, 0.0241], atol=1e-4)
  np.testing.assert_allclose(s["c"][[0, 5, 9]], [0.0841, 0.5126, 0.9951], atol=1e-4)
  rng = np.random.default_rng(0)
  z0, n = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  for t in range(10):
    eta = LT.direction_of_deviation(z0, n, s["c"][t])
    lhs = z0 + s["sqrt_one_minus"][t] * eta
    rhs = s["sqrt_alpha_bar"][t] * z0 + s["sqrt_one_minus"][t] * n
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)
    # With λ = 1 and the whole grid corrupted, the task is DeCo-Diff's x_t.
    np.testing.assert_allclose(LT.corrupt(z0, jnp.zeros((8, 8, 1)), n, t, 1.0, s), rhs, atol=1e-5)


@pytest.mark.parametrize("patch,ratio", [(1, 0.0), (1, 0.35), (2, 0.7), (4, 0.5)])
def test_region_mask_keeps_exact_cell_count(patch, ratio):
  m = np.asarray(LT.region_mask(jax.random.key(3), 8, patch, ratio))
  g = (8 // patch) ** 2
  assert m.shape == (8, 8, 1) and set(np.unique(m)) <= {0.0, 1.0}
  assert m.sum() == np.floor(g * (1 - ratio)) * patch * patch
  cells = m[::patch, ::patch, 0]
  np.testing.assert_array_equal(np.repeat(np.repeat(cells, patch, 0), patch, 1), m[..., 0])  # P×P blocks


def test_latent_unchanged_where_kept_and_changed_in_region():
  cfg = _cfg()
  rng = np.random.default_rng(1)
  z0 = jnp.asarray(rng.normal(size=(8, 8, 4)), jnp.float32)
  pool = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
  f = jax.jit(lambda k, task: LT.synthesize_one(k, z0, pool, task, cfg))
  seen = 0
  for i in range(12):
    for task in (LT.TASK_DEVIATION, LT.TASK_SHUFFLE):
      za, region = (np.asarray(a) for a in f(jax.random.key(i), task))
      keep = region == 0
      np.testing.assert_array_equal(za[keep], np.asarray(z0)[keep])  # exactly untouched inside M = 1
      assert region.mean() <= 0.7 + 1 / 4 + 1e-6  # ⌊G(1−r)⌋ kept: at most r_max + 1/G, G ≥ 4 here
      if region.any():
        seen += 1
        assert np.abs(za - np.asarray(z0))[region > 0].max() > 0
  assert seen > 10
  za, region = f(jax.random.key(0), LT.TASK_IDENTITY)
  np.testing.assert_array_equal(np.asarray(za), np.asarray(z0))
  assert not np.asarray(region).any()


def _patch_rows(z, patch):
  p = np.asarray(LT.to_patches(jnp.asarray(z), patch))
  rows = p.reshape(-1, patch * patch * z.shape[-1])
  return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_shuffles_are_patch_permutations(patch):
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(LT.from_patches(LT.to_patches(jnp.asarray(z), patch), 8)), z)
  # Batch-pooled shuffle: the multiset of all N·G patches is preserved.
  sb = np.asarray(LT.shuffle_batch(jax.random.key(0), jnp.asarray(z), patch))
  np.testing.assert_array_equal(_patch_rows(sb, patch), _patch_rows(z, patch))
  if patch == 1:
    assert not np.array_equal(sb, z)
  # Pool of one latent: a permutation of that latent's own patches.
  s1 = np.asarray(LT.shuffle_from_pool(jax.random.key(1), jnp.asarray(z[:1]), patch))
  np.testing.assert_array_equal(_patch_rows(s1[None], patch), _patch_rows(z[:1], patch))
  # Larger pool: G distinct pool patches (drawn without replacement).
  s3 = np.asarray(LT.shuffle_from_pool(jax.random.key(2), jnp.asarray(z), patch))
  pool_rows = {r.tobytes() for r in _patch_rows(z, patch)}
  out_rows = _patch_rows(s3[None], patch)
  assert all(r.tobytes() in pool_rows for r in out_rows)
  assert len({r.tobytes() for r in out_rows}) == len(out_rows)


def test_patch_sizes_must_divide_latent_size():
  cfg = LT.default_config()
  cfg.patch_sizes = (1, 2, 4, 8, 14)
  with pytest.raises(ValueError, match=r"latent\.patch_sizes: \[8\] do not divide the latent size 28"):
    LT.validate_config(cfg, 28)
  cfg.patch_sizes = (1, 2, 4, 7, 14)
  LT.validate_config(cfg, 28)
  assert LT.patch_size_choices(28) == (1, 2, 4, 7, 14)
  cfg.patch_probs = (1.0,)
  with pytest.raises(ValueError, match=r"latent\.patch_probs"):
    LT.validate_config(cfg, 28)


class _LinearVae:
  """A cheap stand-in VAE (8×8 average pooling into 4 channels, nearest upsampling back): the synthesis
  is VAE-agnostic, and a real conv VAE only adds compile time here (tests/test_vae.py covers those)."""

  def __init__(self):
    self.w = jnp.asarray([0.5, 1.0, -1.0, 2.0], jnp.float32)

  def encode(self, images):
    b, h, w = images.shape
    pooled = images.reshape(b, h // 8, 8, w // 8, 8).mean((2, 4))
    return pooled[..., None] * self.w + 0.1 * jnp.sin(7.0 * pooled)[..., None]

  def decode(self, z):
    x = jnp.clip(jnp.tensordot(z, self.w, axes=1) / jnp.sum(self.w * self.w), 0.0, 1.0)
    return jnp.repeat(jnp.repeat(x, 8, axis=1), 8, axis=2)


@pytest.fixture(scope="module")
def tiny_vae():
  return _LinearVae()


def _synth_fn(vae, cfg):
  def run(state, keys, images, support, tasks):
    del state
    return LT.latent_synthesize(keys, images, support, (vae.encode, vae.decode), cfg, tasks=tasks)
  return jnp.zeros(()), run


def test_latent_synthesize_jit_split_independent_and_shard_map(tiny_vae):
  """Jitted per device under jax.shard_map (one CPU device here) with replicated VAE and support latents,
  as the train step runs it; a sample depends only on its own key, image and task."""
  cfg = _cfg()
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(size=(4, 32, 32)), jnp.float32)
  support = tiny_vae.encode(jnp.asarray(rng.uniform(size=(3, 32, 32)), jnp.float32))
  keys = jax.random.split(jax.random.key(5), 4)
  tasks = jnp.asarray([LT.TASK_DEVIATION, LT.TASK_SHUFFLE, LT.TASK_IDENTITY, LT.TASK_DEVIATION])
  state, run = _synth_fn(tiny_vae, cfg)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  jrun = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data"), P("data"), P(), P("data")),
                               out_specs=P("data")))
  out = jrun(state, keys, images, support, tasks)
  assert {k: v.shape for k, v in out.items()} == {"image": (4, 32, 32), "mask": (4, 32, 32),
                                                   "recon": (4, 32, 32), "task": (4,)}
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  # Identity: image is the VAE round trip, the two-stage mask is empty.
  np.testing.assert_array_equal(np.asarray(out["image"][2]), np.asarray(out["recon"][2]))
  assert not np.asarray(out["mask"][2]).any()
  # A sample depends only on its own key, image and task (support pool: no cross-batch op), so the
  # device split cannot matter: other batch members replaced, samples 0-1 are unchanged.
  other = jnp.concatenate([images[:2], 1.0 - images[2:]])
  out2 = jrun(state, keys, other, support, tasks[jnp.asarray([0, 1, 0, 1])])
  for k in ("image", "mask", "recon"):
    np.testing.assert_allclose(np.asarray(out2[k][:2]), np.asarray(out[k][:2]), atol=1e-6)
  assert not np.allclose(np.asarray(out2["recon"][2:]), np.asarray(out["recon"][2:]))


def test_two_stage_mask_inside_region_and_options(tiny_vae):
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.uniform(size=(6, 32, 32)), jnp.float32)
  support = tiny_vae.encode(images[:3])
  keys = jax.random.split(jax.random.key(7), 6)
  # One compiled program for the options: batch pool (DeCo-Diff), no round trip of normals, raw latents.
  state, run = _synth_fn(tiny_vae, _cfg(pool="batch", severity=(2.0, 3.0), roundtrip_normals=False,
                                        standardise=False, two_stage_threshold=0.0))
  run = jax.jit(run)
  # Identity samples without round trip: the original image comes back, still no mask.
  out = run(state, keys, images, support, jnp.full((6,), LT.TASK_IDENTITY))
  np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(images))
  assert not np.asarray(out["mask"]).any()
  # Anomalies from the batch pool: masks are binary and not all empty; the given tasks come back.
  tasks = jnp.asarray([LT.TASK_DEVIATION, LT.TASK_SHUFFLE] * 3)
  out = run(state, keys, images, support, tasks)
  m = np.asarray(out["mask"])
  assert set(np.unique(m)) <= {0.0, 1.0} and m.any()
  np.testing.assert_array_equal(np.asarray(out["task"]), np.asarray(tasks))
  # Directly: the mask is empty outside the region even where the images differ.
  x = jnp.ones((1, 16, 16))
  region = jnp.zeros((1, 4, 4)).at[0, 1, 2].set(1.0)
  mk = np.asarray(LT.two_stage_mask(x, jnp.zeros_like(x), region, 0.5))
  assert mk.sum() == 16 and mk[0, 4:8, 8:12].all()


def test_latent_stats_standardise_support():
  rng = np.random.default_rng(8)
  z = jnp.asarray(rng.normal(size=(5, 4, 4, 3)) * [0.3, 1.0, 2.0] + [0.1, -1.0, 0.5], jnp.float32)
  mean, std = LT.latent_stats(z)
  zs = (z - mean) / std
  np.testing.assert_allclose(np.asarray(zs.mean((0, 1, 2))), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(zs.std((0, 1, 2))), 1, atol=1e-4)


def _codec(vae: _LinearVae) -> mix.Codec:
  """The stand-in VAE as the codec the entry point takes (its state unused)."""
  return mix.Codec(jnp.zeros(()), lambda state, x: vae.encode(x), lambda state, z: vae.decode(z))


@pytest.mark.slow
def test_entry_point_draws_latent_tasks_from_the_task_table(tiny_vae):
  """With latent tasks in the table, `build_synthesis` needs a codec, pools the support latents and their
  statistics, draws every task with its probability, replaces latent samples by decoded anomalies (two-stage
  masks), identity samples by the VAE round trip, and keeps a sample's result independent of the batch."""
  cfg = mix.default_config()
  probs = {"cutpaste": 0.1, "identity": 0.3, "latent_deviation": 0.35, "latent_shuffle": 0.25}
  for t in mix.TASKS:
    cfg.probs[t] = probs.get(t, 0.0)
  cfg.latent.patch_sizes, cfg.latent.patch_probs = (1, 2), (0.5, 0.5)
  with pytest.raises(ValueError, match="no VAE was given"):
    mix.build_synthesis(cfg)
  synthesize, make_pools = mix.build_synthesis(cfg, _codec(tiny_vae))
  rng = np.random.default_rng(9)
  support = rng.uniform(size=(4, 32, 32)).astype(np.float32)
  pools = make_pools(support)
  assert set(pools) == {"support", "vae", "support_latents", "latent_mean", "latent_std"}
  np.testing.assert_allclose(np.asarray(pools["support_latents"]), np.asarray(tiny_vae.encode(jnp.asarray(support))))
  n = 1024
  images = support[np.arange(n) % 4] * rng.uniform(0.5, 1.0, (n, 1, 1)).astype(np.float32)
  index = np.arange(n, dtype=np.int32)
  fn = jax.jit(synthesize)
  out = jax.device_get(fn(jax.random.key(2), 5, jnp.asarray(images), jnp.asarray(index), pools))
  task = out["task"]
  freq = np.bincount(task, minlength=len(mix.TASKS)) / n
  np.testing.assert_allclose(freq, [probs.get(t, 0.0) for t in mix.TASKS], atol=0.05)
  recon = np.asarray(tiny_vae.decode(tiny_vae.encode(jnp.asarray(images))))
  ident = task == mix.TASKS.index("identity")
  np.testing.assert_allclose(out["image"][ident], recon[ident], atol=1e-6)  # roundtrip_normals
  assert not out["mask"][ident].any()
  lat = task >= len(mix.PIXEL_TASKS)
  mask = out["mask"]
  assert set(np.unique(mask)) <= {0.0, 1.0}
  # Regions keep ⌊G·(1 − r)⌋ of G cells, so small r on coarse patches corrupts nothing: some masks are empty.
  assert np.mean(mask[lat].reshape(int(lat.sum()), -1).max(1) > 0) > 0.4
  # Two-stage: inside the mask the anomaly departs from the round trip by more than the threshold.
  assert np.all(np.abs(out["image"] - recon)[lat][mask[lat] > 0] > cfg.latent.two_stage_threshold)
  paste = task == mix.TASKS.index("cutpaste")
  np.testing.assert_array_equal(out["image"][paste][mask[paste] == 0], images[paste][mask[paste] == 0])
  perm = rng.permutation(n)
  again = jax.device_get(fn(jax.random.key(2), 5, jnp.asarray(images[perm]), jnp.asarray(index[perm]), pools))
  for k in ("image", "mask", "task"):
    np.testing.assert_allclose(again[k], out[k][perm], atol=1e-6)
